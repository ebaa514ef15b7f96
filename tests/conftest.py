"""Shared test setup: single-threaded torch (CI has 2 cores), offline hubs, tiny fixtures."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch
from hypothesis import settings

# One thread by default (CI has 2 cores and some tests start subprocesses); set
# COMPRESSOR_TEST_THREADS=2 to check that trained figures hold with another thread count.
torch.set_num_threads(int(os.environ.get("COMPRESSOR_TEST_THREADS", "1")))


def train_config(adaptive_epochs: int = 3, fixed_epochs: int = 0, **keys):
    """The recipe's ``train`` section for a Trainer, with the defaults these tests were written
    for (Adam 1e-3, no clipping, β = 0) instead of the recipe's RobustDLRT ones."""
    from compressor.recipe import TrainSection

    keys = {"optimizer": "adam", "lr": 1e-3, "grad_clip": None, "beta": 0.0, **keys}
    return TrainSection(epochs=adaptive_epochs, finetune_epochs=fixed_epochs, **keys)


# Property tests draw the same examples on every run (CI must not pass or fail by luck); a
# local search for new counterexamples: HYPOTHESIS_PROFILE=explore pytest ...
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def run_command(argv: list[str]) -> tuple[int, str, str]:
    """``compress <argv>`` in this process (``compressor.cli.main``): its exit code, stdout and
    stderr. The command's imports are then paid once for the whole suite, not once per run; the
    tests about the process itself (exit codes of a real process, a kill and --resume, torchrun,
    the allocator's environment) still start one."""
    from compressor.cli import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:  # main() configures the root logger for a process: a fixture may run outside _restore_logging
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)
    return code, out.getvalue(), err.getvalue()


BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, argv: list[str]) -> int:
    """``python bench/<script> <argv>`` as its ``main(argv)`` in this process: the exit status
    (a ``SystemExit``'s too, its message on stderr). The scripts' imports and the ONNX exporter's
    start-up are paid once per suite, not once per run; the torch thread count and the log
    levels a script sets are put back afterwards."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # where the scripts find harness/ and each other
    stem = Path(script).stem
    module = importlib.import_module(stem)
    threads = torch.get_num_threads()
    loggers = [logging.getLogger(name) for name in (stem, "compressor")]
    levels = [logger.level for logger in loggers]
    try:
        return int(module.main(argv) or 0)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_logging():
    """compressor.cli.main() configures the root logger for a process; give the next test pytest's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)

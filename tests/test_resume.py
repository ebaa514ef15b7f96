"""Interrupted runs resume to the same result; NaN/Inf steps are skipped, counted and reported.

The kill test runs the real command in subprocesses: an uninterrupted run, and a run killed with
SIGKILL at a random point after its first checkpoint, then continued with ``--resume``. On the
CPU with a fixed seed and thread count both must end with the same ranks, the same clean and
adversarial accuracies and bit-identical model.safetensors tensors. The random kill point is
printed; ``COMPRESSOR_KILL_SEED=N`` replays one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from compressor.cli import main
from compressor.layers import low_rank_layers

ROOT = Path(__file__).resolve().parents[1]


# a few seconds of work: a 100k-parameter timm test net on 64 digits, 16 px; every stage
# (dense baseline, its evaluation, factorize, 3 + 1 RobustDLRT epochs, evaluation, export) runs
RECIPE = {
    "run_name": "resume",
    "seed": 3,
    "model": {"name": "timm:test_efficientnet", "input_size": 16},
    "data": {"name": "digits", "train_subset": 64, "val_subset": 32, "batch_size": 16, "eval_batch_size": 32},
    "baseline": {"epochs": 2, "lr": 1e-3},
    "factorize": {"init_rank": 8, "r_min": 2, "r_max": 16},
    "train": {"epochs": 3, "finetune_epochs": 1, "lr": 1e-3, "coefficient_steps": 2, "tau": 0.2, "device": "cpu"},
    "evaluate": {
        "max_samples": 16,
        "attacks": [{"name": "fgsm", "eps": [0.03]}, {"name": "pgd", "eps": [0.03], "options": {"steps": 2}}],
    },
    "export": {"onnx": False, "latency": False},
}
CHECKPOINTS = ("baseline.ckpt", "dense_stage.ckpt", "train.ckpt")
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "MPLBACKEND": "Agg",
    "PYTHONHASHSEED": "0",
}


def _command(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "compressor.cli",
        "--recipe",
        str(recipe),
        "--output-dir",
        str(out),
        "--quiet",
        *extra,
    ]


def _outcome(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text())
    return {
        "ranks": {n: l["ranks"] for n, l in report["compressed"]["layers"].items()},
        "params": report["compressed"]["params"],
        **{
            f"{side}.{key}": report[side][key]
            for side in ("dense", "compressed")
            for key in ("clean_accuracy", "adversarial_accuracy", "worst_case_accuracy", "nonfinite_steps")
        },
        "val_accuracy_per_epoch": [e["val_accuracy"] for e in report["history"]["epochs"]],
        "baseline_val_accuracy": [e["val_accuracy"] for e in report["dense"]["baseline_history"]["epochs"]],
    }


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _kill_when(proc: subprocess.Popen, ready, delay: float, what: str) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds."""
    deadline = time.monotonic() + 240
    while not ready():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after 240 s"
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, f"the run finished before it could be killed ({what})"


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """Killed twice: in the dense part (baseline epochs, dense evaluation, its save), then, after
    a --resume, in RobustDLRT; the second --resume skips the finished dense stage, continues
    from the last RobustDLRT checkpoint and ends where an uninterrupted run ends."""
    from safetensors.torch import load_file

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    seed = int(os.environ.get("COMPRESSOR_KILL_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    first, delays = rng.choice(CHECKPOINTS[:2]), (rng.uniform(0.0, 0.25), rng.uniform(0.0, 0.25))
    print(
        f"kill seed {seed}: SIGKILL {delays[0]:.3f} s after {first} appears, then {delays[1]:.3f} s after "
        f"the resumed run writes train.ckpt"
    )
    run_dir = tmp_path / "run"
    staging = run_dir / ".resume.partial"

    # the uninterrupted reference runs alongside the one that gets killed
    ref = subprocess.Popen(
        _command(recipe, tmp_path / "ref"), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    quiet = dict(cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(subprocess.Popen(_command(recipe, run_dir), **quiet), (staging / first).is_file, delays[0], first)
    assert not (run_dir / "resume").exists()
    assert (staging / "recipe.yaml").is_file() and any((staging / c).is_file() for c in CHECKPOINTS)

    # starting over by accident is refused: the interrupted run is not discarded without --force
    code = main(["--recipe", str(recipe), "--output-dir", str(run_dir), "--quiet"])
    assert code == 2 and staging.is_dir()

    before = _mtime(staging / "train.ckpt")
    _kill_when(
        subprocess.Popen(_command(recipe, run_dir, "--resume"), **quiet),
        lambda: _mtime(staging / "train.ckpt") not in (None, before),
        delays[1],
        "a new train.ckpt",
    )

    command = [c for c in _command(recipe, run_dir, "--resume") if c != "--quiet"]  # the log says what resumed
    resumed = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "dense baseline and its evaluation restored from" in resumed.stderr, resumed.stderr[-3000:]
    assert "RobustDLRT: resumed from" in resumed.stderr, resumed.stderr[-3000:]
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]

    a, b = tmp_path / "ref" / "resume", run_dir / "resume"
    assert _outcome(b) == _outcome(a)
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])][:5]
    # nothing left over: staging renamed away, checkpoints and half-written temporary files gone
    assert sorted(p.name for p in run_dir.iterdir()) == ["resume"]
    assert not [p.name for p in b.iterdir() if p.name.startswith(".") or p.suffix in (".ckpt", ".tmp")]

    # a finished run has nothing to resume
    code = main(["--recipe", str(recipe), "--output-dir", str(run_dir), "--quiet", "--resume"])
    assert code == 2


# ----------------------------------------------------------------------------- non-finite steps


def _nan_on_calls(*calls: int):
    """cross_entropy that returns NaN on the given (1-based) calls: a loss blowing up mid-training."""
    count = {"n": 0}

    def loss_fn(logits, y):
        count["n"] += 1
        loss = nn.functional.cross_entropy(logits, y)
        return loss * float("nan") if count["n"] in calls else loss

    return loss_fn, count


def _loader(n: int = 48, batch: int = 8, nan_batch: int | None = None):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0.5).long() + 2 * (x[:, 1].mean((1, 2)) > 0.5).long()
    if nan_batch is not None:
        x[nan_batch * batch] = float("nan")  # one poisoned image: NaN forward, NaN BatchNorm statistics
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 48),
        nn.ReLU(),
        nn.Linear(48, 4),
    )


@pytest.mark.parametrize("poison", ["loss", "input"])
def test_nonfinite_steps_are_skipped_and_leave_the_model_finite(poison: str, caplog) -> None:
    from conftest import train_config

    from compressor.factorize import factorize_
    from compressor.train import Trainer

    caplog.set_level(logging.WARNING, logger="compressor.train.dlrt")
    model = _net()
    factorize_(model, init_rank=4, r_min=2, r_max=16, keep_first_conv=False, keep_classifier=True)
    layers = low_rank_layers(model)
    assert layers
    cfg = train_config(adaptive_epochs=2, fixed_epochs=1, lr=1e-2, beta=0.1, coefficient_steps=3)
    if poison == "loss":  # steps 1 (an augmentation step) and 5 of 18
        loss_fn, count = _nan_on_calls(1, 5)
        trainer = Trainer(model, _loader(), cfg, loss_fn=loss_fn, set_epoch=lambda loader, epoch: None)
        expected = 2
    else:  # batch 1 of every epoch holds a NaN image
        trainer = Trainer(model, _loader(nan_batch=1), cfg, set_epoch=lambda loader, epoch: None)
        expected = 3
    history = trainer.fit()

    assert history.nonfinite_steps == expected
    assert history.epochs[-1]["nonfinite_steps_total"] == expected
    assert sum("non-finite" in r.getMessage() for r in caplog.records) == expected
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()), (
        "a skipped step left NaN/Inf in the model (factors or BatchNorm statistics)"
    )
    for layer in layers.values():  # the bases are still orthonormal
        for basis in layer.bases():
            eye = torch.eye(basis.shape[1])
            assert torch.allclose(basis.T @ basis, eye, atol=1e-4)
    assert all(e["train_loss"] == e["train_loss"] for e in history.epochs)  # tallies skip the NaN steps
    model.eval()
    assert torch.isfinite(model(torch.rand(2, 3, 8, 8))).all()


def test_report_counts_nonfinite_steps(tmp_path: Path, monkeypatch) -> None:
    """Through the pipeline: a NaN loss in the dense baseline and one in RobustDLRT are survived,
    and report.json says how many steps each skipped."""
    import compressor.train.dlrt as dlrt
    from compressor.pipeline import run
    from compressor.recipe import recipe_from_dict

    loss_fn, count = _nan_on_calls(2, 8)  # baseline: 4 steps (calls 1-4); RobustDLRT: calls 5-20
    monkeypatch.setattr(dlrt, "F", SimpleNamespace(cross_entropy=loss_fn))
    recipe = recipe_from_dict(
        {
            **RECIPE,
            "output_dir": str(tmp_path),
            "baseline": {"epochs": 1, "lr": 1e-3},
            "evaluate": {"max_samples": 8, "attacks": [{"name": "fgsm", "eps": [0.03]}]},
            "export": {"onnx": False, "latency": False, "safetensors": False},
        }
    )
    result = run(recipe)
    assert count["n"] == 4 + 4 * 4
    report = json.loads((result.folder / "report.json").read_text())
    assert report["dense"]["nonfinite_steps"] == 1
    assert report["compressed"]["nonfinite_steps"] == 1 == report["history"]["nonfinite_steps"]
    assert "skipped (NaN/Inf)" in (result.folder / "report.md").read_text()
    assert report["compressed"]["clean_accuracy"] is not None


# ----------------------------------------------------------------------------- background checkpoint writes


def test_checkpoint_writer_writes_the_state_at_submit_in_order(tmp_path: Path) -> None:
    from compressor.train.checkpoint import CheckpointWriter, load_checkpoint

    writer = CheckpointWriter()
    weights = torch.arange(1_000_000, dtype=torch.float32)
    writer.submit(tmp_path / "a.ckpt", {"w": weights, "meta": {"epoch": 1, "lrs": [0.1]}})
    weights.add_(1.0)  # the next training steps change the live tensor ...
    writer.wait()
    saved = load_checkpoint(tmp_path / "a.ckpt")
    assert torch.equal(saved["w"], torch.arange(1_000_000, dtype=torch.float32))  # ... not the file
    assert saved["meta"] == {"epoch": 1, "lrs": [0.1]}
    writer.submit(tmp_path / "a.ckpt", {"w": weights, "meta": {"epoch": 2}})
    writer.submit(tmp_path / "b.ckpt", {"w": weights[:3]})  # waits for the first
    writer.wait()
    assert load_checkpoint(tmp_path / "a.ckpt")["meta"] == {"epoch": 2}
    assert torch.equal(load_checkpoint(tmp_path / "b.ckpt")["w"], weights[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "b.ckpt"]  # no temporary files left


def test_checkpoint_writer_raises_a_failed_write(tmp_path: Path) -> None:
    from compressor.train.checkpoint import CheckpointWriter

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    writer = CheckpointWriter()
    writer.submit(blocker / "x.ckpt", {"w": torch.zeros(3)})  # its folder cannot be made
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # raised once
    writer.submit(blocker / "x.ckpt", {"w": torch.zeros(3)})
    with pytest.raises(OSError):
        writer.submit(tmp_path / "y.ckpt", {"w": torch.zeros(3)})  # the next submit reports it
    writer.wait()

"""A bench run: its options, logging, threads and device, its record, and where its results go."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import page
from .lib import Recipe, dumps, recipe_from_dict, write_text

RESULTS = Path(__file__).resolve().parents[1] / "results"


def exit_with_parent(poll: float = 1.0) -> None:
    """End this process soon after the one that started it ends, however that ended.

    A worker of ``--jobs`` runs a model for hours; if its parent is killed (``kill``, a scheduler's
    time limit) it would go on training into the shared checkpoint, and a rerun would time its
    graphs beside it on cores it does not know are taken. Entries are written whole, under a lock,
    so leaving between two of them or within one loses at most the entry in progress."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:  # an orphan is re-parented to init or a subreaper
            time.sleep(poll)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def parser(doc: str, *, raw: bool = False) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first line as description (``raw``: the whole docstring)."""
    if raw:
        return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    return argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=fmt)


def add_run_options(
    ap: argparse.ArgumentParser,
    section: str,
    *,
    smoke: str,
    threads: str | int | None = "auto",
    resumable: bool = False,
    out: bool = True,
) -> None:
    """--smoke (``smoke``: what it runs), --threads (torch threads: ``auto`` or a number as the default;
    None: the script has its own), --out (unless ``out`` is false), --benchmarks-md and, ``resumable``,
    --checkpoint-dir and --report-only."""
    ap.add_argument("--smoke", action="store_true", help=smoke)
    if threads == "auto":
        ap.add_argument("--threads", default="auto", help="torch threads; auto: 1 if the load ≥ the cores")
    elif threads is not None:
        ap.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    if out:
        ap.add_argument("--out", default=None, help=f"JSON (default bench/results/{section}[-smoke].json)")
    ap.add_argument("--benchmarks-md", default=None, help=f"page of the '{section}' section (--smoke: none)")
    if resumable:
        ap.add_argument("--checkpoint-dir", default=None, help="save finished entries here; a rerun skips them")
        ap.add_argument(
            "--report-only", action="store_true", help="render the table from --checkpoint-dir, run nothing"
        )


def options(ap: argparse.ArgumentParser, **defaults: Any) -> None:
    """``--name`` options from keyword defaults, ``name=default``, ``(default, help)`` or ``(default, help,
    kind)``: typed as the default (a list: one or more values of its items' type; None: a string) or by
    ``kind``: a type or a tuple of choices, in a list for one or more values."""
    for name, value in defaults.items():
        default, help_, kind = (*value, None)[:3] if isinstance(value, tuple) else (value, None, None)
        many = isinstance(default, list) or isinstance(kind, list)
        extra: dict[str, Any] = {"nargs": "+"} if many else {}
        kind = kind[0] if isinstance(kind, list) else kind
        if isinstance(kind, tuple):
            extra["choices"] = kind
        elif kind is not None or default is not None:
            extra["type"] = kind or type(default[0] if many else default)
        ap.add_argument(f"--{name.replace('_', '-')}", default=default, help=help_, **extra)


def check_run_options(ap: argparse.ArgumentParser, args: argparse.Namespace, section: str) -> None:
    """Refuse bad --threads or a --report-only without a folder; ``args.out`` (if an option) becomes
    the JSON's path."""
    threads = getattr(args, "threads", None)
    if isinstance(threads, str) and threads != "auto" and not (threads.isdigit() and int(threads) > 0):
        ap.error(f"--threads {threads!r}: give auto or a positive number")
    if isinstance(threads, int) and threads < 1:
        ap.error("--threads must be at least 1")
    if getattr(args, "report_only", False) and not args.checkpoint_dir:
        ap.error("--report-only reads --checkpoint-dir: give it")
    if hasattr(args, "out"):
        args.out = Path(args.out or RESULTS / f"{section}{'-smoke' if args.smoke else ''}.json")


def pick(ap: argparse.ArgumentParser, chosen: list[str] | None, known) -> list[str]:
    """``--models``: the ``chosen`` ones (default all ``known``) once each, in order; an unknown one is a
    usage error."""
    chosen = list(dict.fromkeys(chosen or known))
    if unknown := [m for m in chosen if m not in known]:
        ap.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    return chosen


def refuse(ap: argparse.ArgumentParser, *checks: tuple[bool, str]) -> None:
    """A usage error with the message of the first ``(bad, message)`` whose ``bad`` is true."""
    for bad, message in checks:
        if bad:
            ap.error(message)


def at_least(ap: argparse.ArgumentParser, args: argparse.Namespace, low: int, *keys: str) -> None:
    """A usage error for the first option in ``keys`` below ``low``."""
    for key in keys:
        if getattr(args, key) < low:
            ap.error(f"--{key.replace('_', '-')} must be at least {low}")


def recipe(args: argparse.Namespace, seed: int, *, source: str, **sections: dict[str, Any]) -> Recipe:
    """The recipe of one arm: the sections a sweep's options give (--model, --input-size, --data,
    --data-root, --train-subset, --val-subset, --batch-size, --dense-epochs, --dense-lr; training
    on the CPU without checkpoints), each updated by the keys of ``sections``."""
    doc: dict[str, Any] = {
        "seed": seed,
        "model": {"name": getattr(args, "model", None), "input_size": getattr(args, "input_size", None)},
        "data": dict(name=args.data, root=args.data_root, train_subset=args.train_subset, val_subset=args.val_subset)
        | {"batch_size": args.batch_size},
        "baseline": {"epochs": args.dense_epochs, "optimizer": "adam", "lr": getattr(args, "dense_lr", 1e-4)},
        "train": {"device": "cpu", "checkpoint_every": 0},
    }
    doc["baseline"]["checkpoint_every"] = 0
    for name, keys in sections.items():
        doc[name] = {**doc.get(name, {}), **keys}
    return recipe_from_dict(doc, source=source)


def resolve_threads(spec: str | int) -> int | None:
    """``--threads``: a number, or auto = 1 on a busy machine (spinning OpenMP threads slow every op
    down there), else None (torch's default)."""
    if isinstance(spec, int) or spec != "auto":
        return int(spec)
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        busy = False
    return 1 if busy else None


def parse_device(ap: argparse.ArgumentParser, spec: str) -> torch.device:
    """``--device``: cpu or cuda[:N] that this machine has, else a one-line usage error."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        ap.error(f"--device {spec!r} is not a device; use cpu or cuda[:N]")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        ap.error(f"--device {spec}: use cpu, or cuda on a machine with a CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        ap.error(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class Run:
    """One invocation of a script: its logging and thread count set, its clock started, and at the
    end its JSON written, its Markdown printed and its section of the page rewritten."""

    def __init__(
        self, file: str, args: argparse.Namespace, argv: list[str] | None, *, cpu=True, torch_threads=None
    ) -> None:
        """``torch_threads``: a fixed count (e.g. 1 where --threads is onnxruntime's); else --threads,
        whose ``auto`` applies to a CPU run only."""
        self.script, self.args = Path(file).name, args
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.start = time.perf_counter()
        md = getattr(args, "benchmarks_md", None)
        self.page = Path(md) if md else (None if args.smoke else page.DEFAULT_PATH)
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        for name in (Path(file).stem, "compressor"):
            logging.getLogger(name).setLevel(logging.INFO)
        spec = getattr(args, "threads", None)
        if torch_threads is None and spec is not None and (cpu or spec != "auto"):
            torch_threads = resolve_threads(spec)
        if torch_threads:
            torch.set_num_threads(torch_threads)

    @contextmanager
    def failing(self, *errors: type[Exception]) -> Iterator[None]:
        """``errors`` end the run as a usage error does: the message on stderr, exit status 2."""
        try:
            yield
        except errors as err:
            print(f"{self.script}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def smoke_check(self, missing: list) -> None:
        """A --smoke run fails when an entry is ``missing``."""
        if self.args.smoke and missing:
            raise SystemExit(f"smoke check failed: missing entries {missing}")

    def record(self, **extra: Any) -> dict[str, Any]:
        """The ``run`` block of a results document."""
        return {
            "argv": self.argv,
            "wall_seconds": time.perf_counter() - self.start,
            "torch_threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            **extra,
        }

    def document(self, what: str, entries: list[dict[str, Any]], *, skip=("out",), **extra: Any) -> dict[str, Any]:
        """A sweep's results: what it measures, this run, its settings (the options but ``skip``),
        the data sizes its entries saw, ``extra`` (``run`` or ``settings`` replace this run's) and
        the entries."""
        args = self.args
        first = lambda key, default: next((e[key] for e in entries if key in e), default)
        doc = {"what": what, "run": self.record(), "settings": {k: v for k, v in vars(args).items() if k not in skip}}
        doc.update(extra, n_train=first("n_train", args.train_subset), n_eval=first("n_eval", args.val_subset))
        return {**doc, "n_attacked": first("n_attacked", args.attack_samples), "entries": entries}

    def figure(self, png: Path | str | None) -> str | None:
        """The plot copied beside the page; its link there (None without a page or a plot)."""
        return page.publish_figure(png, self.page)

    def publish(
        self, section: str, doc: Any, md: str, *, measured: str, body: str | None = None, out: Path | None = None
    ) -> None:
        """Write ``doc`` to ``out`` (default --out), print ``md`` and put ``body`` (default ``md``) in
        ``section`` of the page, with ``measured`` (a sentence) and the command that reproduces it."""
        out = Path(out or self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, dumps(doc))
        print(md)
        page.update_section(section, body or md, script=self.script, argv=self.argv, measured=measured, path=self.page)
        print(f"\nwrote {out}", file=sys.stderr)

"""What the bench scripts share: their run options, logging, the torch thread count and the
device check, written once."""

from __future__ import annotations

import argparse
import logging
import os

import torch


def add_run_options(ap: argparse.ArgumentParser, section: str, *, resumable: bool = True) -> None:
    """--threads, --out, --benchmarks-md and, ``resumable``, --checkpoint-dir and --report-only."""
    ap.add_argument("--threads", default="auto", help="torch threads; auto: 1 if the load ≥ the cores")
    ap.add_argument("--out", default=None, help=f"JSON (default bench/results/{section}[-smoke].json)")
    ap.add_argument("--benchmarks-md", default=None, help=f"page of the '{section}' section (--smoke: none)")
    if resumable:
        ap.add_argument("--checkpoint-dir", default=None, help="save finished entries here; a rerun skips them")
        ap.add_argument(
            "--report-only", action="store_true", help="render the table from --checkpoint-dir, run nothing"
        )


def check_run_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) > 0):
        ap.error(f"--threads {args.threads!r}: give auto or a positive number")
    if getattr(args, "report_only", False) and not args.checkpoint_dir:
        ap.error("--report-only reads --checkpoint-dir: give it")


def resolve_threads(spec: str) -> int | None:
    """``--threads``: a number, or auto = 1 on a busy machine (spinning OpenMP threads slow every op
    down there), else None (torch's default)."""
    if spec != "auto":
        return int(spec)
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        busy = False
    return 1 if busy else None


def start_run(args: argparse.Namespace, logger: str, *, cpu: bool = True) -> None:
    """Progress of ``logger`` and compressor on stderr (other libraries' chatter stays off) and the
    torch thread count (``auto`` applies to a CPU run only)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in (logger, "compressor"):
        logging.getLogger(name).setLevel(logging.INFO)
    threads = resolve_threads(args.threads) if cpu or args.threads != "auto" else None
    if threads:
        torch.set_num_threads(threads)


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

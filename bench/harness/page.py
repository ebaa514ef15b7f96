"""Each bench script owns one section of BENCHMARKS.md and rewrites it after a run.

A section sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; everything
outside the markers (the page's introduction, notes written by hand) is left as it is. The
section ends with what a reader needs to trust a table: the machine, the date, the command
that reproduces it and what was measured. Writes are atomic (a half-written page is never left).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import torch

from .lib import atomic_path, write_text

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PATH = ROOT / "BENCHMARKS.md"

_INTRO = """# Benchmarks

Every figure on this page comes from a run of a script in `bench/` on the machine it names,
with the command that reproduces it. Each script rewrites its own section (between
`<!-- bench:NAME -->` markers) when it finishes; `--smoke` runs, which CI makes, write
nothing here. Speed is reported as ratios measured side by side in one run.
"""


def machine() -> dict[str, Any]:
    """CPU model, cores, threads and versions: what a table's seconds depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "torchvision"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


def load() -> str:
    """The 1, 5 and 15-minute load averages."""
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def machine_line() -> str:
    m = machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{m['cpu']}, {m['cores']} cores, {gpu}; torch {torch.__version__}, {m['torch_threads']} torch thread(s); "
        f"load average {load().replace(' / ', ', ')} at the end"
    )


def command_line(script: str, argv: list[str]) -> str:
    """The command that reproduces a table (``--report-only`` only re-renders it: dropped)."""
    return shlex.join(["python", f"bench/{script}", *(a for a in argv if a != "--report-only")])


def publish_figure(png: Path | str | None, page: Path | str | None) -> str | None:
    """Copy a plot (written beside the run's JSON, which git ignores) to ``docs/figures/`` beside
    ``page`` and return its link relative to the page; None without a plot or a page."""
    if png is None or page is None or not Path(png).is_file():
        return None
    dest = Path(page).resolve().parent / "docs" / "figures" / Path(png).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        shutil.copyfile(png, tmp)
    return os.path.relpath(dest, Path(page).resolve().parent)


def update_section(
    name: str, body: str, *, script: str, argv: list[str], measured: str, path: Path | str | None = DEFAULT_PATH
) -> Path | None:
    """Replace section ``name`` of ``path`` (created with the page intro if missing) by ``body``.

    ``measured`` says in a sentence what the table measures. ``path=None`` writes nothing.
    """
    if path is None:
        return None
    path = Path(path)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join(
        [
            f"<!-- bench:{name} -->",
            body.strip(),
            "",
            f"*Measured {stamp} on {machine_line()}. What: {measured} Reproduce: `{command_line(script, argv)}`.*",
            f"<!-- /bench:{name} -->",
        ]
    )
    text = path.read_text(encoding="utf-8") if path.is_file() else _INTRO
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_text(path, text)
    return path

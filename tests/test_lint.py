"""The whole tree follows one style: ruff's linter and formatter (configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff_passes_on_the_whole_tree(command):
    proc = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True)
    fix = "fix with: ruff check --fix . && ruff format ."
    assert proc.returncode == 0, f"ruff {' '.join(command)} ({fix})\n{proc.stdout[-3000:]}{proc.stderr[-1000:]}"

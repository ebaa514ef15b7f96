"""bench/gpu_check.py, the first GPU's one command, cannot rot between lendings: its --dry-run runs
the whole sequence on the CPU at smoke sizes and every step ends ok (the decision table's step is
skipped while its script is not built), a rerun skips what finished, the section reaches the page
and --render puts it into another; its budget arithmetic and comparisons hold on their own.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gc = load_script()


def dry_run(tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp / "out"), "--work", str(tmp / "work"), *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    doc = json.loads((tmp / "out" / "gpu_check.json").read_text())
    return r, doc


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, dict]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    r, doc = dry_run(tmp)
    return tmp, r, doc


@pytest.mark.slow
def test_dry_run_ends_every_step_ok(dry):
    tmp, r, doc = dry
    steps = doc["steps"]
    assert list(steps) == list(gc.STEPS), r.stdout[-3000:]
    for name, step in steps.items():
        if name == "decision" and not (ROOT / "bench" / "bench_decision.py").is_file():
            assert step["status"] == "skipped" and "not built" in step["reason"]
        elif name == "main_bf16" and not doc["device"]["bf16"]:
            assert step["status"] == "skipped" and "bf16" in step["reason"]
        else:
            assert step["status"] == "ok", (name, step.get("reason"), step.get("log_tail", "")[-2000:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert doc["dry_run"] and doc["device"]["name"] == "cpu"
    assert steps["tests"]["counts"]["passed"] > 0 and steps["tests"]["counts"]["failures"] == 0
    for precision in ("fp32",) + (("bf16",) if doc["device"]["bf16"] else ()):
        summary = steps[f"main_{precision}"]["summary"]
        assert summary["timings"] and all(v >= 0 for v in summary["timings"].values())
        assert 0 < summary["compressed"]["compression_rate"] < 100
        assert (tmp / "out" / f"report-{precision}.json").is_file()
    assert steps["torchrun"]["backend"] == "gloo" and steps["torchrun"]["compare"]["equal"]
    assert steps["regime"]["summary"]["rows"] and (tmp / "out" / "regime.json").is_file()
    # the files that come back from the device: at most 8, none in a subfolder
    assert sorted(p.name for p in (tmp / "out").iterdir()) == sorted(
        n for n in gc.OUT_FILES if n != "report-bf16.json" or doc["device"]["bf16"]
    )


@pytest.mark.slow
def test_rerun_skips_finished_steps_and_render_writes_the_section(dry, tmp_path):
    tmp, _, before = dry
    r, after = dry_run(tmp)
    assert r.returncode == 0, r.stdout[-3000:]
    for name in gc.STEPS:
        if before["steps"][name]["status"] == "ok":
            assert after["steps"][name]["seconds"] == before["steps"][name]["seconds"], name
    page = (tmp / "out" / "BENCHMARKS.md").read_text()
    assert after["section"] and after["section"] in page and "GPU check" in after["section"]
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\nkept\n\n<!-- bench:gpu -->\nold\n<!-- /bench:gpu -->\n\nafter\n")
    args = ["--render", str(tmp / "out" / "gpu_check.json"), "--benchmarks-md", str(target)]
    assert gc.main(args) == 0
    text = target.read_text()
    assert after["section"] in text and "old" not in text and "kept" in text and "after" in text


@pytest.mark.parametrize(
    "probe",
    [
        {"dense": 0.01, "dlrt": 0.04, "attack": 0.01, "attack_dense": 0.005},  # a fast card: epochs scale
        {"dense": 0.2, "dlrt": 0.9, "attack": 0.3, "attack_dense": 0.1},  # a slow one: images scale
    ],
)
@pytest.mark.parametrize("work", [60.0, 200.0, 3000.0])
def test_regime_sizes_fit_the_work(probe, work):
    args = type("A", (), {"dry_run": False})()
    s = gc.regime_sizes(args, probe, work)
    p = gc.PAPER
    batches = s["train_subset"] / p["batch"]
    cost = batches * (s["dense_epochs"] * probe["dense"] + p["arms"] * s["epochs"] * probe["dlrt"])
    cost += s["attack_samples"] * (p["arms"] * probe["attack"] + probe["attack_dense"])
    floor = 4 * p["batch"] / p["batch"] * (probe["dense"] + p["arms"] * probe["dlrt"]) + 64 * (
        p["arms"] * probe["attack"] + probe["attack_dense"]
    )
    assert cost <= max(work, floor) + 1e-9  # the smallest slice may exceed a tiny budget, nothing larger
    assert 1 <= s["epochs"] <= p["epochs"] and 1 <= s["dense_epochs"] <= p["dense_epochs"]
    assert 0 < s["train_subset"] <= p["n_train"] and s["train_subset"] % p["batch"] == 0


def test_max_rel_compares_nested_figures():
    assert gc.max_rel({"a": [1.0, 2.0], "b": 3}, {"a": [1.0, 2.0], "b": 3}) == 0.0
    assert gc.max_rel({"a": [1.0, 2.0]}, {"a": [1.0, 2.2]}) == pytest.approx(0.2 / 2.2)
    assert gc.max_rel([1.0], [1.0, 2.0]) == math.inf
    assert gc.max_rel("x", "y") == math.inf


def test_clock_keeps_the_floors_of_later_steps():
    clock = gc.Clock(100.0, {"a": 10, "b": 30, "c": 20})
    assert 49 < clock.allowance(["b", "c"]) <= 50
    assert 99 < clock.allowance([]) <= 100

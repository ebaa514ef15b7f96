"""bench/bench_decision.py's pure parts: the bisection to a measured latency, the decision table's
choice and the dominance check behind the issue's target."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_decision as bd  # noqa: E402

TOL = 0.05


def row(arm: str, clean: float, fgsm: float, fraction: float | None, failed: str | None = None) -> dict:
    return {"arm": arm, "clean": clean, "fgsm": fgsm, "fraction": fraction, "failed": failed}


@pytest.mark.parametrize("target", [0.8, 0.5, 0.25, 0.12])
def test_bisection_lands_within_tolerance_of_a_monotone_latency(target: float) -> None:
    calls = []

    def measure(ratio: float) -> float:  # a pruned network's latency: quadratic in the kept channels
        calls.append(ratio)
        return 0.05 + 0.95 * (1 - ratio) ** 2

    ratio, fraction, trace = bd.bisect(measure, target, tol=TOL)
    assert abs(fraction / target - 1) <= TOL and fraction == measure(ratio)
    assert trace[-1] == (ratio, fraction) and len(trace) == len(calls) - 1 <= 8  # stops once within


def test_bisection_returns_the_closest_ratio_when_the_target_is_out_of_reach() -> None:
    ratio, fraction, trace = bd.bisect(lambda r: 0.6 - 0.1 * r, 0.3, tol=TOL, steps=5)  # never below 0.51
    assert len(trace) == 5 and fraction == min(f for _, f in trace) and ratio == max(r for r, _ in trace)


def test_choice_is_the_most_accurate_arm_meeting_the_latency_and_skips_failed_rows() -> None:
    rows = [
        row("dense-ish", 0.95, 0.5, 0.9),  # too slow
        row("prune", 0.90, 0.3, 0.26),  # within the 5 % tolerance of 0.25
        row("dlrt", 0.92, 0.2, 0.24, failed="below dense"),
        row("oneshot", 0.88, 0.6, 0.2),
    ]
    assert bd.choose(rows, 0.25, TOL)["arm"] == "prune"
    assert bd.choose(rows, 0.1, TOL) is None  # none is fast enough
    tie = [row("a", 0.9, 0.2, 0.2), row("b", 0.9, 0.4, 0.2)]
    assert bd.choose(tie, 0.25, TOL)["arm"] == "b"  # equal clean: the higher ℓ2-FGSM


def test_dominance_needs_both_figures_and_the_latency() -> None:
    dlrt = row("dlrt", 0.90, 0.40, 0.25)
    rows = [
        dlrt,
        row("prune", 0.91, 0.40, 0.25),  # better clean, equal FGSM: dominates
        row("oneshot", 0.95, 0.30, 0.25),  # better clean, worse FGSM: does not
        row("int8", 0.99, 0.99, 0.60),  # better on both but misses the latency
        row("same", 0.90, 0.40, 0.2),  # equal on both: does not
    ]
    assert bd.dominators(dlrt, rows, 0.25, TOL) == ["prune"]
    assert bd.dominators(dlrt, rows[:1] + rows[2:], 0.25, TOL) == []


def test_the_target_check_says_when_a_harsher_target_widens_one_shots_lead() -> None:
    args = bd.parse_args(["--smoke"])

    def at(dlrt: float, oneshot: float, t: float) -> list[dict]:  # every arm at the target's latency
        return [row("dlrt", dlrt, 0.5, t), row("oneshot", oneshot, 0.5, t), row("prune", 0.5, 0.1, t)]

    met = bd.target_check(args, {0.5: at(0.93, 0.90, 0.5), 0.25: at(0.90, 0.87, 0.25)})
    assert met.startswith(bd.met(True)) and "harsher" not in met
    missed = bd.target_check(args, {0.5: at(0.90, 0.90, 0.5), 0.1: at(0.80, 0.875, 0.1)})
    assert missed.startswith(bd.met(False)) and "at 0.1 dominated by oneshot, clean -7.5 points" in missed
    assert "goes from +0.0 points at 0.5 to -7.5 at 0.1" in missed and "total epochs is the fair test" in missed
    closer = bd.target_check(
        args, {0.5: at(0.88, 0.90, 0.5), 0.1: at(0.89, 0.90, 0.1)}
    )  # the gap narrows: no such claim
    assert "harsher" not in closer


def test_a_target_out_of_low_ranks_reach_is_a_row_that_says_so(tmp_path: Path) -> None:
    """dlrt refused (its floor above the target), the one-shot arms skipped, pruning measured: the
    table names the floor, never picks the refused arm, and the verdict says why."""
    args = bd.parse_args(["--models", "m", "--targets", "0.5", "--seeds", "0", "--report-only"]
                         + ["--checkpoint-dir", str(tmp_path)])  # fmt: skip
    acc = {"l2_fgsm": {"0.05": 0.5, "0.1": 0.4, "0.3": 0.1}, "pgd": 0.2, "params_fraction": 1.0, "macs_fraction": 1.0}
    tier = {"data": "fashion-mnist", "n_train": 8000, "epochs": 9, "plateau": True, "target_size": 224}
    head, at = {"model": "m", "target": None, "seed": None}, {"model": "m", "target": 0.5, "seed": 0}
    entries = [
        {**head, **acc, "arm": "dense", "clean": 0.85, "parity": 1e-6, "tier": tier, "profile": {"depthwise": 0.13}},
        {**head, **acc, "arm": "int8", "clean": 0.84, "parity": 1e-2},
        {**at, "arm": "dlrt", "unreachable": 0.78, "reason": "out of reach"},
        {**at, "arm": "oneshot", "skipped": "budget-RobustDLRT chose no ranks to start from"},
        {**at, **acc, "arm": "prune", "clean": 0.84, "parity": 1e-6},
        {**at, "arm": "latency", "ms": {"224": {a: {"1": v, "32": v} for a, v in
                                                 {"dense": 10.0, "int8": 9.0, "prune": 5.1}.items()}}},
    ]  # fmt: skip
    rows = bd.rows_of(args, entries, "m")[0.5]
    assert bd.choose(rows, 0.5, TOL)["arm"] == "prune"
    md = bd.render(args, {"entries": entries}, {})
    assert "| 0.5 | budget-RobustDLRT |" in md and "out of reach: ≥ 0.78 of dense predicted" in md
    assert "budget-RobustDLRT cannot reach it (≥ 0.78 of dense predicted at its smallest ranks)" in md
    assert "channel pruning (84.0 %)" in md


def test_an_arm_failed_at_the_mildest_target_is_failed_at_every_target_with_its_int8(tmp_path: Path) -> None:
    args = bd.parse_args(["--models", "m", "--targets", "0.5", "0.25", "--seeds", "0", "--report-only"]
                         + ["--checkpoint-dir", str(tmp_path)])  # fmt: skip
    acc = {"l2_fgsm": {"0.05": 0.5, "0.1": 0.4, "0.3": 0.1}, "pgd": 0.2, "parity": 1e-6}
    dense = {"model": "m", "target": None, "seed": None, "arm": "dense", "clean": 0.85, **acc}
    entries = [dense]
    for t, prune in ((0.5, 0.80), (0.25, 0.84)):  # 5 points below dense at 0.5: broken, whatever it does at 0.25
        at = {"model": "m", "target": t, "seed": 0}
        entries += [{**at, **acc, "arm": "prune", "clean": prune}, {**at, **acc, "arm": "prune+int8", "clean": prune}]
        entries += [{**at, **acc, "arm": "dlrt", "clean": 0.845}]
        ms = {"dense": 10.0, "prune": 10 * t, "prune+int8": 10 * t, "dlrt": 10 * t}
        entries.append({**at, "arm": "latency", "ms": {"224": {a: {"1": v, "32": v} for a, v in ms.items()}}})
    by_t = bd.rows_of(args, entries, "m")
    for t in (0.5, 0.25):
        arms = {r["arm"]: r for r in by_t[t]}
        assert arms["prune"].get("failed") and arms["prune+int8"].get("failed") and not arms["dlrt"].get("failed")
        assert bd.choose(by_t[t], t, TOL)["arm"] == "dlrt"
    assert "failed at 0.5: clean 80.0 %" in {r["arm"]: r for r in by_t[0.25]}["prune"]["failed"]


def test_a_vit_is_judged_at_the_size_its_targets_were_set_at(tmp_path: Path) -> None:
    args = bd.parse_args(["--models", "vit", "--targets", "0.25", "--seeds", "0", "--report-only"]
                         + ["--checkpoint-dir", str(tmp_path)])  # fmt: skip
    acc = {"l2_fgsm": {"0.05": 0.5, "0.1": 0.4, "0.3": 0.1}, "pgd": 0.2, "parity": 1e-6}
    dense = {"model": "vit", "target": None, "seed": None, "arm": "dense", "clean": 0.8, **acc}
    at = {"model": "vit", "target": 0.25, "seed": 0}
    ms = {"64": {"dense": 4.0, "prune": 1.0}, "224": {"dense": 40.0, "prune": 10.8}}  # 0.25 at 64 px, 0.27 at 224
    entries = [
        {**dense, "tier": {"target_size": 64}},
        {**at, **acc, "arm": "prune", "clean": 0.79},
        {**at, "arm": "latency", "ms": {s: {a: {"1": v, "32": v} for a, v in d.items()} for s, d in ms.items()}},
    ]
    row = bd.rows_of(args, entries, "vit")[0.25][0]
    assert row["fraction"] == pytest.approx(0.25) and row["fracs"]["224/32"] == pytest.approx(0.27)
    assert bd.choose([row], 0.25, TOL)["arm"] == "prune"


def test_a_harsher_target_asked_of_some_models_only_is_in_their_sections_not_the_table(tmp_path: Path) -> None:
    args = bd.parse_args(["--models", "a", "b", "--targets", "0.5", "0.1", "--seeds", "0", "--report-only"]
                         + ["--checkpoint-dir", str(tmp_path)])  # fmt: skip
    acc = {"l2_fgsm": {"0.05": 0.5, "0.1": 0.4, "0.3": 0.1}, "pgd": 0.2, "parity": 1e-6}
    acc |= {"params_fraction": 0.5, "macs_fraction": 0.5}
    entries = []
    for m, targets in (("a", (0.5, 0.1)), ("b", (0.5,))):
        tier = {"data": "digits", "n_train": 100, "epochs": 3, "plateau": True, "target_size": 224}
        entries.append({"model": m, "target": None, "seed": None, "arm": "dense", "clean": 0.9, "tier": tier, **acc})
        for t in targets:
            at = {"model": m, "target": t, "seed": 0}
            entries.append({**at, **acc, "arm": "prune", "clean": 0.89})
            ms = {"dense": 10.0, "prune": 10 * t}
            entries.append({**at, "arm": "latency", "ms": {"224": {a: {"1": v, "32": v} for a, v in ms.items()}}})
    assert list(bd.rows_of(args, entries, "a")) == [0.5, 0.1] and list(bd.rows_of(args, entries, "b")) == [0.5]
    md = bd.render(args, {"entries": entries}, {})
    assert "| architecture | latency ≤ 0.5 of dense |" in md and "latency ≤ 0.1 of dense" not in md
    assert "Also measured at a harsher target: a at 0.1" in md and "| 0.1 | channel pruning |" in md


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--dlrt-epochs", "0"], "--dlrt-epochs must be at least 1"),
        (["--arms", "oneshot", "prune"], "include dlrt"),
    ],
)
def test_bad_run_options_are_usage_errors(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        bd.parse_args(["--smoke", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_dlrt_epochs_enter_the_fingerprint_only_where_they_differ() -> None:
    same, more = bd.parse_args(["--smoke"]), bd.parse_args(["--smoke", "--dlrt-epochs", "4"])
    assert "dlrt_epochs" not in bd.fingerprint(same) and "dlrt_epochs" in bd.fingerprint(more)
    assert more.arms == list(bd.TUNED) and bd.parse_args(["--arms", "prune", "dlrt"]).arms == ["dlrt", "prune"]


def test_the_gpu_preset_runs_at_smoke_sizes_on_the_cpu(tmp_path: Path) -> None:
    """The device's preset (its own dense training, cached with its checkpoint) end to end on the CPU."""
    page, out, ckpt = tmp_path / "BENCHMARKS.md", tmp_path / "decision.json", tmp_path / "ckpt"
    argv = ["--smoke", "--preset", "gpu", "--dense-epochs", "1", "--out", str(out), "--benchmarks-md", str(page)]
    assert run_bench("bench_decision.py", [*argv, "--checkpoint-dir", str(ckpt)]) == 0
    doc = json.loads(out.read_text())
    dense = next(e for e in doc["entries"] if e["arm"] == "dense")
    assert dense["tier"]["epochs"] == 1 and dense["tier"]["plateau"] is None  # --dense-epochs, not the tier's plateau
    assert (ckpt / "tier" / "dense-timm-test_resnet.pt").is_file()
    assert {e["arm"] for e in doc["entries"]} >= {"dense", "int8", *bd.TUNED, "latency"}
    assert "--preset gpu" in page.read_text()  # the reproduce line names the preset

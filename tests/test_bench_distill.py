"""bench/bench_distill.py in its smoke mode: every arm and seed measured from the tier's dense
weights with the loss terms its arm names, the section written, and re-rendered from the checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_distill.py"


def _section(page: Path) -> str:
    return page.read_text().split("<!-- bench:distill -->")[1].split("<!-- /bench:distill -->")[0]


def test_smoke_run_measures_every_arm_and_renders_again_from_the_checkpoint(tmp_path: Path) -> None:
    page, out, ckpt = tmp_path / "B.md", tmp_path / "distill.json", tmp_path / "ckpt"
    page.write_text("# Benchmarks\n\n<!-- bench:other -->\nkept\n<!-- /bench:other -->\n")
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--benchmarks-md", str(page)]
    cmd += ["--checkpoint-dir", str(ckpt)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    entries = doc["entries"]
    models = doc["settings"]["models"]
    assert {(e["model"], e["arm"], e["seed"]) for e in entries} == {
        *((m, "dense", None) for m in models),
        *((m, a, s) for m in models for a in ("none", "kd", "adv-kd") for s in (0, 1)),
    }
    assert len({e["n_attacked"] for e in entries}) == 1 and len({e["n_eval"] for e in entries}) == 1
    for e in entries:
        assert set(e["l2_fgsm"]) == {"0.05", "0.1", "0.3"} and 0.0 <= e["pgd"] <= 1.0
        if e["arm"] == "dense":
            assert e["tier"]["train_images"] == e["n_train"] and e["macs_fraction"] == 1.0
            continue
        terms = {t["term"]: t for t in e["loss_terms"]}
        assert ("distill" in terms) == (e["arm"] != "none") and ("adversarial" in terms) == (e["arm"] == "adv-kd")
        if "distill" in terms:
            assert terms["distill"]["weight"] == 0.5 and terms["cross_entropy"]["weight"] == 0.5
    # the smoke tier is cached beside the checkpoint, never in the real tier's folder
    assert sorted(p.name for p in (ckpt / "tier").glob("dense-*.pt")) == [
        f"dense-{m.replace(':', '-')}.pt" for m in sorted(models)
    ]
    text = page.read_text()
    assert "<!-- bench:other -->\nkept\n<!-- /bench:other -->" in text and text.count("<!-- bench:distill -->") == 1
    rows = [line for line in _section(page).splitlines() if line.startswith("|")]
    assert len(rows) == len(models) * 6  # header, rule, dense and three arms per model
    assert _section(page).count("logit KD clean ≥ dense − 1") == len(models)
    again = subprocess.run([*cmd, "--report-only"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [line for line in _section(page).splitlines() if line.startswith("|")] == rows
    assert "Reproduce: `python bench/bench_distill.py --smoke" in _section(page) and "--report-only" not in _section(
        page
    )


def test_unknown_model_is_a_usage_error(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--models", "vgg99", "--out", str(tmp_path / "x")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "unknown model(s) vgg99" in proc.stderr
    assert not (tmp_path / "x").exists()

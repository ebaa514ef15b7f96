"""Every bench script runs in its smoke mode (what CI can afford) and writes its results; with
--benchmarks-md it rewrites exactly its own section of the page, keeping the rest."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_bench

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = {  # script → (section, output flag, output file name)
    "bench_factorize.py": ("factorize", "--out", "factorize.json"),
    "bench_dlrt.py": ("dlrt", "--out", "dlrt.json"),
    "bench_attacks.py": ("attacks", "--out", "attacks.json"),
    "bench_export.py": ("export", "--out", "export.json"),
    "bench_init.py": ("init", "--out", "init.json"),
    "bench_quality.py": ("quality-smoke", "--out-dir", "quality-smoke.json"),
    "bench_truncation.py": ("truncation", "--out", "truncation.json"),
    "bench_decision.py": ("decision", "--out", "decision.json"),
    "bench_regime.py": ("regime", "--out", "regime.json"),
    "bench_forms.py": ("forms", "--out", "forms.json"),
}


RESUMABLE = {
    "bench_decision.py": "decision_timm-test_resnet_pareto.png",
    "bench_regime.py": "regime_kappa.png",
}
"""Scripts with --checkpoint-dir and --report-only → the plot they publish beside the page (None: no plot)."""

EXTRA = {"bench_decision.py": ["--models", "timm:test_resnet", "timm:test_vit", "--jobs", "2"]}
"""Options beyond --smoke: the decision table's two models each in its own process, in one folder."""


def _section(page: Path, section: str) -> str:
    return page.read_text().split(f"<!-- bench:{section} -->")[1].split(f"<!-- /bench:{section} -->")[0]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_smoke_run_writes_results_and_its_section(script: str, tmp_path: Path, capsys) -> None:
    section, flag, result = SCRIPTS[script]
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n\nhand-written intro\n\n<!-- bench:other -->\nkept\n<!-- /bench:other -->\n")
    target = tmp_path / result if flag == "--out" else tmp_path
    argv = ["--smoke", flag, str(target), "--benchmarks-md", str(page), *EXTRA.get(script, [])]
    if script in RESUMABLE:
        argv += ["--checkpoint-dir", str(tmp_path / "ckpt")]
    assert run_bench(script, argv) == 0, capsys.readouterr().err[-3000:]
    if script in RESUMABLE:  # the table again from the checkpoint alone, and the plot published beside the page
        table = [line for line in _section(page, section).splitlines() if line.startswith("|")]
        assert run_bench(script, [*argv, "--report-only"]) == 0, capsys.readouterr().err[-3000:]
        assert [line for line in _section(page, section).splitlines() if line.startswith("|")] == table
        assert "--report-only" not in _section(page, section)  # the reproduce line runs the measurement
        if RESUMABLE[script]:
            assert (tmp_path / "docs" / "figures" / RESUMABLE[script]).is_file()
            assert f"](docs/figures/{RESUMABLE[script]})" in _section(page, section)
    data = json.loads((tmp_path / result).read_text())
    assert data, result
    text = page.read_text()
    assert "hand-written intro" in text and "<!-- bench:other -->\nkept\n<!-- /bench:other -->" in text
    assert text.count(f"<!-- bench:{section} -->") == 1 and text.count(f"<!-- /bench:{section} -->") == 1
    body = text.split(f"<!-- bench:{section} -->")[1].split(f"<!-- /bench:{section} -->")[0]
    assert "|---" in body, body  # a Markdown table
    assert "Reproduce: `python bench/" + script in body and "Measured 20" in body and "cores" in body


def _harness():
    sys.path.insert(0, str(ROOT / "bench"))
    import harness.entries
    import harness.page
    import harness.report

    return harness


def test_update_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    md = _harness().page
    page = tmp_path / "B.md"
    md.update_section("a", "| x |\n|---|\n| 1 |", script="s.py", argv=["--n", "1"], measured="m.", path=page)
    assert page.read_text().startswith("# Benchmarks")  # a new page gets the intro
    md.update_section("b", "B1", script="t.py", argv=[], measured="m.", path=page)
    md.update_section("a", "A2", script="s.py", argv=["--n", "2"], measured="m.", path=page)
    text = page.read_text()
    assert text.count("<!-- bench:a -->") == 1 and "A2" in text and "| 1 |" not in text
    assert "B1" in text and text.index("<!-- bench:a -->") < text.index("<!-- bench:b -->")  # order kept
    assert "Reproduce: `python bench/s.py --n 2`" in text
    assert md.update_section("c", "x", script="s.py", argv=[], measured="m.", path=None) is None


def test_entry_store_resumes_its_entries_and_refuses_other_settings(tmp_path: Path) -> None:
    store = _harness().entries.EntryStore
    first = store(tmp_path, {"epochs": 2}, keys=("seed", "arm"))
    first.add({"seed": 0, "arm": "dense", "clean": 0.5})
    again = store(tmp_path, {"epochs": 2}, keys=("seed", "arm"))
    assert again.get(0, "dense")["clean"] == 0.5 and again.get(0, "dlrt") is None
    assert again.missing((0, "dense"), (0, "dlrt")) == [(0, "dlrt")]
    with pytest.raises(SystemExit, match="epochs"):  # mixing entries of other settings is refused
        store(tmp_path, {"epochs": 3}, keys=("seed", "arm"))


def _add_entries(folder: str, worker: int, n: int) -> None:
    store = _harness().entries.EntryStore(folder, {"epochs": 2}, keys=("seed", "arm"))
    for i in range(n):
        store.add({"seed": worker, "arm": f"a{i}"})


def test_entry_store_keeps_what_other_processes_added_to_its_folder(tmp_path: Path) -> None:
    store = _harness().entries.EntryStore
    a, b = (store(tmp_path, {"epochs": 2}, keys=("seed", "arm")) for _ in range(2))
    a.add({"seed": 0, "arm": "dense"})
    b.add({"seed": 1, "arm": "dense"})  # b read the folder before a's entry: a's is kept
    a.add({"seed": 0, "arm": "dlrt"})
    again = store(tmp_path, {"epochs": 2}, keys=("seed", "arm"))
    assert again.missing((0, "dense"), (1, "dense"), (0, "dlrt")) == [] and len(again.entries) == 3
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_add_entries, args=(str(tmp_path / "p"), w, 25)) for w in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert len(store(tmp_path / "p", {"epochs": 2}, keys=("seed", "arm")).entries) == 50  # none overwritten


def _orphan(pidfile: str) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from harness.run import exit_with_parent

    exit_with_parent(poll=0.05)
    Path(f"{pidfile}.tmp").write_text(str(os.getpid()))
    os.replace(f"{pidfile}.tmp", pidfile)  # whole, for the test that polls for it
    time.sleep(120)


def _parent(pidfile: str) -> None:
    multiprocessing.get_context("spawn").Process(target=_orphan, args=(pidfile,)).start()
    time.sleep(120)


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_a_jobs_worker_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "worker.pid"
    parent = multiprocessing.get_context("spawn").Process(target=_parent, args=(str(pidfile),))
    parent.start()
    deadline = time.monotonic() + 60
    while not pidfile.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker = int(pidfile.read_text())
    assert _alive(worker)
    parent.kill()  # SIGKILL: the parent runs no clean-up of its own
    parent.join(10)
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def test_mean_std_cells_and_tables() -> None:
    report = _harness().report
    assert report.mean_std([0.5, None, 0.7], scale=100) == "60.0 ± 14.1"
    assert report.mean_std([2.0], 2, suffix="×") == "2.00×" and report.mean_std([None]) == "—"
    assert report.table(["a", "b"], "lr", [["x", 1]]) == ["| a | b |", "|---|---:|", "| x | 1 |"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--device", "tpu"], "--device 'tpu' is not a device"),
        (["--device", "cpu", "--profile", "2", "--amp", "maybe"], "invalid choice"),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "on a machine with a CUDA GPU")]),
)
def test_bench_dlrt_refuses_a_device_it_cannot_run_on(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    code = run_bench(
        "bench_dlrt.py", [*argv, "--out", str(tmp_path / "x.json"), "--benchmarks-md", str(tmp_path / "B.md")]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err, err[-2000:]
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "B.md").exists()  # nothing half-done

"""The first GPU's check: one command that proves the CUDA path and records its figures in one JSON
and the ``gpu`` section of BENCHMARKS.md, within a time budget (default 540 s: one device call).

Steps, in order (each one's failure recorded, the next one still run; the JSON written after every
step, a rerun skipping the finished ones unless ``--fresh``): ``tests`` (the tests marked ``gpu``),
``main_bf16`` and ``main_fp32`` (the main job on the device: report, stage seconds, peak memory),
``torchrun`` (the float32 job under ``torchrun --nproc_per_node 1``, compared with ``main_fp32``),
``regime`` (``bench_regime.py --preset paper`` sized to the time left) and ``decision``
(``bench_decision.py --preset gpu`` once it exists). See docs/gpu.md.

    python bench/gpu_check.py --out $OUT/gpu              # on the device machine: bench/gpu_run.sh
    python bench/gpu_check.py --dry-run --out /tmp/gc     # the same sequence on the CPU at smoke sizes
    python bench/gpu_check.py --render gpu_check.json     # the section from a fetched JSON, here
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
STEPS = ("tests", "main_bf16", "main_fp32", "torchrun", "regime", "decision")
MAIN = ["--model", "vgg16", "--recipe", "recipes/robust.yaml"]
# the least time worth starting a step with (seconds); a step may use what the later ones leave
FLOOR = {"tests": 60, "main_bf16": 120, "main_fp32": 120, "torchrun": 90, "regime": 90, "decision": 90}
DRY_FLOOR = 15
# the dry run's main job: the same command at smoke sizes (CI's 2 cores)
SMOKE_MAIN = [
    *("--set", "baseline.epochs=1", "--set", "train.epochs=1", "--set", "data.train_subset=64"),
    *("--set", "data.val_subset=32", "--set", "data.batch_size=16", "--set", "data.eval_batch_size=32"),
    *("--set", "evaluate.max_samples=8", "--set", "factorize.calibration_batches=1"),
    *("--set", "factorize.init_rank=8", "--set", "factorize.r_max=16", "--set", "train.coefficient_steps=2"),
    *("--set", "train.bn_batches=1", "--set", "export.onnx=false", "--set", "export.int8=false"),
    *("--set", "export.latency=false"),
]
SMOKE_MODEL = "timm:test_resnet"  # VGG16's 138 M parameters alone take minutes on 2 busy cores
NO_EXPORT = ["--set", "export.onnx=false", "--set", "export.int8=false", "--set", "export.latency=false"]
# bench_regime: the preset and the arms of the slice; sizes come from the budget
REGIME_BASE = ["--preset", "paper", "--seeds", "0", "--arms", "dlrt", "robust", "--betas", "0.075"]
REGIME_SMOKE = dict(vgg="vgg11", width=0.0625, batch_size=32, coefficient_steps=2)
PAPER = dict(n_train=48000, batch=128, dense_epochs=30, epochs=20, arms=2, val_subset=2000)
# tests/test_distributed.py's tolerances for a torchrun run against the one-process run
TOL = dict(train_loss_rel=1e-5, sensitivity_rel=2e-3, weights_rel=1e-4, train_images=1)
OUT_FILES = ("gpu_check.json", "BENCHMARKS.md", "report-bf16.json", "report-fp32.json", "regime.json")
SECTION = re.compile(r"<!-- bench:gpu -->.*?<!-- /bench:gpu -->", re.S)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the whole sequence on the CPU at smoke sizes")
    ap.add_argument("--out", type=Path, default=None, help="folder of the returned files (default: --work)")
    ap.add_argument("--work", type=Path, default=None, help="runs, checkpoints, logs (default bench/results/gpu-check)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole sequence")
    ap.add_argument("--device", default=None, help="cuda[:N] (default), or cpu (--dry-run's)")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="run only these")
    ap.add_argument("--fresh", action="store_true", help="forget the finished steps of an earlier run")
    ap.add_argument("--fashion-root", default=None, help="Fashion-MNIST's IDX files for the regime step")
    ap.add_argument("--benchmarks-md", type=Path, default=None, help="page of the 'gpu' section")
    ap.add_argument("--render", type=Path, default=None, help="write the section of this JSON, run nothing")
    args = ap.parse_args(argv)
    if args.render is None:
        args.device = args.device or ("cpu" if args.dry_run else "cuda")
        if not args.dry_run and not args.device.startswith("cuda"):
            ap.error("a run that is not --dry-run checks a CUDA device: give --device cuda[:N]")
        if args.budget <= 0:
            ap.error("--budget must be positive")
    default_work = BENCH / "results" / ("gpu-check-dry" if args.dry_run else "gpu-check")
    args.work = (args.work or default_work).resolve()
    args.out = (args.out or args.work).resolve()
    if args.benchmarks_md is None:
        args.benchmarks_md = args.work / "BENCHMARKS.md" if args.dry_run else ROOT / "BENCHMARKS.md"
    return args


class State:
    """The JSON: one entry per step, written (and copied to --out) after every step."""

    def __init__(self, args: argparse.Namespace, device: dict[str, Any]) -> None:
        self.args, self.path = args, args.work / "gpu_check.json"
        old = json.loads(self.path.read_text()) if self.path.is_file() and not args.fresh else {}
        same = old.get("dry_run") == args.dry_run and old.get("device", {}).get("name") == device["name"]
        what = "the first GPU's check: CUDA tests, the main job in bf16 and float32, torchrun, regime slice"
        self.doc = dict(what=what, dry_run=args.dry_run, device=device, budget_seconds=args.budget, argv=sys.argv[1:])
        self.doc["steps"] = old.get("steps", {}) if same else {}

    def done(self, step: str) -> bool:
        return self.doc["steps"].get(step, {}).get("status") == "ok"

    def put(self, step: str, entry: dict[str, Any]) -> None:
        self.doc["steps"][step] = entry
        self.write()

    def write(self) -> None:
        self.doc["updated"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        write_json(self.path, self.doc)
        if self.args.out != self.args.work:
            write_json(self.args.out / "gpu_check.json", self.doc)


def write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def device_record(spec: str) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"spec": spec, "torch": torch.__version__, "cores": os.cpu_count()}
    if spec.startswith("cuda"):
        dev = torch.device(spec)
        props = torch.cuda.get_device_properties(dev)
        capability = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        out.update(name=torch.cuda.get_device_name(dev), cuda=torch.version.cuda, capability=capability)
        out.update(memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
        try:  # a tuple in recent torch, an int in older ones
            v = torch.cuda.nccl.version()
            out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except (AttributeError, RuntimeError):
            out["nccl"] = None
    else:
        out.update(name="cpu", bf16=cpu_bf16())
    return out


def cpu_bf16() -> bool:
    import torch

    try:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    except (RuntimeError, TypeError):
        return False


class Clock:
    """The budget: what is left, and what a step may take while the later ones keep their floor."""

    def __init__(self, budget: float, floors: dict[str, float]) -> None:
        self.end, self.floors = time.monotonic() + budget, floors

    def left(self) -> float:
        return self.end - time.monotonic()

    def allowance(self, later: list[str]) -> float:
        return self.left() - sum(self.floors[s] for s in later)


def env(args: argparse.Namespace) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [e.get("PYTHONPATH")])])
    e.update(HF_HUB_OFFLINE="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    if args.dry_run:  # the same thread count in every process: a torchrun run equals the plain one
        e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(args: argparse.Namespace, name: str, cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run ``cmd`` from the repository root within ``timeout`` s (its process group killed after);
    its output goes to <work>/logs/<name>.log, its last lines into the record."""
    log = args.work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[gpu_check] {name}: {' '.join(cmd)} (≤ {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env(args), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    text = log.read_text(encoding="utf-8", errors="replace")
    secs = time.perf_counter() - t0
    print(f"[gpu_check] {name}: rc {rc} in {secs:.0f} s", flush=True)
    return {"command": cmd, "rc": rc, "seconds": round(secs, 1), "timed_out": rc is None, "log": str(log), "text": text}


def record(r: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A step's entry: ok when the command exited 0 (and ``extra`` has no status of its own)."""
    entry = {k: v for k, v in r.items() if k != "text"}
    entry["log_tail"] = r["text"][-3000:]
    entry["status"] = "timeout" if r["timed_out"] else ("ok" if r["rc"] == 0 else "failed")
    entry.update(extra)
    return entry


def step_tests(args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    junit = args.work / "tests.xml"
    junit.unlink(missing_ok=True)
    if args.dry_run:  # the CPU halves of the same tests (the CUDA ones skip without a GPU)
        files, marks = ["tests/test_cuda.py"], "not gpu"
    else:
        tests = (ROOT / "tests").glob("test_*.py")
        files, marks = sorted(str(p.relative_to(ROOT)) for p in tests if "mark.gpu" in p.read_text()), "gpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marks, f"--junitxml={junit}", *files]
    r = run(args, "tests", cmd, timeout)
    counts = junit_counts(junit)
    entry = record(r, files=files, marks=marks, counts=counts)
    if entry["status"] == "ok" and (not counts.get("passed") or (not args.dry_run and counts.get("skipped"))):
        entry.update(status="failed", reason="no test passed, or a CUDA test was skipped on the device")
    return entry


def junit_counts(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    return c


def main_command(args: argparse.Namespace, run_name: str, amp: str) -> list[str]:
    cmd = [*MAIN, "--device", args.device, "--output-dir", str(args.work / "runs"), "--run-name", run_name, "--force"]
    cmd += ["--set", f"baseline.amp='{amp}'", "--set", f"train.amp='{amp}'"]  # quoted: YAML reads off as false
    if args.dry_run:
        cmd[1] = SMOKE_MODEL
        cmd += SMOKE_MAIN
    return cmd


def step_main(args: argparse.Namespace, precision: str, timeout: float) -> dict[str, Any]:
    amp = "bf16" if precision == "bf16" else "off"
    if amp == "bf16" and not args.device_info.get("bf16"):
        return {"status": "skipped", "reason": f"bf16 autocast is not supported on {args.device_info['name']}"}
    name = f"main-{precision}"
    r = run(
        args, f"main_{precision}", [sys.executable, "-m", "compressor.cli", *main_command(args, name, amp)], timeout
    )
    report = args.work / "runs" / name / "report.json"
    entry = record(r, precision=precision, run_dir=str(report.parent))
    if entry["status"] == "ok":
        if not report.is_file():
            return {**entry, "status": "failed", "reason": f"no {report}"}
        shutil.copyfile(report, args.out / f"report-{precision}.json")
        entry["summary"] = summarize_report(json.loads(report.read_text()))
    return entry


def summarize_report(rep: dict[str, Any]) -> dict[str, Any]:
    """What the section shows of a report: accuracies dense vs compressed, c.r., stage times, memory."""

    def side(s: str) -> dict[str, Any]:
        adv = rep.get(s, {}).get("adversarial_accuracy") or {}
        out = {k: rep.get(s, {}).get(k) for k in ("params", "clean_accuracy")}
        return out | {
            "l2_fgsm_0.1": (adv.get("l2_fgsm") or {}).get("0.1"),
            "pgd": next(iter((adv.get("pgd") or {}).values()), None),
        }

    comp, device = rep.get("compressed", {}), rep.get("device", {})
    out = {"model": rep.get("model", {}).get("spec") or rep.get("model", {}).get("name"), "dense": side("dense")}
    out["compressed"] = {**side("compressed"), "compression_rate": comp.get("compression_rate")}
    out.update(nonfinite_steps=comp.get("nonfinite_steps"), timings=rep.get("timings", {}), device=device)
    return out | {"peak_memory_bytes": device.get("peak_memory_bytes")}


def step_torchrun(args: argparse.Namespace, state: State, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd += ["-m", "compressor.cli", *main_command(args, "main-torchrun", "off"), *NO_EXPORT]
    r = run(args, "torchrun", cmd, timeout)
    m = re.search(r"joined process group: rank \d+ of \d+ \(([^)]*)\)", r["text"])
    entry = record(r, backend=m.group(1) if m else None, run_dir=str(args.work / "runs" / "main-torchrun"))
    if entry["status"] != "ok":
        return entry
    if not state.done("main_fp32"):
        return {**entry, "status": "failed", "reason": "main_fp32 did not finish: nothing to compare with"}
    one, two = args.work / "runs" / "main-fp32", args.work / "runs" / "main-torchrun"
    entry["compare"] = compare_runs(one, two)
    if entry["backend"] is None:
        entry.update(status="failed", reason="the run did not join a process group")
    elif not entry["compare"]["equal"]:
        entry.update(status="failed", reason="torchrun differs from the plain run beyond the tolerances")
    return entry


def compare_runs(one: Path, two: Path) -> dict[str, Any]:
    """tests/test_distributed.py's checks of a torchrun run against the one-process run."""
    a, b = (json.loads((d / "report.json").read_text()) for d in (one, two))
    fails: list[str] = []
    keys = ("clean_accuracy", "n_clean", "n_attacked", "clean_accuracy_attacked", "adversarial_accuracy")
    for side in ("dense", "compressed"):
        fails += [f"{side}.{k}" for k in (*keys, "worst_case_accuracy") if a[side].get(k) != b[side].get(k)]
    sens = max_rel(a["compressed"].get("sensitivity"), b["compressed"].get("sensitivity"))
    sens = max(sens, max_rel(a["dense"].get("sensitivity"), b["dense"].get("sensitivity")))
    if sens > TOL["sensitivity_rel"]:
        fails.append("sensitivity")
    ranks = lambda r: {n: l.get("ranks") for n, l in r["compressed"].get("layers", {}).items()}
    if ranks(a) != ranks(b) or a["compressed"].get("params") != b["compressed"].get("params"):
        fails.append("ranks")
    epochs = lambda r: r["history"]["epochs"] + r["dense"].get("baseline_history", {}).get("epochs", [])
    loss_rel, flips, n_train = 0.0, 0.0, a.get("data", {}).get("n_train", 0)
    for ea, eb in zip(epochs(a), epochs(b)):
        if ea.get("val_accuracy") != eb.get("val_accuracy"):
            fails.append(f"val_accuracy of epoch {ea.get('epoch')}")
        loss_rel = max(loss_rel, max_rel(ea.get("train_loss"), eb.get("train_loss")))
        flips = max(flips, abs((ea.get("train_accuracy") or 0) - (eb.get("train_accuracy") or 0)) * n_train)
    if loss_rel > TOL["train_loss_rel"]:
        fails.append("train_loss")
    if flips > TOL["train_images"] + 1e-9:
        fails.append("train_accuracy")
    weights = weights_rel(one / "model.safetensors", two / "model.safetensors")
    if weights is None or weights >= TOL["weights_rel"]:
        fails.append("weights")
    return {
        "equal": not fails,
        "failed_checks": fails,
        "max_train_loss_rel": loss_rel,
        "max_sensitivity_rel": sens,
        "train_images_flipped": flips,
        "weights_rel": weights,
        "tolerances": TOL,
    }


def max_rel(x: Any, y: Any) -> float:
    """Largest relative difference over the numbers of two equally shaped JSON values."""
    if isinstance(x, dict) and isinstance(y, dict):
        return max([max_rel(x[k], y.get(k)) for k in x] or [0.0])
    if isinstance(x, list) and isinstance(y, list):
        return max([max_rel(u, v) for u, v in zip(x, y)] or [0.0]) if len(x) == len(y) else math.inf
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return 0.0 if x == y else abs(x - y) / max(abs(x), abs(y), 1e-12)
    return 0.0 if x == y else math.inf


def weights_rel(pa: Path, pb: Path) -> float | None:
    """‖Wa − Wb‖ / ‖Wa‖ over every weight, each low-rank layer as U S Vᵀ (factor signs are not unique)."""
    if not (pa.is_file() and pb.is_file()):
        return None
    from safetensors.torch import load_file

    def dense(t: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in t.items():
            stem = k[:-2]
            if k.endswith(".S") and stem + ".U" in t:
                out[stem + ".USVt"] = t[stem + ".U"].double() @ v.double() @ t[stem + ".V"].double().T
            elif not (k.endswith((".U", ".V")) and stem + ".S" in t) and v.is_floating_point():
                out[k] = v.double()
        return out

    wa, wb = dense(load_file(pa)), dense(load_file(pb))
    if wa.keys() != wb.keys() or any(wa[k].shape != wb[k].shape for k in wa):
        return math.inf
    num = sum(float((wa[k] - wb[k]).norm()) ** 2 for k in wa)
    return math.sqrt(num) / max(math.sqrt(sum(float(wa[k].norm()) ** 2 for k in wa)), 1e-30)


def supports(script: Path, option: str) -> bool:
    """Whether ``script`` (or the harness it builds its options with) takes ``option``."""
    sources = [script, *(BENCH / "harness").glob("*.py")]
    return any(f'"{option}"' in p.read_text(encoding="utf-8") for p in sources)


def fashion_root(args: argparse.Namespace) -> str | None:
    for cand in (args.fashion_root, ROOT / ".gpu-wheels" / "fashion-mnist", "/usr/share/datasets/fashion-mnist"):
        if cand and Path(cand, "train-images-idx3-ubyte.gz").is_file():
            return str(cand)
    return None


def regime_common(args: argparse.Namespace, folder: Path) -> list[str]:
    cmd = [sys.executable, "bench/bench_regime.py", *REGIME_BASE, "--device", args.device]
    cmd += ["--benchmarks-md", str(folder / "BENCHMARKS-regime.md")]
    root = None if args.dry_run else fashion_root(args)
    cmd += ["--data", "digits"] if args.dry_run else (["--data-root", root] if root else [])
    if args.dry_run:
        for k, v in REGIME_SMOKE.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


PROBE = re.compile(
    r"measured per training step of (\d+) images: dense ([\d.]+) s, DLRT ([\d.]+) s, FGSM-AT ([\d.]+) s; "
    r"per attacked image \(all \d+ attack settings\) ([\d.]+) s \(dense ([\d.]+) s\)"
)


def regime_sizes(args: argparse.Namespace, probe: dict[str, float] | None, work: float) -> dict[str, int]:
    """Epochs, images and attacked images that fit ``work`` seconds at the probed step times: 15 % of
    the time for the attacks; on all 48,000 training images, fine-tuning epochs as the paper's 20
    against 30 dense ones, the dense epochs taking the rest (a well-trained start is the regime's
    premise); when one epoch of each does not fit, one epoch each on fewer images."""
    if probe is None:  # no probe: a guess for a large GPU, cut off by the step's timeout if wrong
        probe = {"dense": 0.02, "dlrt": 0.08, "attack": 0.02, "attack_dense": 0.01}
    p, k = PAPER, PAPER["arms"]
    per_image = k * probe["attack"] + probe["attack_dense"]
    attacked = int(min(2000, max(64, 0.15 * work / per_image)))
    left = max(work - attacked * per_image, 1.0)
    batches = p["n_train"] / p["batch"]
    dense, arm = batches * probe["dense"], batches * probe["dlrt"]
    epochs = left / (1.5 * dense + k * arm)
    if epochs >= 1:
        e = min(p["epochs"], int(epochs))
        sizes = dict(epochs=e, dense_epochs=min(p["dense_epochs"], max(1, int((left - k * e * arm) / dense))))
        sizes["train_subset"] = p["n_train"]
    else:
        n = int(p["n_train"] * left / (dense + k * arm)) // p["batch"] * p["batch"]
        sizes = dict(epochs=1, dense_epochs=1, train_subset=max(4 * p["batch"], n))
    sizes.update(attack_samples=attacked, val_subset=p["val_subset"])
    if args.dry_run:  # the same arithmetic, then the smoke sizes
        sizes = dict(epochs=1, dense_epochs=1, train_subset=64, val_subset=32, attack_samples=16)
    return sizes


def step_regime(args: argparse.Namespace, state: State, timeout: float) -> dict[str, Any]:
    script = BENCH / "bench_regime.py"
    if not script.is_file():
        return {"status": "skipped", "reason": "bench/bench_regime.py is not there"}
    folder = args.work / "regime"
    t0 = time.perf_counter()
    old = state.doc["steps"].get("regime", {})
    sizing: dict[str, Any] = {}
    if old.get("sizes_argv"):  # a rerun: the same sizes, so that --checkpoint-dir resumes
        sized, sizing = old["sizes_argv"], old.get("sizing", {})
    elif supports(script, "--time-budget"):
        sized, sizing = ["--time-budget", str(int(0.9 * timeout))], {"by": "--time-budget"}
    else:
        subset = "64" if args.dry_run else "1024"  # the probe times a few batches: the rest is never read
        probe_cmd = [*regime_common(args, folder), "--estimate-only", "--train-subset", subset]
        probe_cmd += ["--out", str(folder / "probe.json")]
        r = run(args, "regime_probe", probe_cmd, min(timeout / 3, 180))
        m = PROBE.search(r["text"]) if r["rc"] == 0 else None
        probe = None
        if m:  # printed to the millisecond: a faster step counts as one
            names = ("dense", "dlrt", "fgsm", "attack", "attack_dense")
            probe = {k: max(float(v), 1e-3) for k, v in zip(names, m.groups()[1:])}
        spent = time.perf_counter() - t0
        work = 0.8 * (timeout - 2 * spent)  # the run repeats the probe's start-up and the probe itself
        sizes = regime_sizes(args, probe, work)
        sized = [x for k, v in sizes.items() for x in (f"--{k.replace('_', '-')}", str(v))]
        sizing = {"by": "probe" if probe else "guess (probe line not found)", "probe": probe, "work_seconds": work}
        sizing["probe_seconds"], sizing["probe_rc"] = round(spent, 1), r["rc"]
    key = hashlib.sha1(json.dumps([args.device, sized]).encode()).hexdigest()[:8]
    out = folder / "regime.json"
    cmd = [*regime_common(args, folder), *sized, "--checkpoint-dir", str(folder / f"ckpt-{key}"), "--out", str(out)]
    r = run(args, "regime", cmd, timeout - (time.perf_counter() - t0))
    entry = record(r, sizes_argv=sized, sizing=sizing)
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    if entry["status"] == "ok" and out.is_file():
        doc = json.loads(out.read_text())
        shutil.copyfile(out, args.out / "regime.json")
        entry["summary"] = summarize_regime(doc)
    elif entry["status"] == "ok":
        entry.update(status="failed", reason=f"no {out}")
    return entry


def summarize_regime(doc: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for e in doc.get("entries", []):
        acc = e.get("acc") or {}
        row = {k: e.get(k) for k in ("seed", "label", "clean")}
        row.update(
            {"l2_fgsm_0.1": acc.get("l2_fgsm", {}).get("0.1"), "pgd": next(iter(acc.get("pgd", {}).values()), None)}
        )
        rows.append(row | {k: e.get(k) for k in ("compression_rate", "kappa_median", "train_seconds")})
    run_ = doc.get("run", {})
    keys = ("vgg", "width", "train_subset", "dense_epochs", "epochs", "attack_samples", "amp")
    settings = {k: doc.get("settings", {}).get(k) for k in keys}
    return {"rows": rows, "wall_seconds": run_.get("wall_seconds"), "probe": run_.get("probe"), "settings": settings}


def step_decision(args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    script = BENCH / "bench_decision.py"
    if not script.is_file():
        return {"status": "skipped", "reason": "not built: bench/bench_decision.py does not exist yet"}
    folder = args.work / "decision"
    cmd = [sys.executable, str(script.relative_to(ROOT)), "--device", args.device]
    cmd += ["--smoke"] if args.dry_run else ["--preset", "gpu"]
    if supports(script, "--time-budget"):
        cmd += ["--time-budget", str(int(0.9 * timeout))]
    if supports(script, "--checkpoint-dir"):
        cmd += ["--checkpoint-dir", str(folder / "ckpt")]
    cmd += ["--out", str(folder / "decision.json"), "--benchmarks-md", str(folder / "BENCHMARKS-decision.md")]
    return record(run(args, "decision", cmd, timeout))


def fmt(v: Any, pct: bool = False, digits: int = 1) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.{digits}f}" if pct else f"{v:.{digits}f}"


def render(doc: dict[str, Any]) -> str:
    d, steps = doc["device"], doc["steps"]
    title = f"**{d.get('name')}**" + (" (dry run on the CPU, smoke sizes)" if doc.get("dry_run") else "")
    lines = [
        f"### GPU check: {title}",
        "",
        f"torch {d.get('torch')}, CUDA {d.get('cuda', '—')}, compute capability {d.get('capability', '—')}, "
        f"{d.get('memory_gib', '—')} GiB, NCCL {d.get('nccl', '—')}; budget {doc.get('budget_seconds'):.0f} s.",
        "",
        "| step | status | seconds | note |",
        "| --- | --- | ---: | --- |",
    ]
    for name in STEPS:
        s = steps.get(name)
        if s is None:
            lines.append(f"| {name} | not run | — | |")
            continue
        lines.append(f"| {name} | {s.get('status')} | {fmt(s.get('seconds'), digits=0)} | {step_note(name, s)} |")
    mains = [(p, steps.get(f"main_{p}", {}).get("summary")) for p in ("bf16", "fp32")]
    mains = [(p, s) for p, s in mains if s]
    if mains:
        stages = list(dict.fromkeys(k for _, s in mains for k in s["timings"]))
        lines += [
            "",
            f"Main job (`compress --model {mains[0][1].get('model') or 'vgg16'} --recipe recipes/robust.yaml`"
            + (", smoke sizes" if doc.get("dry_run") else "")
            + "), dense vs compressed, seconds per stage:",
            "",
            "| precision | clean % (dense / comp.) | ℓ2-FGSM ε=0.1 % | PGD-ℓ∞ 8/255 % | c.r. % | peak GPU MiB | "
            + " | ".join(stages)
            + " | total s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in stages) + " | ---: |",
        ]
        pair = ("clean_accuracy", "l2_fgsm_0.1", "pgd")
        for p, s in mains:
            peak = s.get("peak_memory_bytes")
            cells = [
                p,
                *(f"{fmt(s['dense'].get(k), True)} / {fmt(s['compressed'].get(k), True)}" for k in pair),
                fmt(s["compressed"]["compression_rate"]),
                fmt(peak / 2**20, digits=0) if peak else "—",
                *(fmt(s["timings"].get(k)) for k in stages),
                fmt(sum(s["timings"].values())),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    reg = steps.get("regime", {}).get("summary")
    if reg:
        st = reg["settings"]
        lines += [
            "",
            f"Regime slice (`bench_regime.py --preset paper`, sized to the budget: {st.get('vgg')} ×{st.get('width')}, "
            f"{st.get('train_subset') or 'all'} training images, {st.get('dense_epochs')} dense + {st.get('epochs')} "
            f"fine-tuning epochs, {st.get('attack_samples')} attacked images, amp {st.get('amp')}); not the paper's "
            "20-epoch run, a measure of its pace on this card:",
            "",
            "| arm | clean % | ℓ2-FGSM ε=0.1 % | PGD-ℓ∞ % | c.r. % | κ median | train s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in reg["rows"]:
            lines.append(
                f"| {r['label']} | {fmt(r['clean'], True)} | {fmt(r['l2_fgsm_0.1'], True)} | {fmt(r['pgd'], True)} | "
                f"{fmt(r['compression_rate'])} | {fmt(r['kappa_median'], digits=2)} | {fmt(r['train_seconds'])} |"
            )
    return "\n".join(lines)


def step_note(name: str, s: dict[str, Any]) -> str:
    if s.get("reason"):
        return s["reason"]
    if name == "tests":
        c = s.get("counts", {})
        failed = c.get("failures", 0) + c.get("errors", 0)
        return f"{c.get('passed', 0)} passed, {c.get('skipped', 0)} skipped, {failed} failed (-m {s.get('marks')!r})"
    if name == "torchrun":
        c = s.get("compare", {})
        if not c:
            return f"backend {s.get('backend')}"
        return (
            f"backend {s.get('backend')}; vs main_fp32: {'equal' if c.get('equal') else 'differs'} within "
            f"test_distributed's tolerances (weights rel. {c.get('weights_rel', 0):.1e}, "
            f"train loss rel. {c.get('max_train_loss_rel', 0):.1e})"
        )
    if name == "regime" and s.get("sizing"):
        return f"sized by {s['sizing'].get('by')}: {' '.join(s.get('sizes_argv', []))}"
    return ""


def write_section(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    """Rewrite the ``gpu`` section of --benchmarks-md, keep its text in the JSON (for --render) and
    copy the page to --out."""
    sys.path.insert(0, str(BENCH))
    from harness.page import update_section

    page = update_section(
        "gpu",
        render(doc),
        script="gpu_check.py",
        argv=["--dry-run"] if doc.get("dry_run") else [],
        measured="the CUDA tests, the main job dense vs compressed in bf16 and float32 (stage seconds, peak "
        "GPU memory), a 1-process torchrun run against the plain one, and a budget-sized regime slice.",
        path=args.benchmarks_md,
    )
    m = SECTION.search(Path(page).read_text(encoding="utf-8"))
    doc["section"] = m.group(0) if m else None
    if args.out.resolve() != Path(page).resolve().parent:
        shutil.copyfile(page, args.out / "BENCHMARKS.md")


def splice(page: Path, section: str) -> None:
    """Put a section written on the device into ``page`` (its machine line stays the device's)."""
    text = page.read_text(encoding="utf-8") if page.is_file() else "# Benchmarks\n"
    text = SECTION.sub(lambda _: section, text, count=1) if SECTION.search(text) else text.rstrip() + f"\n\n{section}\n"
    tmp = page.with_name(f".{page.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, page)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        doc = json.loads(args.render.read_text())
        if not doc.get("section"):
            print(
                f"gpu_check.py: error: {args.render} holds no section (its run did not finish a step)", file=sys.stderr
            )
            return 2
        splice(args.benchmarks_md, doc["section"])
        print(f"wrote the gpu section of {args.benchmarks_md}")
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check.py: error: no CUDA device here; --dry-run runs the sequence on the CPU", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    args.device_info = device_record(args.device)
    print(f"[gpu_check] device: {args.device_info['name']} ({args.device}), budget {args.budget:.0f} s", flush=True)
    state = State(args, args.device_info)
    floors = {s: (DRY_FLOOR if args.dry_run else f) for s, f in FLOOR.items()}
    if not (BENCH / "bench_decision.py").is_file():
        floors["decision"] = 0
    clock = Clock(args.budget, floors)
    todo = [s for s in STEPS if s in args.steps and not state.done(s)]
    for i, step in enumerate(todo):
        allowed = clock.allowance(todo[i + 1 :])
        if allowed < min(floors[step], 15) and step != "decision":
            state.put(step, {"status": "skipped", "reason": f"budget spent ({clock.left():.0f} s left)"})
            continue
        try:
            if step == "tests":
                entry = step_tests(args, allowed)
            elif step.startswith("main_"):
                entry = step_main(args, step.split("_")[1], allowed)
            elif step in ("torchrun", "regime"):
                entry = (step_torchrun if step == "torchrun" else step_regime)(args, state, allowed)
            else:
                entry = step_decision(args, max(allowed, 1.0))
        except Exception as err:  # a step's own bug is recorded; the next step still runs
            entry = {"status": "failed", "reason": f"gpu_check: {type(err).__name__}: {err}"}
        state.put(step, entry)
        try:
            write_section(args, state.doc)
            state.write()
        except Exception as err:  # the JSON holds everything; the page is a rendering of it
            print(f"[gpu_check] section not written: {type(err).__name__}: {err}", flush=True)
        print(f"[gpu_check] {step}: {entry['status']} {entry.get('reason', '')}", flush=True)
    statuses = {s: state.doc["steps"].get(s, {}).get("status") for s in STEPS if s in args.steps}
    print(f"[gpu_check] {json.dumps(statuses)}; {state.path}", flush=True)
    return 0 if all(v in ("ok", "skipped") for v in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

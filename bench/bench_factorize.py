"""Factorization benchmark: wall time of ``factorize_`` on torchvision VGG16 (10 classes, random init,
r_max 200, init_rank 150; target ≤ 15 s on 2 cores, the reference takes ~190 s).

    python bench/bench_factorize.py              # VGG16, median of 3 (--threads: torch threads, default 1)
    python bench/bench_factorize.py --smoke      # ResNet-18, 1 run (CI)
    python bench/bench_factorize.py --accuracy   # also: randomized SVD vs exact on 4096×25088
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time

import torch
import torchvision
from harness import lib
from harness.report import table
from harness.run import Run, add_run_options, check_run_options, parser


def _time_layers(model: torch.nn.Module, init_rank: int, r_max: int) -> tuple[float, dict[str, float], dict]:
    """One factorize_ run; per-layer seconds from forward-pre hooks would not see the SVDs, so
    wrap the two factor constructors instead."""
    per_layer: dict[str, float] = {}
    originals = {cls: cls.__dict__["from_dense"] for cls in (lib.LowRankLinear, lib.TuckerConv2d)}
    names = {id(m): n for n, m in model.named_modules()}

    def wrap(cls):
        fn = originals[cls].__func__

        def timed(klass, module, *a, **kw):
            t = time.perf_counter()
            out = fn(klass, module, *a, **kw)
            per_layer[names.get(id(module), "?")] = time.perf_counter() - t
            return out

        return classmethod(timed)

    try:
        for cls in originals:
            cls.from_dense = wrap(cls)
        t = time.perf_counter()
        report = lib.factorize_(model, init_rank=init_rank, r_max=r_max)
        total = time.perf_counter() - t
    finally:
        for cls, orig in originals.items():
            cls.from_dense = orig
    return total, per_layer, report.to_dict()


def _accuracy(rank: int = 150) -> list[dict]:
    """Randomized (this library) vs torch.svd_lowrank(niter=4) on VGG16's classifier shape."""
    m, n = 4096, 25088
    g = torch.Generator().manual_seed(0)
    cases = {"random init": torch.randn(m, n, generator=g) / math.sqrt(n)}
    k = 1024
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)  # slow power-law decay (hard case)
    cases["sigma_i = 1/i"] = (u * s) @ v.mT + 1e-3 * torch.randn(m, n, generator=g) / math.sqrt(n)
    del u, v
    rows = []
    for name, a in cases.items():
        lam = torch.linalg.eigvalsh(lib.functional.gram64(a))
        sigma = lam.flip(0).clamp_min(0).sqrt()
        optimal = float(sigma[rank:].norm())
        ad = a.double()
        for method, fn in (
            ("compressor (block Krylov)", lambda a=a: lib.functional.top_singular(a, rank)),
            ("svd_lowrank q=r+20 niter=4", lambda a=a: torch.svd_lowrank(a, q=rank + 20, niter=4)),
        ):
            t = time.perf_counter()
            uu, ss, _ = fn()
            secs = time.perf_counter() - t
            uu = uu[:, :rank].double()
            err = float(torch.linalg.matrix_norm(ad - uu @ (uu.mT @ ad)))
            rel_sv = float(((ss[:rank].double() - sigma[:rank]).abs() / sigma[:rank]).max())
            row = dict(matrix=name, method=method, seconds=secs, error_over_optimal=err / optimal)
            rows.append(row | {"max_rel_sv_error": rel_sv})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, raw=True)
    ap.add_argument("--accuracy", action="store_true", help="also compare the randomized SVD's accuracy")
    # one thread by default: on a shared 2-core box a second OpenMP thread competing with other
    # jobs makes LAPACK calls several times slower
    add_run_options(ap, "factorize", smoke="ResNet-18, 1 run (CI)", threads=1)
    args = ap.parse_args(argv)
    check_run_options(ap, args, "factorize")
    run = Run(__file__, args, argv)

    arch = "resnet18" if args.smoke else "vgg16"
    runs = 1 if args.smoke else 3
    init_rank, r_max = 150, 200
    load_before = os.getloadavg()
    totals, per_layer, report = [], {}, {}
    for i in range(runs):
        torch.manual_seed(i)
        model = getattr(torchvision.models, arch)(num_classes=10).eval()
        total, per_layer, report = _time_layers(model, init_rank, r_max)
        totals.append(total)
    median = statistics.median(totals)
    n_fact = sum(1 for d in report["layers"] if d["factorized"])
    result = dict(model=f"torchvision {arch}, 10 classes, random init", init_rank=init_rank, r_max=r_max, runs=runs)
    result.update(seconds=totals, median_seconds=median, target_seconds=15.0, factorized_layers=n_fact)
    result.update(candidate_layers=len(report["layers"]), per_layer_seconds_last_run=per_layer)
    result.update(torch=torch.__version__, threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    result.update(machine=platform.machine(), loadavg_before=load_before, loadavg_after=os.getloadavg())
    head = ["runs", "median s", "all runs s", "factorized / candidates", "target s", "threads"]
    row = [runs, f"{median:.2f}", ", ".join(f"{t:.2f}" for t in totals), f"{n_fact} / {len(report['layers'])}"]
    row += [15, torch.get_num_threads(), f"{load_before[0]:.1f} → {os.getloadavg()[0]:.1f}"]
    shapes = {d["name"]: (d["shape"], d["ranks"]) for d in report["layers"]}
    slowest = []
    for name, secs in sorted(per_layer.items(), key=lambda kv: -kv[1])[:5]:
        shape, ranks = shapes.get(name, ([], []))
        slowest.append([name, "x".join(map(str, shape)), ",".join(map(str, ranks)), f"{secs:.2f}"])
    lines = [
        f"## factorize_ — {arch}, init_rank {init_rank}, r_max {r_max}",
        "",
        *table([*head, "load avg (1 min) before → after"], "rrlrrrl", [row]),
        "",
        *table(["slowest layers (last run)", "shape", "ranks", "s"], "lllr", slowest),
    ]
    if args.accuracy:
        result["accuracy"] = rows = _accuracy()
        head = ["4096×25088, rank 150", "method", "s", "‖A − UUᵀA‖ / optimal", "max rel. σ error"]
        cells = [
            [r["matrix"], r["method"], f"{r['seconds']:.2f}", f"{r['error_over_optimal']:.5f}"]
            + [f"{r['max_rel_sv_error']:.1e}"]
            for r in rows
        ]
        lines += ["", *table(head, "llrrr", cells)]
    run.publish(
        "factorize",
        result,
        "\n".join(lines),
        measured=f"wall time of factorize_ on torchvision {arch} (10 classes, random init; "
        "the time does not depend on the weights' values), SVD/HOSVD init.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

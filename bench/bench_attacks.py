"""Throughput of our ``pgd`` against ``torchattacks.PGD`` (10 steps, ℓ∞) on the same model and batches:
median images/s over repeats, the two alternating (which goes first flips every repeat), and the
largest difference of their images without random start.

    python bench/bench_attacks.py            # small VGG-like CNN, 32x32, 10 classes
    python bench/bench_attacks.py --smoke    # a few seconds
    python bench/bench_attacks.py --model vgg16 --device cuda
"""

from __future__ import annotations

import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
from harness import lib
from harness.measure import sync
from harness.report import table
from harness.run import Run, add_run_options, check_run_options, options, parser


def build_model(name: str) -> nn.Module:
    if name == "vgg16":
        from torchvision.models import vgg16

        return vgg16(weights=None, num_classes=10)  # random init; 32x32 works through its adaptive pool
    from torchvision.models.vgg import make_layers

    # conv-BN-ReLU blocks: 32, 32, pool, 64, 64, pool, 128, pool; then 2048 → 256 → 10
    features = make_layers([32, 32, "M", 64, 64, "M", 128, "M"], batch_norm=True)
    return nn.Sequential(features, nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(inplace=True), nn.Linear(256, 10))


def timed(attack, batches, device: torch.device) -> float:
    """Images per second of one pass over all batches."""
    sync(device)
    t0 = time.perf_counter()
    for x, y in batches:
        attack(x, y)
    sync(device)
    return sum(len(x) for x, _ in batches) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    options(ap, model=("small", None, ("small", "vgg16")), batch_size=32, batches=2, repeats=5, steps=10, eps=8 / 255)
    options(ap, device="cuda" if torch.cuda.is_available() else "cpu")
    add_run_options(ap, "attacks", smoke="tiny run: a few seconds", threads=1)
    args = ap.parse_args(argv)
    check_run_options(ap, args, "attacks")
    if args.smoke:
        args.batch_size, args.batches, args.repeats = 8, 1, 3
    run = Run(__file__, args, argv)
    import torchattacks  # optional test dependency; imported late so --help works without it

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model).to(device).eval()
    g = torch.Generator().manual_seed(1)
    n = args.batch_size
    xy = [(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)) for _ in range(args.batches)]
    batches = [(x.to(device), y.to(device)) for x, y in xy]
    pgd = dict(eps=args.eps, alpha=2.5 * args.eps / args.steps, steps=args.steps)  # the same step size for both
    impls = {"ours": lib.create_attack("pgd", model, **pgd), "torchattacks": torchattacks.PGD(model, **pgd)}
    # same function: without random start the two give the same images
    ref = torchattacks.PGD(model, **pgd, random_start=False)(*batches[0])
    max_diff = float((ref - lib.create_attack("pgd", model, **pgd, random_start=False)(*batches[0])).abs().max())

    for atk in impls.values():  # warm-up: allocator, kernels, lazy imports
        timed(atk, batches[:1], device)
    runs: dict[str, list[float]] = {k: [] for k in impls}
    order = list(impls)
    for r in range(args.repeats):
        for k in order if r % 2 == 0 else order[::-1]:
            runs[k].append(timed(impls[k], batches, device))
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = med["ours"] / med["torchattacks"]

    keys = ("model", "batch_size", "batches", "repeats", "steps", "eps", "threads", "device", "smoke")
    result = {
        "benchmark": "pgd_linf",
        "config": {k: getattr(args, k) for k in keys},
        "environment": {
            "torch": torch.__version__,
            "torchattacks": getattr(torchattacks, "__version__", "?"),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "images_per_second": {k: {"median": med[k], "runs": v} for k, v in runs.items()},
        "ratio_ours_over_torchattacks": ratio,
        "max_abs_diff_without_random_start": max_diff,
    }
    lines = [
        f"PGD ℓ∞, {args.steps} steps, ε = {args.eps:.4f}, model {args.model}, batch {args.batch_size} × "
        f"{args.batches}, device {args.device}, {args.threads} thread(s), {args.repeats} repeats (alternating "
        "order).",
        "",
        *table(
            ["implementation", "images/s (median)", "min", "max"],
            "lrrr",
            ([k, f"{med[k]:.1f}", f"{min(v):.1f}", f"{max(v):.1f}"] for k, v in runs.items()),
        ),
        "",
        f"Ratio ours / torchattacks: **{ratio:.3f}** (target ≥ 1.0); max |Δ| of the images without random "
        f"start: {max_diff:.2e}.",
    ]
    run.publish(
        "attacks",
        result,
        "\n".join(lines),
        measured="images per second of compressor's pgd against torchattacks.PGD (same model, batches, "
        "steps, step size, random start), median over repeats.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

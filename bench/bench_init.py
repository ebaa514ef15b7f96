"""Initial factors: SVD/HOSVD of the weights vs activation-aware bases, on a briefly trained VGG16.

    python bench/bench_init.py            # torchvision VGG16 on digits (32×32): dense 4 epochs, then factorize
    python bench/bench_init.py --smoke    # tiny CNN, 1 epoch (CI)

The dense model is trained as the main job's baseline does (Adam 1e-4, cosine, batch 32, from
random init: no pretrained weights offline), then factorized with the project's policy at
several initial ranks, once per ``factorize.init`` (``svd``: the weights alone; ``activations``:
bases from 8 calibration batches, compressor/calibration.py). For each: compression rate and
validation accuracy right after factorization (no training), and after one RobustDLRT epoch
(β 0.075, τ 0.1, AdamW 5e-4, clip 1.0, as the recipes). Writes bench/results/init.json and the "init" section of
BENCHMARKS.md. ``--dense-cache FILE`` keeps the dense weights for a rerun with other ranks.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

import benchmarks_md  # noqa: E402

from compressor.atomic import write_text  # noqa: E402
from compressor.data import build_data, set_epoch  # noqa: E402
from compressor.factorize import factorize_  # noqa: E402
from compressor.models import create_model  # noqa: E402
from compressor.recipe import BaselineSection, DataSection, TrainSection  # noqa: E402
from compressor.runtime import compression_stats  # noqa: E402
from compressor.train import Trainer, clean_accuracy  # noqa: E402


def _tiny_cnn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CNN, 96 images, 1 epoch (CI)")
    ap.add_argument("--model", default="tv:vgg16")
    ap.add_argument("--dense-epochs", type=int, default=4)
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 150])
    ap.add_argument("--r-max", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--dense-cache",
        type=Path,
        default=None,
        help="reuse the dense weights saved here by an earlier run with the same settings (or save them)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "init.json")
    ap.add_argument(
        "--benchmarks-md",
        type=Path,
        default=None,
        help="page whose 'init' section the table replaces (default: BENCHMARKS.md; --smoke: none)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    section = DataSection(
        name="digits",
        batch_size=32,
        eval_batch_size=128,
        **({"train_subset": 96, "val_subset": 64} if args.smoke else {}),
    )
    if args.smoke:
        args.dense_epochs, args.ranks, args.r_max = 1, [4], 16
    data = build_data(section, input_size=32, seed=0)
    torch.manual_seed(0)
    if args.smoke:
        dense = _tiny_cnn(data.num_classes)
    else:
        dense, _ = create_model(
            args.model, data.num_classes, in_chans=data.in_chans, mean=data.mean, std=data.std, input_size=32
        )

    t = time.perf_counter()
    if args.dense_cache is not None and args.dense_cache.is_file():
        dense.load_state_dict(torch.load(args.dense_cache, weights_only=True))
    else:
        torch.manual_seed(1)
        Trainer(
            dense,
            data.train_loader,
            BaselineSection(epochs=args.dense_epochs, lr=1e-4, schedule="cosine", checkpoint_every=0),
            set_epoch=set_epoch,
            name="dense",
        ).fit()
        if args.dense_cache is not None:
            args.dense_cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dense.state_dict(), args.dense_cache)
    dense_seconds = time.perf_counter() - t
    cpu = torch.device("cpu")
    dense_acc = clean_accuracy(dense, data.val_loader, cpu)

    rows = []
    for rank in args.ranks:
        for init in ("svd", "activations"):
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            set_epoch(data.train_loader, 0)
            report = factorize_(
                model,
                init_rank=rank,
                r_min=2,
                r_max=args.r_max,
                calibration=data.train_loader if init == "activations" else None,
            )
            seconds = time.perf_counter() - t
            acc0, cr0 = clean_accuracy(model, data.val_loader, cpu), compression_stats(model).rate
            torch.manual_seed(2)
            history = Trainer(
                model,
                data.train_loader,
                TrainSection(
                    epochs=1,
                    optimizer="adamw",
                    lr=5e-4,
                    grad_clip=1.0,
                    beta=0.075,
                    tau=0.1,
                    coefficient_steps=10,
                    schedule="cosine",
                    checkpoint_every=0,
                ),
                val_loader=data.val_loader,
                set_epoch=set_epoch,
                name=init,
            ).fit()
            rows.append(
                {
                    "init_rank": rank,
                    "init": init,
                    "factorized_layers": len(report.factorized),
                    "compression_rate_at_init": cr0,
                    "factorize_seconds": seconds,
                    "accuracy_at_init": acc0,
                    "accuracy_after_one_epoch": history.epochs[-1]["val_accuracy"],
                    "compression_rate_after_one_epoch": history.epochs[-1]["compression_rate"],
                }
            )

    name = "tiny CNN" if args.smoke else args.model
    lines = [
        f"{name} on digits ({data.n_train} training / {data.n_val} validation images, 32×32): dense baseline "
        f"{args.dense_epochs} epoch(s) of Adam 1e-4 from random init → **{100 * dense_acc:.1f} %** validation "
        f"accuracy. Then factorized (policy: first conv and classifier dense, r_max {args.r_max}, break-even "
        "caps) and trained one RobustDLRT epoch (β 0.075, τ 0.1, AdamW 5e-4, clip 1.0).",
        "",
        "| initial rank | init | c.r. at init % | accuracy at init % | after 1 epoch % | c.r. after 1 epoch % "
        "| factorize s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['init_rank']} | {r['init']} | {r['compression_rate_at_init']:.2f} | "
            f"{100 * r['accuracy_at_init']:.1f} | {100 * r['accuracy_after_one_epoch']:.1f} | "
            f"{r['compression_rate_after_one_epoch']:.2f} | {r['factorize_seconds']:.1f} |"
        )
    print("\n".join(lines))
    result = {
        "model": name,
        "dense_accuracy": dense_acc,
        "dense_epochs": args.dense_epochs,
        "dense_seconds": dense_seconds,
        "rows": rows,
        "smoke": args.smoke,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    md = args.benchmarks_md or (None if args.smoke else benchmarks_md.DEFAULT_PATH)
    benchmarks_md.update_section(
        "init",
        "\n".join(lines),
        script="bench_init.py",
        argv=list(sys.argv[1:] if argv is None else argv),
        path=md,
        measured="validation accuracy of the same briefly trained dense model right after factorizing it with "
        "weight-SVD vs activation-aware initial bases, and after one RobustDLRT epoch.",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

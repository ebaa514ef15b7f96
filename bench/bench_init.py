"""Initial factors: SVD/HOSVD of the weights vs activation-aware bases, on a briefly trained VGG16.

The dense model (digits at 32×32, Adam 1e-4 from random init) is factorized at several initial ranks
once per ``factorize.init``; for each, accuracy and c.r. right after factorizing and after one
RobustDLRT epoch. ``--dense-cache FILE`` keeps the dense weights for a rerun with other ranks.

    python bench/bench_init.py            # torchvision VGG16: dense 4 epochs, then factorize
    python bench/bench_init.py --smoke    # tiny CNN, 1 epoch (CI)
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from harness import lib
from harness.measure import dense_weights
from harness.report import table
from harness.run import Run, add_run_options, check_run_options, options, parser
from torch import nn


def _tiny_cnn(classes: int) -> nn.Module:
    conv = lambda i, o: (nn.Conv2d(i, o, 3, padding=1), nn.ReLU())  # built in order: the draws of their init
    features = (*conv(3, 16), *conv(16, 32), nn.MaxPool2d(2), *conv(32, 32), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return nn.Sequential(*features, nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, classes))


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    options(ap, model="tv:vgg16", dense_epochs=4, ranks=[32, 64, 150], r_max=200)
    options(ap, dense_cache=(None, "reuse the dense weights saved here (or save them)", Path))
    add_run_options(ap, "init", smoke="tiny CNN, 96 images, 1 epoch (CI)", threads=2)
    args = ap.parse_args(argv)
    check_run_options(ap, args, "init")
    run = Run(__file__, args, argv)
    subsets = {"train_subset": 96, "val_subset": 64} if args.smoke else {}
    section = lib.DataSection(name="digits", batch_size=32, eval_batch_size=128, **subsets)
    if args.smoke:
        args.dense_epochs, args.ranks, args.r_max = 1, [4], 16
    data = lib.build_data(section, input_size=32, seed=0)
    torch.manual_seed(0)
    if args.smoke:
        dense = _tiny_cnn(data.num_classes)
    else:
        dense, _ = lib.create_model(
            args.model, data.num_classes, in_chans=data.in_chans, mean=data.mean, std=data.std, input_size=32
        )
    cfg = lib.BaselineSection(epochs=args.dense_epochs, lr=1e-4, schedule="cosine", checkpoint_every=0)
    t = time.perf_counter()
    dense_weights(dense, data.train_loader, cfg, seed=0, cache=args.dense_cache, name="dense")
    dense_seconds = time.perf_counter() - t
    cpu = torch.device("cpu")
    dense_acc = lib.clean_accuracy(dense, data.val_loader, cpu)

    robust = dict(optimizer="adamw", lr=5e-4, grad_clip=1.0, beta=0.075, tau=0.1, coefficient_steps=10)
    robust = lib.TrainSection(epochs=1, **robust, schedule="cosine", checkpoint_every=0)
    rows = []
    for rank in args.ranks:
        for init in ("svd", "activations"):
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            lib.set_epoch(data.train_loader, 0)
            calibration = data.train_loader if init == "activations" else None
            report = lib.factorize_(model, init_rank=rank, r_min=2, r_max=args.r_max, calibration=calibration)
            seconds = time.perf_counter() - t
            acc0, cr0 = lib.clean_accuracy(model, data.val_loader, cpu), lib.compression_stats(model).rate
            torch.manual_seed(2)
            history = lib.Trainer(
                model, data.train_loader, robust, val_loader=data.val_loader, set_epoch=lib.set_epoch, name=init
            ).fit()
            last = history.epochs[-1]
            row = dict(init_rank=rank, init=init, factorized_layers=len(report.factorized))
            row.update(compression_rate_at_init=cr0, factorize_seconds=seconds, accuracy_at_init=acc0)
            row.update(accuracy_after_one_epoch=last["val_accuracy"])
            rows.append(row | {"compression_rate_after_one_epoch": last["compression_rate"]})

    name = "tiny CNN" if args.smoke else args.model
    head = ["initial rank", "init", "c.r. at init %", "accuracy at init %", "after 1 epoch %"]
    cells = [
        [r["init_rank"], r["init"], f"{r['compression_rate_at_init']:.2f}", f"{100 * r['accuracy_at_init']:.1f}"]
        + [f"{100 * r['accuracy_after_one_epoch']:.1f}", f"{r['compression_rate_after_one_epoch']:.2f}"]
        + [f"{r['factorize_seconds']:.1f}"]
        for r in rows
    ]
    lines = [
        f"{name} on digits ({data.n_train} training / {data.n_val} validation images, 32×32): dense baseline "
        f"{args.dense_epochs} epoch(s) of Adam 1e-4 from random init → **{100 * dense_acc:.1f} %** validation "
        f"accuracy. Then factorized (policy: first conv and classifier dense, r_max {args.r_max}, break-even "
        "caps) and trained one RobustDLRT epoch (β 0.075, τ 0.1, AdamW 5e-4, clip 1.0).",
        "",
        *table([*head, "c.r. after 1 epoch %", "factorize s"], "rlrrrrr", cells),
    ]
    result = dict(model=name, dense_accuracy=dense_acc, dense_epochs=args.dense_epochs, dense_seconds=dense_seconds)
    result.update(rows=rows, smoke=args.smoke)
    run.publish(
        "init",
        result,
        "\n".join(lines),
        measured="validation accuracy of the same briefly trained dense model right after factorizing it with "
        "weight-SVD vs activation-aware initial bases, and after one RobustDLRT epoch.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

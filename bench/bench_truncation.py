"""Cost of one DLRT truncation with and without re-factoring the tall bases: VGG16 at 32×32.

The trainer's truncation (every layer's ``truncate_`` and the optimizer state's map) after one real
cycle (digits, AdamW), on copies of the same state, alternating: *refactored* (U·P re-factored by
Cholesky QR; the trainer does it every 8th truncation) and *rotated* (U·P, P orthonormal). Reported:
median seconds, their ratio, the trainer's mean per truncation, the worst ‖UᵀU − I‖ after each.

    python bench/bench_truncation.py            # VGG16, ours and the reference's ranks, 7 repeats
    python bench/bench_truncation.py --smoke    # ResNet-18, ranks ≤ 16, 2 repeats (seconds; CI)
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import time

import torch
from bench_dlrt import build_model, digits_batches
from harness import lib
from harness.report import table
from harness.run import Run, add_run_options, check_run_options, options, parser


def _orthonormality_error(trainer: lib.Trainer) -> float:
    worst = 0.0
    for layer in trainer.layers.values():
        for basis in layer.bases():
            b = basis.detach().double()
            worst = max(worst, float((b.mT @ b - torch.eye(b.shape[1], dtype=torch.float64)).abs().max()))
    return worst


def measure_model(name: str, args) -> dict:
    model = build_model("lowrank_reference_ranks" if name == "reference_ranks" else "lowrank", args)[0]
    batches = digits_batches(args.s_star, args.batch_size, size=args.size)
    cfg = dict(optimizer="adamw", lr=5e-4, grad_clip=1.0, beta=0.075, tau=args.tau, coefficient_steps=args.s_star)
    cfg = lib.TrainSection(epochs=1, **cfg, amp="off", checkpoint_every=0)
    trainer = lib.Trainer(model, batches, cfg, set_epoch=lambda loader, epoch: None)
    model.train()
    for i, (x, y) in enumerate(batches):  # one cycle up to its truncation
        if i == 0:
            trainer._set_bases_trainable(True)
        loss, _, _ = trainer._forward_backward(x, y)
        lib.guarded_step(trainer.params, trainer.optimizer, cfg.grad_clip, loss)
        if i == 0:
            trainer._augment()
            trainer._set_bases_trainable(False)
    state = copy.deepcopy((model.state_dict(), trainer.optimizer.state_dict()))
    seconds: dict[str, list[float]] = {"refactored": [], "rotated": []}
    error: dict[str, float] = {}
    ranks: dict[str, list] = {}
    for _ in range(args.repeats):
        for form in seconds:
            model.load_state_dict(state[0])  # resizes the factors back to the cycle's ranks
            trainer.optimizer.load_state_dict(state[1])
            t = time.perf_counter()
            trainer._truncate(exact=form == "refactored")
            seconds[form].append(time.perf_counter() - t)
            error[form] = _orthonormality_error(trainer)
            ranks[form] = [list(l.ranks) for l in trainer.layers.values()]
    med = {k: statistics.median(v) for k, v in seconds.items()}
    run_mean = (7 * med["rotated"] + med["refactored"]) / 8
    out = dict(layers=len(trainer.layers), seconds=seconds, median=med)
    out.update(rotated_over_refactored=med["rotated"] / med["refactored"], run_mean=run_mean)
    out.update(run_mean_over_refactored=run_mean / med["refactored"], orthonormality_error=error)
    return out | {"same_ranks": ranks["rotated"] == ranks["refactored"]}


def markdown(res: dict, args) -> str:
    head = ["model", "layers", "refactored, median", "rotated, median", "rotated / refactored"]
    head += ["trainer's mean per truncation (7 rotated + 1 refactored) / refactored"]
    head += ["‖UᵀU − I‖ after refactored / rotated", "same ranks"]
    cells = []
    for name, r in res["models"].items():
        e, med = r["orthonormality_error"], r["median"]
        cells.append(
            [name, r["layers"], f"{med['refactored'] * 1e3:.0f} ms", f"{med['rotated'] * 1e3:.0f} ms"]
            + [f"{r['rotated_over_refactored']:.2f}", f"{r['run_mean_over_refactored']:.2f}"]
            + [f"{e['refactored']:.1e} / {e['rotated']:.1e}", r["same_ranks"]]
        )
    lines = [
        f"Truncation (every layer's truncate_ + the optimizer state's map) of torchvision {args.model} at "
        f"{args.size}×{args.size}, after one cycle (s* = {args.s_star}, τ = {args.tau}), {args.repeats} "
        "repeats of each form, alternating, on copies of the same state.",
        "",
        *table(head, "lrrrrrrl", cells),
        "",
        f"Load average before / after: {res['load_before']} / {res['load_after']} on {os.cpu_count()} cores.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, raw=True)
    options(ap, model="vgg16", batch_size=32, init_rank=150, r_max=200, tau=0.1, s_star=10, repeats=7)
    add_run_options(ap, "truncation", smoke="ResNet-18, ranks ≤ 16, 2 repeats (seconds; CI)", threads=2)
    args = ap.parse_args(argv)
    check_run_options(ap, args, "truncation")
    args.size = 32
    if args.smoke:
        args.model, args.batch_size, args.init_rank, args.r_max, args.s_star, args.repeats = "resnet18", 8, 8, 16, 3, 2
    run = Run(__file__, args, argv)
    lib.enable_huge_pages()
    load_before = [round(x, 2) for x in os.getloadavg()]
    models = {name: measure_model(name, args) for name in ("ours", "reference_ranks")}
    res = dict(
        args=vars(args), models=models, load_before=load_before, load_after=[round(x, 2) for x in os.getloadavg()]
    )
    res["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    text = markdown(res, args)
    run.publish(
        "truncation",
        res,
        text,
        measured="seconds of one DLRT truncation with the tall bases re-factored (Cholesky QR of U·P) and without "
        "(U·P, P orthonormal to float64 round-off), alternating on copies of one training state; "
        "orthonormality of the bases after each.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

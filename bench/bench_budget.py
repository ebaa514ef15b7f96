"""Compress to a budget: budget-RobustDLRT against the one-shot baseline at the same ranks.

Fashion-MNIST (Debian package ``dataset-fashion-mnist``), torchvision VGG16 at 32×32 RGB, random
init. Per seed (a seed draws the subsets, the initialization, the batch order and the attacks):

1. dense: ``Trainer`` with the recipe's ``baseline`` section (Adam ``--dense-lr``, cosine,
   ``--dense-epochs``); its weights are the start of every arm below;
2. per budget (MACs ``--macs`` and parameters ``--params``, fractions of the dense model's):
   - **budget-RobustDLRT**: ``factorize_and_train`` with ``train.target`` set (β ``--beta``,
     τ ``--tau``, ``--epochs`` rank-adaptive epochs, the budget reached over ``--ramp`` of them);
   - **one-shot baseline**: the dense weights factorized by SVD / Tucker (HOSVD) at each layer's
     cap, truncated at once to exactly the per-layer ranks the RobustDLRT arm ended at, then
     plain fine-tuning of every factor at those fixed ranks (the factors as plain layers, as after
     AIMET's SVD compression; β = 0) with the same optimizer, schedule, clipping and number of
     epochs. Its latency is that of the unfolded factors (``fold="none"``), RobustDLRT's that of
     the forms the export picks (the fewest MACs at no more parameters);
3. every model: clean accuracy and ℓ2-FGSM accuracy (ε in pixel units) on the same validation
   images, parameters and c.r., multiply-adds per image, and onnxruntime latency at batch 1 and
   32, the compressed model timed side by side with the dense one (speedup = dense median /
   compressed median).

Outputs: ``--out`` (JSON, every entry), a Pareto plot ``<out stem>_pareto.png`` beside it (clean
accuracy vs batch-32 latency), the Markdown table on stdout and in the ``budget`` section of
``--benchmarks-md`` (default BENCHMARKS.md; ``--smoke``: none), with plain-words verdicts.

    python bench/bench_budget.py --smoke      # < 1 min: digits, timm:test_resnet, 1 seed, 2 budgets (CI)
    python bench/bench_budget.py --checkpoint-dir bench/results/budget-ckpt   # the full sweep

With ``--checkpoint-dir`` every finished entry is saved at once (and the dense weights of each
seed); a rerun with the same settings skips what is finished.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import lib
from harness.entries import Clock, EntryStore
from harness.measure import EPS_L2 as EPS
from harness.measure import dense_weights, latency_vs_dense, ranks, robustness, sizes, slim
from harness.report import mean_std, met, pareto_plot, table
from harness.run import Run, add_run_options, at_least, check_run_options, parser, recipe

log = logging.getLogger("bench_budget")
ARMS = {"robustdlrt": "budget-RobustDLRT", "oneshot": "one-shot + fine-tune"}
_FINGERPRINT = ("model", "data", "data_root", "input_size", "train_subset", "val_subset", "batch_size")
_FINGERPRINT += ("dense_epochs", "epochs", "dense_lr", "beta", "tau", "ramp", "coefficient_steps")
_FINGERPRINT += ("attack_samples", "latency_repeats", "latency_threads")
HISTORY = ("epoch", "phase", "train_loss", "train_accuracy", "compression_rate", "seconds", "budget")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--model", default="tv:vgg16")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-root", default=None, help="data.root (fashion-mnist: the Debian package's files)")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--macs", type=float, nargs="*", default=[0.5, 0.25, 0.15], help="MAC budgets (fractions)")
    ap.add_argument("--params", type=float, nargs="*", default=[0.1, 0.05, 0.02], help="parameter budgets")
    ap.add_argument("--train-subset", type=int, default=3000)
    ap.add_argument("--val-subset", type=int, default=1000, help="evaluation images (held out of training)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dense-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each arm (rank-adaptive / fixed-rank)")
    ap.add_argument("--dense-lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.075)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--ramp", type=float, default=0.5, help="train.target.ramp")
    ap.add_argument("--coefficient-steps", type=int, default=10)
    ap.add_argument("--attack-samples", type=int, default=1000, help="images attacked by ℓ2-FGSM")
    ap.add_argument("--latency-repeats", type=int, default=20)
    ap.add_argument("--latency-threads", type=int, default=2)
    ap.add_argument("--target-macs", type=float, default=0.2, help="the issue's target point")
    ap.add_argument("--target-points", type=float, default=2.0, help="clean points above the baseline")
    ap.add_argument("--target-speedup", type=float, default=4.0, help="over dense at batch 32")
    add_run_options(ap, "budget", smoke="< 1 min: digits, timm:test_resnet, tiny sizes (CI)", resumable=True)
    args = ap.parse_args(argv)
    check_run_options(ap, args, "budget")
    if args.smoke:
        args.model, args.data, args.seeds, args.macs, args.params = "timm:test_resnet", "digits", [0], [0.25], [0.05]
        args.train_subset, args.val_subset, args.batch_size, args.dense_epochs, args.epochs = 64, 32, 32, 1, 1
        args.dense_lr, args.coefficient_steps, args.attack_samples, args.latency_repeats = 1e-3, 2, 32, 3
    for f in args.macs + args.params + [args.target_macs]:
        if not 0.0 < f <= 1.0:
            ap.error(f"budget {f:g} is not a fraction in (0, 1]")
    if not args.macs and not args.params:
        ap.error("give at least one budget (--macs or --params)")
    at_least(ap, args, 1, "train_subset", "val_subset", "batch_size", "epochs", "attack_samples", "latency_repeats")
    if args.dense_epochs < 0 or any(s < 0 for s in args.seeds):
        ap.error("--dense-epochs and --seeds must not be negative")
    args.seeds, args.macs, args.params = (list(dict.fromkeys(x)) for x in (args.seeds, args.macs, args.params))
    return args


def budgets(args: argparse.Namespace) -> list[tuple[str, float]]:
    return [("macs", f) for f in args.macs] + [("params", f) for f in args.params]


def bkey(kind: str, f: float) -> str:
    return f"{kind}={f:g}"


def recipe_for(args: argparse.Namespace, seed: int, kind: str | None = None, fraction: float = 1.0) -> lib.Recipe:
    target = {kind: fraction, "ramp": args.ramp} if kind else {}
    train = dict(epochs=args.epochs, beta=args.beta, tau=args.tau, coefficient_steps=args.coefficient_steps)
    return recipe(args, seed, source="bench_budget", train={**train, "target": target})


# ----------------------------------------------------------------------------- measuring


def measure(model, loader, args, seed: int, onnx: dict[str, Path] | None, of: torch.nn.Module | None = None) -> dict:
    """Accuracy (clean, ℓ2-FGSM), size, MACs and (``onnx``: dense and a path to write) latency;
    ``of``: the factorized model whose parameters and MACs ``model`` has (default: itself)."""
    out = robustness(model, loader, samples=args.attack_samples, seed=seed)
    out.update(sizes(model if of is None else of, args.input_size))
    if onnx is not None:
        lib.export_onnx(model, onnx["compressed"], input_size=args.input_size, check=False)
        out.update(
            latency_vs_dense(
                onnx, args.input_size, threads=args.latency_threads, repeats=args.latency_repeats, seed=seed
            )
        )
        onnx["compressed"].unlink(missing_ok=True)
    return out


def one_shot(args, seed: int, kind: str, f: float, dense, data, want: dict[str, list[int]]) -> dict[str, Any]:
    """The baseline: SVD/HOSVD cut at once to RobustDLRT's ranks, then every factor fine-tuned."""
    model = copy.deepcopy(dense)
    r = recipe_for(args, seed, kind, f)
    lib.factorize_(model, r.factorize.model_copy(update={"init": "svd", "init_rank": None}), seed=seed)
    layers = lib.low_rank_layers(model)
    if set(layers) != set(want):
        raise RuntimeError(f"one-shot factorized other layers than RobustDLRT: {sorted(set(layers) ^ set(want))}")
    for name, layer in layers.items():
        layer.truncate_(0.0, rank_cap=tuple(want[name]))  # τ = 0: only the cap cuts
    same = ranks(model) == want
    if not same:
        log.warning("seed %d %s: one-shot ranks differ from RobustDLRT's", seed, bkey(kind, f))
    before = lib.clean_accuracy(model, data.val_loader, torch.device("cpu"))
    # every factor trains (Vᵀ, S, U or U_in, core, U_out as plain layers at these ranks), as after AIMET's SVD
    # compression
    plain = lib.plain_model(model, lib.plan_export(model, "none")).train()
    keep = ("optimizer", "lr", "momentum", "weight_decay", "schedule", "grad_clip")
    cfg = lib.BaselineSection(**{k: getattr(r.train, k) for k in keep}, epochs=args.epochs, checkpoint_every=0)
    torch.manual_seed(seed + 3)
    t1 = time.perf_counter()
    history = lib.Trainer(plain, data.train_loader, cfg, seed=seed, name="one-shot", set_epoch=lib.set_epoch).fit()
    train_s = time.perf_counter() - t1
    return dict(
        plain=plain, model=model, ranks=ranks(model), ranks_match_robustdlrt=same, clean_before_finetune=before,
        train_seconds=train_s, history=slim(history, *HISTORY),
    )  # fmt: skip


def run_seed(args: argparse.Namespace, seed: int, state: EntryStore, work: Path, clock: Clock, exported: dict) -> None:
    """Dense (trained once per seed, its ONNX graph exported once per run), then both arms per budget."""
    todo = state.missing(*((seed, bkey(k, f), a) for k, f in budgets(args) for a in ARMS))
    if not todo and state.get(seed, "dense", "dense"):
        return
    rec = recipe_for(args, seed)
    torch.manual_seed(seed)
    data = lib.build_data(rec.data, input_size=args.input_size, seed=seed)
    dense, _ = lib.create_model(
        args.model, data.num_classes, in_chans=data.in_chans, mean=data.mean, std=data.std, input_size=args.input_size
    )
    weights, done_dense = state.weights(seed), state.get(seed, "dense", "dense") is not None
    t0 = time.perf_counter()
    history, train_s = dense_weights(
        dense, data.train_loader, rec.baseline, seed=seed, cache=weights, reuse=done_dense, name="dense"
    )
    if not done_dense:
        m = measure(dense, data.val_loader, args, seed, None)
        hist = slim(history, *HISTORY) if history else []
        state.add(
            dict(seed=seed, budget="dense", arm="dense", **m, n_train=data.n_train, train_seconds=train_s, history=hist)
        )
        logged(clock, "dense", t0, state)
    if "dense" not in exported:  # the same graph for every seed: exported once
        exported["dense"] = work / "dense.onnx"
        lib.export_onnx(dense, exported["dense"], input_size=args.input_size, check=False)
    onnx = {"dense": exported["dense"], "compressed": work / "compressed.onnx"}
    for kind, f in budgets(args):
        key, head = bkey(kind, f), dict(seed=seed, budget=bkey(kind, f), kind=kind, fraction=f)
        if state.get(seed, key, "robustdlrt") is None:
            t0 = time.perf_counter()
            model = copy.deepcopy(dense)
            log.info("seed %d %s: budget-RobustDLRT, factorize + %d epoch(s)", seed, key, args.epochs)
            r = recipe_for(args, seed, kind, f)
            _, history, secs = lib.factorize_and_train(
                model, data.train_loader, r, device=torch.device("cpu"), set_epoch=lib.set_epoch
            )
            m = measure(model, data.val_loader, args, seed, onnx)
            more = dict(ranks=ranks(model), train_seconds=secs["train"], factorize_seconds=secs["factorize"])
            state.add({**head, "arm": "robustdlrt", **m, **more, "history": slim(history, *HISTORY)})
            logged(clock, "robustdlrt", t0, state)
            del model
        if state.get(seed, key, "oneshot") is None:
            t0 = time.perf_counter()
            o = one_shot(args, seed, kind, f, dense, data, state.get(seed, key, "robustdlrt")["ranks"])
            plain, model = o.pop("plain"), o.pop("model")
            state.add({**head, "arm": "oneshot", **measure(plain, data.val_loader, args, seed, onnx, of=model), **o})
            logged(clock, "oneshot", t0, state)
    if weights is not None:
        weights.unlink(missing_ok=True)  # every entry of this seed is saved


def logged(clock: Clock, kind: str, t0: float, state: EntryStore) -> None:
    """Log the entry and how long the rest of this invocation should take at this pace."""
    left, e = clock.done(kind, t0), state.entries[-1]
    speed = f"{e['speedup']['32']:.2f}×" if "speedup" in e else "—"
    log.info(
        "seed %d %s %s: clean %.1f%%, MACs %.3f, params %.3f, speedup b32 %s, %.0f s; ≈ %.0f min left at this pace",
        *(e["seed"], e["budget"], e["arm"], 100 * e["clean"], e["macs_fraction"], e["params_fraction"], speed),
        *(time.perf_counter() - t0, left),
    )


# ----------------------------------------------------------------------------- aggregation and report


def rows(args: argparse.Namespace, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (budget, arm): the entries over seeds and the paired RobustDLRT − baseline clean gaps."""
    out = []
    for kind, f in budgets(args):
        key = bkey(kind, f)
        by = {a: {e["seed"]: e for e in entries if e["budget"] == key and e["arm"] == a} for a in ARMS}
        gaps = [100 * (by["robustdlrt"][s]["clean"] - by["oneshot"][s]["clean"]) for s in by["oneshot"]]
        for arm, es in by.items():
            if es:
                gap = gaps if arm == "robustdlrt" else []
                out.append(dict(kind=kind, fraction=f, budget=key, arm=arm, entries=list(es.values()), gaps=gap))
    return out


def verdicts(args: argparse.Namespace, table: list[dict[str, Any]]) -> list[str]:
    lines = []
    lost = [r["budget"] for r in table if r["gaps"] and statistics.fmean(r["gaps"]) <= 0]
    paired = [r for r in table if r["gaps"]]
    if paired:
        lines.append(
            f"- Budget-RobustDLRT is above the one-shot baseline (clean, mean over seeds) at "
            f"{len(paired) - len(lost)} of {len(paired)} budgets"
            + (f"; **it does not beat the baseline at {', '.join(lost)}**." if lost else ".")
        )
    macs = [r for r in paired if r["kind"] == "macs"]
    if not macs:
        return lines + [f"- Target at {args.target_macs:g} of the MACs: not measured (no MAC budget in this run)."]
    within = [r for r in macs if r["fraction"] <= args.target_macs + 1e-9]
    near = lambda r: abs(r["fraction"] - args.target_macs)  # noqa: E731
    r = max(within, key=lambda r: r["fraction"]) if within else min(macs, key=near)
    gap = statistics.fmean(r["gaps"])
    sp = [e["speedup"]["32"] for e in r["entries"] if "speedup" in e]
    speed = statistics.fmean(sp) if sp else float("nan")
    where = (
        f"the MAC budget {r['fraction']:g}"
        + (f" (the largest ≤ {args.target_macs:g}: the model ends within the target)" if within else " (closest)")
        + f", reached {mean_std([e['macs_fraction'] for e in r['entries']], 3)} of the dense MACs"
    )
    lines.append(
        f"- Target at {args.target_macs:g} of the MACs, measured at {where}: RobustDLRT − baseline clean = "
        f"{gap:+.1f} points (target ≥ {args.target_points:g}: {met(gap >= args.target_points)}); "
        f"speedup over dense at batch 32 in onnxruntime = {speed:.2f}× (target ≥ {args.target_speedup:g}×: "
        f"{met(speed >= args.target_speedup)})."
    )
    return lines


def render(args: argparse.Namespace, doc: dict[str, Any], pareto: str | None = None) -> str:
    """The section: settings, the table (mean ± std over seeds), verdicts; ``pareto``: the plot's path as shown."""
    groups = rows(args, doc["entries"])
    dense = [e for e in doc["entries"] if e["arm"] == "dense"]
    eps_h = [f"ℓ2-FGSM ε={x:g}" if i == 0 else f"ε={x:g}" for i, x in enumerate(EPS)]
    cells = []
    if dense:
        fg = [mean_std([e["l2_fgsm"][str(x)] for e in dense], scale=100) for x in EPS]
        clean, secs = mean_std([e["clean"] for e in dense], scale=100), mean_std([e["train_seconds"] for e in dense], 0)
        cells.append(["dense", "—", "1", "0", "1", clean, *fg, "1×", "1×", "—", secs])
    for r in groups:
        es = r["entries"]

        def col(key: str, digits: int = 1, scale: float = 1.0, es=es) -> str:
            return mean_std([e[key] for e in es], digits, scale)

        row = [f"{r['kind']} {r['fraction']:g}", ARMS[r["arm"]], col(r["kind"] + "_fraction", 3)]
        row += [col("compression_rate", 2), col("macs_fraction", 3), col("clean", scale=100)]
        row += [mean_std([e["l2_fgsm"][str(x)] for e in es], scale=100) for x in EPS]
        row += [mean_std([e.get("speedup", {}).get(b) for e in es], 2, suffix="×") for b in ("1", "32")]
        cells.append(row + [mean_std(r["gaps"]) if r["gaps"] else "—", col("train_seconds", 0)])
    head = ["budget", "method", "reached", "c.r. %", "MACs ratio", "clean", *eps_h, "speedup b1", "speedup b32"]
    head += ["RobustDLRT − baseline clean (points)", "train s"]
    out = [
        f"## Compress to a budget: {args.model} on {args.data}",
        "",
        f"{len(args.seeds)} seed(s) ({', '.join(map(str, args.seeds))}), mean ± std. {doc['n_train']} training / "
        f"{doc['n_eval']} held-out evaluation images at {args.input_size}×{args.input_size}. Dense: Adam "
        f"{args.dense_lr:g}, {args.dense_epochs} epoch(s). From the same dense weights per seed: budget-RobustDLRT "
        f"(activation-aware init, AdamW 5e-4 cosine clip 1.0, β {args.beta:g}, τ {args.tau:g}, {args.epochs} "
        f"rank-adaptive epoch(s), budget reached over the first {args.ramp:g} of the truncations) and the one-shot "
        f"baseline (SVD/HOSVD truncated at once to the same per-layer ranks, then {args.epochs} epoch(s) training "
        "every factor with the same optimizer; its latency is that of the unfolded factors). Accuracies in %; "
        "ℓ2-FGSM ε in pixel units on "
        f"{doc['n_attacked']} images. 'reached' = the budgeted quantity (MACs or params) as a fraction of dense; "
        f"speedup = dense / compressed onnxruntime median ({args.latency_threads} threads, {args.latency_repeats} "
        "runs each, timed side by side). Gap = RobustDLRT − baseline clean accuracy, paired by seed.",
        "",
        *table(head, "ll" + "r" * (len(head) - 2), cells),
    ]
    mismatched = [f"{e['seed']}/{e['budget']}" for e in doc["entries"] if e.get("ranks_match_robustdlrt") is False]
    out += ["", "Verdict:", ""] + verdicts(args, groups)
    if mismatched:
        out.append(f"- The one-shot ranks differ from RobustDLRT's at {', '.join(mismatched)} (see the JSON).")
    if pareto:
        out += ["", f"![Pareto plot: clean accuracy vs onnxruntime latency at batch 32]({pareto})"]
    return "\n".join(out)


def plot(args: argparse.Namespace, entries: list[dict[str, Any]], path: Path) -> bool:
    groups = [r for r in rows(args, entries) if all("latency_ms" in e for e in r["entries"])]
    if not groups:
        return False
    colors = {r["budget"]: f"C{i}" for i, r in enumerate(x for x in groups if x["arm"] == "robustdlrt")}
    points = [
        dict(
            x=statistics.fmean(e["latency_ms"]["compressed"]["32"] for e in r["entries"]),
            y=100 * statistics.fmean(e["clean"] for e in r["entries"]),
            marker="o" if r["arm"] == "robustdlrt" else "s",
            color=colors.get(r["budget"], "k"),
            label=f"{ARMS[r['arm']]}, {r['kind']} {r['fraction']:g}",
        )
        for r in groups
    ]
    dense = [e for e in entries if e["arm"] == "dense"]
    if dense:
        x = statistics.median(e["latency_ms"]["dense"]["32"] for r in groups for e in r["entries"])
        y = 100 * statistics.fmean(e["clean"] for e in dense)
        points.append(dict(x=x, y=y, marker="*", s=150, color="k", label="dense"))
    title = f"{args.model} on {args.data}: ○ budget-RobustDLRT, □ one-shot baseline"
    pareto_plot(path, points, title=title, xlabel="onnxruntime latency at batch 32 (ms, log scale)")
    return True


def main(argv: list[str] | None = None) -> int:
    lib.enable_huge_pages()
    args = parse_args(argv)
    run = Run(__file__, args, argv)
    state = EntryStore.of(args, _FINGERPRINT, keys=("seed", "budget", "arm"))
    seeds, n_b = len(args.seeds), len(budgets(args))
    todo = {
        "dense": len(state.missing(*((s, "dense", "dense") for s in args.seeds))),
        **{a: len(state.missing(*((s, bkey(*b), a) for s in args.seeds for b in budgets(args)))) for a in ARMS},
    }
    image_epochs = seeds * (args.dense_epochs + 2 * n_b * args.epochs) * args.train_subset
    log.info(
        "work: %d seed(s) × (dense %d epoch(s) + %d budgets × 2 arms × %d epoch(s)) of %d images = %d image-epochs; "
        "%d evaluations (%d images, ℓ2-FGSM × %d ε); %d ONNX exports and latency pairs; to do now: %s",
        *(seeds, args.dense_epochs, n_b, args.epochs, args.train_subset, image_epochs, seeds * (1 + 2 * n_b)),
        *(args.val_subset, len(EPS), seeds * 2 * n_b, todo),
    )
    clock, exported = Clock(todo), {}
    with tempfile.TemporaryDirectory(prefix="bench_budget-") as work:
        for seed in [] if args.report_only else args.seeds:
            run_seed(args, seed, state, Path(work), clock, exported)
    entries = [e for e in state.entries if e["seed"] in args.seeds]
    what = "compress to a budget: budget-RobustDLRT vs one-shot truncation + fine-tuning at the same ranks"
    settings = {**{k: v for k, v in vars(args).items() if k != "out"}, "eps": EPS}
    doc = run.document(what, entries, settings=settings)
    png = args.out.with_name(args.out.stem + "_pareto.png")
    doc["pareto"] = str(png) if plot(args, entries, png) else None
    doc["markdown"] = md = render(args, doc, doc["pareto"])
    run.publish(
        "budget",
        doc,
        md,
        body=render(args, doc, run.figure(doc["pareto"])),
        measured="accuracy (clean, ℓ2-FGSM), c.r., MACs and onnxruntime speedup of budget-RobustDLRT and of the "
        "one-shot baseline at the same per-layer ranks, per budget, mean ± std over seeds.",
    )
    missing = state.missing(*((s, bkey(*b), a) for s in args.seeds for b in budgets(args) for a in ARMS))
    if args.smoke and (missing or not doc["pareto"] or any(e.get("ranks_match_robustdlrt") is False for e in entries)):
        raise SystemExit("smoke check failed: an entry, the plot or equal ranks in both arms is missing")
    return 0


if __name__ == "__main__":
    sys.exit(main())

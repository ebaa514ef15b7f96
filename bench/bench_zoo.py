"""The zoo: the architectures edge users deploy, compressed, trained, exported and measured in one table.

Per model (Fashion-MNIST, the same subsets for every model, random init): dense trained briefly (its
weights cached in ``--checkpoint-dir``), then from those weights, with ``recipes/robust.yaml``'s
settings for ``--epochs``: DLRT (β 0), RobustDLRT (``--beta``) and a budget arm (RobustDLRT with
``train.target.macs = --macs``). Each: size, MACs, clean and attacked accuracy, κ, ONNX parity,
onnxruntime speedup against dense, where its cost stays, and the issue's targets met or not.

    python bench/bench_zoo.py --smoke     # < 2 min: timm test_resnet and test_vit on digits (CI)
    python bench/bench_zoo.py --checkpoint-dir bench/results/zoo-ckpt            # the full table
    python bench/bench_zoo.py --models tv:resnet18 timm:convnext_atto --checkpoint-dir …  # a subset
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from harness import lib
from harness.entries import EntryStore
from harness.measure import EPS_L2 as EPS
from harness.measure import dense_weights, latency_vs_dense, parity, ranks, robustness, sizes
from harness.report import mean_std, met, table
from harness.run import Run, add_run_options, at_least, check_run_options, options, parser, pick, recipe

log = logging.getLogger("bench_zoo")

# model → (input size, dense learning rate, family). CNNs at 32 px; the ViT at 64 px, a 4×4 grid
# of its 16-pixel patches. VGG16 has no batch norm and diverges at Adam 1e-3 from random init.
ZOO: dict[str, tuple[int, float, str]] = {
    "tv:vgg16": (32, 1e-4, "cnn"),
    "tv:resnet18": (32, 1e-3, "cnn"),
    "tv:resnet50": (32, 1e-3, "cnn"),
    "tv:mobilenet_v3_small": (32, 1e-3, "mobile"),
    "tv:efficientnet_b0": (32, 1e-3, "mobile"),
    "timm:convnext_atto": (32, 1e-3, "cnn"),
    "timm:deit_tiny_patch16_224": (64, 5e-4, "vit"),
}
SMOKE = {"timm:test_resnet": (32, 1e-3, "cnn"), "timm:test_vit": (32, 1e-3, "vit")}
ARMS = {"dense": "dense", "dlrt": "DLRT", "robustdlrt": "RobustDLRT", "budget": "budget"}
TARGET_CR = {"cnn": 80.0, "vit": 80.0, "mobile": 40.0}  # %, the targets per family
_FINGERPRINT = ("data", "data_root", "train_subset", "val_subset", "batch_size", "dense_epochs", "epochs")
_FINGERPRINT += ("beta", "macs", "attack_samples", "pgd_steps", "latency_repeats", "latency_threads", "seed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--models", nargs="+", default=None, help=f"subset of {', '.join(ZOO)}")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-root", default=None, help="data.root (fashion-mnist: the Debian package's files)")
    options(ap, seed=0, train_subset=1500, val_subset=(500, "held-out images scored clean"), batch_size=64)
    options(ap, dense_epochs=4, epochs=(2, "rank-adaptive epochs of every arm"))
    options(ap, beta=(0.075, "β of the RobustDLRT and budget arms"), macs=(0.25, "train.target.macs of the budget arm"))
    options(ap, attack_samples=(200, "held-out images attacked"), pgd_steps=10, latency_repeats=20)
    options(ap, latency_threads=(1, "onnxruntime intra-op threads"))
    add_run_options(ap, "zoo", smoke="< 2 min: timm test models on digits, tiny sizes (CI)", resumable=True)
    args = ap.parse_args(argv)
    check_run_options(ap, args, "zoo")
    table = SMOKE if args.smoke else ZOO
    if args.smoke:
        args.data, args.train_subset, args.val_subset, args.batch_size = "digits", 128, 64, 32
        args.dense_epochs, args.epochs, args.attack_samples, args.pgd_steps, args.latency_repeats = 1, 1, 32, 2, 3
    args.models = pick(ap, args.models, table)
    args.zoo = {m: table[m] for m in args.models}
    at_least(ap, args, 1, "train_subset", "val_subset", "batch_size", "epochs", "attack_samples", "latency_repeats")
    if args.dense_epochs < 0 or args.seed < 0 or args.pgd_steps < 1:
        ap.error("--dense-epochs and --seed must not be negative, --pgd-steps at least 1")
    if not 0.0 < args.macs <= 1.0:
        ap.error(f"--macs {args.macs:g} is not a fraction in (0, 1]")
    return args


def recipe_for(args: argparse.Namespace, model: str, arm: str) -> lib.Recipe:
    size, dense_lr, _ = args.zoo[model]
    train: dict[str, Any] = {"epochs": args.epochs, "beta": 0.0 if arm == "dlrt" else args.beta}
    if arm == "budget":
        train["target"] = {"macs": args.macs, "ramp": 0.5}
    factorize = {"init": "activations", "init_rank": 150, "r_min": 2, "r_max": 200}
    model_ = {"name": model, "input_size": size}
    return recipe(
        args, args.seed, source="bench_zoo", model=model_, baseline={"lr": dense_lr}, factorize=factorize, train=train
    )


def where_it_stays(model: torch.nn.Module, fact, size: int, top: int = 3) -> dict[str, Any]:
    """The layers holding most of the compressed model's parameters and MACs, and why layers stayed dense."""
    macs = lib.macs_by_layer(model, size)
    total_macs = sum(macs.values()) or 1
    params = {n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in model.named_modules()}
    for name, layer in lib.low_rank_layers(model).items():
        params[name] = layer.num_parameters()
    total_params = sum(p.numel() for p in model.parameters())
    dense_reasons: dict[str, list[int]] = {}
    for d in fact.skipped if fact is not None else []:
        reason = d.reason.split(":")[0].split("(")[0].strip()
        n_p = dense_reasons.setdefault(reason, [0, 0])
        n_p[0], n_p[1] = n_p[0] + 1, n_p[1] + d.params_dense
    return {
        "macs_top": [(n, v / total_macs) for n, v in sorted(macs.items(), key=lambda kv: -kv[1])[:top]],
        "params_top": [(n, v / total_params) for n, v in sorted(params.items(), key=lambda kv: -kv[1])[:top]],
        "dense_reasons": {r: {"layers": n, "params": p} for r, (n, p) in dense_reasons.items()},
        "factorized_layers": len(lib.low_rank_layers(model)),
    }


def measure(model, data, args, size: int, onnx: dict[str, Path], fact=None) -> dict[str, Any]:
    out = robustness(model, data.val_loader, samples=args.attack_samples, seed=args.seed, pgd_steps=args.pgd_steps)
    out.update((k, v) for k, v in sizes(model, size).items() if not k.endswith("_fraction"))
    kappas = [layer.condition_number() for layer in lib.low_rank_layers(model).values()]
    kappas = [k for k in kappas if math.isfinite(k)]
    out["kappa_median"] = statistics.median(kappas) if kappas else None
    out["kappa_max"] = max(kappas) if kappas else None
    path = onnx["compressed"] if fact is not None else onnx["dense"]
    out.update(parity(model, path, size))
    if fact is not None:
        lat = latency_vs_dense(onnx, size, threads=args.latency_threads, repeats=args.latency_repeats, seed=args.seed)
        out.update(lat, where=where_it_stays(model, fact, size))
        path.unlink(missing_ok=True)
    return out


def run_model(args: argparse.Namespace, name: str, state: EntryStore, work: Path) -> None:
    size, _, family = args.zoo[name]
    if not state.missing(*((name, a) for a in ARMS)):
        return
    rec = recipe_for(args, name, "robustdlrt")
    torch.manual_seed(args.seed)
    data = lib.build_data(rec.data, input_size=size, seed=args.seed)
    dense, _ = lib.create_model(name, data.num_classes, in_chans=3, mean=data.mean, std=data.std, input_size=size)
    slug = name.replace(":", "-")
    weights = state.weights(slug)
    onnx = {"dense": work / f"{slug}-dense.onnx", "compressed": work / f"{slug}-compressed.onnx"}
    timing = weights.with_suffix(".json") if weights is not None else None  # its training seconds
    _, secs = dense_weights(dense, data.train_loader, rec.baseline, seed=args.seed, cache=weights, name="dense")
    if secs is None:
        secs = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
    elif timing is not None:
        lib.write_text(timing, json.dumps({"seconds": secs}))
    if state.get(name, "dense") is None:
        # the dense reference gets what every arm gets after training: BatchNorm statistics estimated
        # on the training data (brief training leaves e.g. MobileNetV3's momentum-0.01 ones far off)
        lib.set_epoch(data.train_loader, 0)
        lib.reestimate_batchnorm_(dense, data.train_loader, torch.device("cpu"), rec.train.bn_batches)
        if weights is not None:
            torch.save(dense.state_dict(), weights)
        m = measure(dense, data, args, size, onnx)
        per_epoch = None if secs is None else secs / max(args.dense_epochs, 1)
        state.add(dict(model=name, arm="dense", family=family, input_size=size, n_train=data.n_train, **m,
                       seconds_per_epoch=per_epoch))  # fmt: skip
        report(state)
    else:
        lib.export_onnx(dense, onnx["dense"], input_size=size, check=False)
    for arm in ("dlrt", "robustdlrt", "budget"):
        if state.get(name, arm) is not None:
            continue
        model = copy.deepcopy(dense)
        log.info("%s: %s, factorize + %d epoch(s)", name, ARMS[arm], args.epochs)
        fact, _, secs = lib.factorize_and_train(
            model, data.train_loader, recipe_for(args, name, arm), device=torch.device("cpu"), set_epoch=lib.set_epoch
        )
        m = measure(model, data, args, size, onnx, fact)
        state.add(dict(model=name, arm=arm, family=family, input_size=size, **m, ranks=ranks(model),
                       seconds_per_epoch=secs["train"] / args.epochs, factorize_seconds=secs["factorize"]))  # fmt: skip
        report(state)
        del model
    onnx["dense"].unlink(missing_ok=True)


def report(state: EntryStore) -> None:
    e = state.entries[-1]
    speed = f", speedup b1 {e['speedup']['1']:.2f}× b32 {e['speedup']['32']:.2f}×" if "speedup" in e else ""
    log.info(
        "%s %s: clean %.1f%%, c.r. %.1f%%, MACs %.3f, parity %.1e%s, %.0f s/epoch",
        *(e["model"], e["arm"], 100 * e["clean"], e["compression_rate"], e["macs"] / e["macs_dense"]),
        *(e["parity_rel"], speed, e["seconds_per_epoch"] or float("nan")),
    )


short = lambda name: name.removeprefix("net.").removeprefix("features.")


def why(e: dict[str, Any]) -> str:
    """Where the compressed model's parameters and MACs stay, and why layers were left dense."""
    w = e.get("where") or {}
    parts = []
    if w.get("params_top"):
        parts.append("params: " + ", ".join(f"{short(n)} {100 * f:.0f}%" for n, f in w["params_top"]))
    if w.get("macs_top"):
        parts.append("MACs: " + ", ".join(f"{short(n)} {100 * f:.0f}%" for n, f in w["macs_top"]))
    if w.get("dense_reasons"):
        parts.append(
            "dense: " + "; ".join(f"{v['layers']}× {r} ({v['params']:,} p)" for r, v in w["dense_reasons"].items())
        )
    return " · ".join(parts)


# reason a layer stayed dense → what would change it (the recipe key, or why nothing can)
REMEDIES = {
    "first conv kept dense": "factorize.keep_first_conv: false",
    "final classifier kept dense": "factorize.keep_classifier: false",
    "grouped/depthwise conv": "nothing here: a depthwise conv has one channel per group, no channel mode to factorize",
    "no saving at any rank >= r_min=2": "nothing here: too small to save at any rank",
}


def remedy(e: dict[str, Any], missed_cr: bool, missed_speed: bool) -> str:
    """What would change a missed target, from where the compressed model's cost stays."""
    hints = []
    if missed_cr:
        for reason, v in sorted(
            (e.get("where") or {}).get("dense_reasons", {}).items(), key=lambda kv: -kv[1]["params"]
        ):
            share = v["params"] / e["params"]
            if share >= 0.05:
                hints.append(f"{100 * share:.0f} % of what is left is dense ({reason}): {REMEDIES.get(reason, reason)}")
        if not hints:
            hints.append("the factorized layers keep high ranks: a parameter budget (train.target.params)")
    if missed_speed:
        hints.append(
            "latency follows the MACs less than the MAC ratio promises: ranks on multiples of 8 "
            "(train.target.multiple: 8) suit the runtime's kernels; a MAC budget cuts where the MACs are"
        )
    return "; ".join(hints)


def verdicts(args: argparse.Namespace, entries: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Per model, the RobustDLRT arm against the issue's targets: c.r., clean ≥ dense − 1, speedup b1."""
    out = []
    for name in args.models:
        dense = next((e for e in entries if e["model"] == name and e["arm"] == "dense"), None)
        rob = next((e for e in entries if e["model"] == name and e["arm"] == "robustdlrt"), None)
        if dense is None or rob is None:
            continue
        target = TARGET_CR[rob["family"]]
        cr = rob["compression_rate"]
        gap = 100 * (rob["clean"] - dense["clean"])
        mac_ratio = rob["macs_dense"] / rob["macs"]
        sp = rob["speedup"]["1"]
        out.append(
            (
                name,
                f"{cr:.1f} % vs ≥ {target:g} %: {met(cr >= target)}",
                f"{gap:+.1f} points: {met(gap >= -1.0)}",
                f"{sp:.2f}× vs 0.8 × {mac_ratio:.2f} = {0.8 * mac_ratio:.2f}×: {met(sp >= 0.8 * mac_ratio)}",
                why(rob),
                remedy(rob, cr < target, sp < 0.8 * mac_ratio) or "—",
            )
        )
    return out


def render(args: argparse.Namespace, doc: dict[str, Any]) -> str:
    entries = doc["entries"]
    out = [
        f"## The zoo: {len(args.models)} architectures on {args.data}",
        "",
        f"Seed {args.seed}; {doc['n_train']} training / {doc['n_eval']} held-out images, the first "
        f"{doc['n_attacked']} attacked (ℓ2-FGSM ε in pixel units; PGD-ℓ∞ ε 8/255, {args.pgd_steps} steps). Dense: "
        f"random init, Adam, {args.dense_epochs} epoch(s), then BatchNorm statistics re-estimated over 16 training "
        "batches (as after every arm). Every arm from the same dense weights with "
        f"recipes/robust.yaml's settings for {args.epochs} rank-adaptive epoch(s): DLRT (β 0), RobustDLRT "
        f"(β {args.beta:g}), budget (RobustDLRT with train.target.macs {args.macs:g}). Speedups: onnxruntime "
        f"({args.latency_threads} thread(s)), the compressed graph timed interleaved with the dense one, median "
        f"of {args.latency_repeats}. Parity: max |ONNX − PyTorch| / max |logit|. Accuracies in %.",
        "",
    ]
    cells, pct, kfmt = [], (lambda x: mean_std([x], scale=100)), (lambda k: mean_std([k], g=True))
    for name in args.models:
        for arm, label in ARMS.items():
            e = next((x for x in entries if x["model"] == name and x["arm"] == arm), None)
            if e is None:
                continue
            ratio = e["macs_dense"] / e["macs"]
            sp = e.get("speedup")
            dense = arm == "dense"
            row = [name if dense else "", str(e["input_size"]) if dense else "", label, f"{e['params'] / 1e6:.2f} M"]
            row += ["—" if dense else f"{e['compression_rate']:.1f}"]
            row += [f"{e['macs'] / 1e6:.1f} M" + ("" if dense else f" ({ratio:.2f}×)"), pct(e["clean"])]
            row += [*(pct(e["l2_fgsm"].get(f"{x:g}", e["l2_fgsm"].get(str(x)))) for x in EPS), pct(e["pgd"])]
            row += ["—" if dense else f"{kfmt(e['kappa_median'])} / {kfmt(e['kappa_max'])}", f"{e['parity_rel']:.1e}"]
            row += ["—" if sp is None else f"{sp[b]:.2f}×" for b in ("1", "32")]
            cells.append(row + ["—" if e["seconds_per_epoch"] is None else f"{e['seconds_per_epoch']:.3g}"])
    head = ["model", "px", "arm", "params", "c.r. %", "MACs (ratio)", "clean", *(f"ℓ2-FGSM {x:g}" for x in EPS)]
    out += table([*head, "PGD", "κ med / max", "parity", "ORT b1", "ORT b32", "s/epoch"], "l" * 16, cells)
    rows = verdicts(args, entries)
    if rows:
        out += [
            "",
            "Targets (RobustDLRT arm): c.r. ≥ 80 % (MobileNet/EfficientNet ≥ 40 %), clean ≥ dense − 1 point, "
            "onnxruntime speedup at batch 1 ≥ 0.8 × the MAC ratio. *Where it stays*: the layers holding the "
            "largest shares of the compressed model's parameters and MACs, and the layers left dense with "
            "their reason and parameters.",
            "",
        ]
        head = ["model", "c.r.", "clean vs dense", "speedup b1", "where it stays", "what would change a missed target"]
        out += table(head, "l" * 6, rows)
    return "\n".join(out)


def _l2_keys(entries: list[dict[str, Any]]) -> None:
    """JSON keys of the ε dictionaries are strings: normalize them to the table's spelling."""
    for e in entries:
        e["l2_fgsm"] = {f"{float(k):g}": v for k, v in e["l2_fgsm"].items()}


def main(argv: list[str] | None = None) -> int:
    lib.enable_huge_pages()
    args = parse_args(argv)
    run = Run(__file__, args, argv)
    state = EntryStore.of(args, _FINGERPRINT, keys=("model", "arm"))
    with run.failing(lib.CompressorError), tempfile.TemporaryDirectory(prefix="bench-zoo-") as tmp:
        for name in [] if args.report_only else args.models:
            run_model(args, name, state, Path(tmp))
    entries = [e for e in state.entries if e["model"] in args.models]
    _l2_keys(entries)
    what = "the zoo: dense vs DLRT vs RobustDLRT vs a MAC budget on the architectures edge users deploy"
    doc = run.document(what, entries, skip=("out", "zoo"))
    doc["markdown"] = md = render(args, doc)
    run.publish(
        "zoo",
        doc,
        md,
        measured="per architecture: size, MACs, clean and attacked accuracy, κ, ONNX parity and onnxruntime "
        "speedup of DLRT, RobustDLRT and a MAC budget against the dense model they started from.",
    )
    run.smoke_check(state.missing(*((m, a) for m in args.models for a in ARMS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

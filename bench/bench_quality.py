"""Accuracy, robustness and conditioning on real data: dense vs DLRT (β = 0) vs RobustDLRT (β > 0).

The paper's Table 5 in spirit: torchvision VGG16 at 32×32 on Fashion-MNIST (random init), per seed a
dense baseline, then per β a copy factorized and trained rank-adaptively; every model scored on the
same images under ℓ2-FGSM, Jitter, Mixup (``--eps-unit``, default the reference code's normalized
units, as docs/peers.md) and PGD-ℓ∞ 8/255. Writes ``--out-dir``/quality[-tag].json, .md, _spectra.png
(Fig. 1: one layer's singular values) and _kappa.png (Fig. 2: κ of its core over training, per β).

    python bench/bench_quality.py --smoke                    # < 1 min: digits, ResNet-18, CI
    python bench/bench_quality.py --checkpoint-dir bench/results/quality-ckpt   # the full run
    python bench/bench_quality.py --seeds 0 --betas 0 0.075 --checkpoint-dir bench/results/quality-ckpt  # docs/peers.md
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import logging
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness import lib, page
from harness.entries import EntryStore
from harness.measure import ATTACK_LABELS, PAPER_EPS, dense_weights, sizes, slim
from harness.report import mean, table
from harness.run import RESULTS, Run, add_run_options, check_run_options, options, parser, recipe
from torch.utils.data import DataLoader, Subset

log = logging.getLogger("bench_quality")

# (attack, [ε], options, unit): unit "arg" = --eps-unit, "pixel" = always pixel units
ATTACKS = [(n, e, {"steps": 10} if n == "pgd" else {}, "pixel" if n == "pgd" else "arg") for n, e in PAPER_EPS.items()]

# The reference implementation's figures, measured by a peer on this kind of machine and
# published in docs/peers.md ("Fashion-MNIST subset (real data), one seed": ScSteffen/
# RobustDLRT release 1.0, torchvision VGG16 at 32×32, 5,000 train / 2,000 test images, dense
# Adam 1e-4 batch 64 3 epochs, then 3 epochs of the reference DLRT, ℓ2-FGSM in normalized
# units). They are the peer's measurements, not ours; copied here as data for the side-by-side.
_PEER_ROWS = [  # config, label, c.r. %, clean, ℓ2-FGSM at 0.05 / 0.1 / 0.3, κ median, train s per epoch
    ("dense", "dense (3 epochs)", 0.0, 75.9, (72.6, 69.6, 58.3), None, 246),
    ("beta=0", "reference DLRT, β = 0", 93.73, 78.0, (74.7, 71.5, 58.6), 1.70, 65),
    ("beta=0.075", "reference RobustDLRT, β = 0.075", 93.69, 72.7, (69.5, 66.6, 51.9), 1.68, 81),
]
REFERENCE_PEERS = {
    "source": "docs/peers.md, section 'Fashion-MNIST subset (real data), one seed'",
    "rows": [
        dict(
            config=c,
            label=lab,
            compression_rate=cr,
            clean=clean,
            l2_fgsm=dict(zip(("0.05", "0.1", "0.3"), fg)),
            kappa_median=k,
            train_s_per_epoch=t,
        )  # fmt: skip
        for c, lab, cr, clean, fg, k, t in _PEER_ROWS
    ],
}

# settings that change the figures: a checkpoint made with other values is not reused
_FINGERPRINT_KEYS = ("data", "model", "init", "train_subset", "val_subset", "eval_split", "dense_epochs", "epochs")
_FINGERPRINT_KEYS += ("batch_size", "dense_lr", "optimizer", "lr", "grad_clip", "init_rank", "r_max", "tau")
_FINGERPRINT_KEYS += ("coefficient_steps", "eps_unit", "max_samples", "fgsm_samples", "input_size", "attack_steps")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = parser(__doc__)
    options(ap, data=("fashion-mnist", "compressor data set name"))
    options(ap, data_root=(None, "data.root (fashion-mnist: default Debian package files)"))
    options(ap, model="tv:vgg16", input_size=32, seeds=[0, 1, 2], betas=[0.0, 0.05, 0.075, 0.15], train_subset=5000)
    options(ap, val_subset=(2000, "images in the evaluation set"))
    split = "test: the official test file (fashion-mnist/mnist); val: held out of the training file; auto: test if any"
    options(ap, eval_split=("auto", split, ("auto", "test", "val")))
    options(ap, dense_epochs=3, epochs=(3, "rank-adaptive (Robust)DLRT epochs"), batch_size=64, eval_batch_size=128)
    options(ap, dense_lr=(1e-4, "dense baseline: Adam, cosine"))
    opt = "DLRT optimizer (default: the reference code's AdamW 5e-4, clip 1.0)"
    options(ap, optimizer=("adamw", opt, ("adam", "adamw", "sgd")))
    options(ap, lr=(5e-4, "DLRT learning rate (cosine schedule)"), grad_clip=(1.0, "DLRT gradient-norm clip (0: none)"))
    init = "initial bases: activation-aware (the recipes' default) or SVD/HOSVD of the weights"
    options(ap, init=("activations", init, ("activations", "svd")))
    options(ap, init_rank=150, r_max=200, tau=0.1, coefficient_steps=10)
    unit = "unit of the ℓ2-FGSM/Jitter/Mixup ε (PGD is always 8/255 pixel)"
    options(ap, eps_unit=("normalized", unit, ("normalized", "pixel")))
    options(ap, max_samples=(250, "images attacked by Jitter, Mixup and PGD"))
    options(ap, fgsm_samples=(None, "images attacked by ℓ2-FGSM (default: all)", int))
    steps = "override the iterations of Jitter/Mixup/PGD (smoke runs); default: the attacks' own"
    options(ap, attack_steps=(None, steps, int))
    layer = "layer of Fig. 1/2 (module name, e.g. net.features.14); default: the middle factorized one"
    options(ap, spectrum_layer=(None, layer), out_dir=str(RESULTS))
    options(ap, tag=(None, "output names quality-<tag>.* (--smoke: tag smoke)"))
    smoke = "< 1 min: digits, tv:resnet18, tiny subsets, 1 epoch each, 1 seed, β ∈ {0, 0.075}, 16 attacked images"
    add_run_options(ap, "quality[-tag]", smoke=smoke + "; writes quality-smoke.*", resumable=True, out=False)
    args = ap.parse_args(argv)
    check_run_options(ap, args, "quality")
    if args.smoke:
        args.data, args.model, args.seeds, args.betas = "digits", "tv:resnet18", [0], [0.0, 0.075]
        args.train_subset, args.val_subset, args.dense_epochs, args.epochs = 96, 32, 1, 1
        args.batch_size, args.eval_batch_size, args.init_rank, args.r_max = 32, 32, 8, 16
        args.coefficient_steps, args.max_samples, args.fgsm_samples, args.attack_steps = 2, 8, 32, 1
    if args.eval_split == "auto":
        args.eval_split = "test" if args.data in ("fashion-mnist", "mnist") else "val"
    args.seeds, args.betas = list(dict.fromkeys(args.seeds)), list(dict.fromkeys(args.betas))
    return args


config_names = lambda args: ["dense"] + [beta_key(b) for b in args.betas]
beta_key = lambda beta: f"beta={beta:g}"


def config_label(config: str) -> str:
    if config == "dense":
        return "dense"
    beta = float(config.split("=", 1)[1])
    return "DLRT, β = 0" if beta == 0 else f"RobustDLRT, β = {beta:g}"


def recipe_for(args: argparse.Namespace, seed: int, beta: float) -> lib.Recipe:
    """The library recipe of one (seed, β): the same sections the compress command reads."""
    train = dict(epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, grad_clip=args.grad_clip or None)
    train.update(beta=beta, tau=args.tau, coefficient_steps=args.coefficient_steps, schedule="cosine")
    factorize = {"init": args.init, "init_rank": args.init_rank, "r_min": 2, "r_max": args.r_max}
    data = {"eval_batch_size": args.eval_batch_size}
    return recipe(args, seed, source="bench_quality", data=data, factorize=factorize, train=train)


def test_loader(args: argparse.Namespace, seed: int, batch_size: int) -> tuple[DataLoader, int]:
    """A random ``--val-subset`` (by seed) of the official test file, unshuffled, [0, 1] 3×S×S."""
    root = Path(args.data_root or lib.FASHION_MNIST_DEFAULT_ROOT)
    if args.data == "mnist" and args.data_root is None:
        raise SystemExit("--eval-split test with mnist needs --data-root")

    def find(stem: str) -> Path:
        for d in (root, root / ("FashionMNIST" if args.data == "fashion-mnist" else "MNIST") / "raw"):
            for name in (stem, stem + ".gz"):
                if (d / name).is_file():
                    return d / name
        raise SystemExit(f"no {stem}[.gz] under {root}: use --eval-split val")

    images = lib.read_idx_images(find("t10k-images-idx3-ubyte"))
    labels = lib.read_idx_labels(find("t10k-labels-idx1-ubyte"))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + 2))
    keep = sorted(order[: args.val_subset].tolist())
    ds = lib.TensorImages(images[keep], labels[keep], args.input_size)
    return DataLoader(ds, batch_size=batch_size, shuffle=False), len(ds)


def run_attacks(
    model: torch.nn.Module, eval_loader: DataLoader, args: argparse.Namespace, std: list[float], seed: int
) -> dict[str, Any]:
    """Clean accuracy on the whole evaluation set and accuracy under every attack."""
    out: dict[str, Any] = {"adversarial_accuracy": {}, "sensitivity": {}, "attack_seconds": {}, "n_attacked": {}}
    clean = None
    for name, eps, defaults, unit in ATTACKS:
        opts = dict(defaults)
        if args.attack_steps is not None and name != "l2_fgsm":
            opts["steps"] = args.attack_steps
        n = args.fgsm_samples if name == "l2_fgsm" else args.max_samples
        eps_unit = args.eps_unit if unit == "arg" else "pixel"
        full = clean is None  # the first call scores every image (clean accuracy); the others only theirs
        ds = eval_loader.dataset  # theirs: the first n images (so their clean passes cover only them)
        head = not full and n is not None and n < len(ds)
        loader = DataLoader(Subset(ds, range(n)), batch_size=args.eval_batch_size) if head else eval_loader
        attack = [{"name": name, "eps": eps, "options": opts}]
        res = lib.evaluate(
            model, loader, attacks=attack, max_samples=n, eps_unit=eps_unit, std=std, seed=seed, device="cpu"
        )
        if full:
            clean = res.clean_accuracy
            out.update(n_clean=res.n_clean, clean_seconds=res.timing["clean_seconds"])
        out["adversarial_accuracy"][name] = res.adversarial_accuracy[name]
        out["sensitivity"][name] = _finite(res.sensitivity[name])
        out["attack_seconds"][name] = res.timing["attack_seconds"][name]
        out["n_attacked"][name] = res.n_attacked
        out.setdefault("eps_unit", {})[name] = eps_unit
    out["clean_accuracy"] = clean
    return out


_finite = lambda d: {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in d.items()}


def kappa_stats(model: torch.nn.Module) -> dict[str, Any]:
    """κ(S) of every core: median, mean, max over layers (an infinite κ counts as inf)."""
    summary = lib.layer_summary(model)
    ks = [d["condition_number"] if d["condition_number"] is not None else math.inf for d in summary.values()]
    finite = [k for k in ks if math.isfinite(k)]
    out = {"median": statistics.median(ks) if ks else None}
    out.update(mean=(statistics.fmean(ks) if len(finite) == len(ks) else math.inf) if ks else None)
    return out | dict(max=max(ks) if ks else None, n_layers=len(ks), n_infinite=len(ks) - len(finite), layers=summary)


_rounded = lambda values: [float(f"{v:.6g}") for v in values]


def run_seed(args: argparse.Namespace, seed: int, state: EntryStore) -> None:
    if not state.missing(*((seed, c) for c in config_names(args))):
        log.info("seed %d: every entry already finished (checkpoint)", seed)
        return
    rec0 = recipe_for(args, seed, 0.0)
    torch.manual_seed(seed)
    data = lib.build_data(rec0.data, input_size=args.input_size, seed=seed)
    test = args.eval_split == "test"
    eval_loader, n_eval = test_loader(args, seed, args.eval_batch_size) if test else (data.val_loader, data.n_val)
    data_info = dict(name=data.name, n_train=data.n_train, n_eval=n_eval, eval_split=args.eval_split)
    data_info.update(mean=data.mean, std=data.std, train_batches_per_epoch=len(data.train_loader))
    model, info = lib.create_model(
        args.model, data.num_classes, in_chans=data.in_chans, mean=data.mean, std=data.std, input_size=args.input_size
    )
    std = info.std
    if args.spectrum_layer and args.spectrum_layer not in dict(model.named_modules()):
        conv_lin = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        raise SystemExit(
            f"--spectrum-layer {args.spectrum_layer!r} is not a module of {args.model}; "
            f"its conv/linear layers: {', '.join(conv_lin)}"
        )
    dense_file, has_dense = state.weights(seed), state.get(seed, "dense") is not None
    history, train_s = dense_weights(
        model, data.train_loader, rec0.baseline, seed=seed, cache=dense_file, reuse=has_dense,
        val_loader=eval_loader, name="dense baseline",
    )  # fmt: skip

    def score(entry: dict[str, Any], net: torch.nn.Module, hist: dict, epochs: int, kappa: bool, **seconds) -> None:
        """``entry`` (up to its sizes) completed: accuracy under every attack, κ (``kappa``: of the
        cores, else None), the training's ``seconds``, the evaluation's (κ included) and the history."""
        t0 = time.perf_counter()
        entry.update(run_attacks(net, eval_loader, args, std, seed))
        entry.update(kappa=kappa_stats(net) if kappa else None, **seconds)
        entry.update(eval_seconds=time.perf_counter() - t0, train_seconds_per_epoch=_per_epoch(hist))
        entry.update(history=slim(hist, *HISTORY), train_steps=epochs * len(data.train_loader))

    if train_s is not None and not has_dense:
        entry = dict(seed=seed, config="dense", data=data_info, model=info.to_dict())
        entry.update(params=sum(p.numel() for p in model.parameters()), compression_rate=0.0)
        score(entry, model, history.to_dict() if history else {}, args.dense_epochs, False, train_seconds=train_s)
        add(state, entry)

    for beta in args.betas:
        config = beta_key(beta)
        if state.get(seed, config) is not None:
            continue
        rec = recipe_for(args, seed, beta)
        work = copy.deepcopy(model)
        log.info("seed %d: %s: factorize + %d epochs", seed, config_label(config), args.epochs)
        kappa0: dict[str, float] = {}
        fact, history, secs = lib.factorize_and_train(
            work, data.train_loader, rec, val_loader=eval_loader, device=torch.device("cpu"), set_epoch=lib.set_epoch,
            progress=_initial_kappa_probe(work, kappa0),
        )  # fmt: skip
        factorized = [d.name for d in fact.factorized]
        layer = args.spectrum_layer or (factorized[len(factorized) // 2] if factorized else None)
        hist, size = history.to_dict(), sizes(work)
        entry = dict(seed=seed, config=config, beta=beta, data=data_info, params=size["params"])
        entry.update(params_dense=size["params_dense"], compression_rate=size["compression_rate"])
        score(entry, work, hist, args.epochs, True, train_seconds=secs["train"], factorize_seconds=secs["factorize"])
        entry.update(n_factorized=len(factorized), figure_layer=layer)
        if layer is not None:
            trace = [[0, kappa0.get(layer)]] if layer in kappa0 else []
            trace += [[t["step"], t["kappa"].get(layer)] for t in hist["kappa_trace"] if layer in t["kappa"]]
            entry["kappa_trace"] = [[step, _finite({"k": k})["k"]] for step, k in trace]
            entry["kappa_initial"] = _finite({k: v for k, v in kappa0.items() if k})
            if seed == args.seeds[0]:  # Fig. 1: this layer's dense weight (the model every β starts from) and core
                entry["spectrum"] = _rounded(lib.layer_spectrum(dict(work.named_modules())[layer]))
                entry["spectrum_dense"] = _rounded(lib.layer_spectrum(dict(model.named_modules())[layer]))
        add(state, entry)
        del work
    if dense_file is not None:
        dense_file.unlink(missing_ok=True)  # every entry of this seed is saved: the weights are not needed


def add(state: EntryStore, e: dict[str, Any]) -> None:
    e["torch_threads"] = torch.get_num_threads()
    state.add(e)
    acc = e["adversarial_accuracy"]
    log.info(
        "seed %d %s: c.r. %.2f%%, clean %.2f%%, ℓ2-FGSM(0.1) %.2f%%, PGD %.2f%%, train %.0f s, eval %.0f s",
        *(e["seed"], e["config"], e["compression_rate"], 100 * e["clean_accuracy"], 100 * acc["l2_fgsm"]["0.1"]),
        *(100 * next(iter(acc["pgd"].values())), e["train_seconds"], e["eval_seconds"]),
    )


def _initial_kappa_probe(model: torch.nn.Module, sink: dict[str, float]):
    """A Trainer progress factory that records κ of every core when the first epoch starts.

    The trainer asks for a progress bar at the start of every epoch; the first time is right
    after the factorization, before any step: κ at initialization, step 0 of Fig. 2.
    """

    def factory(total: int, desc: str):
        if not sink:
            with torch.no_grad():
                sink.update({n: float(l.condition_number()) for n, l in lib.low_rank_layers(model).items()})
            sink.setdefault("", math.nan)  # marks "recorded" even with no factorized layer
        return lib.silent_progress(total, desc)

    return factory


_per_epoch = lambda history: mean(e["seconds"] for e in history.get("epochs", []))
HISTORY = ("epoch", "phase", "train_loss", "train_accuracy", "regularizer", "val_accuracy", "compression_rate")
HISTORY += ("seconds", "seconds_augment", "seconds_truncate", "nonfinite_steps_total")
_num = lambda v: math.inf if v == "inf" else math.nan if v is None else float(v)


def metric_rows(args: argparse.Namespace) -> list[tuple[str, str, Any]]:
    """(key, header, getter(entry) → number) of every aggregated figure."""
    rows: list[tuple[str, str, Any]] = [
        ("compression_rate", "c.r. %", lambda e: e["compression_rate"]),
        ("clean", "clean", lambda e: 100 * e["clean_accuracy"]),
    ]
    for name, eps, _, _unit in ATTACKS:
        for x in eps:
            head = f"{ATTACK_LABELS[name]} {'8/255 px' if name == 'pgd' else f'ε={x:g}'}"
            get = lambda e, n=name, k=str(float(x)): 100 * e["adversarial_accuracy"][n][k]
            rows.append((f"{name}@{float(x)}", head, get))
    for key in ("median", "mean", "max"):
        rows.append((f"kappa_{key}", f"κ {key}", lambda e, k=key: _num(e["kappa"][k]) if e["kappa"] else None))
    rows.append(("train_s_per_epoch", "train s/epoch", lambda e: e["train_seconds_per_epoch"]))
    return rows + [("eval_s", "eval s", lambda e: e["eval_seconds"])]


def aggregate(args: argparse.Namespace, entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for config in config_names(args):
        es = [e for e in entries if e["config"] == config]
        if not es:
            continue
        agg: dict[str, Any] = {"n_seeds": len(es), "seeds": [e["seed"] for e in es]}
        for key, _, get in metric_rows(args):
            vals = [float(v) for v in map(get, es) if v is not None]
            finite = all(math.isfinite(v) for v in vals)
            mean_ = statistics.fmean(vals) if finite and vals else math.inf
            std = (statistics.stdev(vals) if len(vals) > 1 else 0.0) if finite else None
            agg[key] = {"mean": mean_, "std": std, "values": vals} if vals else None
        out[config] = agg
    return out


def _fmt(stat: dict[str, Any] | None, digits: int = 1, kappa: bool = False) -> str:
    if stat is None:
        return "—"
    m, s = stat["mean"], stat["std"]
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "—"
    if not math.isfinite(m):
        return "inf"
    text = f"{m:.3g}" if kappa else f"{m:.{digits}f}"
    if len(stat["values"]) > 1 and s is not None:
        text += f" ± {s:.2g}" if kappa else f" ± {s:.{digits}f}"
    return text


def render(args: argparse.Namespace, doc: dict[str, Any], figure_dir: str = "") -> str:
    agg, m, run = doc["aggregate"], doc["machine"], doc["run"]
    rows = metric_rows(args)
    seeds = ", ".join(map(str, args.seeds))
    d0 = next((e["data"] for e in doc["entries"]), {})
    eval_what = "held out of the official training images by compressor.data's stratified split"
    eval_what = "a random subset of the official test images" if args.eval_split == "test" else eval_what
    restored = doc["run"].get("from_checkpoint")
    restored = f"; {restored} entries came from --checkpoint-dir" if restored else ""
    per_row = ", ".join(f"{config_label(c)} {', '.join(map(str, a_['seeds']))}" for c, a_ in agg.items())
    per_row = "" if len({a_["n_seeds"] for a_ in agg.values()}) <= 1 else f" (seeds per row: {per_row})"
    pixels = f"{statistics.fmean(d0.get('std', [1.0])):.3f}·ε in [0, 1] pixels"
    pixels = f" (the reference code's unit: a perturbation of ε in the normalized input is ε·std ≈ {pixels})"
    when = sorted({e.get("measured_at", run["date"]) for e in doc["entries"]})
    loads = [str(e.get("load_avg", "?")).split(" / ")[0] for e in doc["entries"]]
    threads = sorted({e.get("torch_threads", m["torch_threads"]) for e in doc["entries"]})
    head = [
        f"Measured {when[0] if when else run['date']}"
        + (f" – {when[-1]}" if len(when) > 1 else "")
        + f" on {m['cpu']} ({m['cores']} cores, {'/'.join(map(str, threads))} torch thread(s), CPU only; 1-min "
        f"load average when each entry finished: {', '.join(loads)} — the machine was shared, so the seconds are "
        f"upper bounds), torch {m['torch']}, torchvision {m['torchvision']}.",
        f"Command: `{run['command']}` (this invocation: {run['wall_seconds'] / 60:.1f} min{restored}).",
        "",
        f"Model `{args.model}` (random init) at {args.input_size}×{args.input_size} RGB on `{args.data}`: "
        f"{d0.get('n_train', args.train_subset)} training images (random subset, by seed), "
        f"{d0.get('n_eval', args.val_subset)} evaluation images ({eval_what}); normalization by the training "
        f"subset's mean/std inside the model. Dense baseline: Adam {args.dense_lr:g}, cosine, batch "
        f"{args.batch_size}, {args.dense_epochs} epoch(s). Then per β, from the same dense weights: factorize "
        f"({'activation-aware' if args.init == 'activations' else 'SVD/HOSVD'} init, init rank {args.init_rank}, "
        f"r_max {args.r_max}) and {args.epochs} rank-adaptive epoch(s) "
        f"({args.optimizer} {args.lr:g}, cosine{f', grad clip {args.grad_clip:g}' if args.grad_clip else ''}, "
        f"τ = {args.tau:g}, s* = {args.coefficient_steps}). Seeds {seeds}: a seed draws the subsets, the "
        f"initialization, the batch order and the attacks' randomness; figures are mean ± std over seeds{per_row}.",
        "",
        f"Accuracies in %. ℓ2-FGSM, Jitter and Mixup ε in **{args.eps_unit}** units"
        f"{pixels if args.eps_unit == 'normalized' else ''}"
        f"; PGD ℓ∞ ε = 8/255 in pixel units, {args.attack_steps or 10} step(s). ℓ2-FGSM on "
        f"{_n_attacked(doc, 'l2_fgsm')} images, the other attacks on the first {_n_attacked(doc, 'pgd')}; same "
        "images and attack seeds for every model. c.r. = (1 − params/dense params) × 100. κ = condition number "
        "of each factorized layer's core S (conv: Tucker core unfolded) at the end, median/mean/max over "
        "layers. Train s/epoch excludes the per-epoch validation pass and the factorization.",
    ]
    acc_rows = [r for r in rows if r[0] == "compression_rate" or r[0] == "clean" or "@" in r[0]]
    cost_rows = [r for r in rows if r[0].startswith("kappa") or r[0] in ("train_s_per_epoch", "eval_s")]
    out = [
        "### Accuracy under attack (mean ± std over seeds)",
        "",
        *head,
        "",
        _table(["model"] + [h for _, h, _ in acc_rows], agg, acc_rows),
        "",
        "### Conditioning and cost",
        "",
        _table(["model"] + [h for _, h, _ in cost_rows] + ["factorize s"], agg, cost_rows, doc),
        "",
    ]
    if args.data == "fashion-mnist" and args.model in ("vgg16", "tv:vgg16", "torchvision:vgg16"):
        out += render_peers(args, doc)
    figs = doc.get("figures", {})
    if figs:
        out += ["### Figures", ""]
        if figure_dir:
            out += [f"Written by the run into `{figure_dir}` (run outputs are not kept in git).", ""]
        at = f"{figure_dir}/" if figure_dir else ""
        if figs.get("spectra"):
            out.append(
                f"![singular values of {figs['layer']}]({at}{figs['spectra']}) — Fig. 1: singular values of "
                f"`{figs['layer']}` (dense weight vs the trained cores), seed {args.seeds[0]}."
            )
        if figs.get("kappa"):
            out.append(
                f"![κ over training]({at}{figs['kappa']}) — Fig. 2: κ of `{figs['layer']}`'s core at "
                f"initialization (step 0) and after each truncation, per β, seed {args.seeds[0]}."
            )
        out.append("")
    return "\n".join(out)


def _n_attacked(doc: dict[str, Any], attack: str) -> str:
    ns = sorted({e["n_attacked"][attack] for e in doc["entries"]})
    return "/".join(map(str, ns)) or "?"


def _table(header: list[str], agg: dict[str, Any], rows: list, doc: dict[str, Any] | None = None) -> str:
    digits = {"train_s_per_epoch": 0, "eval_s": 0, "compression_rate": 2}
    cells = []
    for config, a in agg.items():
        row = [config_label(config)]
        row += [_fmt(a.get(key), digits.get(key, 1), kappa=key.startswith("kappa")) for key, _, _ in rows]
        if doc is not None:
            fs = [e["factorize_seconds"] for e in doc["entries"] if e["config"] == config and "factorize_seconds" in e]
            row.append(f"{statistics.fmean(fs):.0f}" if fs else "—")
        cells.append(row)
    return "\n".join(table(header, "l" + "r" * (len(header) - 1), cells))


def render_peers(args: argparse.Namespace, doc: dict[str, Any]) -> list[str]:
    """compressor's dense / β = 0 / β = 0.075 beside the reference's docs/peers.md figures."""
    ref = REFERENCE_PEERS["rows"]
    agg = doc["aggregate"]
    ours = [r for r in ref if r["config"] in agg]
    if not ours:
        return []
    d0 = next((e["data"] for e in doc["entries"]), {})
    ours_setup = (d0.get("n_train"), d0.get("n_eval"), args.eval_split, args.dense_epochs, args.epochs)
    ours_setup += (args.batch_size, args.dense_lr, args.eps_unit)
    same = "**not the docs/peers.md sizes/schedule: these rows are not comparable to the reference's.** "
    if ours_setup == (5000, 2000, "test", 3, 3, 64, 1e-4, "normalized"):
        same = "the docs/peers.md sizes and schedule. "
    lines = [
        "### docs/peers.md setup: compressor beside the reference implementation",
        "",
        "The reference rows are the peer's measurements copied from docs/peers.md (ScSteffen/RobustDLRT 1.0, one "
        "seed, 5,000 train / 2,000 test images, dense Adam 1e-4 batch 64 for 3 epochs, then 3 epochs of its "
        "DLRT loop: AdamW 5e-4, cosine, clip 1.0, batch 64), not ours. "
        f"The compressor rows are this run ({len(args.seeds)} seed(s), mean ± std): "
        f"{d0.get('n_train')} train / {d0.get('n_eval')} {args.eval_split} images, dense {args.dense_epochs} "
        f"epoch(s), DLRT {args.epochs} epoch(s) with {args.optimizer} {args.lr:g}, ε in {args.eps_unit} units, "
        f"the paper's ℓ2-FGSM; {same}"
        "The random subsets are not the same images and the dense baselines are trained separately. "
        "Accuracies in %.",
        "",
    ]
    cells = []
    for r in ours:
        a, f = agg[r["config"]], r["l2_fgsm"]
        k = "—" if r["kappa_median"] is None else f"{r['kappa_median']:.2f}"
        cells.append(
            [f"{r['label']} (docs/peers.md)", f"{r['compression_rate']:.2f}", f"{r['clean']:.1f}"]
            + [f"{f[x]:.1f}" for x in ("0.05", "0.1", "0.3")]
            + [k, r["train_s_per_epoch"]]
        )
        cells.append(
            [f"compressor {config_label(r['config'])}", _fmt(a["compression_rate"], 2), _fmt(a["clean"])]
            + [_fmt(a[f"l2_fgsm@{x}"]) for x in ("0.05", "0.1", "0.3")]
            + [_fmt(a["kappa_median"], kappa=True), _fmt(a["train_s_per_epoch"], 0)]
        )
    head = ["model", "c.r. %", "clean", "ℓ2-FGSM ε=0.05", "ε=0.1", "ε=0.3", "κ median", "train s/epoch"]
    lines += table(head, "lrrrrrrr", cells)
    lines.append("")
    return lines


def figures(args: argparse.Namespace, entries: list[dict[str, Any]], out_dir: Path, stem: str) -> dict[str, Any]:
    seed = args.seeds[0]
    by = {e["config"]: e for e in entries if e["seed"] == seed}
    comp = [by[beta_key(b)] for b in args.betas if beta_key(b) in by]
    if not comp or comp[0].get("figure_layer") is None:
        return {}
    layer = comp[0]["figure_layer"]
    figs: dict[str, Any] = {"layer": layer, "seed": seed}
    spectra = {"dense": comp[0]["spectrum_dense"]} if comp[0].get("spectrum_dense") else {}
    for e in comp:
        if e.get("spectrum") and e.get("figure_layer") == layer:
            spectra[config_label(e["config"])] = e["spectrum"]
    title = f"Singular values of {layer} ({args.model}, {args.data}, seed {seed})"
    if lib.plot_spectra(spectra, out_dir / f"{stem}_spectra.png", title):
        figs["spectra"] = f"{stem}_spectra.png"
    steps: dict[int, dict[str, float]] = {}
    for e in comp:
        for step, k in e.get("kappa_trace") or []:
            if k is not None and math.isfinite(k):
                steps.setdefault(step, {})[config_label(e["config"])] = k
    trace = [{"step": s, "kappa": steps[s]} for s in sorted(steps)]
    if trace:
        labels = [config_label(e["config"]) for e in comp]
        trace[-1]["kappa"] = {lab: trace[-1]["kappa"].get(lab, math.nan) for lab in labels}  # legend order
        title = f"κ of {layer}'s core over training, per β (seed {seed})"
        if lib.plot_kappa(trace, out_dir / f"{stem}_kappa.png", title):
            figs["kappa"] = f"{stem}_kappa.png"
    return figs


def main(argv: list[str] | None = None) -> int:
    lib.enable_huge_pages()  # as the compress command does, before the first tensor
    args = parse_args(argv)
    run = Run(__file__, args, argv)
    log.info("torch threads: %d (load average %s, %d cores)", torch.get_num_threads(), page.load(), os.cpu_count())
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("smoke" if args.smoke else None)
    stem = f"quality-{tag}" if tag else "quality"
    load_start = page.load()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    state = EntryStore.of(args, _FINGERPRINT_KEYS, keys=("seed", "config"))
    configs = set(config_names(args))
    selected = lambda: [e for e in state.entries if e["seed"] in args.seeds and e["config"] in configs]
    n_restored = len(selected())
    for seed in [] if args.report_only else args.seeds:
        run_seed(args, seed, state)
    entries = selected()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
    wall = run.record()["wall_seconds"]
    doc: dict[str, Any] = {
        "what": "dense vs DLRT (β=0) vs RobustDLRT (β>0) on real data: accuracy, adversarial accuracy, "
        "compression rate, κ of the cores, training time",
        "run": dict(command=command, date=date, wall_seconds=wall, load_start=load_start, load_end=page.load())
        | dict(smoke=args.smoke, from_checkpoint=n_restored),
        "machine": page.machine(),
        "settings": {
            **vars(args),
            "attacks": [{"name": n, "eps": e, "options": o, "unit": u} for n, e, o, u in ATTACKS],
        },
        "reference_peers": REFERENCE_PEERS,
        "aggregate": aggregate(args, entries),
        "entries": entries,
    }
    doc["figures"] = figures(args, entries, out_dir, stem)
    doc["projection"] = None if args.smoke else projection(args, entries)
    md = render(args, doc)
    lib.write_text(out_dir / f"{stem}.md", md + "\n")
    figure_dir = os.path.relpath(out_dir.resolve(), run.page.resolve().parent) if run.page else ""
    title = f"## Quality: {args.model} on {args.data}" + (f" ({tag})" if tag else "")
    run.publish(
        stem,
        doc,
        md,
        body=title + "\n\n" + render(args, doc, figure_dir),
        out=out_dir / f"{stem}.json",
        measured="clean and adversarial accuracy, compression rate, κ of the cores and training time "
        "of dense vs DLRT vs RobustDLRT from the same dense weights, per seed, aggregated.",
    )
    if doc["projection"]:
        p = doc["projection"]
        print(
            f"\nProjected full run ({p['setting']}): ≈ {p['hours']:.1f} h on this machine at this load ({p['basis']})."
        )
    if args.smoke:
        check_smoke(args, doc, out_dir)
    return 0


def check_smoke(args: argparse.Namespace, doc: dict[str, Any], out_dir: Path) -> None:
    """CI: every entry present and sane, tables and figures written; raise otherwise."""
    want = {(s, c) for s in args.seeds for c in config_names(args)}
    got = {(e["seed"], e["config"]) for e in doc["entries"]}
    problems = [f"missing entries {sorted(want - got)}"] if want - got else []
    for e in doc["entries"]:
        accs = [e["clean_accuracy"]] + [v for per in e["adversarial_accuracy"].values() for v in per.values()]
        if not all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in accs):
            problems.append(f"{e['config']}: accuracy outside [0, 1]")
        if e["config"] != "dense" and not (0.0 < e["compression_rate"] < 100.0 and e["kappa"]["n_layers"] > 0):
            problems.append(f"{e['config']}: nothing was compressed")
    for key in ("spectra", "kappa"):
        if not (out_dir / doc["figures"].get(key, "-")).is_file():
            problems.append(f"figure {key} not written")
    if problems:
        raise SystemExit("smoke check failed: " + "; ".join(problems))
    print("\nsmoke check passed")


def projection(args: argparse.Namespace, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Extrapolate this run's per-step and per-image times to the default full run (same model)."""
    dense = [e for e in entries if e["config"] == "dense" and e["train_steps"]]
    comp = [e for e in entries if e["config"] != "dense" and e["train_steps"]]
    if not dense or not comp:
        return None
    full = {"train": 5000, "eval": 2000, "dense_epochs": 3, "epochs": 3, "seeds": 3, "betas": 4, "max": 250}
    steps_per_epoch = full["train"] // args.batch_size
    d_step = statistics.fmean(e["train_seconds"] / e["train_steps"] for e in dense)
    c_step = statistics.fmean(e["train_seconds"] / e["train_steps"] for e in comp)
    fact = statistics.fmean(e["factorize_seconds"] for e in comp)

    def eval_s(es: list[dict[str, Any]]) -> float:
        per = []
        for e in es:
            t = e["clean_seconds"] * full["eval"] / max(1, e["n_clean"])
            for name, secs in e["attack_seconds"].items():
                n_full = full["eval"] if name == "l2_fgsm" else full["max"]
                t += sum(secs.values()) * n_full / max(1, e["n_attacked"][name])
            per.append(t)
        return statistics.fmean(per)

    # per-epoch validation passes (clean, all eval images) ≈ the clean-pass time
    val_d = statistics.fmean(e["clean_seconds"] / max(1, e["n_clean"]) for e in dense) * full["eval"]
    val_c = statistics.fmean(e["clean_seconds"] / max(1, e["n_clean"]) for e in comp) * full["eval"]
    per_seed = (
        full["dense_epochs"] * (steps_per_epoch * d_step + val_d)
        + eval_s(dense)
        + full["betas"] * (fact + full["epochs"] * (steps_per_epoch * c_step + val_c) + eval_s(comp))
    )
    total = full["seeds"] * per_seed
    return {
        "setting": f"{args.model}, 3 seeds × (dense + 4 β), 5000/2000 images, 3+3 epochs, batch "
        f"{args.batch_size}, {full['max']} attacked images",
        "seconds": total,
        "hours": total / 3600,
        "per_seed_seconds": per_seed,
        "basis": f"measured here: dense step {d_step:.2f} s, DLRT step {c_step:.2f} s, factorize {fact:.0f} s",
    }


if __name__ == "__main__":
    sys.exit(main())

"""The regime experiment: does DLRT lose robustness when it fine-tunes well-trained weights, and
which conditioning method recovers it at equal compression?

The paper's claim (Schotthöfer et al., arXiv 2505.08022): in long rank-adaptive fine-tuning of
well-trained weights, unregularized DLRT cores grow ill-conditioned and lose adversarial robustness
against the dense model, and β·R(S) wins it back. Per seed: a VGG without batch norm (torchvision's
features at ``--width``, a small classifier) trained dense until well trained (its weights cached in
``--checkpoint-dir``); then from those weights, with the paper's Table 3 fine-tuning and one parameter
budget (``--params``): DLRT, RobustDLRT per β, the κ clamp, the nuclear norm, FGSM fine-tuning with β
= 0 and with β. Every model: c.r., clean and attacked accuracy (ℓ2-FGSM, Jitter, Mixup, PGD-ℓ∞), κ,
the certificate log ∏κ (eq. 2) beside the measured sensitivity (eq. 1), the κ trace (plotted), and
the issue's target met or not. ``--preset cpu`` (the default) scales the paper's setup down (VGG11,
a quarter of the width, 5 fine-tuning epochs); ``--preset paper`` is its scale, for ``--device cuda``.
A run logs its estimated wall time first (the probe ``--estimate-only`` prints alone).

    python bench/bench_regime.py --smoke     # < 1 min: tiny VGG, 64 images, 1 epoch, 1 seed, 3 arms (CI)
    python bench/bench_regime.py --checkpoint-dir bench/results/regime-ckpt           # CPU default
    python bench/bench_regime.py --preset paper --device cuda --checkpoint-dir bench/results/regime-gpu
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness import lib
from harness.entries import EntryStore
from harness.measure import ATTACK_LABELS, EPS_L2, PAPER_EPS, dense_weights, ranks, sizes, slim, sync
from harness.report import figure, mean, mean_std, met, table
from harness.run import Run, add_run_options, at_least, check_run_options, options, parse_device, parser, refuse
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

log = logging.getLogger("bench_regime")

# the paper's attacks and budgets (Table 5 / Appendix B); PGD-ℓ∞ is the usual 8/255 in pixel units
PGD = {"steps": 10, "norm": "linf", "eps_unit": "pixel"}
ATTACKS = [{"name": n, "eps": e} | ({"options": PGD} if n == "pgd" else {}) for n, e in PAPER_EPS.items()]
MID = EPS_L2[len(EPS_L2) // 2]  # the verdicts' ε

VGG_CFGS = {name: cfgs[key] for name, key in (("vgg11", "A"), ("vgg13", "B"), ("vgg16", "D"), ("vgg19", "E"))}
ARM_KINDS = ("dlrt", "robust", "clamp", "nuclear", "fgsm", "fgsm-robust")

# sizes by preset; an explicit flag wins. train/val subset 0 = every image of the split.
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        vgg="vgg11", width=1 / 16, data="fashion-mnist", seeds=[0], train_subset=64, val_subset=32,
        batch_size=32, dense_epochs=1, epochs=1, coefficient_steps=2, attack_samples=16,
        arms=["dlrt", "robust", "clamp"], betas=[0.075],
    ),
    "cpu": dict(
        vgg="vgg11", width=0.25, data="fashion-mnist", seeds=[0, 1], train_subset=0, val_subset=2000,
        batch_size=128, dense_epochs=10, epochs=5, coefficient_steps=10, attack_samples=500,
        arms=list(ARM_KINDS), betas=[0.01, 0.075, 0.3],
    ),
    "paper": dict(
        vgg="vgg16", width=1.0, data="fashion-mnist", seeds=[0, 1], train_subset=0, val_subset=0,
        batch_size=128, dense_epochs=30, epochs=20, coefficient_steps=10, attack_samples=0,
        arms=list(ARM_KINDS), betas=[0.01, 0.075, 0.3],
    ),
}
# fmt: on
_FINGERPRINT = ("vgg", "width", "hidden", "data", "data_root", "input_size", "train_subset", "val_subset")
_FINGERPRINT += ("batch_size", "dense_epochs", "dense_lr", "epochs", "lr", "tau", "coefficient_steps", "init_rank")
_FINGERPRINT += ("r_max", "params", "ramp", "adv_eps", "attack_samples", "eps_unit", "device_type", "amp")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="sizes; explicit flags override")
    P = lambda kind, what="": (None, f"{what} (default: from --preset)".lstrip(), kind)
    options(ap, vgg=P(tuple(sorted(VGG_CFGS)), "depth"), width=P(float, "channel multiplier of torchvision's VGG"))
    options(ap, hidden=(None, "classifier width (default: the last conv's)", int), data=P(str, "data set"))
    options(ap, data_root=(None, "data.root (fashion-mnist: the Debian package's files)"), input_size=32)
    options(ap, seeds=P([int]), train_subset=P(int, "training images, 0 = all"))
    options(ap, val_subset=P(int, "held-out images scored clean, 0 = all"), batch_size=P(int), dense_epochs=P(int))
    options(ap, dense_lr=(1e-3, "Adam, cosine"), dense_target=(0.90, "'well trained': held-out clean accuracy"))
    options(ap, epochs=P(int, "rank-adaptive fine-tuning epochs of every arm"))
    options(ap, lr=(1e-3, "fine-tuning: Adam, cosine, no clipping (Table 3)"), tau=0.1, coefficient_steps=P(int, "s*"))
    options(ap, init_rank=(None, "SVD init rank (default: 150 × width)", int))
    options(ap, r_max=(None, "largest rank (default: 200 × width)", int))
    options(ap, params=(0.06, "train.target.params: c.r. ≈ 1 − this"), ramp=(0.5, "train.target.ramp"))
    options(ap, arms=P([ARM_KINDS]), betas=P([float], "RobustDLRT β grid"))
    options(ap, kappa_max=(10.0, "clamp arm: train.kappa_max"), nuclear_beta=(0.01, "nuclear arm: β of ‖S‖_*"))
    options(ap, adv_eps=(8 / 255, "FGSM fine-tuning: ℓ∞ ε in pixel units"), adv_beta=(0.075, "fgsm-robust arm's β"))
    options(ap, attack_samples=P(int, "attacked held-out images, 0 = all"))
    options(ap, eps_unit=("pixel", "ℓ2-FGSM, Jitter, Mixup", ("pixel", "normalized")))
    options(ap, target_cr=(94.0, "the issue's target: c.r. at least (%%)"))
    options(ap, target_gain=(3.0, "… ℓ2-FGSM points above DLRT at the middle ε"))
    options(ap, target_slack=(1.0, "… points below dense allowed (ℓ2-FGSM, clean)"))
    options(ap, device=("cpu", "cpu or cuda[:N]"), amp=(None, "autocast: off on CPU, bf16 on CUDA", ("off", "bf16")))
    add_run_options(ap, "regime", smoke="< 1 min: --preset smoke (CI)", resumable=True)
    ap.add_argument("--estimate-only", action="store_true", help="print the wall-time estimate, run nothing")
    args = ap.parse_args(argv)
    args.preset = "smoke" if args.smoke else args.preset
    args.smoke = args.preset == "smoke"
    preset = dict(PRESETS[args.preset])
    if args.smoke and args.data is None and args.data_root is None:
        if not Path(lib.FASHION_MNIST_DEFAULT_ROOT).is_dir():
            preset["data"] = "digits"  # CI without the Debian package: the embedded set
    vars(args).update({key: value for key, value in preset.items() if getattr(args, key) is None})
    args.device_type = parse_device(ap, args.device).type
    args.amp = ("bf16" if args.device_type == "cuda" else "off") if args.amp is None else args.amp
    at_least(ap, args, 1, "batch_size", "epochs", "coefficient_steps", "input_size")
    negative = [k for k in ("train_subset", "val_subset", "attack_samples", "dense_epochs") if getattr(args, k) < 0]
    refuse(
        ap,
        (not 0.0 < args.width <= 4.0, f"--width {args.width:g}: give a channel multiplier in (0, 4]"),
        (args.coefficient_steps < 2, "--coefficient-steps must be at least 2 (augment first, truncate after the last)"),
        (bool(negative), f"--{negative[0].replace('_', '-')} must not be negative (0: all)" if negative else ""),
        (args.input_size < 32, "--input-size must be at least 32 (VGG pools five times)"),
        (any(s < 0 for s in args.seeds), "--seeds must not be negative"),
        (not (0.0 < args.params <= 1.0 and 0.0 < args.ramp <= 1.0), "--params and --ramp must be fractions in (0, 1]"),
        (not 0.0 <= args.tau < 1.0, "--tau must be in [0, 1)"),
        (min(args.betas + [args.nuclear_beta, args.adv_beta]) < 0, "β must not be negative"),
        (not 0.0 <= args.dense_target <= 1.0, "--dense-target is a held-out accuracy in [0, 1]"),
        (args.kappa_max < 1.0, "--kappa-max must be at least 1"),
        (not 0.0 < args.adv_eps <= 1.0, "--adv-eps must be in (0, 1] (pixel units)"),
        (not (0.0 < args.lr <= 10.0 and 0.0 < args.dense_lr <= 10.0), "--lr and --dense-lr must be in (0, 10]"),
        (args.hidden is not None and args.hidden < 1, "--hidden must be at least 1"),
    )
    check_run_options(ap, args, "regime")
    widest = max(c for c in VGG_CFGS[args.vgg] if c != "M")
    args.widest = max(1, round(widest * args.width))
    args.init_rank = max(2, round(150 * args.widest / 512)) if args.init_rank is None else args.init_rank
    args.r_max = max(args.init_rank, round(200 * args.widest / 512)) if args.r_max is None else args.r_max
    if args.init_rank < 2 or args.r_max < args.init_rank:
        ap.error("--init-rank must be at least 2 and at most --r-max")
    args.seeds, args.betas = list(dict.fromkeys(args.seeds)), list(dict.fromkeys(args.betas))
    args.arms = [a for a in ARM_KINDS if a in args.arms]
    return args


def arms(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The compressed arms in table order: key, label and the ``train`` overrides of each."""
    adv = {"attack": "fgsm", "eps": args.adv_eps}
    k, nb, ab = args.kappa_max, args.nuclear_beta, args.adv_beta
    kinds = {  # kind → its arms: (key, label, train)
        "dlrt": [("dlrt", "DLRT (β=0)", {"beta": 0.0})],
        "robust": [(f"robust b={b:g}", f"RobustDLRT β={b:g}", {"beta": b}) for b in args.betas],
        "clamp": [(f"clamp k={k:g}", f"clamp κ≤{k:g}", {"beta": 0.0, "kappa_max": k})],
        "nuclear": [(f"nuclear b={nb:g}", f"nuclear β={nb:g}", {"beta": nb, "regularizer": "nuclear"})],
        "fgsm": [("fgsm", "FGSM-AT (β=0)", {"beta": 0.0, "adversarial": adv})],
        "fgsm-robust": [(f"fgsm+robust b={ab:g}", f"FGSM-AT + β={ab:g}", {"beta": ab, "adversarial": adv})],
    }
    return [dict(key=key, label=label, train=train) for kind in args.arms for key, label, train in kinds[kind]]


def build_vgg(args: argparse.Namespace, num_classes: int, mean: list[float], std: list[float]) -> nn.Module:
    """torchvision's VGG features (no batch norm) at ``--width``, a small classifier, VGG's init."""
    cfg = [c if c == "M" else max(1, round(c * args.width)) for c in VGG_CFGS[args.vgg]]
    last, hidden = cfg[-2], args.hidden or cfg[-2]
    classifier = [nn.Linear(last, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True)]
    net = nn.Sequential(make_layers(cfg, batch_norm=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), *classifier)
    net.append(nn.Linear(hidden, num_classes))
    for m in net.modules():  # torchvision's VGG initialization
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return lib.NormalizedClassifier(net, mean, std)


def data_section(args: argparse.Namespace) -> dict[str, Any]:
    subsets = dict(train_subset=args.train_subset or None, val_subset=args.val_subset or None)
    return dict(name=args.data, root=args.data_root, **subsets, batch_size=args.batch_size, eval_batch_size=256)


def dense_section(args: argparse.Namespace) -> lib.BaselineSection:
    keys = dict(epochs=args.dense_epochs, optimizer="adam", lr=args.dense_lr, schedule="cosine", amp=args.amp)
    return lib.BaselineSection.model_validate({**keys, "checkpoint_every": 0})


def arm_recipe(args: argparse.Namespace, seed: int, arm: dict[str, Any]) -> lib.Recipe:
    train = dict(epochs=args.epochs, finetune_epochs=0, optimizer="adam", lr=args.lr, schedule="cosine")
    train.update(grad_clip=None, tau=args.tau, coefficient_steps=args.coefficient_steps, amp=args.amp)
    train.update(target={"params": args.params, "ramp": args.ramp}, device=args.device, checkpoint_every=0)
    factorize = {"init": "svd", "init_rank": args.init_rank, "r_min": 2, "r_max": args.r_max}
    doc = {"seed": seed, "data": data_section(args), "factorize": factorize, "train": {**train, **arm["train"]}}
    return lib.recipe_from_dict({**doc, "run_name": "regime"}, source="bench_regime")


def measure(model: nn.Module, loader, args, seed: int, std: list[float]) -> dict[str, Any]:
    """Clean and attacked accuracy, sensitivity and size (every model sees the same attack draws)."""
    t0 = time.perf_counter()
    attacks = dict(attacks=copy.deepcopy(ATTACKS), eps_unit=args.eps_unit, std=std, device=args.device)
    res = lib.evaluate(model, loader, max_samples=args.attack_samples or None, seed=seed, **attacks)
    out = {"clean": res.clean_accuracy, "acc": res.adversarial_accuracy, "sensitivity": res.sensitivity}
    out.update(n_eval=res.n_clean, n_attacked=res.n_attacked, **sizes(model))
    return {**out, "eval_seconds": time.perf_counter() - t0}


def eligible_layers(model: nn.Module, args: argparse.Namespace) -> list[str]:
    """The layers factorize_ chooses by its default rules (first conv and head dense, break-even)."""
    cands = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n]
    first = next((n for n, m in cands if isinstance(m, nn.Conv2d)), None)
    head = cands[-1][0] if cands else None
    return [n for n, m in cands if n not in (first, head) and lib.break_even_rank(m, args.r_max) >= 2]


def kappa_stats(kappas: dict[str, float]) -> dict[str, Any]:
    vals = list(kappas.values())
    finite = all(math.isfinite(k) for k in vals)
    return {
        "kappa": kappas,
        "kappa_median": statistics.median(vals) if vals else None,
        "kappa_top": max(vals) if vals else None,
        "log_prod_kappa": sum(math.log(k) for k in vals) if vals and finite else None,
    }


HISTORY = ("epoch", "phase", "train_loss", "train_accuracy", "val_accuracy", "regularizer", "compression_rate")
HISTORY += ("seconds", "budget")


def probe(args: argparse.Namespace, data, dense: nn.Module) -> dict[str, float]:
    """Seconds per training step (dense, one DLRT cycle of s* steps, FGSM) and per attacked image,
    timed on the first batches of this seed's data with an untrained copy of the model."""
    dev = torch.device(args.device)
    lib.set_epoch(data.train_loader, 0)
    batches = list(itertools.islice(data.train_loader, args.coefficient_steps))
    out: dict[str, float] = {}

    def timed(model: nn.Module, cfg, n: int) -> float:
        t = time.perf_counter()
        lib.Trainer(model, batches[:n], cfg, device=dev, name="probe", set_epoch=lambda loader, epoch: None).fit()
        sync(dev)
        return (time.perf_counter() - t) / n

    model = copy.deepcopy(dense).to(dev)
    one = dense_section(args).model_copy(update={"epochs": 1})
    timed(model, one, 1)  # warm-up
    out["dense_step"] = timed(model, one, min(4, len(batches)))
    rec = arm_recipe(args, 0, {"train": {"beta": 0.075}})
    lib.factorize_(model, rec.factorize, seed=0)
    out["dlrt_step"] = timed(model, rec.train.model_copy(update={"epochs": 1}), len(batches))
    fgsm = rec.train.adversarial.model_copy(update={"attack": "fgsm"})
    out["fgsm_step"] = timed(model, rec.train.model_copy(update={"epochs": 1, "adversarial": fgsm}), len(batches))
    n = max(1, min(args.attack_samples or len(data.val_loader.dataset), 32))
    x, y = next(iter(data.val_loader))
    for key, net in (("attack_image", model), ("attack_image_dense", dense)):
        t = time.perf_counter()
        attacks = dict(attacks=copy.deepcopy(ATTACKS), eps_unit=args.eps_unit, std=data.std, device=dev)
        lib.evaluate(net, [(x[:n], y[:n])], max_samples=None, **attacks)
        out[key] = (time.perf_counter() - t) / n
    return out


def predict(args: argparse.Namespace, state: EntryStore, data, t: dict[str, float]) -> dict[tuple[int, str], float]:
    """Seconds each entry still to do should take at the probed pace, by (seed, arm key)."""
    batches = len(data.train_loader)
    attacked = min(args.attack_samples or data.n_val, data.n_val)
    out = {}
    for seed in args.seeds:
        if state.get(seed, "dense") is None:
            cached = state.weights(seed) is not None and state.weights(seed).is_file()
            train = 0 if cached else args.dense_epochs * batches * t["dense_step"]
            out[(seed, "dense")] = train + attacked * t["attack_image_dense"]
        for arm in arms(args):
            if state.get(seed, arm["key"]) is None:
                step = t["fgsm_step"] if "adversarial" in arm["train"] else t["dlrt_step"]
                out[(seed, arm["key"])] = args.epochs * batches * step + attacked * t["attack_image"]
    return out


class EstimateOnly(Exception):
    """--estimate-only: the estimate is printed, nothing else is run or written."""


def run_seed(args: argparse.Namespace, seed: int, state: EntryStore, clock: dict[str, Any]) -> None:
    todo = [a for a in arms(args) if state.get(seed, a["key"]) is None]
    if not todo and state.get(seed, "dense"):
        return
    dev = torch.device(args.device)
    torch.manual_seed(seed)
    section = lib.recipe_from_dict({"data": data_section(args)}).data
    data = lib.build_data(section, input_size=args.input_size, seed=seed)
    dense = build_vgg(args, data.num_classes, data.mean, data.std).to(dev)
    if not clock["estimated"]:
        clock["estimated"] = True
        t = probe(args, data, dense)
        clock["predicted"] = predict(args, state, data, t)
        secs = sum(clock["predicted"].values())
        log.info(
            "estimated wall time of this run: %.1f min (%s; %d thread(s), load %.1f); measured per training step "
            "of %d images: dense %.3f s, DLRT %.3f s, FGSM-AT %.3f s; per attacked image (all %d attack settings) "
            "%.3f s (dense %.3f s)",
            *(secs / 60, args.device, torch.get_num_threads(), os.getloadavg()[0], args.batch_size),
            *(t["dense_step"], t["dlrt_step"], t["fgsm_step"], sum(len(a["eps"]) for a in ATTACKS)),
            *(t["attack_image"], t["attack_image_dense"]),
        )
        clock["probe"], clock["estimate_seconds"] = t, secs
        if args.estimate_only:
            raise EstimateOnly
    t_dense = time.perf_counter()
    history, train_s = dense_weights(
        dense, data.train_loader, dense_section(args), seed=seed, cache=state.weights(seed), device=dev,
        val_loader=data.val_loader, name="dense",
    )  # fmt: skip
    dense.eval()
    modules, spectra = dict(dense.named_modules()), {}  # the dense layers' singular values, each computed once

    def dense_spectra(names) -> dict[str, list[float]]:
        with torch.no_grad():
            spectra.update({n: lib.layer_spectrum(modules[n]) for n in names if n not in spectra})
        return spectra

    if not state.get(seed, "dense"):
        m = measure(dense, data.val_loader, args, seed, data.std)
        if m["clean"] < args.dense_target:
            log.warning(
                "seed %d: dense reached %.1f%% held-out accuracy, below the %.0f%% of 'well trained': "
                "raise --dense-epochs (and use another --checkpoint-dir)",
                *(seed, 100 * m["clean"], 100 * args.dense_target),
            )
        names = eligible_layers(dense, args)
        s = dense_spectra(names)
        kappas = {n: s[n][0] / s[n][-1] if s[n][-1] > 0 else math.inf for n in names}
        entry = {"seed": seed, "arm": "dense", "label": "dense", **m, **kappa_stats(kappas), "n_train": data.n_train}
        state.add(entry | {"train_seconds": train_s, "history": slim(history, *HISTORY) if history else []})
        done(clock, (seed, "dense"), t_dense, state)
    for arm in todo:
        t0 = time.perf_counter()
        rec = arm_recipe(args, seed, arm)
        model = copy.deepcopy(dense)
        model.train()
        log.info("seed %d: %s, factorize + %d epoch(s)", seed, arm["label"], args.epochs)
        fact, history, secs = lib.factorize_and_train(
            model, data.train_loader, rec, device=dev, set_epoch=lib.set_epoch
        )
        model.eval()
        m = measure(model, data.val_loader, args, seed, data.std)
        cert = lib.certificate(model, fact, dense_spectra(d.name for d in fact.factorized), {}, {})
        kappas = kappa_stats({n: layer.condition_number() for n, layer in lib.low_rank_layers(model).items()})
        entry = {"seed": seed, "arm": arm["key"], "label": arm["label"], "train_config": arm["train"], **m, **kappas}
        entry.update(dense_log_prod_kappa=cert["dense_log_prod_kappa"], certificate_layers=cert["layers"])
        entry.update(ranks=ranks(model), train_seconds=secs["train"], factorize_seconds=secs["factorize"])
        entry.update(nonfinite_steps=history.nonfinite_steps, history=slim(history, *HISTORY))
        state.add(entry | {"kappa_trace": history.kappa_trace})
        done(clock, (seed, arm["key"]), t0, state)
        del model


def done(clock: dict[str, Any], key: tuple[int, str], t0: float, state: EntryStore) -> None:
    """Log the entry and how long the rest should take: the probe's prediction for the entries
    left, scaled by how the finished ones compared with theirs."""
    secs = time.perf_counter() - t0
    clock["spent"] += secs
    clock["spent_predicted"] += clock["predicted"].pop(key, secs)
    ratio = clock["spent"] / max(clock["spent_predicted"], 1e-9)
    left = ratio * sum(clock["predicted"].values())
    e = state.entries[-1]
    log.info(
        "seed %d %s: clean %.1f%%, ℓ2-FGSM ε=%g %.1f%%, c.r. %.1f%%, κ median %s max %s, %.0f s; "
        "%d entries left, ≈ %.0f min (the estimate × %.2f, the pace so far)",
        *(e["seed"], e["label"], 100 * e["clean"], MID, 100 * acc(e, "l2_fgsm", MID), e["compression_rate"]),
        *(mean_std([e[k]], g=True) for k in ("kappa_median", "kappa_top")),
        *(secs, len(clock["predicted"]), left / 60, ratio),
    )


acc = lambda e, attack, eps: e["acc"].get(attack, {}).get(str(float(eps)))
sens = lambda e, attack="l2_fgsm", eps=MID: e["sensitivity"].get(attack, {}).get(str(float(eps)))


def groups(args: argparse.Namespace, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm in table order (dense first): label and its entries over seeds."""
    order = [("dense", "dense")] + [(a["key"], a["label"]) for a in arms(args)]
    by = {key: [e for e in entries if e["arm"] == key and e["seed"] in args.seeds] for key, _ in order}
    return [{"key": key, "label": label, "entries": by[key]} for key, label in order if by[key]]


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]], fn) -> list[float]:
    """fn(a) − fn(b) per seed both have, in points."""
    bs = {e["seed"]: e for e in b}
    return [100 * (fn(e) - fn(bs[e["seed"]])) for e in a if e["seed"] in bs and fn(e) is not None]


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); None below 3 points or without spread."""
    from scipy.stats import spearmanr

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(spearmanr(xs, ys).statistic)


def verdicts(args: argparse.Namespace, table: list[dict[str, Any]]) -> list[str]:
    by = {g["key"]: g for g in table}
    mid = lambda e: acc(e, "l2_fgsm", MID)
    clean = lambda e: e["clean"]
    lines = []
    dense = by.get("dense")
    if dense:
        ok = all(e["clean"] >= args.dense_target for e in dense["entries"])
        lines.append(
            f"- Dense reached {mean_std([e['clean'] for e in dense['entries']], scale=100)} % held-out clean "
            f"accuracy (well trained = ≥ {100 * args.dense_target:g} % for every seed: {met(ok)}"
            + ("" if ok else "; the regime's premise does not hold, read the rest with care")
            + ")."
        )
    dlrt = by.get("dlrt")
    if dense and dlrt:
        d = paired(dlrt["entries"], dense["entries"], mid)
        dc = paired(dlrt["entries"], dense["entries"], clean)
        if d:
            gap = statistics.fmean(d)
            words = f"**loses {-gap:.1f} points**" if gap <= -1.0 else f"**does not lose**, it gains {gap:.1f} points"
            words = f"**does not lose** more than a point ({gap:+.1f} points)" if -1.0 < gap < 1.0 else words
            lines.append(
                f"- (1) At ε={MID:g}, DLRT {words} of ℓ2-FGSM accuracy against dense: "
                f"{mean_std([mid(e) for e in dlrt['entries']], scale=100)} vs "
                f"{mean_std([mid(e) for e in dense['entries']], scale=100)} % (per seed "
                f"{', '.join(f'{x:+.1f}' for x in d)}); clean {statistics.fmean(dc):+.1f} points; c.r. "
                f"{mean_std([e['compression_rate'] for e in dlrt['entries']])} %."
            )
    comp = [g for g in table if g["key"] != "dense"]
    if not comp:
        return lines + ["- No compressed arm was measured."]
    scored = [(mean([mid(e) for e in g["entries"]]), g) for g in comp]
    scored = [(s, g) for s, g in scored if s is not None]
    if not scored:
        return lines + [f"- No compressed arm has an ℓ2-FGSM accuracy at ε={MID:g}."]
    best_s, best = max(scored, key=lambda t: t[0])
    crs = [e["compression_rate"] for g in comp for e in g["entries"]]
    lines.append(
        f"- (2) Best arm at ε={MID:g}: **{best['label']}** with {100 * best_s:.1f} % ℓ2-FGSM accuracy "
        f"(clean {mean_std([e['clean'] for e in best['entries']], scale=100)} %); the compressed arms' c.r. "
        f"spans {min(crs):.2f}–{max(crs):.2f} % (budget {args.params:g} of the parameters)."
    )
    # the target: the best conditioned arm (any arm but DLRT) against DLRT and dense
    cond = [(s, g) for s, g in scored if g["key"] != "dlrt"]
    if not (cond and dlrt and dense):
        lines.append("- Target: not measured (needs dense, DLRT and at least one conditioned arm).")
        return lines

    def check(g: dict[str, Any]) -> tuple[bool, str]:
        a = mean([mid(e) for e in g["entries"]])
        d_dlrt = statistics.fmean(paired(g["entries"], dlrt["entries"], mid) or [float("nan")])
        d_dense = statistics.fmean(paired(g["entries"], dense["entries"], mid) or [float("nan")])
        d_clean = statistics.fmean(paired(g["entries"], dense["entries"], clean) or [float("nan")])
        cr = mean([e["compression_rate"] for e in g["entries"]])
        parts = [
            (d_dlrt >= args.target_gain, f"{d_dlrt:+.1f} points vs DLRT (≥ +{args.target_gain:g})"),
            (d_dense >= -args.target_slack, f"{d_dense:+.1f} vs dense (≥ −{args.target_slack:g})"),
            (cr >= args.target_cr, f"c.r. {cr:.2f} % (≥ {args.target_cr:g})"),
            (d_clean >= -args.target_slack, f"clean {d_clean:+.1f} vs dense (≥ −{args.target_slack:g})"),
        ]
        text = ", ".join(t + ("" if p else " ✗") for p, t in parts)
        return all(p for p, _ in parts), f"{g['label']}: ℓ2-FGSM ε={MID:g} {100 * a:.1f} %, {text}"

    results = [(s, g, *check(g)) for s, g in cond]
    meeting = [r for r in results if r[2]]
    s, g, ok, text = max(meeting or results, key=lambda r: r[0])
    lines.append(
        f"- Target (the best conditioned arm's ℓ2-FGSM accuracy at ε={MID:g} ≥ DLRT's + {args.target_gain:g} "
        f"points and ≥ dense's − {args.target_slack:g}, at c.r. ≥ {args.target_cr:g} % and clean ≥ dense − "
        f"{args.target_slack:g}; differences paired by seed): {met(ok)} — {text}."
        + ("" if ok else " No conditioned arm meets all four.")
    )
    es = [e for g in comp for e in g["entries"] if e.get("log_prod_kappa") is not None and sens(e) is not None]
    rho = spearman([e["log_prod_kappa"] for e in es], [sens(e) for e in es])
    if rho is not None:
        order = "a larger bound goes with a more sensitive model" if rho > 0.3 else "no clear ordering"
        order = "reversed: a larger bound goes with a less sensitive model" if rho < -0.3 else order
        lines.append(
            f"- Certificate vs measurement: over the {len(es)} compressed models, log ∏κ and the measured relative "
            f"sensitivity (ℓ2-FGSM ε={MID:g}) have Spearman ρ = {rho:+.2f} ({order})."
        )
    return lines


def render(args: argparse.Namespace, doc: dict[str, Any], plot: str | None = None) -> str:
    arms_ = groups(args, doc["entries"])
    cols = [(a["name"], e) for a in ATTACKS for e in a["eps"]]
    head = []
    for i, (name, e) in enumerate(cols):
        first = i == 0 or cols[i - 1][0] != name
        shown = "8/255" if name == "pgd" else f"{e:g}"
        head.append(f"{ATTACK_LABELS[name]} ε={shown}" if first else f"ε={shown}")
    unit = "pixel" if args.eps_unit == "pixel" else "normalized"
    out = [
        f"## The regime: DLRT vs conditioning at equal compression ({args.vgg} ×{args.width:g}, no BN, on {args.data})",
        "",
        f"{len(args.seeds)} seed(s) ({', '.join(map(str, args.seeds))}), mean ± std. {doc['n_train']} training / "
        f"{doc['n_eval']} held-out images at {args.input_size}×{args.input_size}, {doc['n_attacked']} attacked. "
        f"Dense: {args.vgg} without batch norm at {args.width:g}× torchvision's width (widest conv "
        f"{args.widest}), Adam {args.dense_lr:g} cosine, {args.dense_epochs} epoch(s), batch {args.batch_size}. "
        f"Every arm starts from the same dense weights per seed: SVD init at rank {args.init_rank} (r_max "
        f"{args.r_max}), Adam {args.lr:g} cosine, no clipping, τ {args.tau:g}, s* {args.coefficient_steps}, "
        f"{args.epochs} rank-adaptive epoch(s), parameter budget {args.params:g} reached over the first "
        f"{args.ramp:g} of the truncations. Accuracies in %; ℓ2-FGSM, Jitter and Mixup ε in {unit} units, PGD-ℓ∞ "
        f"8/255 in pixels, 10 steps; FGSM-AT trains on FGSM-RS examples at ℓ∞ ε {args.adv_eps:.4g}. κ over the "
        "factorized layers at the end (dense: the same layers' weights); log ∏κ = the certificate of eq. (2); "
        f"sens. = the measured relative sensitivity of eq. (1) under ℓ2-FGSM ε={MID:g}.",
        "",
    ]
    rows = []
    for g in arms_:
        es = g["entries"]
        cells = [
            g["label"],
            mean_std([e["compression_rate"] for e in es], 2),
            mean_std([e["clean"] for e in es], scale=100),
        ]
        cells += [mean_std([acc(e, n, x) for e in es], scale=100) for n, x in cols]
        cells += [mean_std([e["kappa_median"] for e in es], g=True), mean_std([e["kappa_top"] for e in es], g=True)]
        cells += [mean_std([e["log_prod_kappa"] for e in es]), mean_std([sens(e) for e in es], 2)]
        rows.append(cells + [mean_std([e.get("train_seconds") for e in es], 0)])
    head = ["arm", "c.r. %", "clean", *head, "κ median", "κ max", "log ∏κ", "sens.", "train s"]
    out += table(head, "l" + "r" * (len(head) - 1), rows)
    out += ["", "Verdict:", ""] + verdicts(args, arms_)
    if plot:
        out += ["", f"![κ over training: median and max over the factorized layers, per arm and seed]({plot})"]
    return "\n".join(out)


def kappa_plot(args: argparse.Namespace, entries: list[dict[str, Any]], path: Path) -> bool:
    """One panel per arm: median (solid) and max (dashed) κ over the factorized layers after each
    truncation, one colour per seed, log scale, shared axes."""
    panels = [
        g for g in groups(args, entries) if g["key"] != "dense" and any(e.get("kappa_trace") for e in g["entries"])
    ]
    if not panels:
        return False
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    with figure(path, (3.4 * cols, 2.8 * rows + 0.5), 110) as fig:
        axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax, g in zip(axes.flat, panels):
            for e in g["entries"]:
                steps, med, top = [], [], []
                for t in e.get("kappa_trace") or []:
                    ks = [k for k in t["kappa"].values() if k is not None and math.isfinite(k)]
                    if ks:
                        steps.append(t["step"])
                        med.append(statistics.median(ks))
                        top.append(max(ks))
                color = f"C{args.seeds.index(e['seed']) % 10}"
                mark = "o" if len(steps) < 20 else None
                ax.plot(steps, med, color=color, lw=1.2, marker=mark, ms=3, label=f"seed {e['seed']} median")
                ax.plot(steps, top, color=color, lw=1.0, ls="--", marker=mark, ms=3, label=f"seed {e['seed']} max")
            cap = next((e.get("train_config", {}).get("kappa_max") for e in g["entries"]), None)
            if cap:
                ax.axhline(cap, color="0.5", ls=":", lw=1.0)  # the clamp's bound, held after each step
            ax.set_yscale("log")
            ax.set_title(g["label"], fontsize=9)
            ax.grid(alpha=0.3, which="both")
        for ax in axes[-1]:
            ax.set_xlabel("training step")
        for ax in axes[:, 0]:
            ax.set_ylabel("κ(S)")
        axes.flat[0].legend(fontsize=6)
        fig.suptitle(f"κ of the cores over fine-tuning: {args.vgg} ×{args.width:g} on {args.data}", fontsize=10)
    return True


def main(argv: list[str] | None = None) -> int:
    lib.enable_huge_pages()
    args = parse_args(argv)
    run = Run(__file__, args, argv, cpu=args.device_type == "cpu")
    with run.failing(lib.CompressorError):
        state = EntryStore.of(args, _FINGERPRINT, keys=("seed", "arm"))
        left = len(state.missing(*((s, a) for s in args.seeds for a in ["dense"] + [x["key"] for x in arms(args)])))
        log.info(
            "work: %d seed(s) × (dense %d epoch(s) + %d arm(s) × %d epoch(s)) on %s ×%g; %d entries to do",
            *(len(args.seeds), args.dense_epochs, len(arms(args)), args.epochs, args.vgg, args.width, left),
        )
        clock: dict[str, Any] = {"estimated": False, "predicted": {}, "spent": 0.0, "spent_predicted": 0.0}
        try:
            for seed in [] if args.report_only else args.seeds:
                run_seed(args, seed, state, clock)
        except EstimateOnly:
            return 0
    entries = [e for e in state.entries if e["seed"] in args.seeds]
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if args.device_type == "cuda" else None
    record = run.record(estimated_seconds=clock.get("estimate_seconds"), probe=clock.get("probe"))
    doc = run.document(
        "the regime experiment: DLRT vs dense and vs conditioned arms at equal compression, "
        "fine-tuning well-trained weights",
        entries,
        run=record | {"device": args.device, "gpu": gpu},
        settings={**{k: v for k, v in vars(args).items() if k != "out"}, "attacks": ATTACKS},
        arms=arms(args),
    )
    png = args.out.with_name(args.out.stem + "_kappa.png")
    doc["kappa_plot"] = str(png) if kappa_plot(args, entries, png) else None
    doc["markdown"] = md = render(args, doc, doc["kappa_plot"])
    doc["verdicts"] = verdicts(args, groups(args, entries))
    run.publish(
        "regime",
        doc,
        md,
        body=render(args, doc, run.figure(doc["kappa_plot"])),
        measured="clean and attacked accuracy (ℓ2-FGSM, Jitter, Mixup, PGD), c.r., κ and the log ∏κ certificate "
        "beside the measured sensitivity of DLRT, RobustDLRT (β grid), κ clamp, nuclear norm and FGSM "
        "fine-tuning from the same well-trained dense weights at one parameter budget, mean ± std over seeds.",
    )
    missing = state.missing(*((s, a["key"]) for s in args.seeds for a in arms(args)))
    if args.smoke and (missing or not doc["kappa_plot"]):
        raise SystemExit("smoke check failed: an entry or the κ plot is missing")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Distillation from the dense model (issue 31): what logit and adversarial KD recover of a MAC budget's cost.

Per model, from the dense tier's plateau-trained weights (bench/dense_tier.py; BatchNorm statistics
re-estimated as after every arm), the budget arm (``train.target.macs = --macs``) once per seed
without KD, with logit KD (the frozen dense model the teacher) and with adversarial KD (FGSM-RS examples
against the student, the teacher's clean soft label the target). Targets: KD clean ≥ dense − 1 point;
adversarial KD ℓ2-FGSM (ε 0.1) and PGD ≥ dense's at clean ≥ dense − 2; each verdict says by how much a
missed one is missed and what would meet it.

    python bench/bench_distill.py --smoke     # < 2 min: timm test models, the tier's smoke sizes (CI)
    python bench/bench_distill.py --threads 1 --checkpoint-dir bench/results/distill-ckpt
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from dense_tier import SMOKE as SMOKE_TIER
from dense_tier import TIER, TierData, build_tier_data, dense_model
from harness import lib
from harness.entries import EntryStore
from harness.measure import EPS_L2, robustness, sizes
from harness.report import mean, mean_std, met, table
from harness.run import RESULTS, Run, add_run_options, at_least, check_run_options, options, parser, pick, recipe

log = logging.getLogger("bench_distill")

MODELS = ["tv:resnet18", "tv:mobilenet_v3_small"]
SMOKE_MODELS = ["timm:test_resnet", "timm:test_efficientnet"]
ARMS = {"dense": "dense", "none": "no KD", "kd": "logit KD", "adv-kd": "adversarial KD"}
_FINGERPRINT = ("smoke", "epochs", "macs", "beta", "kd_weight", "temperature", "adv_eps", "attack_samples")
_FINGERPRINT += ("pgd_steps",)
_TIER_KEYS = ("epochs", "plateau", "train_images", "val_images", "val_acc", "last_two_epochs_change", "published")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--models", nargs="+", default=None, help=f"subset of {', '.join(MODELS)}")
    options(ap, seeds=[0, 1], epochs=(3, "rank-adaptive epochs of every arm"), macs=(0.25, "train.target.macs"))
    options(ap, beta=(0.075, "β of every arm (the budget arm)"), kd_weight=(0.5, "train.distill.weight"))
    options(ap, temperature=(4.0, "train.distill.temperature"), adv_eps=(8 / 255, "FGSM training: ℓ∞ ε in pixels"))
    options(ap, attack_samples=(1000, "held-out images attacked"), pgd_steps=10)
    ap.add_argument("--tier-dir", default=None, help="the dense tier's cache (default bench/results/dense-tier)")
    add_run_options(ap, "distill", smoke="< 2 min: timm test models, the tier's smoke sizes (CI)", resumable=True)
    args = ap.parse_args(argv)
    check_run_options(ap, args, "distill")
    args.models = pick(ap, args.models, SMOKE_MODELS if args.smoke else MODELS)
    if args.smoke:
        args.seeds, args.epochs, args.attack_samples, args.pgd_steps = [0, 1], 1, 16, 2
    args.seeds = list(dict.fromkeys(args.seeds))
    at_least(ap, args, 1, "epochs", "attack_samples", "pgd_steps")
    if min(args.seeds) < 0 or not 0.0 < args.macs <= 1.0 or not 0.0 < args.kd_weight <= 1.0:
        ap.error("--seeds must not be negative, --macs and --kd-weight must be fractions in (0, 1]")
    args.tier = SMOKE_TIER if args.smoke else TierData()
    # the recipe's data section (harness.recipe) describes the tier's images
    args.data, args.data_root, args.dense_epochs = "fashion-mnist", None, 0
    vars(args).update({k: getattr(args.tier, k) for k in ("train_subset", "val_subset", "batch_size")})
    return args


def recipe_for(args: argparse.Namespace, model: str, arm: str, seed: int) -> lib.Recipe:
    train: dict[str, Any] = {"epochs": args.epochs, "beta": args.beta, "target": {"macs": args.macs, "ramp": 0.5}}
    if arm in ("kd", "adv-kd"):
        train["distill"] = {"weight": args.kd_weight, "temperature": args.temperature}
    if arm == "adv-kd":
        train["adversarial"] = {"attack": "fgsm", "eps": args.adv_eps}
    factorize = {"init": "activations", "init_rank": 150, "r_min": 2, "r_max": 200}
    model_ = {"name": model, "input_size": args.tier_input[model]}
    return recipe(args, seed, source="bench_distill", model=model_, factorize=factorize, train=train)


def measure(model: torch.nn.Module, data, args: argparse.Namespace, size: int) -> dict[str, Any]:
    """Attack draws seeded 0 for every entry: the same images, the same PGD starts."""
    out = robustness(model, data.val_loader, samples=args.attack_samples, seed=0, pgd_steps=args.pgd_steps)
    return {**out, **sizes(model, size), "l2_fgsm": {f"{float(k):g}": v for k, v in out["l2_fgsm"].items()}}


def reshuffle(loader, base: int, seed: int) -> None:
    """Seed ``seed``'s shuffle order (and augmentation draws) of the tier's training images: the
    sampler's seed only (``base``: the tier's), so the training and held-out images stay the tier's."""
    loader.sampler.seed = base + 1000 * seed


def run_model(args: argparse.Namespace, name: str, state: EntryStore, tier_dir: Path) -> None:
    todo = state.missing(*((name, arm, seed) for seed in args.seeds for arm in ("none", "kd", "adv-kd")))
    if state.get(name, "dense", None) is not None and not todo:
        return
    size = args.tier_input[name]
    data = build_tier_data(args.tier, size)
    dense, info = dense_model(name, data, tier_dir, args.tier)
    # the reference gets what every arm gets after training: statistics estimated on training batches
    lib.set_epoch(data.train_loader, 0)
    lib.reestimate_batchnorm_(dense, data.train_loader, torch.device("cpu"), 16)
    dense.eval()
    if state.get(name, "dense", None) is None:
        tier = {k: info.get(k) for k in _TIER_KEYS} | {"seconds": info.get("seconds")}
        state.add(dict(model=name, arm="dense", seed=None, n_train=data.n_train, **measure(dense, data, args, size),
                       tier=tier, train_seconds=info.get("seconds")))  # fmt: skip
        report(state)
    teacher = copy.deepcopy(dense).requires_grad_(False).eval()
    base = data.train_loader.sampler.seed
    for _, arm, seed in todo:
        rec = recipe_for(args, name, arm, seed)
        model = copy.deepcopy(dense)
        reshuffle(data.train_loader, base, seed)
        log.info("%s: %s seed %d, factorize + %d epoch(s)", name, ARMS[arm], seed, args.epochs)
        _, history, secs = lib.factorize_and_train(
            model, data.train_loader, rec, device=torch.device("cpu"), set_epoch=lib.set_epoch,
            teacher=teacher if rec.train.distill.weight > 0 else None,
        )  # fmt: skip
        state.add(dict(model=name, arm=arm, seed=seed, n_train=data.n_train, **measure(model, data, args, size),
                       train_seconds=secs["train"] + secs["factorize"], loss_terms=history.loss_terms))  # fmt: skip
        report(state)


def report(state: EntryStore) -> None:
    e = state.entries[-1]
    log.info(
        "%s %s seed %s: clean %.1f%%, ℓ2-FGSM 0.1 %.1f%%, PGD %.1f%%, MACs %.3f, c.r. %.1f%%, %.0f s",
        *(e["model"], e["arm"], e["seed"], 100 * e["clean"], 100 * e["l2_fgsm"]["0.1"], 100 * e["pgd"]),
        *(e["macs_fraction"], e["compression_rate"], e["train_seconds"] or float("nan")),
    )


cells = lambda entries, key, sub=None: [e[key][sub] if sub else e[key] for e in entries]


def targets(args: argparse.Namespace, by_arm: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The issue's two targets, on the means over seeds, with the gap and what would close it."""
    dense = by_arm["dense"][0]
    d_clean, d_fgsm, d_pgd = 100 * dense["clean"], 100 * dense["l2_fgsm"]["0.1"], 100 * dense["pgd"]
    out = []
    if by_arm.get("kd"):
        clean = 100 * mean(cells(by_arm["kd"], "clean"))
        gap = clean - (d_clean - 1)
        line = f"- logit KD clean ≥ dense − 1: {clean:.1f} vs {d_clean - 1:.1f}: {met(gap >= 0)}"
        if gap < 0 and by_arm.get("none"):
            plain = 100 * mean(cells(by_arm["none"], "clean"))
            gain, cost = clean - plain, d_clean - plain
            line += (
                f", {-gap:.1f} points short. KD recovered {gain:+.1f} of the {cost:.1f} points the budget costs "
                f"without it; the rest needs more rank-adaptive epochs than {args.epochs} or a milder budget than "
                f"train.target.macs {args.macs:g}"
            )
        out.append(line + ".")
    if by_arm.get("adv-kd"):
        adv = by_arm["adv-kd"]
        clean, fgsm = 100 * mean(cells(adv, "clean")), 100 * mean(cells(adv, "l2_fgsm", "0.1"))
        pgd = 100 * mean(cells(adv, "pgd"))
        gaps = {"ℓ2-FGSM 0.1": fgsm - d_fgsm, "PGD": pgd - d_pgd, "clean vs dense − 2": clean - (d_clean - 2)}
        line = (
            f"- adversarial KD ℓ2-FGSM 0.1 and PGD ≥ dense's at clean ≥ dense − 2: ℓ2-FGSM {fgsm:.1f} vs "
            f"{d_fgsm:.1f}, PGD {pgd:.1f} vs {d_pgd:.1f}, clean {clean:.1f} vs {d_clean - 2:.1f}: "
            f"{met(min(gaps.values()) >= 0)}"
        )
        if missed := {k: g for k, g in gaps.items() if g < 0}:
            line += ", short by " + ", ".join(f"{-g:.1f} points ({k})" for k, g in missed.items())
            if "clean vs dense − 2" in missed:
                line += (
                    f". Clean pays for the FGSM term: a smaller train.adversarial.eps than {args.adv_eps:.4g}, "
                    f"a higher train.distill.weight than {args.kd_weight:g} (the teacher's clean labels) or more epochs"
                )
            else:
                line += ". A stronger training attack (train.adversarial.attack pgd) or more epochs"
        out.append(line + ".")
    return out


def render(args: argparse.Namespace, doc: dict[str, Any]) -> str:
    entries = doc["entries"]
    out = [
        f"## Distillation from the dense model: {', '.join(args.models)} at train.target.macs {args.macs:g}",
        "",
        f"{doc['n_train']} training / {doc['n_eval']} held-out Fashion-MNIST images (32 px), the first "
        f"{doc['n_attacked']} held-out ones attacked (ℓ2-FGSM ε in pixel units; PGD-ℓ∞ ε 8/255, {args.pgd_steps} "
        "steps; the same images and draws for every row). Dense: the dense tier's plateau-trained weights "
        "(bench/dense_tier.py), BatchNorm statistics re-estimated over 16 training batches as after every arm. "
        f"Every arm from those weights, the budget arm (recipes/robust.yaml's settings, β {args.beta:g}, "
        f"train.target.macs {args.macs:g}) for {args.epochs} rank-adaptive epoch(s), seeds "
        f"{', '.join(map(str, args.seeds))}: no KD; logit KD (train.distill weight {args.kd_weight:g}, T "
        f"{args.temperature:g}; teacher: the dense row, frozen); adversarial KD (the same KD with FGSM-RS "
        f"training, ℓ∞ ε {args.adv_eps:.4g}; the student attacked, the teacher's clean soft label the target). "
        "Accuracies in %, mean ± std over seeds.",
    ]
    head = ["arm", "clean", *(f"ℓ2-FGSM {x:g}" for x in EPS_L2), "PGD", "MACs", "c.r. %", "train s"]
    for name in args.models:
        by_arm = {a: [e for e in entries if e["model"] == name and e["arm"] == a] for a in ARMS}
        if not by_arm["dense"]:
            continue
        t = by_arm["dense"][0]["tier"]
        change = t["last_two_epochs_change"]
        out += [
            "",
            f"### {name}",
            "",
            f"Dense tier: {t['epochs']} epochs on {t['train_images']} images, held-out accuracy {t['val_acc']:.2f} % "
            f"after the last, {'—' if change is None else f'{change:.2f}'} points of change over the last two "
            f"(plateau {'reached' if t['plateau'] else 'not reached'}); published: {t['published'] or 'none found'}.",
            "",
        ]
        rows = []
        for arm, label in ARMS.items():
            es = by_arm[arm]
            if not es:
                continue
            row = [label + (f" ({len(es)} seed{'s' * (len(es) > 1)})" if arm != "dense" else "")]
            row += [mean_std(cells(es, "clean"), scale=100)]
            row += [*(mean_std(cells(es, "l2_fgsm", f"{x:g}"), scale=100) for x in EPS_L2)]
            row += [mean_std(cells(es, "pgd"), scale=100), mean_std(cells(es, "macs_fraction"), digits=3)]
            row += ["—" if arm == "dense" else mean_std(cells(es, "compression_rate"))]
            rows.append(row + [mean_std(cells(es, "train_seconds"), digits=0)])
        out += table(head, "l" + "r" * (len(head) - 1), rows)
        out += ["", *targets(args, by_arm)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    lib.enable_huge_pages()
    args = parse_args(argv)
    args.tier_input = {m: TIER[m].input_size if m in TIER else 32 for m in args.models}
    run = Run(__file__, args, argv)
    state = EntryStore.of(args, _FINGERPRINT, keys=("model", "arm", "seed"))
    with run.failing(lib.CompressorError), tempfile.TemporaryDirectory(prefix="bench-distill-tier-") as tmp:
        # the smoke run's tier lives with its checkpoint (or nowhere), never in the real tier's cache
        default = (Path(args.checkpoint_dir) / "tier" if args.checkpoint_dir else Path(tmp)) if args.smoke else None
        tier_dir = Path(args.tier_dir) if args.tier_dir else (default or RESULTS / "dense-tier")
        for name in [] if args.report_only else args.models:
            run_model(args, name, state, tier_dir)
    entries = [e for e in state.entries if e["model"] in args.models and e["seed"] in [None, *args.seeds]]
    doc = run.document("distillation from the dense model at a MAC budget", entries, skip=("out", "tier"))
    doc["markdown"] = md = render(args, doc)
    run.publish(
        "distill",
        doc,
        md,
        measured="per model: clean and attacked accuracy, MACs, c.r. and training seconds of a MAC-budget arm "
        "without distillation, with logit distillation and with adversarial distillation, against the dense "
        "tier model they start from and distill from.",
    )
    run.smoke_check(
        state.missing(*((m, a, s) for m in args.models for a in ("none", "kd", "adv-kd") for s in args.seeds))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

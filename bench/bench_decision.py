"""Which compression for which network (issue 32): arms at equal measured latency, from the same dense weights.

Per model (the dense tier's plateau-trained weights, bench/dense_tier.py: Fashion-MNIST, 8,000
training / 2,000 held-out images; tv:vgg16 on the main job's digits instead, where it plateaus
cheaply), latency target t (of the dense onnxruntime latency at batch 32, ``--deploy-size`` 224 px)
and seed, every arm starts from the same dense weights and trains the same epochs with the same
optimizer (recipes/robust.yaml's AdamW 5e-4, cosine, clip 1.0) and logit KD from the frozen dense
model (weight 0.5, T 4):

- ``dlrt``: budget-RobustDLRT with ``train.target.latency = t``;
- ``oneshot``: low-rank at once at dlrt's final per-layer ranks and export forms with activation-aware
  bases, then fine-tuned at fixed ranks (every factor, β 0); ``oneshot-svd``: weight-SVD bases;
- ``prune``: torch-pruning's channel pruning (group magnitude L2, global, rounded to 8), its ratio
  bisected until its measured latency is within ``--tolerance`` of dlrt's, then the same fine-tuning;
- ``int8``: the dense model in static QDQ INT8 as ``compress`` exports it (MinMax, per channel, the
  first 256 training images of epoch 0); ``dlrt+int8``, ``prune+int8``: the same on those arms.

A target below what low rank can reach (the budget refuses it: every factorized layer at its smallest
rank is still slower) is a dlrt row that says so; the one-shot arms, which take dlrt's ranks, are
skipped, and pruning is bisected to the target itself.

Per arm: clean, ℓ2-FGSM (ε 0.05/0.1/0.3, pixels) and PGD-ℓ∞ 8/255 accuracy (INT8: the examples made
on its float model), parameters and MACs as deployed, ONNX parity, and per (target, seed) every
graph's onnxruntime latency, dense included, interleaved in one process at batch 1 and 32, at the
deployment and the training size. At the mildest target a fine-tuned arm more than 2 points below
dense is failed and never chosen. ViTs (graphs built for one size) take their target at the training
size and are timed at 224 with resampled position embeddings.

    python bench/bench_decision.py --smoke      # < 1 min: digits, timm:test_resnet, 1 seed, 1 target (CI)
    python bench/bench_decision.py --threads 1 --checkpoint-dir bench/results/decision-ckpt
    python bench/bench_decision.py --threads 1 --jobs 2 --checkpoint-dir bench/results/decision-ckpt  # 2 cores

``--jobs N`` runs N models at once, each in its own process (one thread each with ``--threads 1``),
in the order given; they share the checkpoint folder, and a model's latency passes interleave its own
graphs, so the other process loads dense and arms alike.
"""

from __future__ import annotations

import argparse
import copy
import logging
import multiprocessing
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from dense_tier import SMOKE as SMOKE_TIER
from dense_tier import TIER, TierData, TierSpec, dense_model, slug
from harness import lib
from harness.entries import Clock, EntryStore
from harness.measure import EPS_L2, PGD_EPS, dense_weights, ranks
from harness.report import mean, mean_std, met, pareto_plot, table
from harness.run import (
    RESULTS,
    Run,
    add_run_options,
    at_least,
    check_run_options,
    exit_with_parent,
    parse_device,
    parser,
)
from torch import nn

log = logging.getLogger("bench_decision")
ALIASES = {
    "vgg16": "tv:vgg16",
    "resnet18": "tv:resnet18",
    "deit_tiny": "timm:deit_tiny_patch16_224",
    "convnext_atto": "timm:convnext_atto",
}
MODELS = ["vgg16", "tv:resnet18", "tv:mobilenet_v3_small", "timm:convnext_atto", "deit_tiny"]
DIGITS, TARGET_MODELS = ("tv:vgg16",), ("tv:vgg16", "tv:resnet18")
ARMS = {"dense": "dense", "int8": "INT8 of dense", "dlrt": "budget-RobustDLRT", "oneshot": "one-shot low-rank"}
ARMS |= {"oneshot-svd": "one-shot weight-SVD", "prune": "channel pruning"}
ARMS |= {"dlrt+int8": "budget-RobustDLRT + INT8", "prune+int8": "channel pruning + INT8"}
TUNED = ("dlrt", "oneshot", "oneshot-svd", "prune")  # the fine-tuned arms, in training order
GRAPHS = ("dense", "int8", *TUNED, "dlrt+int8", "prune+int8")
KINDS = {"kxk": "k×k convs", "1x1": "1×1 convs", "depthwise": "depthwise convs", "linear": "linear layers"}
FACTORIZE = {"init": "activations", "init_rank": 150, "r_min": 2, "r_max": 200}  # recipes/robust.yaml
SANITY_POINTS, TARGET_POINTS, BN_BATCHES = 2.0, 2.0, 16
_FINGERPRINT = ("smoke", "preset", "epochs", "dense_epochs", "beta", "kd_weight", "temperature", "attack_samples")
_FINGERPRINT += ("pgd_steps", "deploy_size", "latency_threads", "latency_repeats", "tolerance")


class OutOfTime(Exception):
    """--time-budget spent: the finished arms are saved and shown."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--models", nargs="+", default=None, help=f"model names (default {' '.join(MODELS)})")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25], help="latency fractions at batch 32")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=2, help="training epochs of every arm")
    ap.add_argument("--dlrt-epochs", type=int, default=None, help="budget-RobustDLRT's epochs (default --epochs)")
    ap.add_argument("--arms", nargs="+", choices=TUNED, default=list(TUNED), help="the fine-tuned arms to run")
    ap.add_argument("--beta", type=float, default=0.075)
    ap.add_argument("--kd-weight", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--attack-samples", type=int, default=500, help="held-out images attacked")
    ap.add_argument("--pgd-steps", type=int, default=10)
    ap.add_argument("--deploy-size", type=int, default=None, help="input side of targets and latency (224)")
    ap.add_argument("--latency-threads", type=int, default=1, help="onnxruntime threads (targets and timing)")
    ap.add_argument("--latency-repeats", type=int, default=5)
    ap.add_argument("--tolerance", type=float, default=0.05, help="pruning's latency vs dlrt's (relative)")
    ap.add_argument("--preset", choices=("cpu", "gpu"), default="cpu", help="gpu: all images, more epochs, bf16")
    ap.add_argument("--dense-epochs", type=int, default=15, help="--preset gpu: dense epochs on the device")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; no arm starts after them")
    ap.add_argument("--tier-dir", default=None, help="the dense tier's cache (default bench/results/dense-tier)")
    ap.add_argument("--jobs", type=int, default=1, help="models run at once, each in its own process")
    add_run_options(ap, "decision", smoke="< 1 min: digits, timm:test_resnet, 1 seed, 1 target (CI)", resumable=True)
    args = ap.parse_args(argv)
    check_run_options(ap, args, "decision")
    args.dev, args.bisect_steps = parse_device(ap, args.device), 8
    if args.preset == "gpu":
        args.epochs, args.attack_samples = max(args.epochs, 5), max(args.attack_samples, 1000)
    if args.smoke:  # any --models and --deploy-size at these sizes
        args.targets, args.seeds, args.epochs, args.attack_samples, args.pgd_steps = [0.5], [0], 1, 16, 2
        args.latency_repeats, args.bisect_steps = 3, 2
    args.deploy_size = args.deploy_size or (32 if args.smoke else 224)
    models = args.models or (["timm:test_resnet"] if args.smoke else MODELS)
    args.models = list(dict.fromkeys(ALIASES.get(m, m) for m in models))
    args.targets, args.seeds = sorted(set(args.targets), reverse=True), list(dict.fromkeys(args.seeds))
    if args.jobs > 1 and args.dev.type == "cuda":
        ap.error("--jobs runs models side by side on the CPU cores; on a GPU give --jobs 1")
    args.dlrt_epochs = args.epochs if args.dlrt_epochs is None else args.dlrt_epochs
    args.arms = [a for a in TUNED if a in args.arms]  # in training order
    if "dlrt" not in args.arms:
        ap.error("--arms: the other arms start from budget-RobustDLRT's ranks or latency: include dlrt")
    sizes = ("jobs", "epochs", "dlrt_epochs", "attack_samples", "pgd_steps", "deploy_size")
    at_least(ap, args, 1, *sizes, "latency_threads", "latency_repeats")
    if not all(0 < t < 1 for t in args.targets) or min(args.seeds) < 0 or not 0 < args.tolerance < 1:
        ap.error("--targets and --tolerance must be fractions in (0, 1), --seeds not negative")
    args.train_subset = args.val_subset = None  # the entries carry their data sizes
    return args


# ----------------------------------------------------------------------------- the decision (pure: tested)


def bisect(measure: Callable[[float], float], target: float, *, tol: float, hi: float = 0.9, steps: int = 8):
    """The pruning ratio in (0, ``hi``) whose latency fraction ``measure(ratio)`` (decreasing in the
    ratio) is within ``tol`` (relative) of ``target``, else the closest tried: (ratio, fraction, trace)."""
    lo, trace = 0.0, []
    for _ in range(steps):
        mid = (lo + hi) / 2
        trace.append((mid, measure(mid)))
        if abs(trace[-1][1] / target - 1) <= tol:
            break
        lo, hi = (mid, hi) if trace[-1][1] > target else (lo, mid)
    return (*min(trace, key=lambda p: abs(p[1] / target - 1)), trace)


def meets(row: dict[str, Any], target: float, tol: float) -> bool:
    return row.get("fraction") is not None and row["fraction"] <= target * (1 + tol)


def choose(rows: list[dict[str, Any]], target: float, tol: float) -> dict[str, Any] | None:
    """Among the rows (arm, clean, fgsm, fraction, failed) not failed that meet the latency target,
    the highest clean accuracy, ties to ℓ2-FGSM; None when none meets it."""
    ok = [r for r in rows if not r.get("failed") and meets(r, target, tol)]
    return max(ok, key=lambda r: (round(r["clean"], 6), r["fgsm"]), default=None)


def dominators(row: dict[str, Any], rows: list[dict[str, Any]], target: float, tol: float) -> list[str]:
    """The arms meeting the latency target that are at least as good as ``row`` on clean and ℓ2-FGSM
    and better on one (Pareto dominance)."""
    ge = [r for r in rows if meets(r, target, tol) and r["clean"] >= row["clean"] and r["fgsm"] >= row["fgsm"]]
    return [r["arm"] for r in ge if (r["clean"], r["fgsm"]) != (row["clean"], row["fgsm"])]


# ----------------------------------------------------------------------------- a model's setting


@dataclass
class Ctx:
    """One model: its data, dense start and teacher, input sizes, the folder of its graphs."""

    name: str
    size: int
    deploy: int
    target_size: int
    data: Any
    dense: nn.Module
    teacher: nn.Module
    work: Path
    resizable: bool

    @property
    def sizes(self) -> list[int]:
        return sorted({self.size, self.deploy})


def setup(args: argparse.Namespace, name: str, tier_dir: Path, work: Path) -> tuple[Ctx, dict[str, Any]]:
    spec, tier = TIER.get(name, TierSpec()), SMOKE_TIER if args.smoke else TierData()
    digits = args.smoke or (name in DIGITS and args.preset == "cpu")
    n = (128, 64) if args.smoke else (None, None)
    section = lib.DataSection(name="digits", train_subset=n[0], val_subset=n[1], batch_size=32)
    if not digits:  # gpu: all 48,000 training images of the split (a fifth of the 60,000 held out, 2,000 scored)
        gpu = lib.DataSection(name="fashion-mnist", val_subset=2000, batch_size=128)
        section = tier.section() if args.preset == "cpu" else gpu
    data = lib.build_data(section, input_size=spec.input_size, seed=tier.seed)
    if args.preset == "gpu":
        dense, _ = lib.create_model(name, data.num_classes, mean=data.mean, std=data.std, input_size=spec.input_size)
        base = lib.BaselineSection(epochs=args.dense_epochs, lr=spec.lr, checkpoint_every=0)
        cache = tier_dir / f"dense-{slug(name)}.pt"
        _, secs = dense_weights(dense, data.train_loader, base, seed=0, cache=cache, device=args.dev)
        info = {"epochs": args.dense_epochs, "seconds": secs, "published": spec.published}
    else:
        dense, info = dense_model(name, data, tier_dir / ("digits" if digits and not args.smoke else ""), tier, spec)
    lib.set_epoch(data.train_loader, 0)  # the reference gets what every arm gets: statistics re-estimated
    lib.reestimate_batchnorm_(dense.to(args.dev), data.train_loader, args.dev, BN_BATCHES)
    resizable = runs_at(dense.eval(), args.deploy_size)
    teacher = copy.deepcopy(dense).requires_grad_(False).eval()
    target_size = args.deploy_size if resizable else spec.input_size
    ctx = Ctx(name, spec.input_size, args.deploy_size, target_size, data, dense, teacher, work / slug(name), resizable)
    ctx.work.mkdir(parents=True, exist_ok=True)
    info = {k: info.get(k) for k in ("epochs", "plateau", "published", "seconds", "last_two_epochs_change")}
    return ctx, {**info, "data": data.name, "n_train": data.n_train, "target_size": target_size}


@torch.no_grad()
def runs_at(model: nn.Module, size: int) -> bool:
    """Whether the graph takes another input size (a CNN) or is built for one (a ViT)."""
    try:
        copy.deepcopy(model).cpu().float()(torch.zeros(1, 3, size, size))
        return True
    except (AssertionError, RuntimeError):
        return False


def cpu_at(ctx: Ctx, model: nn.Module, size: int) -> nn.Module:
    """A float32 CPU copy taking ``size`` px (a ViT's position embeddings resampled by timm)."""
    out = copy.deepcopy(model).cpu().float().eval()
    if size != ctx.size and not ctx.resizable:
        getattr(out, "net", out).set_input_size(img_size=size)
    return out


def recipe_for(args: argparse.Namespace, ctx: Ctx, seed: int, target: float | None = None) -> lib.Recipe:
    """dlrt's recipe (``target``), or the other arms' fine-tuning: the same optimizer, epochs, KD; β 0."""
    train = {"device": args.device, "checkpoint_every": 0}
    train["distill"] = {"weight": args.kd_weight, "temperature": args.temperature}
    if target is None:
        train.update(epochs=0, finetune_epochs=args.epochs, beta=0.0)
    else:
        goal = {"latency": target, "batch": 32, "input_size": ctx.target_size, "threads": args.latency_threads}
        train.update(epochs=args.dlrt_epochs, beta=args.beta, target=goal)
    doc = {"seed": seed, "model": {"name": ctx.name, "input_size": ctx.size}, "factorize": FACTORIZE, "train": train}
    return lib.recipe_from_dict(doc, source="bench_decision")


# ----------------------------------------------------------------------------- the arms


def reshuffle(ctx: Ctx, seed: int) -> None:
    """Seed ``seed``'s shuffle order of the same training images (the sampler's seed only)."""
    sampler = ctx.data.train_loader.sampler
    sampler.base_seed = getattr(sampler, "base_seed", sampler.seed)
    sampler.seed = sampler.base_seed + 1000 * seed


def dlrt(args: argparse.Namespace, ctx: Ctx, target: float, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    model, rec = copy.deepcopy(ctx.dense), recipe_for(args, ctx, seed, target)
    loader = ctx.data.train_loader
    _, _, secs = lib.factorize_and_train(
        model, loader, rec, device=args.dev, set_epoch=lib.set_epoch, teacher=ctx.teacher
    )
    forms = {n: f.form for n, f in lib.plan_export(model).items()}
    return model, {"ranks": ranks(model), "forms": forms, "train_seconds": secs["train"] + secs["factorize"]}


def one_shot(args, ctx: Ctx, seed: int, init: str, want: dict[str, list[int]], forms: dict[str, str]):
    """The layers factorized on a dense copy per rank r of dlrt's (``init`` bases; a conv's
    activation-aware output basis depends on its input basis's rank, so rank-r bases are not the
    first r of larger ones), a Tucker layer's other mode cut by HOSVD, then written in dlrt's export
    forms and fine-tuned at fixed ranks."""
    model, groups, rec = copy.deepcopy(ctx.dense), {}, recipe_for(args, ctx, seed)
    for name, r in want.items():
        groups.setdefault(max(r), []).append(name)
    for r, names in sorted(groups.items()):
        src = copy.deepcopy(ctx.dense)
        lib.set_epoch(ctx.data.train_loader, 0)
        section = rec.factorize.model_copy(update={"init": init, "init_rank": r, "include": names})
        lib.factorize_(src, section, calibration=ctx.data.train_loader, seed=seed)
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, src.get_submodule(name))
    layers = lib.low_rank_layers(model)
    if set(layers) != set(want):
        raise RuntimeError(f"one-shot factorized other layers than dlrt: {sorted(set(layers) ^ set(want))}")
    for name, layer in layers.items():
        layer.truncate_(0.0, rank_cap=tuple(want[name]))  # τ 0: only the cap cuts
        setattr(layer, lib.EXPORT_FORM_ATTR, forms[name])
    same, plain = ranks(model) == want, lib.plain_model(model, lib.plan_export(model))
    return plain, {"ranks_match_dlrt": same, "train_seconds": finetune(args, ctx, plain, seed)}


def pruned(model: nn.Module, ratio: float, size: int) -> nn.Module:
    """torch-pruning's usual setting: group magnitude (L2) importance ranked globally, channels in
    multiples of 8, no layer below a tenth of its channels, the classifier's outputs kept; attention
    keeps its head count and loses head dimensions (timm's Attention updated after)."""
    import torch_pruning as tp

    out = copy.deepcopy(model).cpu().float().eval()
    head = [m for m in out.modules() if isinstance(m, nn.Linear)][-1]
    heads = {m.qkv: m.num_heads for m in out.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")}
    options = dict(global_pruning=True, pruning_ratio=ratio, round_to=8, max_pruning_ratio=0.9, num_heads=heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes on unwrapped parameters (a ViT's position embeddings)
        importance = tp.importance.GroupMagnitudeImportance(p=2)
        pruner = tp.pruner.MetaPruner(out, torch.rand(1, 3, size, size), importance, ignored_layers=[head], **options)
        pruner.step()
    for m in (m for m in out.modules() if getattr(m, "qkv", None) in heads):
        m.num_heads = pruner.num_heads[m.qkv]
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        m.attn_dim = m.num_heads * m.head_dim
    return out


def prune(args, ctx: Ctx, seed: int, group: Path, goal: float | None) -> tuple[nn.Module, dict[str, Any]]:
    """The ratio bisected until pruned / dense latency (batch 32, the target's size) is within
    ``--tolerance`` of dlrt / dense (of ``goal`` where dlrt could not reach its target), each graph
    timed alone, minutes apart at most."""
    s, threads = ctx.target_size, args.latency_threads

    def ms(path: Path) -> float:
        lat = lib.onnx_latencies({"g": path}, batch_sizes=(32,), input_size=s, threads=threads, repeats=3, warmup=1)
        return lat["g"][32]["median_ms"]

    def measure(ratio: float) -> float:
        lib.export_onnx(cpu_at(ctx, pruned(ctx.dense, ratio, ctx.size), s), group / "probe.onnx", input_size=s)
        return ms(group / "probe.onnx") / dense_ms

    dense_ms = ms(ctx.work / f"dense@{s}.onnx")
    goal = goal or ms(group / f"dlrt@{s}.onnx") / dense_ms
    ratio, got, trace = bisect(measure, goal, tol=args.tolerance, steps=args.bisect_steps)
    model, info = pruned(ctx.dense, ratio, ctx.size), {"ratio": ratio, "goal": goal, "probe": got, "bisection": trace}
    return model, {**info, "train_seconds": finetune(args, ctx, model, seed)}


def finetune(args: argparse.Namespace, ctx: Ctx, model: nn.Module, seed: int) -> float:
    """Every weight trained with the arms' optimizer, epochs and KD; BatchNorm re-estimated after."""
    t0, loader, train = time.perf_counter(), ctx.data.train_loader, recipe_for(args, ctx, seed).resolved_train()
    torch.manual_seed(seed + 3)
    model.to(args.dev).train()
    lib.Trainer(model, loader, train, device=args.dev, seed=seed, set_epoch=lib.set_epoch, teacher=ctx.teacher).fit()
    lib.set_epoch(loader, 0)
    lib.reestimate_batchnorm_(model, loader, args.dev, BN_BATCHES)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- measuring


def attacks(args: argparse.Namespace) -> dict[str, Any]:
    pgd = {"name": "pgd", "eps": [PGD_EPS], "options": {"steps": args.pgd_steps}}
    return {"attacks": [{"name": "l2_fgsm", "eps": EPS_L2}, pgd], "max_samples": args.attack_samples, "seed": 0}


def accuracies(clean: float, adv: dict[str, dict[str, float]], n: int, n_attacked: int) -> dict[str, Any]:
    fgsm = {f"{float(k):g}": v for k, v in adv["l2_fgsm"].items()}
    return {
        "clean": clean,
        "l2_fgsm": fgsm,
        "pgd": next(iter(adv["pgd"].values())),
        "n_eval": n,
        "n_attacked": n_attacked,
    }


def export(ctx: Ctx, model: nn.Module, folder: Path, arm: str) -> dict[int, Path]:
    """The arm's graphs at the training size (scored) and at the deployment size (timed)."""
    out = {s: folder / f"{arm}@{s}.onnx" for s in ctx.sizes}
    for s, path in out.items():
        lib.export_onnx(cpu_at(ctx, model, s), path, input_size=s, check=False)
    return out


def quantized(ctx: Ctx, fp32: dict[int, Path], name: str) -> tuple[dict[int, Path], dict[str, Any]]:
    """INT8 graphs ``name@size`` as compress exports them; the deployment-size one (timed only)
    calibrated on 32 of the same images resized."""
    images, out, info = lib.calibration_images(ctx.data.train_loader), {}, {}
    for s, path in fp32.items():
        out[s] = path.with_name(f"{name}@{s}.onnx")
        x = images if s == ctx.size else F.interpolate(images[:32], size=(s, s), mode="bilinear")
        q = lib.quantize_int8(path, out[s], x.clamp(0, 1))
        info = info or {k: q[k] for k in ("size_ratio", "activation_type", "calibrate_method")}
    return out, info


def measured(args, ctx: Ctx, model: nn.Module, folder: Path, arm: str, dense=None) -> list[dict[str, Any]]:
    """The arm's entry (white-box accuracies, size as deployed, parity) and, for dense, dlrt and prune,
    its INT8 entry (the same adversarial images, made on the float model, scored by the INT8 graph)."""
    graphs = export(ctx, model, folder, arm)
    res = lib.evaluate(model.to(args.dev).eval(), ctx.data.val_loader, keep_adversarial=True, **attacks(args))
    plain = (
        lib.plain_model(model, lib.plan_export(model)) if lib.low_rank_layers(model) else cpu_at(ctx, model, ctx.size)
    )
    size = {"params": sum(p.numel() for p in plain.parameters()), "macs": lib.count_macs(plain, ctx.size)}
    size.update(
        params_fraction=size["params"] / (dense or size)["params"], macs_fraction=size["macs"] / (dense or size)["macs"]
    )

    def onnx(path: Path):
        return lib.evaluate_onnx(
            path, ctx.data.val_loader, torch_model=model, adversarial=res.adversarial, **attacks(args)
        )

    entry = accuracies(res.clean_accuracy, res.adversarial_accuracy, res.n_clean, res.n_attacked)
    out = [{**entry, **size, "parity": onnx(graphs[ctx.size]).max_abs_logit_diff, "arm": arm}]
    if arm in ("dense", "dlrt", "prune"):
        name = "int8" if arm == "dense" else f"{arm}+int8"
        q, info = quantized(ctx, graphs, name)
        ox = onnx(q[ctx.size])
        entry = accuracies(ox.clean_accuracy, ox.transfer_accuracy, ox.n_clean, ox.n_attacked)
        out.append({**entry, **size, "int8": info, "parity": ox.max_abs_logit_diff, "arm": name})
    return out


def mac_profile(ctx: Ctx) -> dict[str, float]:
    """Where the dense MACs sit at the deployment size: k×k, 1×1 and depthwise convs, linear layers
    (attention and MLP projections in a ViT; attention's token products are not counted)."""
    model = cpu_at(ctx, ctx.dense, ctx.deploy)
    macs, mods, out = lib.macs_by_layer(model, ctx.deploy), dict(model.named_modules()), dict.fromkeys(KINDS, 0.0)
    for name, m in macs.items():
        mod, kind = mods[name], "linear"
        if isinstance(mod, nn.Conv2d):
            kind = "depthwise" if mod.groups > 1 else "1x1" if mod.kernel_size == (1, 1) else "kxk"
        out[kind] += m / sum(macs.values())
    return {**out, "attention": float(any(hasattr(m, "qkv") for m in model.modules()))}


def latency_pass(args, ctx: Ctx, folder: Path) -> dict[str, Any]:
    """Every graph of a (target, seed), dense and its INT8 included, interleaved in one onnxruntime
    session set: {size: {graph: {batch: median ms}}}."""
    out = {}
    for s in ctx.sizes:
        paths = {a: (ctx.work if a in ("dense", "int8") else folder) / f"{a}@{s}.onnx" for a in GRAPHS}
        n, threads = args.latency_repeats, args.latency_threads
        lat = lib.onnx_latencies(
            {a: p for a, p in paths.items() if p.is_file()}, input_size=s, threads=threads, repeats=n, warmup=1, block=n
        )
        out[str(s)] = {a: {str(b): v["median_ms"] for b, v in d.items()} for a, d in lat.items()}
    return out


def run_model(args, name: str, state: EntryStore, tier_dir: Path, work: Path, clock: Clock, t_start: float) -> None:
    todo = [(t, s) for t in args.targets for s in args.seeds if not state.get(name, t, s, "latency")]
    if state.get(name, None, None, "dense") and not todo:
        return
    ctx, info = setup(args, name, tier_dir, work)

    def deadline() -> None:
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            raise OutOfTime(f"--time-budget {args.time_budget:g} s spent")

    head = {"model": name, "target": None, "seed": None}
    if not state.get(name, None, None, "dense"):
        deadline()
        plain, int8 = measured(args, ctx, ctx.dense, ctx.work, "dense")
        state.add({**head, **plain, "tier": info, "profile": mac_profile(ctx), "resizable": ctx.resizable})
        state.add({**head, **int8})
    elif not all((ctx.work / f"int8@{s}.onnx").is_file() for s in ctx.sizes):  # resumed: its graphs again
        quantized(ctx, export(ctx, ctx.dense, ctx.work, "dense"), "int8")
    for t, seed in todo:
        group, key = ctx.work / f"t{t:g}-s{seed}", (name, t, seed)
        group.mkdir(exist_ok=True)
        reshuffle(ctx, seed)
        for arm in (a for a in args.arms if not state.get(*key, a)):
            deadline()
            t0 = time.perf_counter()
            log.info("%s target %g seed %d: %s", *key, ARMS[arm])
            row, d = {"model": name, "target": t, "seed": seed, "arm": arm}, state.get(*key, "dlrt")
            if arm == "dlrt":
                try:
                    model, extra = dlrt(args, ctx, t, seed)
                except lib.UnreachableTargetError as err:  # a row saying so; pruning aims at the target itself
                    log.warning("%s target %g: %s", name, t, err)
                    state.add({**row, "unreachable": err.floor, "reason": str(err)})
                    continue
            elif arm == "prune":
                model, extra = prune(args, ctx, seed, group, t if "unreachable" in d else None)
            elif "unreachable" in d:
                state.add({**row, "skipped": "budget-RobustDLRT chose no ranks to start from"})
                continue
            else:
                init = "activations" if arm == "oneshot" else "svd"
                model, extra = one_shot(args, ctx, seed, init, d["ranks"], d["forms"])
            for e in measured(args, ctx, model, group, arm, state.get(name, None, None, "dense")):
                state.add({"model": name, "target": t, "seed": seed, **e, **(extra if e["arm"] == arm else {})})
            secs, left, clean = time.perf_counter() - t0, clock.done(arm, t0), 100 * state.get(*key, arm)["clean"]
            log.info("%s t %g seed %d %s: clean %.1f%%, %.0f s; ≈ %.0f min left", *key, arm, clean, secs, left)
        deadline()
        state.add({"model": name, "target": t, "seed": seed, "arm": "latency", "ms": latency_pass(args, ctx, group)})
        shutil.rmtree(group)
    shutil.rmtree(ctx.work)


# ----------------------------------------------------------------------------- report


def rows_of(args, entries: list[dict[str, Any]], name: str) -> dict[float, list[dict[str, Any]]]:
    """Per target, one row per arm (means over seeds) with its latency fractions of dense
    ({"size/batch": fraction}), ``fraction`` at batch 32 at the size the targets were set at (the
    deployment size; a ViT's training size), failed or not: a
    fine-tuned arm more than SANITY_POINTS below dense at the mildest target is failed there and
    at every harsher one, its INT8 with it."""
    mine = [e for e in entries if e["model"] == name]
    dense, deploy, out = next((e for e in mine if e["arm"] == "dense"), None), str(args.deploy_size), {}
    # the targets this model was measured at (a harsher one may be asked of some models only); none yet: all
    targets = [t for t in args.targets if any(e["target"] == t for e in mine)] or args.targets
    mildest, broken = max(targets), {}  # arm → why it failed at the mildest target: failed at every one
    judged = str(dense["tier"]["target_size"]) if dense and "tier" in dense else deploy  # where the targets were set
    for t in targets:
        lats, rows = [e["ms"] for e in mine if e["target"] == t and e["arm"] == "latency"], []
        for arm in GRAPHS[1:]:
            es = [e for e in mine if e["arm"] == arm and (arm == "int8" or e["target"] == t)]
            if not es:
                continue
            if not all("clean" in e for e in es):  # out of dlrt's reach: a row that says so, never chosen
                floors = [e["unreachable"] for e in es if "unreachable" in e]
                floor = mean(floors) if floors else None
                note = f"out of reach: ≥ {floor:.2f} of dense predicted" if floor else es[0].get("skipped", "")
                empty = {"clean": None, "fracs": {}, "fraction": None}
                rows.append({"arm": arm, "entries": es, "note": note, "floor": floor, **empty})
                continue
            fr = {
                f"{s}/{b}": mean(m[s][arm][b] / m[s]["dense"][b] for m in lats if arm in m[s])
                for s in {k for m in lats for k in m}
                for b in ("1", "32")
            }
            row = {"arm": arm, "entries": es, "clean": mean(e["clean"] for e in es), "fracs": fr}
            row |= {"fgsm": mean(e["l2_fgsm"]["0.1"] for e in es), "fraction": fr.get(f"{judged}/32")}
            row["ms"] = mean(m[deploy][arm]["32"] for m in lats if arm in m.get(deploy, {}))
            if dense and arm in TUNED and t == mildest and row["clean"] < dense["clean"] - SANITY_POINTS / 100:
                gap = 100 * (dense["clean"] - row["clean"])
                row["failed"] = broken[arm] = f"clean {100 * row['clean']:.1f} % is {gap:.1f} points below dense"
            elif (base := arm.split("+")[0]) in broken:  # the arm (or its INT8) at a harsher target
                row["failed"] = f"{ARMS[base]} failed at {mildest:g}: {broken[base]}"
            rows.append(row)
        out[t] = rows
    return out


def verdict(args, dense: dict[str, Any], by_t: dict[float, list[dict[str, Any]]]) -> list[str]:
    """Plain words from the figures: what wins at each target, whether INT8 alone is enough, and why."""
    lines, tol, wins = [], args.tolerance, {}
    for t, rows in by_t.items():
        best, arms = choose(rows, t, tol), {r["arm"]: r for r in rows}
        kind = (
            "none"
            if best is None
            else "INT8"
            if best["arm"] == "int8"
            else "pruning"
            if "prune" in best["arm"]
            else "low rank"
        )
        wins.setdefault(kind, []).append(f"{t:g}")
        what = f"{t:g} of dense latency: " + (f"**{ARMS[best['arm']]}** wins" if best else "no arm meets it")
        if (q := arms.get("int8")) and q["fraction"] is not None:
            enough = "is enough" if meets(q, t, tol) and q["clean"] >= dense["clean"] - 0.01 else "is not enough"
            what += f"; INT8 alone {enough} ({q['fraction']:.2f} of dense, {100 * q['clean']:.1f} % clean)"
        d, at = arms.get("dlrt"), f"{dense['tier']['target_size']}/32"
        if d and d["fracs"].get(at) and d["fracs"][at] > t * (1 + tol):
            what += f"; budget-RobustDLRT measured {d['fracs'][at]:.2f} of dense where it aimed at {t:g}"
        if d and d.get("floor"):
            what += f"; budget-RobustDLRT cannot reach it (≥ {d['floor']:.2f} of dense predicted at its smallest ranks)"
        lines.append(f"- At {what}.")
    if said := [f"{k} wins at {', '.join(v)}" for k, v in wins.items() if k != "none"]:
        lines.insert(0, f"- {(text := '; '.join(said))[0].upper()}{text[1:]} of dense latency.")
    p = dense.get("profile", {})
    why = ", ".join(f"{100 * p[k]:.0f} % in {w}" for k, w in KINDS.items() if p.get(k, 0) >= 0.005)
    lines.append(f"- Why: the dense MACs at {args.deploy_size} px sit {why}.")
    if p.get("depthwise", 0) >= 0.1:
        lines.append("- Depthwise convs have no channel-mixing rank to cut: low rank leaves them as they are.")
    if p.get("attention"):
        lines.append("- Attention's token products are neither factorized nor counted in MACs; pruning narrows them.")
    if any(r.get("floor") for rows in by_t.values() for r in rows):
        lines.append(
            "- Low rank cuts the rank of each layer's weights but keeps every activation at full width: what runs "
            "on the activations (depthwise convs, normalization, nonlinearities, reading and writing each layer's "
            "input and output) keeps its time, which is the floor it cannot go below; pruning narrows the "
            "activations themselves."
        )
    forms = [
        e["forms"] for rows in by_t.values() for r in rows if r["arm"] == "dlrt" for e in r["entries"] if "forms" in e
    ]
    if forms and (n := round(mean(sum(f == "dense" for f in fm.values()) for fm in forms))) >= 1:
        lines.append(
            f"- budget-RobustDLRT left {n:.0f} of {len(forms[0])} layers dense: low rank measured no faster there."
        )
    return lines


def target_check(args, by_t: dict[float, list[dict[str, Any]]]) -> str:
    """The issue's target: dlrt not dominated on clean and ℓ2-FGSM 0.1, ≥ 2 points clean over oneshot;
    where missed, why (from the figures) and what would change it."""
    parts, ok, gaps = [], True, {}
    for t, rows in by_t.items():
        arms = {r["arm"]: r for r in rows}
        if any(arms.get(a, {}).get("clean") is None for a in ("dlrt", "oneshot")):
            return "not measured (an arm is missing or out of reach)"
        dom = dominators(arms["dlrt"], rows, t, args.tolerance)
        gaps[t] = gap = 100 * (arms["dlrt"]["clean"] - arms["oneshot"]["clean"])
        ok &= not dom and gap >= TARGET_POINTS
        parts.append(f"at {t:g} dominated by {', '.join(dom) or 'none'}, clean {gap:+.1f} points over one-shot")
        tuned = [100 * r["clean"] for r in rows if r["arm"] in TUNED and r["clean"] is not None]
        if gap < TARGET_POINTS and (spread := max(tuned) - min(tuned)) < TARGET_POINTS:
            parts[-1] += f" (every fine-tuned arm within {spread:.1f} points: fine-tuning with KD recovers any cut)"
    mild, hard = max(gaps), min(gaps)
    if not ok and gaps[hard] < gaps[mild]:
        parts.append(
            f"a harsher target does not change it: dlrt's lead over one-shot goes from {gaps[mild]:+.1f} points "
            f"at {mild:g} to {gaps[hard]:+.1f} at {hard:g}. One-shot starts at dlrt's final ranks, its bases "
            "refitted to the activations, and trains every epoch at them, where dlrt spends half of its epochs "
            "reaching the target: the ranks are what dlrt contributes. Giving dlrt the one-shot arm's total "
            "epochs is the fair test (*Where a target is missed*)"
        )
    return f"{met(ok)}: {'; '.join(parts)}"


def model_table(
    dense: dict[str, Any], by_t: dict[float, list[dict[str, Any]]], cols: list[tuple[str, str]]
) -> list[str]:
    def accs(es) -> list[str]:
        fgsm = [mean_std([e["l2_fgsm"][f"{x:g}"] for e in es], scale=100) for x in EPS_L2]
        return [mean_std([e["clean"] for e in es], scale=100), *fgsm, mean_std([e["pgd"] for e in es], scale=100)]

    rows = [["—", "dense", *accs([dense]), *(["1"] * len(cols)), "1", "1", f"{dense['parity']:.1e}", "ok"]]
    for t, rs in by_t.items():
        for r in rs:
            es, fr = r["entries"], r["fracs"]
            if r.get("note"):
                rows.append([f"{t:g}", ARMS[r["arm"]], *(["—"] * (len(EPS_L2) + 5 + len(cols))), r["note"]])
                continue
            lat = [f"{fr[f'{s}/{b}']:.2f}" if fr.get(f"{s}/{b}") else "—" for s, b in cols]
            size = [mean_std([e[k] for e in es], 3) for k in ("params_fraction", "macs_fraction")]
            status = f"failed: {r['failed']}" if r.get("failed") else "ok"
            rows.append(
                [f"{t:g}", ARMS[r["arm"]], *accs(es), *lat, *size, f"{max(e['parity'] for e in es):.1e}", status]
            )
    head = ["target", "method", "clean", *(f"ℓ2-FGSM {x:g}" for x in EPS_L2), "PGD", *(f"b{b} @{s}" for s, b in cols)]
    return table([*head, "params", "MACs", "parity", "status"], "ll" + "r" * (len(head) + 1) + "l", rows)


def render(args, doc: dict[str, Any], figures: dict[str, str | None]) -> str:
    entries, tol, size = doc["entries"], args.tolerance, f"{args.deploy_size}×{args.deploy_size}"
    dlrt_epochs = f" (budget-RobustDLRT {args.dlrt_epochs})" if args.dlrt_epochs != args.epochs else ""
    models = [m for m in args.models if any(e["model"] == m and e["arm"] == "dense" for e in entries)]
    by_model = {m: rows_of(args, entries, m) for m in models}
    common = [t for t in args.targets if all(t in by_model[m] for m in models)]  # the table's columns
    picks = {m: [choose(by_model[m][t], t, tol) for t in common] for m in models}
    cells = [
        [m, *(f"{ARMS[p['arm']]} ({100 * p['clean']:.1f} %)" if p else "none meets it" for p in ps)]
        for m, ps in picks.items()
    ]
    out = [f"## Which compression for which network: latency at batch 32, {size}", ""]
    out += table(["architecture", *(f"latency ≤ {t:g} of dense" for t in common)], "l" * (1 + len(common)), cells)
    if more := {t: [m for m in models if t in by_model[m]] for t in args.targets if t not in common}:
        also = "; ".join(f"{', '.join(ms)} at {t:g}" for t, ms in more.items())
        out += ["", f"Also measured at a harsher target: {also} (in their sections below)."]
    out += [
        "",
        f"Best: the highest clean accuracy (mean over seeds {', '.join(map(str, args.seeds))}) among the arms whose "
        f"measured onnxruntime latency (batch 32, {size}, {args.latency_threads} thread(s); a ViT at the size its "
        f"targets were set at, its training size) is within {100 * tol:g} % of the target, ties to ℓ2-FGSM ε 0.1; "
        f"a fine-tuned arm more than {SANITY_POINTS:g} points below dense at the "
        "mildest target is failed (at every target, its INT8 too) and never chosen. Every arm from the same dense "
        f"weights, {args.epochs} epoch(s){dlrt_epochs}, "
        f"AdamW 5e-4 cosine, logit KD from the dense model (weight {args.kd_weight:g}, T {args.temperature:g}). "
        "Accuracies in % (ℓ2-FGSM ε in pixels, PGD-ℓ∞ 8/255; INT8 under attack: the examples made on its float model). "
        "Latency: the arm's median over dense's in one interleaved run per target and seed (b = batch, @ = input px). "
        "Params and MACs as deployed, fractions of dense. Parity: the largest |ONNX − torch| logit (INT8: against "
        "the float model).",
    ]
    sizes = sorted({args.deploy_size, *(TIER.get(m, TierSpec()).input_size for m in models)}, reverse=True)
    cols = [(str(s), b) for s in sizes for b in ("1", "32")]
    for m in models:
        dense = next(e for e in entries if e["model"] == m and e["arm"] == "dense")
        tier = dense["tier"]
        about = (
            f"Dense: {tier['data']}, {tier['n_train']} training images, {tier['epochs']} epochs, held-out "
            f"{100 * dense['clean']:.1f} % (plateau reached: {tier.get('plateau')}); published: "
            f"{(tier.get('published') if tier['data'] == 'fashion-mnist' else None) or 'none found'}. "
            f"Latency targets set at {tier['target_size']} px."
        )
        out += ["", f"### {m}", "", about, ""]
        out += [*model_table(dense, by_model[m], cols), "", "Verdict:", "", *verdict(args, dense, by_model[m])]
        if m in TARGET_MODELS:
            goal = f"dlrt undominated, ≥ {TARGET_POINTS:g} points over one-shot"
            out.append(f"- Target ({goal}): {target_check(args, by_model[m])}.")
        if figures.get(m):
            out += ["", f"![{m}: clean accuracy vs latency at batch 32]({figures[m]})"]
    return "\n".join(out)


def plot(args, entries: list[dict[str, Any]], name: str, path: Path) -> bool:
    """Clean accuracy vs latency at batch 32 at the deployment size: every arm at every target."""
    dense = next((e for e in entries if e["model"] == name and e["arm"] == "dense"), None)
    lats = [
        e["ms"][str(args.deploy_size)]["dense"]["32"] for e in entries if e["model"] == name and e["arm"] == "latency"
    ]
    points = [
        dict(x=r["ms"], y=100 * r["clean"], marker="os^vDPXp"[j], color=f"C{i}", label=f"{ARMS[r['arm']]}, t {t:g}")
        for i, (t, rows) in enumerate(rows_of(args, entries, name).items())
        for j, r in enumerate(rows)
        if r.get("ms") and (i == 0 or r["arm"] != "int8")  # the dense INT8 once
    ]
    if not points or dense is None:
        return False
    points.append(dict(x=mean(lats), y=100 * dense["clean"], marker="*", s=150, color="k", label="dense"))
    title = f"{name}: clean vs onnxruntime latency, batch 32, {args.deploy_size} px"
    pareto_plot(path, points, title=title, xlabel="latency at batch 32 (ms, log scale)")
    return True


KEYS = ("model", "target", "seed", "arm")


def fingerprint(args: argparse.Namespace) -> tuple[str, ...]:
    """The settings a checkpoint's entries were made with; --dlrt-epochs only where it differs from
    --epochs, so that checkpoints made before the option stay valid."""
    return _FINGERPRINT + (("dlrt_epochs",) if args.dlrt_epochs != args.epochs else ())


def clock_for(args: argparse.Namespace, state: EntryStore, models: list[str]) -> Clock:
    """The time-left clock of ``models``' arms not yet in ``state``."""
    keys = [(m, t, s, a) for m in models for t in args.targets for s in args.seeds for a in args.arms]
    return Clock({a: sum(1 for k in state.missing(*keys) if k[3] == a) for a in args.arms})


def model_job(args: argparse.Namespace, name: str, tier_dir: Path, work: Path, t_start: float) -> Exception | None:
    """One model's arms in its own process (``--jobs``): its logging, threads, store and clock; the
    error that stopped it early (out of time, or a compressor error, as a plain one), else None."""
    Run(__file__, args, [], cpu=args.dev.type == "cpu")
    state = EntryStore.of(args, fingerprint(args), keys=KEYS)
    try:
        run_model(args, name, state, tier_dir, work, clock_for(args, state, [name]), t_start)
    except (OutOfTime, lib.CompressorError) as err:
        return (OutOfTime if isinstance(err, OutOfTime) else lib.CompressorError)(f"{name}: {err}")
    return None


def run_models(args: argparse.Namespace, state: EntryStore, tier_dir: Path, work: Path, t_start: float) -> None:
    """Every model's arms into ``state``: one after the other, or ``--jobs`` processes at a time
    (perf_counter is the system's monotonic clock, so ``t_start`` holds in them too)."""
    if args.jobs == 1 or len(args.models) == 1:
        clock = clock_for(args, state, args.models)
        for name in args.models:
            run_model(args, name, state, tier_dir, work, clock, t_start)
        return
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with ProcessPoolExecutor(args.jobs, mp_context=spawn, initializer=exit_with_parent) as pool:
        jobs = [pool.submit(model_job, args, name, tier_dir, work, t_start) for name in args.models]
        stops = [err for err in (job.result() for job in jobs) if err]
    state.entries = EntryStore.of(args, fingerprint(args), keys=KEYS).entries  # every process's
    for kind in (lib.CompressorError, OutOfTime):
        if same := [str(err) for err in stops if type(err) is kind]:
            raise kind("; ".join(same))


def main(argv: list[str] | None = None) -> int:
    lib.enable_huge_pages()
    args = parse_args(argv)
    run = Run(__file__, args, argv, cpu=args.dev.type == "cpu")
    state, t_start = EntryStore.of(args, fingerprint(args), keys=KEYS), time.perf_counter()
    keys = [(m, t, s) for m in args.models for t in args.targets for s in args.seeds]
    with tempfile.TemporaryDirectory(prefix="bench-decision-") as tmp:
        root = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(tmp)
        # the smoke's and the gpu preset's dense models live with their checkpoint, never in the tier's cache
        own = root / "tier" if args.smoke or args.preset == "gpu" else RESULTS / "dense-tier"
        try:
            if not args.report_only:
                run_models(args, state, Path(args.tier_dir) if args.tier_dir else own, root / "graphs", t_start)
        except OutOfTime as stop:
            log.warning("%s: the page shows the finished arms; rerun with the same --checkpoint-dir to go on", stop)
        except lib.CompressorError as err:
            print(f"bench_decision.py: error: {err}", file=sys.stderr)
            return 2
    entries = [e for e in state.entries if e["model"] in args.models and e["seed"] in [None, *args.seeds]]
    doc = run.document("which compression for which network, at equal measured latency", entries, skip=("out", "dev"))
    pngs = {m: args.out.with_name(f"{args.out.stem}_{slug(m)}_pareto.png") for m in args.models}
    doc["pareto"] = {m: str(p) for m, p in pngs.items() if plot(args, entries, m, p)}
    doc["markdown"] = md = render(args, doc, doc["pareto"])
    body = render(args, doc, {m: run.figure(p) for m, p in doc["pareto"].items()})
    what = "per architecture and latency target, each arm's accuracy (clean, ℓ2-FGSM, PGD), latency, size and parity."
    run.publish("decision", doc, md, body=body, measured=what)
    missing = [k + ("latency",) for k in keys if not state.get(*k, "latency")]
    if args.smoke and (missing or len(doc["pareto"]) != len(args.models)):
        raise SystemExit(f"smoke check failed: missing {missing or 'a plot'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

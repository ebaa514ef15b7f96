"""The stages both entry points run — the ``compress`` command (:mod:`compressor.pipeline`) and
``compress()`` (:mod:`compressor.api`): factorize + RobustDLRT, the per-layer summary and spectra,
and the report's common part. Neither entry point imports the other.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import INPUTS_CHECKED
from .factorize import FactorizationReport, factorize_
from .functional import singular_values, unfold
from .layers import low_rank_layers
from .recipe import Recipe
from .runtime import DistContext, ProgressFactory, compression_stats, silent_progress
from .train import Trainer, TrainingHistory
from .train.batchnorm import batchnorms, reestimate_batchnorm_, warn_on_mismatch
from .train.checkpoint import CheckpointWriter
from .train.losses.spectral import layer_regularizer

log = logging.getLogger(__name__)


def build_model(recipe: Recipe, data: Any) -> tuple[nn.Module, Any]:
    """The recipe's model for ``data`` (a :class:`~compressor.data.DataBundle`): its head sized
    for the data's classes, normalized by the data's statistics unless its weights bring their
    own (a weight file or pretrained weights keep the normalization they were trained with)."""
    from .models import create_model

    keep_own_norm = recipe.model.weights is not None or recipe.model.pretrained
    return create_model(
        recipe.model.name,
        data.num_classes,
        in_chans=data.in_chans,
        weights=recipe.model.weights,
        pretrained=recipe.model.pretrained,
        mean=None if keep_own_norm else data.mean,
        std=None if keep_own_norm else data.std,
        input_size=recipe.model.input_size,
    )


def default_set_epoch(loader: Iterable, epoch: int) -> None:
    """For user loaders: DistributedSampler.set_epoch if there is one; nothing otherwise."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def factorize_and_train(
    model: nn.Module,
    train_loader: Iterable,
    recipe: Recipe,
    *,
    device: torch.device,
    val_loader: Iterable | None = None,
    dist: DistContext | None = None,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    progress: ProgressFactory = silent_progress,
    set_epoch: Callable[[Iterable, int], None] = default_set_epoch,
    checkpoint_writer: CheckpointWriter | None = None,
    teacher: nn.Module | None = None,
) -> tuple[FactorizationReport, TrainingHistory, dict[str, float]]:
    """Factorize ``model`` in place (``recipe.factorize``), then RobustDLRT (``recipe.train``).

    ``checkpoint_writer``: share the caller's background writer, so that its earlier
    checkpoints are on disk before the first RobustDLRT one. ``teacher``: the dense model that
    ``train.distill`` distills from (a copy: ``model`` itself is factorized). Returns the
    factorization report, the training history and the seconds of both stages.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    torch.manual_seed(recipe.seed + 2)  # stage-local seeding: a resumed run sees the same RNG here
    model.to(device)  # calibration runs the model; SVDs and QRs run where the training will
    warn_on_mismatch(model, val_loader if val_loader is not None else train_loader, device, "before compression")
    calibration = None
    if recipe.factorize.init == "activations":
        set_epoch(train_loader, 0)  # the first batches of epoch 0, on every process
        calibration = train_loader
    fact = factorize_(model, recipe.factorize, calibration=calibration, dist=dist, seed=recipe.seed)
    timings["factorize"] = time.perf_counter() - t
    if not fact.factorized:
        log.warning("no layer was factorized (see the factorization table); training continues densely")
    t = time.perf_counter()
    trainer = Trainer(
        model,
        train_loader,
        recipe.resolved_train(),
        val_loader=val_loader,
        device=device,
        seed=recipe.seed,
        dist=dist,
        checkpoint_path=checkpoint_path,
        progress=progress,
        name="RobustDLRT" if recipe.train.beta > 0 else "DLRT",
        set_epoch=set_epoch,
        checkpoint_writer=checkpoint_writer,
        teacher=teacher,
    )
    history = trainer.fit(resume=resume)
    if recipe.train.bn_batches and batchnorms(model):
        set_epoch(train_loader, 0)  # a fixed pass: a resumed run re-estimates the same way
        reestimate_batchnorm_(model, train_loader, device, recipe.train.bn_batches, dist)
        warn_on_mismatch(model, val_loader if val_loader is not None else train_loader, device, "after compression")
    if recipe.train.target.latency is not None:  # each layer is exported in its fastest measured form
        from .latency import set_export_forms

        budget = trainer.budget
        latency = budget.latency_model if budget is not None else latency_model(model, recipe, _in_chans(model))
        forms = set_export_forms(model, latency)
        log.info(
            "latency target: export forms %s", {f: sum(v == f for v in forms.values()) for f in set(forms.values())}
        )
    timings["train"] = time.perf_counter() - t
    return fact, history, timings


def latency_model(model: nn.Module, recipe: Recipe, in_chans: int) -> Any:
    """The latency model of ``train.target.latency`` for ``model`` (from the cache once built)."""
    from .latency import build_latency_model

    return build_latency_model(model, recipe.latency_settings(in_chans))


def _in_chans(model: nn.Module) -> int:
    """The input channels of the model's first conv or linear layer (3 if it has none)."""
    return next((int(m.in_channels) for m in model.modules() if hasattr(m, "in_channels")), 3)


def layer_spectrum(module: nn.Module) -> list[float]:
    """Singular values of a layer's weight (conv: mode-0 unfolding), dense or factorized."""
    if hasattr(module, "core_matrix"):
        return singular_values(module.core_matrix().float()).tolist()
    w = module.weight.detach().float()
    return singular_values(w if w.dim() == 2 else unfold(w, 0)).tolist()


def layer_summary(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{layer: {rank, ranks, kind, condition_number, regularizer}} at the current state."""
    out = {}
    with torch.no_grad():
        for name, layer in low_rank_layers(model).items():
            kappa = layer.condition_number()
            out[name] = {
                "rank": layer.ranks[0] if len(layer.ranks) == 1 else list(layer.ranks),
                "ranks": list(layer.ranks),
                "kind": layer.kind,
                "condition_number": kappa if kappa != float("inf") else None,
                "regularizer": float(layer_regularizer(layer)),
            }
    return out


def compression_report(
    model: nn.Module,
    fact: FactorizationReport,
    history: TrainingHistory,
    recipe: Recipe,
    *,
    dense: dict[str, Any],
    compressed: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The report's common part: dense vs compressed (``dense`` / ``compressed`` hold the
    evaluation figures each side has), the factorization, the training history, timings and the
    resolved recipe. The pipeline adds data, export, plots and machine details to it."""
    stats = compression_stats(model)
    return {
        "dense": dense,
        # nonfinite_steps: steps skipped for a NaN/Inf loss or gradient (the factors were left as they were)
        "compressed": {
            "params": stats.params,
            "compression_rate": stats.rate,
            **compressed,
            "layers": layer_summary(model),
            "nonfinite_steps": history.nonfinite_steps,
        },
        "loss_terms": history.loss_terms,  # the objective the compressed model was trained with
        "factorization": fact.to_dict(),
        "history": history.to_dict(),
        "timings": timings,
        "recipe": recipe.model_dump(mode="json"),
    }


@dataclass
class DryRun:
    """What factorizing would do, before any training: ``compress ... --dry-run``."""

    factorization: FactorizationReport
    params: tuple[int, int]
    """(dense, factorized) parameters."""
    macs: tuple[int, int]
    """(dense, factorized) multiply-adds per image at the recipe's input size."""
    macs_by_layer: dict[str, tuple[int, int]]
    budget: dict[str, Any] | None = None
    """With ``train.target``: what the allocation would choose at the target (:func:`budget_preview`)."""

    def summary(self) -> str:
        (pd, pf), (md, mf) = self.params, self.macs
        lines = [
            self.factorization.table(self.macs_by_layer),
            "",
            f"parameters: {pd:,} -> {pf:,} (c.r. {100 * (1 - pf / pd):.2f} %)",
            f"multiply-adds per image: {md / 1e6:,.1f}M -> {mf / 1e6:,.1f}M ({md / max(mf, 1):.2f}x fewer)",
        ]
        if self.budget is None:
            return "\n".join(
                [*lines, "These are the initial ranks; RobustDLRT then adapts them (tolerance train.tau)."]
            )
        return "\n".join([*lines, "", *budget_preview_lines(self.budget)])


def dry_run(recipe: Recipe) -> DryRun:
    """Build the recipe's data and model and factorize them as a run would, without training or
    writing anything (the model's weights are untrained unless ``model.weights`` is given)."""
    from .data import build_data, set_epoch
    from .runtime import count_macs, macs_by_layer

    data = build_data(recipe.data, input_size=recipe.model.input_size, seed=recipe.seed)
    model, _ = build_model(recipe, data)
    log.info("inputs checked; dry run: factorize only", extra={INPUTS_CHECKED: True})
    size = recipe.model.input_size
    dense_params = sum(p.numel() for p in model.parameters())
    torch.manual_seed(recipe.seed + 2)
    calibration = None
    if recipe.factorize.init == "activations":
        set_epoch(data.train_loader, 0)
        calibration = data.train_loader
    fact = factorize_(model, recipe.factorize, calibration=calibration, seed=recipe.seed)
    dense_layers = macs_by_layer(model, size, dense_equivalent=True)
    now_layers = macs_by_layer(model, size)
    per_layer = {d.name: (dense_layers.get(d.name, 0), now_layers.get(d.name, 0)) for d in fact.layers}
    return DryRun(
        fact,
        (dense_params, sum(p.numel() for p in model.parameters())),
        (count_macs(model, size, dense_equivalent=True), count_macs(model, size)),
        per_layer,
        budget_preview(model, recipe, data.in_chans) if recipe.train.target.kind is not None else None,
    )


def _budget(model: nn.Module, recipe: Recipe, in_chans: int) -> Any:
    """``train.target``'s :class:`~compressor.train.budget.Budget` on the factorized ``model``
    (raises ConfigError when the model cannot reach the target)."""
    from .train.budget import Budget

    target = recipe.train.target
    return Budget(
        model,
        target.kind,
        target.fraction,
        input_size=recipe.model.input_size,
        in_chans=in_chans,
        multiple=target.multiple,
        latency=recipe.latency_settings(in_chans),
        tau=recipe.train.tau,
    )


def check_budget(model: nn.Module, recipe: Recipe, in_chans: int) -> dict[str, Any] | None:
    """Refuse a ``train.target`` the model cannot reach before anything runs or is written
    (ConfigError naming the reachable floor). The floor depends on which layers factorize and
    their smallest ranks, not on the weights, so a copy factorized from its weights' SVD (no
    calibration) tells. A latency target builds the latency model here (the training's budget
    then finds it in the cache): what that build timed is returned, for the report."""
    if recipe.train.target.kind is None:
        return None
    probe = copy.deepcopy(model).cpu()
    factorize_(probe, recipe.factorize.model_copy(update={"init": "svd"}), seed=recipe.seed)
    lm = _budget(probe, recipe, in_chans).latency_model
    return None if lm is None else {"measured_graphs": lm.measured_graphs, "seconds": lm.seconds}


def budget_preview(model: nn.Module, recipe: Recipe, in_chans: int) -> dict[str, Any]:
    """The ranks the budget's allocation (``train.target``) would choose at the target from the
    factorized model's initial spectra, every layer's cost there (for a latency target: its
    predicted milliseconds and fastest form) and the model's."""
    target = recipe.train.target
    budget = _budget(model, recipe, in_chans)
    initial = {n: tuple(layer.ranks) for n, layer in budget.layers.items()}
    ranks = budget.preview()
    layers = {
        n: {"initial": list(initial[n]), "ranks": list(r), "cost": budget.layer_cost(n, r)} for n, r in ranks.items()
    }
    out = {
        "kind": target.kind,
        "fraction": target.fraction,
        "dense": budget.dense,
        "target": budget.target,
        "initial": budget.cost(initial),
        "reached": budget.cost(ranks),
        "multiple": budget.multiple,
        "layers": layers,
    }
    if budget.latency_model is not None:
        lm = budget.latency_model
        for n, r in ranks.items():
            layers[n]["form"] = lm.layer_ms(n, r)[0]
        out["latency"] = {"settings": lm.settings.to_dict(), "model": lm.summary()}
    return out


def budget_preview_lines(preview: dict[str, Any]) -> list[str]:
    """:func:`budget_preview` as text: the per-layer table and what it sums to."""
    kind, unit = preview["kind"], {"params": "parameters", "macs": "multiply-adds", "latency": "ms"}[preview["kind"]]

    def cost(v: float) -> str:
        return f"{v:,.2f}" if kind == "latency" else f"{v:,.0f}"

    unit = "ms alone" if kind == "latency" else unit
    head = ("layer", "initial ranks", "ranks at the target", *(("form",) if kind == "latency" else ()), unit)
    rows = [head]
    for name, d in preview["layers"].items():
        form = (d["form"],) if kind == "latency" else ()
        rows.append((name, ",".join(map(str, d["initial"])), ",".join(map(str, d["ranks"])), *form, cost(d["cost"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    what = f"train.target.{kind} = {preview['fraction']}"
    tau = (
        "τ (train.tau) only bounds them at the last truncation (directions it drops cost next to nothing in time)"
        if kind == "latency"
        else "τ (train.tau) is not used"
    )
    lines = [
        f"With {what} the budget chooses every layer's ranks at each truncation; {tau}.",
        f"The allocation at the target from the initial spectra (ranks in steps of {preview['multiple']}):",
        "",
        *table,
        "",
    ]
    if kind == "latency":
        lat = preview["latency"]
        s = lat["settings"]
        lines.append(
            f"predicted onnxruntime latency at batch {s['batch']}, {s['threads']} thread(s), {s['input_size']} px, "
            f"{s['precision']}: {preview['dense']:.2f} ms dense -> {preview['reached']:.2f} ms "
            f"({preview['reached'] / preview['dense']:.3f} of dense; target {preview['fraction']}); the ms column "
            "is each layer's stand-alone graph"
        )
        if model := lat.get("model"):
            versions = ", ".join(
                f"{k} {v:.2f} ms (Σ tables {model['networks_tables_ms'].get(k, float('nan')):.2f})"
                for k, v in model["networks_ms"].items()
            )
            lines.append(f"latency model: the network timed {versions}")
    else:
        lines.append(
            f"{unit}: {cost(preview['dense'])} dense -> {cost(preview['reached'])} "
            f"({preview['reached'] / preview['dense']:.3f} of dense; target {preview['fraction']})"
        )
    lines.append("Training reaches the target over the first train.target.ramp of the truncations; RobustDLRT's")
    lines.append("gradients then decide which directions each layer keeps, so the final ranks differ.")
    return lines


def budget_report(model: nn.Module, recipe: Recipe, *, in_chans: int, dense_params: int) -> dict[str, Any] | None:
    """``train.target`` asked for and what was reached: parameters, multiply-adds (at the
    recipe's input size), c.r., and every factorized layer's ranks and multiply-adds."""
    target = recipe.train.target
    if target.kind is None:
        return None
    from .runtime import macs_by_layer

    size = recipe.model.input_size
    now, dense = (
        macs_by_layer(model, size, in_chans=in_chans),
        macs_by_layer(model, size, in_chans=in_chans, dense_equivalent=True),
    )
    stats = compression_stats(model)
    out = {
        "target": {"kind": target.kind, "fraction": target.fraction, "ramp": target.ramp},
        "reached": {
            "params_fraction": stats.params / dense_params,
            "macs_fraction": sum(now.values()) / max(1, sum(dense.values())),
            "compression_rate": stats.rate,
            "macs": sum(now.values()),
            "macs_dense": sum(dense.values()),
        },
        "layers": {
            name: {"ranks": list(layer.ranks), "macs": now.get(name, 0), "macs_dense": dense.get(name, 0)}
            for name, layer in low_rank_layers(model).items()
        },
    }
    if target.latency is not None:
        out["latency"] = latency_prediction(model, recipe, in_chans)
        for name, d in out["latency"]["layers"].items():
            out["layers"][name]["form"] = d["form"]
    return out


def latency_prediction(model: nn.Module, recipe: Recipe, in_chans: int) -> dict[str, Any]:
    """A latency target asked for and what the latency model predicts at the model's ranks."""
    lm = latency_model(model, recipe, in_chans)
    ranks = {n: tuple(layer.ranks) for n, layer in low_rank_layers(model).items() if n in lm.tables}
    p = lm.predict(ranks)
    return {
        "asked": {"fraction": recipe.train.target.latency, **lm.settings.to_dict()},
        "predicted": {
            "ms": p["ms"],
            "dense_ms": p["dense_ms"],
            "fraction": p["fraction"],
            "speedup": 1 / p["fraction"] if p["fraction"] > 0 else None,
            "tables_ms": p["tables_ms"],
        },
        "model": lm.summary(),
        "layers": p["layers"],
    }


def measure_latency_target(
    model: nn.Module,
    dense_model: nn.Module | None,
    recipe: Recipe,
    *,
    in_chans: int,
    export_dir: Path | None = None,
    export_latency: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a latency target reached, measured: the exported graph (``export_dir``'s
    model.onnx, or model.int8.onnx for an INT8 target) against the dense one, side by side at
    batch 1 and the target's batch (taken from the export's own latency check when it timed
    them under the same settings), and the layers holding most of the predicted time timed
    alone against their prediction (:mod:`compressor.latency.verify`)."""
    from .latency import verify

    lm = latency_model(model, recipe, in_chans)
    settings = lm.settings
    batches = sorted({1, settings.batch})
    out: dict[str, Any] = {}
    key = "int8" if settings.precision == "int8" else "compressed"
    same = (
        export_latency is not None
        and export_latency.get("threads") == settings.threads
        and settings.input_size == recipe.model.input_size
    )
    network = verify.from_export_latency(export_latency, key, batches) if same else None
    if network is not None:
        out["source"] = "the export's latency check"
    elif dense_model is not None:
        onnx_name = "model.int8.onnx" if key == "int8" else "model.onnx"
        given = (
            export_dir / onnx_name
            if export_dir is not None and settings.input_size == recipe.model.input_size
            else None
        )
        network = verify.network_latency(
            model,
            dense_model,
            settings,
            batch_sizes=batches,
            repeats=recipe.export.latency_repeats,
            compressed_onnx=given if given is not None and given.is_file() else None,
        )
        out["source"] = "timed here"
    if network is not None:
        out["network"] = {str(b): v for b, v in network.items()}
        at = network[settings.batch]
        predicted = lm.predict({n: tuple(l.ranks) for n, l in low_rank_layers(model).items() if n in lm.tables})
        out["fraction"] = at["fraction"]
        out["speedup"] = at["speedup"]
        out["predicted_fraction"] = predicted["fraction"]
        out["prediction_error"] = predicted["fraction"] / at["fraction"] - 1
        out["met"] = at["fraction"] <= recipe.train.target.latency
    top = verify.slowest_layers(latency_prediction(model, recipe, in_chans)["layers"])
    out["layers_alone"] = verify.layers_alone(model, lm, top)
    return out


def certificate(
    model: nn.Module,
    fact: FactorizationReport,
    dense_spectra: dict[str, list[float]],
    dense_eval: dict[str, Any],
    compressed_eval: dict[str, Any],
) -> dict[str, Any]:
    """The paper's eq. (2): a network's relative sensitivity is bounded by the product of its
    layers' condition numbers. log ∏κ over the factorized layers, dense (their weights before
    factorization) vs compressed (their cores), over the layers whose dense spectrum was
    computed, beside the measured relative sensitivity of each model."""
    import math

    layers = low_rank_layers(model)
    names = [d.name for d in fact.factorized if d.name in layers and len(dense_spectra.get(d.name) or []) > 0]
    dense_k = {n: dense_spectra[n][0] / dense_spectra[n][-1] if dense_spectra[n][-1] > 0 else math.inf for n in names}
    comp_k = {n: layers[n].condition_number() for n in names}

    def log_prod(kappas: dict[str, float]) -> float | None:
        return sum(math.log(k) for k in kappas.values()) if all(math.isfinite(k) for k in kappas.values()) else None

    return {
        "layers": len(names),
        "layers_left_out": len(fact.factorized) - len(names),
        "dense_log_prod_kappa": log_prod(dense_k),
        "compressed_log_prod_kappa": log_prod(comp_k),
        "sensitivity": {"dense": dense_eval.get("sensitivity"), "compressed": compressed_eval.get("sensitivity")},
    }

"""The whole job behind the ``compress`` command, one stage after another:

    data → model → dense baseline → evaluate dense → factorize + RobustDLRT → evaluate compressed → export

Outputs go to ``<output_dir>/<run_name>/``: model.safetensors, model.onnx, report.json,
report.md, recipe.yaml and plots, written as a transaction (:mod:`compressor.rundir`): every
input is checked before any long work (:func:`compressor.preflight.validate_inputs`), nothing is
written until data and model are built, checkpoints (dense baseline per epoch, the dense stage,
RobustDLRT per epoch) are written atomically, so ``--resume`` continues a killed run to the
same ranks and accuracies on the same machine. See docs/reliability.md.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import atomic
from .errors import INPUTS_CHECKED
from .preflight import validate_inputs
from .recipe import Recipe, recipe_to_yaml
from .rundir import RunPaths, check_output, finalize_output, prepare_output
from .runtime import DistContext, ProgressFactory, resolve_device, silent_progress
from .stages import (
    budget_report,
    build_model,
    certificate,
    check_budget,
    compression_report,
    factorize_and_train,
    layer_spectrum,
)
from .train import Trainer
from .train.checkpoint import CheckpointWriter, load_checkpoint

log = logging.getLogger(__name__)

SPECTRUM_MAX_WEIGHTS = 4_000_000
"""Dense layers whose spectra the report keeps: larger matrices (VGG16's 4096×25088 classifier)
would make the dense stage's SVDs a large share of the job."""

KEEP_ADVERSARIAL_MAX_BYTES = 1 << 30
"""The compressed model's adversarial images are kept for the ONNX evaluation (scored there
instead of crafted a second time) only while they fit in this many bytes."""


@dataclass
class RunResult:
    folder: Path
    report: dict[str, Any]


@contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    log.info("stage: %s", name)
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def run(
    recipe: Recipe,
    *,
    resume: bool = False,
    force: bool = False,
    progress: ProgressFactory = silent_progress,
    dist: DistContext | None = None,
) -> RunResult:
    """Run the whole pipeline for ``recipe``; see the module docstring."""
    from .data import build_data, set_epoch
    from .evaluate import evaluate

    dist = dist or DistContext()
    validate_inputs(recipe)
    if dist.is_main:
        check_output(recipe, resume=resume, force=force)
    device = resolve_device(recipe.train.device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", torch.cuda.current_device())
    timings: dict[str, float] = {}
    torch.manual_seed(recipe.seed)

    with _stage(timings, "data"):
        data = build_data(
            recipe.data,
            input_size=recipe.model.input_size,
            seed=recipe.seed,
            rank=dist.rank,
            world_size=dist.world_size,
        )
    with _stage(timings, "model"):
        model, info = build_model(recipe, data)
        model.to(device)
        latency_built = check_budget(model, recipe, data.in_chans)
    # data and model are built from checked inputs: only now is anything written
    paths = prepare_output(recipe, resume=resume, force=force, dist=dist)
    log.info(
        "inputs checked; %s %s", "resuming in" if resume else "staging in", paths.staging, extra={INPUTS_CHECKED: True}
    )

    eval_kwargs = dict(std=info.std, device=device, dist=dist)  # sharded under torchrun, results summed over processes

    def evaluate_with_bar(desc: str, **extra: Any):
        shard = getattr(data.val_loader, "batch_sampler", None)  # under torchrun: this process's images only
        bar = progress(getattr(shard, "num_samples", None) or len(data.val_loader.dataset), desc)
        try:
            return evaluate(model, data.val_loader, recipe.evaluate, progress=bar.update, **eval_kwargs, **extra)
        finally:
            bar.close()

    # -- dense: baseline fine-tuning + evaluation (checkpointed as one stage for --resume);
    # under torchrun rank 0 decides and reads (it wrote the files); the others receive the result
    writer = CheckpointWriter()  # every checkpoint of the run, in order, in the background
    if resume and dist.main_decides(paths.dense_stage.is_file()):
        stage = dist.from_main(lambda: load_checkpoint(paths.dense_stage))
        model.load_state_dict(stage["model"])
        dense_eval, baseline_history, dense_spectra = stage["eval"], stage["history"], stage["spectra"]
        timings.update(stage["timings"])
        log.info("resume: dense baseline and its evaluation restored from %s", paths.dense_stage)
    else:
        baseline_history: dict[str, Any] = {}
        if recipe.baseline.epochs > 0:
            with _stage(timings, "baseline"):
                torch.manual_seed(recipe.seed + 1)
                trainer = Trainer(
                    model,
                    data.train_loader,
                    recipe.baseline,
                    val_loader=data.val_loader,
                    device=device,
                    seed=recipe.seed,
                    dist=dist,
                    checkpoint_path=paths.baseline_ckpt,
                    progress=progress,
                    name="dense baseline",
                    set_epoch=set_epoch,
                    checkpoint_writer=writer,
                )
                baseline_history = trainer.fit(resume=resume).to_dict()
        with _stage(timings, "evaluate_dense"):
            dense_eval = evaluate_with_bar("evaluate dense").to_dict()
        dense_spectra = {
            n: layer_spectrum(m)
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.numel() <= SPECTRUM_MAX_WEIGHTS
        }
        if dist.is_main:  # written while the model is factorized and trained (waited for below)
            writer.submit(
                paths.dense_stage,
                {
                    "model": model.state_dict(),
                    "eval": dense_eval,
                    "history": baseline_history,
                    "spectra": dense_spectra,
                    "timings": dict(timings),
                },
            )
        dist.barrier()
    dense_params = sum(p.numel() for p in model.parameters())
    timed = recipe.export.latency or recipe.train.target.latency is not None  # the dense graph to time against
    dense_model = copy.deepcopy(model).cpu() if timed and dist.is_main else None

    # the dense model, on every process, as distillation's teacher (no copy when it is off)
    teacher = copy.deepcopy(model) if recipe.train.distill.weight > 0 else None

    # -- compress: factorize + RobustDLRT, then evaluate
    fact, history, t = factorize_and_train(
        model,
        data.train_loader,
        recipe,
        val_loader=data.val_loader,
        device=device,
        dist=dist,
        checkpoint_path=paths.train_ckpt,
        resume=resume and dist.main_decides(paths.train_ckpt.is_file()),
        progress=progress,
        set_epoch=set_epoch,
        checkpoint_writer=writer,
        teacher=teacher,
    )
    del teacher  # training is over: its memory back before evaluation and export
    writer.wait()
    timings.update(t)
    with _stage(timings, "evaluate_compressed"):
        comp_eval = evaluate_with_bar("evaluate compressed", keep_adversarial=_keep_adversarial(recipe, data, dist))

    dense = {
        "params": dense_params,
        **dense_eval,
        "baseline_history": baseline_history,
        "nonfinite_steps": int(baseline_history.get("nonfinite_steps", 0)),
    }
    report = {
        "run_name": recipe.run_name,
        "model": info.to_dict(),
        "data": data.to_dict(),
        "eps_unit": recipe.evaluate.eps_unit,
        **compression_report(
            model, fact, history, recipe, dense=dense, compressed=comp_eval.to_dict(), timings=timings
        ),
    }
    report["certificate"] = certificate(model, fact, dense_spectra, dense_eval, report["compressed"])
    if (budget := budget_report(model, recipe, in_chans=data.in_chans, dense_params=dense_params)) is not None:
        report["budget"] = budget
        built = [e["budget"]["latency_model"] for e in history.epochs if "latency_model" in e.get("budget", {})]
        built += [latency_built] if latency_built else []
        if built and "latency" in budget:  # the run's builds (the check's, the trainer's), not the report's reload
            budget["latency"]["model"].update(max(built, key=lambda b: b["measured_graphs"]))
    if not dist.is_main:
        # Rank 0 alone exports and writes; no barrier after it, so that a long export cannot
        # run into the process group's timeout. The other processes are done.
        return RunResult(paths.final, report)

    with _stage(timings, "export"):
        if dist.enabled:  # rank 0's export evaluates/calibrates on the whole split, not its shard
            from .data import whole_split_loader

            data = replace(
                data, train_loader=whole_split_loader(data.train_loader), val_loader=whole_split_loader(data.val_loader)
            )
        report["export"] = _export(model, dense_model, recipe, info, data, paths, comp_eval.adversarial)
        if "budget" in report and recipe.train.target.latency is not None:
            from .stages import measure_latency_target

            report["budget"]["latency"]["measured"] = measure_latency_target(
                model,
                dense_model,
                recipe,
                in_chans=data.in_chans,
                export_dir=paths.staging,
                export_latency=report["export"].get("latency"),
            )
    report["plots"], spectra = _plots(report, history, fact, model, dense_spectra, recipe, paths.staging)
    if spectra:
        report["spectra"] = spectra

    from .report import device_info, versions, write_report

    report["versions"] = versions()
    report["device"] = device_info(device)
    atomic.write_text(paths.staging / "recipe.yaml", recipe_to_yaml(recipe))
    write_report(paths.staging, report)
    finalize_output(paths)
    return RunResult(paths.final, report)


def _keep_adversarial(recipe: Recipe, data, dist: DistContext) -> bool:
    """Keep them when the ONNX model will be evaluated on them and they fit the budget; under
    torchrun each process holds only its shard, so rank 0's whole-split evaluation recrafts."""
    if dist.enabled or not recipe.export.onnx or not recipe.evaluate.attacks:
        return False
    n = data.n_val if recipe.evaluate.max_samples is None else min(data.n_val, recipe.evaluate.max_samples)
    pairs = sum(len(a.eps) for a in recipe.evaluate.attacks)
    return n * pairs * data.in_chans * recipe.model.input_size**2 * 4 <= KEEP_ADVERSARIAL_MAX_BYTES


def _export(
    model: nn.Module,
    dense_model: nn.Module | None,
    recipe: Recipe,
    info,
    data,
    paths: RunPaths,
    adversarial: dict | None,
) -> dict[str, Any]:
    """Export (safetensors, ONNX, INT8) into the staging folder, then check what was written
    (parity, ONNX and INT8 accuracy with the INT8 remedies, latency against the dense model)."""
    from .check import calibration_images, check_export
    from .export import export_model

    e = recipe.export
    if not e.onnx:  # INT8 and latency need the ONNX model; the recipe may ask for them regardless
        e = e.model_copy(update={"int8": False, "latency": False})
    calibration = calibration_images(data.train_loader) if e.int8 else None  # as `compress export` takes them
    exported = export_model(
        model,
        paths.staging,
        e,
        input_size=recipe.model.input_size,
        in_chans=data.in_chans,
        model_info=info.to_dict(),
        class_names=data.class_names,
        preprocess=data.preprocess,
        recipe=recipe.model_dump(mode="json"),
        calibration=calibration,
        calibration_source=f"{len(calibration)} training images" if calibration is not None else "",
    )
    checked = check_export(
        model,
        exported,
        recipe.evaluate,
        val_loader=data.val_loader,
        std=info.std,
        adversarial=adversarial,
        dense_model=dense_model,
    )
    return checked.to_dict()


def _plots(
    report: dict[str, Any],
    history,
    fact,
    model: nn.Module,
    dense_spectra: dict[str, list[float]],
    recipe: Recipe,
    folder: Path,
) -> tuple[dict[str, str], dict[str, Any] | None]:
    """kappa.png (κ over training), spectrum.png (the middle factorized layer, dense vs
    compressed), accuracy_vs_eps.png; returns {plot: file name} and the plotted spectra."""
    from .report import plot_accuracy_vs_eps, plot_kappa, plot_spectra

    plots: dict[str, str] = {}
    if plot_kappa(history.kappa_trace, folder / "kappa.png"):
        plots["kappa"] = "kappa.png"
    spectra = None
    factorized = [d.name for d in fact.factorized if d.name in dense_spectra]
    if factorized:
        layer = factorized[len(factorized) // 2]
        spectra = {
            "dense": dense_spectra[layer],
            f"compressed (β={recipe.train.beta})": layer_spectrum(model.get_submodule(layer)),
        }
        if plot_spectra(spectra, folder / "spectrum.png", f"Singular values of {layer}"):
            plots["spectrum"] = "spectrum.png"
        spectra = {"layer": layer, **spectra}
    if recipe.evaluate.attacks and plot_accuracy_vs_eps(
        {"dense": report["dense"], "compressed": report["compressed"]},
        folder / "accuracy_vs_eps.png",
        eps_unit=recipe.evaluate.eps_unit,
    ):
        plots["accuracy_vs_eps"] = "accuracy_vs_eps.png"
    return plots, spectra

"""The whole job behind the ``compress`` command, one stage after another:

    data → model → dense baseline → evaluate dense → factorize → RobustDLRT → evaluate compressed → export

Outputs go to ``<output_dir>/<run_name>/``: model.safetensors, model.onnx, report.json,
report.md, recipe.yaml and plots. They are written into a hidden staging folder
``.<run_name>.partial`` that is renamed into place only when the run succeeded, so a run folder
is never half-written; the staging folder keeps the checkpoints that ``--resume`` continues from.

Reliability (see docs/reliability.md):

- every input is checked before any long work (:func:`validate_inputs`, :func:`check_output`),
  and nothing is written until data and model are built, so bad input leaves no trace;
- the staging folder holds the resolved recipe from the start; ``--resume`` refuses a recipe
  that differs from it (other than :data:`RESUME_MAY_CHANGE`), naming the keys;
- checkpoints (dense baseline per epoch, the dense stage, RobustDLRT per epoch) are written
  atomically, so a kill at any point leaves a run that ``--resume`` continues, to the same ranks
  and accuracies on the same machine;
- only ``<output_dir>/<run_name>/``, ``<output_dir>/.<run_name>.partial/`` and, during the final
  rename with ``--force``, ``<output_dir>/.<run_name>.old/`` are ever written or removed; a run
  folder is replaced only with ``--force``, an interrupted run is discarded only with ``--force``.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import atomic
from .api import factorize_and_train, layer_spectrum, layer_summary
from .errors import INPUTS_CHECKED, ConfigError, OutputError
from .recipe import Recipe, recipe_to_yaml
from .train import DistContext, Trainer, TrainerConfig, compression_stats
from .train.checkpoint import CheckpointWriter, load_checkpoint
from .train.common import ProgressFactory, resolve_device, silent_progress

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    folder: Path
    report: dict[str, Any]


@dataclass
class RunPaths:
    final: Path
    staging: Path

    @property
    def dense_stage(self) -> Path:
        return self.staging / "dense_stage.ckpt"

    @property
    def baseline_ckpt(self) -> Path:
        return self.staging / "baseline.ckpt"

    @property
    def train_ckpt(self) -> Path:
        return self.staging / "train.ckpt"

    @property
    def recipe(self) -> Path:
        """The resolved recipe, written when the staging folder is created (checked on --resume)."""
        return self.staging / "recipe.yaml"

    @property
    def old(self) -> Path:
        """Where --force parks the previous run folder during the final rename."""
        return self.final.with_name(f".{self.final.name}.old")


RESUME_MAY_CHANGE: tuple[str, ...] = ("output_dir", "train.device", "data.num_workers")
"""Recipe keys that --resume lets differ from the interrupted run's: where the run folder is
given from (it was found by output_dir and run_name already) and how, not what, is computed."""


def run_paths(recipe: Recipe) -> RunPaths:
    out_dir = Path(recipe.output_dir).expanduser()
    return RunPaths(out_dir / recipe.run_name, out_dir / f".{recipe.run_name}.partial")


# ----------------------------------------------------------------------------- checks first


def validate_inputs(recipe: Recipe) -> None:
    """Fail fast, before any long work: names, data location, attack names and options."""
    from .attacks import attack_options, list_attacks
    from .data import list_datasets
    from .errors import unknown_name
    from .models import resolve_name

    from .evaluate import check_attacks
    from .models import WEIGHT_SUFFIXES

    resolve_name(recipe.model.name)
    if recipe.model.weights is not None:
        weights = Path(recipe.model.weights)
        if not weights.is_file():
            raise ConfigError(f"model.weights: file not found: {weights} (give a .safetensors or .pth file)")
        if weights.suffix.lower() not in WEIGHT_SUFFIXES:
            raise ConfigError(f"model.weights: {weights} has an unsupported extension; use one of "
                              f"{', '.join(WEIGHT_SUFFIXES)}")
    if recipe.data.name not in list_datasets():
        raise unknown_name("data set", recipe.data.name, list_datasets())
    if recipe.data.root is not None and not recipe.data.download:
        root = Path(recipe.data.root).expanduser()
        if not root.exists():
            raise ConfigError(f"data.root: {recipe.data.root} does not exist (create it, fix the path, "
                              f"or set data.download=true for torchvision data sets)")
        if not root.is_dir():
            raise ConfigError(f"data.root: {recipe.data.root} is a file; give the folder that holds the data set")
    for i, spec in enumerate(recipe.evaluate.attacks):
        if spec.name not in list_attacks():
            raise unknown_name("attack", spec.name, list_attacks())
        valid = attack_options(spec.name)
        for key in spec.options:
            if key not in valid:
                raise ConfigError(f"evaluate.attacks.{i}.options.{key}: unknown option for {spec.name}; "
                                  f"valid: {', '.join(sorted(valid)) or 'none'}")
        # build it on a stand-in model: a bad option value fails now, not after training
        try:
            check_attacks([spec.model_dump()], eps_unit=recipe.evaluate.eps_unit, round_8bit=recipe.evaluate.round_8bit,
                          seed=recipe.evaluate.seed)
        except ConfigError as err:
            raise ConfigError(f"evaluate.attacks.{i} ({spec.name}): {err}") from None
    if recipe.factorize.r_max < recipe.factorize.r_min:
        raise ConfigError("factorize.r_max must be >= factorize.r_min")
    resolve_device(recipe.train.device)


def _check_writable(out_dir: Path) -> None:
    """Can ``out_dir`` be written (or created)? Leaves no trace: nothing is created here."""
    existing = out_dir
    while not existing.exists():
        if existing.is_symlink():
            raise OutputError(f"output folder {out_dir}: {existing} is a broken link; choose another with --output-dir")
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"output folder {out_dir} cannot be created: {existing} is a file, not a folder; "
                          f"choose another with --output-dir")
    if existing == out_dir:
        try:  # the real test (ACLs, read-only mounts); the probe file is removed at once
            with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
                pass
        except OSError as err:
            raise OutputError(f"output folder {out_dir} is not writable ({err.strerror}); "
                              f"choose another with --output-dir") from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {out_dir} cannot be created: {existing} is not writable; "
                          f"choose another with --output-dir")


def _check_same_recipe(recipe: Recipe, paths: RunPaths) -> None:
    """--resume continues the interrupted run only with the recipe it was started with."""
    from .recipe import load_recipe_dict, recipe_differences, recipe_from_dict

    if not paths.recipe.is_file():
        return  # killed before the recipe was written: nothing was computed yet
    stored = recipe_from_dict(load_recipe_dict(paths.recipe), source=str(paths.recipe)).model_dump(mode="json")
    changed = [k for k in recipe_differences(stored, recipe.model_dump(mode="json")) if k not in RESUME_MAY_CHANGE]
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ConfigError(f"--resume: the recipe differs from the interrupted run's ({paths.recipe}) in {shown}; "
                          f"resume with the same recipe, or start over with --force instead of --resume")


def check_output(recipe: Recipe, *, resume: bool, force: bool) -> RunPaths:
    """Is the output location usable for this run? Side-effect free; raises OutputError/ConfigError.

    A finished run folder is replaced only with ``force``; an interrupted run (staging folder) is
    continued with ``resume`` (same recipe) or discarded with ``force``, never silently.
    """
    paths = run_paths(recipe)
    staged = paths.staging.is_dir()
    if paths.final.exists() and not force:
        finished = " (a finished run: there is nothing to resume)" if resume and not staged else ""
        raise OutputError(f"{paths.final} already exists{finished}: choose another run name (--run-name / run_name) "
                          f"or pass --force to replace it")
    if resume and not staged:
        raise OutputError(f"--resume: no interrupted run to continue at {paths.staging} (start without --resume)")
    if resume:
        _check_same_recipe(recipe, paths)
    elif (staged or paths.staging.is_symlink()) and not force:
        raise OutputError(f"an interrupted run {recipe.run_name!r} is waiting at {paths.staging}: continue it with "
                          f"--resume, or pass --force to discard it and start over")
    _check_writable(paths.final.parent)
    return paths


def prepare_output(recipe: Recipe, *, resume: bool, force: bool, dist: DistContext) -> RunPaths:
    """Check the output location is usable; create (or reuse, on resume) the staging folder."""
    paths = run_paths(recipe)
    if not dist.is_main:
        # only rank 0 writes (and, on several nodes, only rank 0 can see) the output folder;
        # if it refuses, it exits and torchrun stops the other processes
        return paths
    check_output(recipe, resume=resume, force=force)
    try:
        paths.final.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            _remove(paths.staging)  # an interrupted run the user chose (--force) not to resume
        paths.staging.mkdir(exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {paths.staging} ({err.strerror}); choose another --output-dir") from None
    _remove_partial_writes(paths.staging)  # temporary files of writes a kill interrupted
    if not paths.recipe.is_file():
        atomic.write_text(paths.recipe, recipe_to_yaml(recipe))
    return paths


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree if it is there (a link is removed, never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _remove_partial_writes(folder: Path) -> None:
    """Drop the ``.NAME.*.tmp`` files atomic writes leave behind when killed mid-write."""
    for tmp in folder.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink()


def finalize_output(paths: RunPaths) -> None:
    """Drop checkpoints and move the finished staging folder into place (replacing on --force).

    A kill in here loses no result: before the rename the staging folder is still there for
    --resume (which redoes what the dropped checkpoints held, to the same result); after it the
    run is complete. A previous run folder parked at ``.NAME.old`` by a killed --force run is
    removed by the next finalize.
    """
    for ckpt in (paths.dense_stage, paths.baseline_ckpt, paths.train_ckpt):
        ckpt.unlink(missing_ok=True)
    _remove_partial_writes(paths.staging)
    _remove(paths.old)
    if paths.final.exists() or paths.final.is_symlink():
        os.replace(paths.final, paths.old)
    os.replace(paths.staging, paths.final)
    try:
        _remove(paths.old)
    except OSError as err:  # the run is in place; a leftover of the old one is only untidy
        log.warning("could not remove the replaced run folder %s: %s", paths.old, err)


# ----------------------------------------------------------------------------- the run


@contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    log.info("stage: %s", name)
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _spectrum_layer(candidates: list[str]) -> str | None:
    """The layer whose singular spectrum the report plots: the middle factorized layer."""
    return candidates[len(candidates) // 2] if candidates else None


def run(recipe: Recipe, *, resume: bool = False, force: bool = False, progress: ProgressFactory = silent_progress,
        dist: DistContext | None = None) -> RunResult:
    """Run the whole pipeline for ``recipe``; see the module docstring."""
    from .data import build_data, set_epoch
    from .evaluate import evaluate, plot_accuracy_vs_eps
    from .models import create_model

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
        data = build_data(recipe.data, input_size=recipe.model.input_size, seed=recipe.seed,
                          rank=dist.rank, world_size=dist.world_size)
    with _stage(timings, "model"):
        keep_own_norm = recipe.model.weights is not None or recipe.model.pretrained
        model, info = create_model(recipe.model.name, data.num_classes, in_chans=data.in_chans,
                                   weights=recipe.model.weights, pretrained=recipe.model.pretrained,
                                   mean=None if keep_own_norm else data.mean, std=None if keep_own_norm else data.std,
                                   input_size=recipe.model.input_size)
        model.to(device)
    # data and model are built from checked inputs: only now is anything written
    paths = prepare_output(recipe, resume=resume, force=force, dist=dist)
    log.info("inputs checked; %s %s", "resuming in" if resume else "staging in", paths.staging,
             extra={INPUTS_CHECKED: True})

    eval_kwargs = dict(max_samples=recipe.evaluate.max_samples, eps_unit=recipe.evaluate.eps_unit,
                       std=info.std, round_8bit=recipe.evaluate.round_8bit, seed=recipe.evaluate.seed, device=device,
                       dist=dist)  # sharded under torchrun, results summed over processes
    attacks = [a.model_dump() for a in recipe.evaluate.attacks]

    # -- dense: baseline fine-tuning + evaluation (checkpointed as one stage for --resume)
    # under torchrun rank 0 decides and reads (it wrote the files); the others receive the result
    dense_done = resume and dist.main_decides(paths.dense_stage.is_file())
    writer = CheckpointWriter()  # every checkpoint of the run, in order, in the background
    if dense_done:
        stage = dist.from_main(lambda: load_checkpoint(paths.dense_stage))
        model.load_state_dict(stage["model"])
        dense_eval_dict, baseline_history, dense_spectra = stage["eval"], stage["history"], stage["spectra"]
        timings.update(stage["timings"])
        log.info("resume: dense baseline and its evaluation restored from %s", paths.dense_stage)
    else:
        baseline_history: dict[str, Any] = {}
        if recipe.baseline.epochs > 0:
            with _stage(timings, "baseline"):
                torch.manual_seed(recipe.seed + 1)
                trainer = Trainer(model, data.train_loader, TrainerConfig.from_section(recipe.baseline, dense=True),
                                  val_loader=data.val_loader, device=device, seed=recipe.seed, dist=dist,
                                  checkpoint_path=paths.baseline_ckpt, progress=progress, name="dense baseline",
                                  set_epoch=set_epoch, checkpoint_writer=writer)
                trainer.cfg.checkpoint_every = 1
                baseline_history = trainer.fit(resume=resume).to_dict()
        with _stage(timings, "evaluate_dense"):
            dense_eval = _evaluate_with_bar(evaluate, model, data, attacks, progress, "evaluate dense", eval_kwargs)
        dense_eval_dict = dense_eval.to_dict()
        # spectra of the dense layers for the report's Fig. 1 plot; the huge classifier
        # matrices (VGG16's 4096×25088: ~10 s of SVD) are left out
        dense_spectra = {n: layer_spectrum(m) for n, m in model.named_modules()
                         if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.numel() <= 4_000_000}
        if dist.is_main:  # written while the model is factorized and trained (waited for below)
            writer.submit(paths.dense_stage, {"model": model.state_dict(), "eval": dense_eval_dict,
                                              "history": baseline_history, "spectra": dense_spectra,
                                              "timings": dict(timings)})
        dist.barrier()
    dense_params = sum(p.numel() for p in model.parameters())
    dense_model = copy.deepcopy(model).cpu() if recipe.export.latency and dist.is_main else None

    # -- compress: factorize + RobustDLRT
    fact, history, t = factorize_and_train(model, data.train_loader, recipe, val_loader=data.val_loader, device=device,
                                           dist=dist, checkpoint_path=paths.train_ckpt,
                                           resume=resume and dist.main_decides(paths.train_ckpt.is_file()),
                                           progress=progress,
                                           set_epoch=set_epoch, checkpoint_writer=writer)
    writer.wait()
    timings.update(t)
    with _stage(timings, "evaluate_compressed"):
        comp_eval = _evaluate_with_bar(evaluate, model, data, attacks, progress, "evaluate compressed",
                                       {**eval_kwargs, "keep_adversarial": _keep_adversarial(recipe, data, dist)})
    comp_eval_dict = comp_eval.to_dict()

    stats = compression_stats(model)
    report: dict[str, Any] = {
        "run_name": recipe.run_name,
        "model": info.to_dict(),
        "data": {"name": data.name, "n_train": data.n_train, "n_val": data.n_val, "num_classes": data.num_classes,
                 "mean": data.mean, "std": data.std},
        "eps_unit": recipe.evaluate.eps_unit,
        "dense": {"params": dense_params, **dense_eval_dict, "baseline_history": baseline_history,
                  "nonfinite_steps": int(baseline_history.get("nonfinite_steps", 0))},
        # steps skipped for a NaN/Inf loss or gradient (the factors were left as they were)
        "compressed": {"params": stats.params, "compression_rate": stats.rate, **comp_eval_dict,
                       "layers": layer_summary(model), "nonfinite_steps": history.nonfinite_steps},
        "factorization": fact.to_dict(),
        "history": history.to_dict(),
    }
    if not dist.is_main:
        # Rank 0 alone exports and writes; no barrier after it, so that a long export cannot
        # run into the process group's timeout. The other processes are done.
        return RunResult(paths.final, report)

    with _stage(timings, "export"):
        if dist.enabled:  # rank 0's export evaluates/calibrates on the whole split, not its shard
            from dataclasses import replace

            from .data import whole_split_loader

            data = replace(data, train_loader=whole_split_loader(data.train_loader),
                           val_loader=whole_split_loader(data.val_loader))
        report["export"] = _export(model, dense_model, recipe, info, data, paths.staging, comp_eval.adversarial)

    # plots
    plots: dict[str, str] = {}
    if plot_kappa_path := _plot_kappa(history, paths.staging):
        plots["kappa"] = plot_kappa_path
    factorized = [d.name for d in fact.factorized if d.name in dense_spectra]
    layer = _spectrum_layer(factorized)
    if layer is not None:
        from .report import plot_spectra

        spectra = {"dense": dense_spectra[layer], f"compressed (β={recipe.train.beta})":
                   layer_spectrum(dict(model.named_modules())[layer])}
        if plot_spectra(spectra, paths.staging / "spectrum.png", f"Singular values of {layer}"):
            plots["spectrum"] = "spectrum.png"
            report["spectra"] = {"layer": layer, **spectra}
    if recipe.evaluate.attacks:
        plot_accuracy_vs_eps({"dense": dense_eval_dict, "compressed": comp_eval_dict}, paths.staging / "accuracy_vs_eps.png")
        plots["accuracy_vs_eps"] = "accuracy_vs_eps.png"
    report["plots"] = plots

    from .report import device_info, versions, write_report

    report["timings"] = timings
    report["versions"] = versions()
    report["device"] = device_info(device)
    report["recipe"] = recipe.model_dump(mode="json")
    atomic.write_text(paths.staging / "recipe.yaml", recipe_to_yaml(recipe))
    write_report(paths.staging, report)
    finalize_output(paths)
    return RunResult(paths.final, report)


KEEP_ADVERSARIAL_MAX_BYTES = 1 << 30
"""The compressed model's adversarial images are kept for the ONNX evaluation (scored there
instead of crafted a second time) only while they fit in this many bytes."""


def _keep_adversarial(recipe: Recipe, data, dist: DistContext) -> bool:
    """Keep them when the ONNX model will be evaluated on them and they fit the budget; under
    torchrun each process holds only its shard, so rank 0's whole-split evaluation recrafts."""
    if dist.enabled or not recipe.export.onnx or not recipe.evaluate.attacks:
        return False
    n = data.n_val if recipe.evaluate.max_samples is None else min(data.n_val, recipe.evaluate.max_samples)
    pairs = sum(len(a.eps) for a in recipe.evaluate.attacks)
    return n * pairs * data.in_chans * recipe.model.input_size ** 2 * 4 <= KEEP_ADVERSARIAL_MAX_BYTES


def _evaluate_with_bar(evaluate, model, data, attacks, progress: ProgressFactory, desc: str, kwargs: dict):
    shard = getattr(data.val_loader, "batch_sampler", None)  # under torchrun: this process's images only
    total = getattr(shard, "num_samples", None) or (len(data.val_loader.dataset) if hasattr(data.val_loader, "dataset") else 0)
    bar = progress(total, desc)
    try:
        return evaluate(model, data.val_loader, attacks, progress=bar.update, **kwargs)
    finally:
        bar.close()


def _plot_kappa(history, folder: Path) -> str | None:
    from .report import plot_kappa

    return "kappa.png" if plot_kappa(history.kappa_trace, folder / "kappa.png") else None


def _export(model, dense_model, recipe: Recipe, info, data, folder: Path,
            adversarial: dict | None) -> dict[str, Any]:
    """safetensors + ONNX + checks (+ INT8, latency) into the staging folder.

    ``adversarial``: the compressed model's evaluation images (None: craft them again), scored
    by the ONNX model as well.
    """
    from .export import (count_macs, export_onnx, onnx_latencies, onnx_latency, parity_check, quantize_int8,
                         save_compressed, structure_check)

    out: dict[str, Any] = {}
    model = model.cpu().eval()
    size = recipe.model.input_size
    if recipe.export.safetensors:
        save_compressed(model, folder / "model.safetensors", model_info=info.to_dict(),
                        recipe=recipe.model_dump(mode="json"))
        out["safetensors_bytes"] = (folder / "model.safetensors").stat().st_size
    if not recipe.export.onnx:
        return out
    onnx_path = folder / "model.onnx"
    info_onnx = export_onnx(model, onnx_path, input_size=size, in_chans=data.in_chans, opset=recipe.export.opset)
    out["onnx"] = _as_dict(info_onnx)
    out["onnx_bytes"] = onnx_path.stat().st_size
    out["structure"] = _as_dict(structure_check(onnx_path, model))
    out["parity"] = _as_dict(parity_check(onnx_path, model, input_size=size, batches=(1, 8)))
    from .evaluate import evaluate_onnx

    attacks = [a.model_dump() for a in recipe.evaluate.attacks]
    onnx_eval_kwargs = dict(torch_model=model, attacks=attacks, max_samples=recipe.evaluate.max_samples,
                            eps_unit=recipe.evaluate.eps_unit, std=info.std, round_8bit=recipe.evaluate.round_8bit,
                            seed=recipe.evaluate.seed)
    out["onnx_eval"] = _as_dict(evaluate_onnx(onnx_path, data.val_loader, adversarial=adversarial or None,
                                              **onnx_eval_kwargs))
    macs_dense = count_macs(dense_model, size) if dense_model is not None else None
    macs_comp = count_macs(model, size)
    out["macs"] = {"dense": macs_dense, "compressed": macs_comp,
                   "ratio": (macs_dense / macs_comp) if macs_dense and macs_comp else None}
    if recipe.export.int8:
        calib = torch.cat([x for x, _ in _take(data.train_loader, 256)])
        out["int8"] = _as_dict(quantize_int8(onnx_path, folder / "model.int8.onnx", calib))
        out["int8"]["eval"] = _as_dict(evaluate_onnx(folder / "model.int8.onnx", data.val_loader,
                                                     adversarial=adversarial or None, **onnx_eval_kwargs))
    if recipe.export.latency:
        latency_args = dict(batch_sizes=(1, 32), threads=recipe.export.latency_threads,
                            repeats=recipe.export.latency_repeats, input_size=size, in_chans=data.in_chans)
        if dense_model is None:
            out["latency"] = {"compressed": onnx_latency(onnx_path, **latency_args)}
        else:
            with tempfile.TemporaryDirectory() as tmp:
                dense_path = Path(tmp) / "dense.onnx"
                # a throwaway reference, only timed: no onnx.checker pass (~4 s for VGG16's
                # 0.5 GB; onnxruntime validates the graph as it loads it)
                export_onnx(dense_model, dense_path, input_size=size, in_chans=data.in_chans, opset=recipe.export.opset,
                            check=False)
                # interleaved, so that the speedup compares the two under the same machine load
                out["latency"] = onnx_latencies({"compressed": onnx_path, "dense": dense_path}, **latency_args)
            out["latency"]["speedup"] = {
                b: out["latency"]["dense"][b]["median_ms"] / out["latency"]["compressed"][b]["median_ms"]
                for b in out["latency"]["compressed"]}
        out["latency"]["threads"] = latency_args["threads"]
    return out


def _take(loader, n: int):
    seen = 0
    for x, y in loader:
        if seen >= n:
            break
        yield x[: n - seen], y[: n - seen]
        seen += len(x)


def _as_dict(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    return obj

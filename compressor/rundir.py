"""The run folder as a transaction: ``<output_dir>/<run_name>/`` appears complete or not at all.

Outputs are written into a hidden staging folder ``.<run_name>.partial`` that is renamed into
place only when the run succeeded; the staging folder keeps the checkpoints that ``--resume``
continues from, and the resolved recipe, which ``--resume`` compares against (see
docs/reliability.md).

Only ``<output_dir>/<run_name>/``, ``<output_dir>/.<run_name>.partial/`` and, during the final
rename with ``--force``, ``<output_dir>/.<run_name>.old/`` are ever written or removed; a run
folder is replaced only with ``--force``, an interrupted run is discarded only with ``--force``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import atomic
from .errors import ConfigError, OutputError
from .recipe import Recipe, load_recipe_dict, recipe_differences, recipe_from_dict, recipe_to_yaml
from .runtime import DistContext

log = logging.getLogger(__name__)


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
        raise OutputError(
            f"output folder {out_dir} cannot be created: {existing} is a file, not a folder; "
            f"choose another with --output-dir"
        )
    if existing == out_dir:
        try:  # the real test (ACLs, read-only mounts); the probe file is removed at once
            with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
                pass
        except OSError as err:
            raise OutputError(
                f"output folder {out_dir} is not writable ({err.strerror}); choose another with --output-dir"
            ) from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(
            f"output folder {out_dir} cannot be created: {existing} is not writable; choose another with --output-dir"
        )


def _check_same_recipe(recipe: Recipe, paths: RunPaths) -> None:
    """--resume continues the interrupted run only with the recipe it was started with."""
    if not paths.recipe.is_file():
        return  # killed before the recipe was written: nothing was computed yet
    stored = recipe_from_dict(load_recipe_dict(paths.recipe), source=str(paths.recipe)).model_dump(mode="json")
    changed = [k for k in recipe_differences(stored, recipe.model_dump(mode="json")) if k not in RESUME_MAY_CHANGE]
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ConfigError(
            f"--resume: the recipe differs from the interrupted run's ({paths.recipe}) in {shown}; "
            f"resume with the same recipe, or start over with --force instead of --resume"
        )


def check_output(recipe: Recipe, *, resume: bool, force: bool) -> RunPaths:
    """Is the output location usable for this run? Side-effect free; raises OutputError/ConfigError.

    A finished run folder is replaced only with ``force``; an interrupted run (staging folder) is
    continued with ``resume`` (same recipe) or discarded with ``force``, never silently.
    """
    paths = run_paths(recipe)
    staged = paths.staging.is_dir()
    if paths.final.exists() and not force:
        finished = " (a finished run: there is nothing to resume)" if resume and not staged else ""
        raise OutputError(
            f"{paths.final} already exists{finished}: choose another run name (--run-name / run_name) "
            f"or pass --force to replace it"
        )
    if resume and not staged:
        raise OutputError(f"--resume: no interrupted run to continue at {paths.staging} (start without --resume)")
    if resume:
        _check_same_recipe(recipe, paths)
    elif (staged or paths.staging.is_symlink()) and not force:
        raise OutputError(
            f"an interrupted run {recipe.run_name!r} is waiting at {paths.staging}: continue it with "
            f"--resume, or pass --force to discard it and start over"
        )
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

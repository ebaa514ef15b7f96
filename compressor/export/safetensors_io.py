"""Compressed models as safetensors: exact-size factors plus a JSON manifest to rebuild them.

The file holds the NormalizedClassifier's state dict at the layers' current ranks (no r_max
padding) and, in the safetensors ``__metadata__``, a manifest: the model name and shape
(enough for :func:`compressor.models.create_model`), the normalization, and for every
factorized layer its kind, ranks and rank bounds. :func:`load_into` takes a dense
skeleton of the architecture, swaps the listed layers for empty factorized ones of the recorded
ranks and loads the tensors strictly: the loaded model computes bit for bit what the saved one
did. Building that skeleton by name is :func:`compressor.load.load_compressed`'s part: export/
builds no model.

The header is checked here before the safetensors library sees the file, so that a corrupt,
truncated or foreign file fails with one line that says what is wrong.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import ConfigError, WeightsError
from ..layers import (
    LowRankLayer,
    layer_kinds,
    layer_type,
    low_rank_layers,
    project_attention_,
    projected_attention,
)
from ..runtime import compression_stats

log = logging.getLogger(__name__)

FORMAT = "compressor-lowrank"
FORMAT_VERSION = 1
"""Manifest version written by :func:`save_compressed`; files with a newer version are refused."""

_TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CUSTOM_SOURCE = "custom"
"""``model.source`` of a module not built by create_model: reloaded into a skeleton the user passes."""
_MODEL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "source": str,
    "name": str,
    "num_classes": int,
    "in_chans": int,
    "input_size": int,
    "mean": list,
    "std": list,
}


# ----------------------------------------------------------------------------- saving


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    try:
        out["compressor"] = md.version("compressor")
    except md.PackageNotFoundError:  # running from a checkout without `pip install -e .`
        from .. import __version__

        out["compressor"] = __version__
    try:
        out["safetensors"] = md.version("safetensors")
    except md.PackageNotFoundError:
        pass
    return out


def build_manifest(
    model: nn.Module,
    model_info: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    deployment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest :func:`save_compressed` writes (also useful on its own for reports).

    ``model_info``: :meth:`compressor.models.ModelInfo.to_dict` for a model built by
    ``create_model`` (then the file alone rebuilds it); for any other module the manifest
    records its class, and :func:`load_into` needs a skeleton of it.
    """
    if model_info is None:
        model_info = {
            "source": CUSTOM_SOURCE,
            "name": type(model).__qualname__,
            "spec": f"{type(model).__module__}.{type(model).__qualname__}",
        }
    info = dict(model_info)
    if info.get("source") != CUSTOM_SOURCE:
        missing = [k for k in _MODEL_FIELDS if k not in info]
        if missing:
            raise ConfigError(f"model_info lacks {', '.join(missing)}: pass ModelInfo.to_dict() from create_model")
    stats = compression_stats(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {
            k: info.get(k)
            for k in (
                "source",
                "name",
                "spec",
                "num_classes",
                "in_chans",
                "input_size",
                "mean",
                "std",
                "weights",
                "head",
            )
        },
        "layers": {name: layer.manifest_entry() for name, layer in low_rank_layers(model).items()},
        # nn.MultiheadAttention modules factorize_ replaced: the reload replaces them again
        "attention": projected_attention(model),
        "params": {"compressed": stats.params, "dense": stats.params_dense, "compression_rate": stats.rate},
        "recipe": dict(recipe) if recipe is not None else None,
        "extra": dict(extra) if extra is not None else None,
        "deployment": dict(deployment) if deployment is not None else None,
        "versions": _versions(),
    }


def save_compressed(
    model: nn.Module,
    path: str | Path,
    *,
    model_info: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    deployment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model`` (any module, factorized or not) to ``path``.

    Tensors are written at their current (exact) ranks, contiguous, on the CPU; the manifest
    (:func:`build_manifest`) goes into the safetensors metadata under ``"manifest"`` as JSON.
    The file is written atomically. Returns the manifest.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"save_compressed expects a torch.nn.Module, got {type(model).__name__}")
    manifest = build_manifest(model, model_info, recipe, extra, deployment)
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        # safetensors refuses tensors that share memory (tied weights, views): give each its own copy
        if ptr in seen_storage or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        if ptr != -1:
            seen_storage.add(ptr)
        tensors[key] = t
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "manifest": json.dumps(manifest, sort_keys=True, default=str, allow_nan=False),
    }
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    log.info("saved %d tensors (%d factorized layers) to %s", len(tensors), len(manifest["layers"]), path)
    return manifest


# ----------------------------------------------------------------------------- reading


_LIBRARY_ERRORS = (  # safetensors' own wording → what the user should be told
    (
        ("header too large", "header too small", "invalid header length"),
        "its header length field says something the file's size contradicts (corrupt, truncated, or another format)",
    ),
    (
        ("not fully covered",),
        "its tensor data does not cover the file as the header says: the file is truncated "
        "or has bytes appended (re-export it)",
    ),
    (("invalid json",), "its header is not JSON: the file is corrupt or another format"),
)


def read_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """A safetensors file's tensors and metadata: ({tensor: {dtype, shape}}, metadata).

    The safetensors library checks the framing (header length against the file size, the
    header's JSON, dtypes, offsets that tile the data section); its errors become one-line
    WeightsErrors that say what is wrong with the file.
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"compressed model file not found: {p}")
    name = f"{p} is not a valid safetensors file"
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            header = {}
            for key in f.keys():
                tensor = f.get_slice(key)
                header[key] = {"dtype": tensor.get_dtype(), "shape": list(tensor.get_shape())}
    except OSError as err:
        raise WeightsError(f"cannot read {p} ({err.strerror})") from None
    except Exception as err:  # the library's SafetensorError
        text = " ".join(str(err).split())
        reason = next((msg for needles, msg in _LIBRARY_ERRORS if any(n in text.lower() for n in needles)), text[:200])
        raise WeightsError(f"{name}: {reason}") from None
    return header, metadata


def _parse_manifest(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    text = metadata.get("manifest")
    if text is None:
        raise WeightsError(
            f"{path} has no compressor manifest: it is a plain safetensors state dict, not a file "
            "written by save_compressed (load a plain state dict with create_model(weights=...))"
        )
    try:
        manifest = json.loads(text)
    except RecursionError:
        raise WeightsError(f"{path}: the manifest in its metadata nests too deeply (corrupt or hostile)") from None
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: the manifest in its metadata is not valid JSON ({err.msg} at {err.pos})") from None
    where = f"{path}: malformed manifest"
    if not isinstance(manifest, dict):
        raise WeightsError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise WeightsError(f"{where}: no integer format_version")
    if version > FORMAT_VERSION:
        raise WeightsError(
            f"{path} has manifest version {version}, newer than this compressor reads "
            f"({FORMAT_VERSION}): upgrade compressor"
        )
    model = manifest.get("model")
    if not isinstance(model, dict):
        raise WeightsError(f"{where}: no 'model' section")
    if not isinstance(model.get("source"), str) or not isinstance(model.get("name"), str):
        raise WeightsError(f"{where}: model.source and model.name must be strings")
    if model["source"] != CUSTOM_SOURCE:
        for key, typ in _MODEL_FIELDS.items():
            if not isinstance(model.get(key), typ) or isinstance(model.get(key), bool):
                raise WeightsError(f"{where}: model.{key} missing or not a {typ.__name__}")
        for key in ("mean", "std"):
            if len(model[key]) != model["in_chans"] or not all(isinstance(v, (int, float)) for v in model[key]):
                raise WeightsError(f"{where}: model.{key} must hold {model['in_chans']} numbers")
    layers = manifest.get("layers")
    if not isinstance(layers, dict):
        raise WeightsError(f"{where}: no 'layers' section")
    kinds = layer_kinds()
    for name, entry in layers.items():
        if not isinstance(entry, dict) or entry.get("kind") not in kinds:
            raise WeightsError(f"{where}: layer {name!r} needs kind {' or '.join(map(repr, kinds))}")
        ranks = entry.get("ranks")
        n_ranks = layer_type(entry["kind"]).n_modes
        if (
            not isinstance(ranks, list)
            or len(ranks) != n_ranks
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)
        ):
            raise WeightsError(f"{where}: layer {name!r} needs {n_ranks} positive integer rank(s), got {ranks!r}")
        for key in ("r_min", "r_max"):
            if not isinstance(entry.get(key), int) or entry[key] < 1:
                raise WeightsError(f"{where}: layer {name!r} needs a positive integer {key}")
    return manifest


def _check_factor_shapes(path: Path, header: Mapping[str, Mapping[str, Any]], layers: Mapping[str, Any]) -> None:
    """Each listed layer's factors are in the file, with the recorded ranks."""
    for name, entry in layers.items():
        error = layer_type(entry["kind"]).stored_factor_error(name, entry["ranks"], header)
        if error is not None:
            raise WeightsError(f"{path}: {error}")


def build_low_rank_like(
    dense: nn.Module, kind: str, ranks: list[int] | tuple[int, ...], r_min: int, r_max: int
) -> LowRankLayer:
    """An empty factorized layer of ``kind`` with ``dense``'s hyper-parameters and the given ranks.

    Factor contents are undefined: meant to be filled by ``load_state_dict``. The rank bounds
    passed back in are the layer's stored ``r_min``/``r_max``, which rebuild the same per-mode
    caps (``min(r_max, channels)`` is idempotent).
    """
    try:
        factorized = layer_type(kind)
    except KeyError as err:
        raise WeightsError(err.args[0]) from None
    return factorized.empty_like(dense, ranks, r_min, r_max)


def model_spec(model: Mapping[str, Any]) -> str:
    """The create_model spec of a manifest's ``model`` section (``tv:vgg16``, ``timm:resnet18``)."""
    prefix = {"torchvision": "tv", "timm": "timm"}.get(model["source"])
    return f"{prefix}:{model['name']}" if prefix else model.get("spec") or model["name"]


def read_compressed(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """A file written by :func:`save_compressed`, checked: ({tensor: {dtype, shape}}, manifest).

    Raises WeightsError for a missing, corrupt, truncated or foreign file, a missing or
    malformed manifest, or factors whose shapes contradict the manifest's ranks.
    """
    p = Path(path)
    header, metadata = read_header(p)
    manifest = _parse_manifest(p, metadata)
    _check_factor_shapes(p, header, manifest["layers"])
    return header, manifest


def load_into(
    path: str | Path, model: nn.Module, *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Fill ``model`` with the file :func:`save_compressed` wrote; return (model in eval mode, manifest).

    ``model``: a freshly built (dense) instance of the saved architecture; its layers listed in
    the manifest are replaced by factorized ones in place, then every tensor comes from the file
    (strict load). :func:`compressor.load_compressed` builds that skeleton by name for a model
    made by create_model. Raises WeightsError for a missing, corrupt, truncated or foreign
    file, a missing or malformed manifest, or tensors that do not match the manifest or the
    architecture.
    """
    p = Path(path)
    header, manifest = read_compressed(p)
    m = manifest["model"]
    spec = model_spec(m)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be a torch.nn.Module (a new {spec}), got {type(model).__name__}; "
            "compressor.load_compressed(path) rebuilds a model made by create_model from its name"
        )

    project_attention_(model, names=list(manifest.get("attention") or []))
    factorized = low_rank_layers(model)  # a skeleton may be factorized already
    for name, entry in manifest["layers"].items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise WeightsError(
                f"{p}: the manifest lists layer {name!r}, which {spec} does not have "
                "(saved from another architecture or library version?)"
            ) from None
        try:
            if name in factorized:
                layer = factorized[name]
                layer.set_ranks_(tuple(entry["ranks"]))
            else:
                layer = build_low_rank_like(dense, entry["kind"], entry["ranks"], entry["r_min"], entry["r_max"])
        except (WeightsError, ValueError, RuntimeError) as err:
            raise WeightsError(f"{p}: layer {name!r}: {err}") from None
        layer.apply_manifest_entry_(entry)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)

    own = model.state_dict()
    missing = [k for k in own if k not in header]
    unexpected = [k for k in header if k not in own]
    wrong = [k for k in own if k in header and list(own[k].shape) != header[k]["shape"]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with another shape ({k}: file {header[k]['shape']} vs model {list(own[k].shape)})"
            )
        raise WeightsError(f"{p}: tensors do not match the manifest's model {spec}: {'; '.join(parts)}")
    # keep the saved precision (a bf16-trained model stays bf16): bit-exact outputs
    float_dtypes = {header[k]["dtype"] for k, v in own.items() if v.is_floating_point()}
    if len(float_dtypes) == 1 and (dt := _TORCH_DTYPE.get(float_dtypes.pop())) is not None and dt != torch.float32:
        model.to(dt)

    from safetensors.torch import load_file

    try:
        tensors = load_file(str(p), device="cpu")
    except Exception as err:  # the library raises its own SafetensorError
        raise WeightsError(f"{p}: cannot read tensors ({type(err).__name__}: {str(err)[:200]})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise WeightsError(
            f"{p}: tensors do not fit the model: {first[1].strip() if len(first) > 1 else first[0]}"
        ) from None
    model.to(map_location).eval()
    return model, manifest

"""Model names: ``vgg16`` / ``tv:vgg16`` / ``timm:vgg16`` → (library, canonical name), and listing."""

from __future__ import annotations

import fnmatch
import functools

from ..errors import ConfigError, unknown_name

BARE_NAME_ORDER: tuple[str, ...] = ("torchvision", "timm")
"""Libraries searched, in order, for a model name given without a ``tv:``/``timm:`` prefix."""

PREFIXES: dict[str, str] = {"tv": "torchvision", "torchvision": "torchvision", "timm": "timm"}
"""Accepted name prefixes (``prefix:name``) and the library each selects."""


@functools.lru_cache(maxsize=1)
def _tv_names() -> frozenset[str]:
    import torchvision.models as tvm

    # module=tvm: classification models only (no detection/segmentation/video/quantized)
    return frozenset(tvm.list_models(module=tvm))


@functools.lru_cache(maxsize=1)
def _timm_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def _timm_has(name: str) -> bool:
    import timm

    return timm.is_model(name)  # accepts pretrained tags: "resnet18.a1_in1k"


def resolve_name(spec: str) -> tuple[str, str]:
    """``"vgg16"`` / ``"tv:vgg16"`` / ``"timm:vgg16"`` → ``(library, canonical name)``.

    Bare names try the libraries in :data:`BARE_NAME_ORDER` (torchvision, then timm).
    Raises UnknownNameError with close matches when no library has the name.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"model name must be a non-empty string, got {spec!r} (e.g. model.name=vgg16)")
    text = spec.strip()
    prefix, sep, rest = text.partition(":")
    if sep:
        lib = PREFIXES.get(prefix.strip().lower())
        if lib is None:
            raise ConfigError(f"unknown model prefix {prefix!r} in {spec!r}: use tv:<name>, timm:<name> or a bare name")
        name = rest.strip().lower()
        if lib == "torchvision" and name in _tv_names():
            return lib, name
        if lib == "timm" and name and _timm_has(name):
            return lib, name
        valid = [f"{prefix.strip().lower()}:{n}" for n in (_tv_names() if lib == "torchvision" else _timm_names())]
        raise unknown_name(f"{lib} model", text.lower(), valid)
    name = text.lower()
    for lib in BARE_NAME_ORDER:
        if lib == "torchvision" and name in _tv_names():
            return lib, name
        if lib == "timm" and _timm_has(name):
            return lib, name
    raise unknown_name("model", name, _tv_names() | _timm_names())


def list_models(pattern: str = "*") -> list[str]:
    """Classification models of both libraries as prefixed names (``tv:vgg16``, ``timm:vgg16``).

    ``pattern`` is a glob on the bare name (``"vgg*"``) or on the prefixed one (``"tv:vgg*"``).
    """
    names = [f"tv:{n}" for n in sorted(_tv_names())] + [f"timm:{n}" for n in sorted(_timm_names())]
    pat = pattern.lower()
    if ":" in pat:
        return [n for n in names if fnmatch.fnmatchcase(n, pat)]
    return [n for n in names if fnmatch.fnmatchcase(n.split(":", 1)[1], pat)]

"""Model loading: build a torchvision or timm classifier, fit its head, load local weights.

Every model the toolkit hands on is a :class:`NormalizedClassifier`: it takes images in [0, 1]
pixel space and normalizes inside (``net((x - mean) / std)``), so attacks, ε-balls, export and
data loading all work on plain pixels and the normalization travels with the weights.

Name resolution (:data:`BARE_NAME_ORDER`): a bare name such as ``vgg16`` is looked up in
torchvision first and, only if torchvision has no classification model of that name, in timm.
``tv:vgg16`` (or ``torchvision:vgg16``) and ``timm:vgg16`` pick the library explicitly; timm
names may carry a pretrained tag (``timm:resnet18.a1_in1k``).

Weights: random init by default. ``pretrained=True`` asks the library (torchvision, or timm
with its Hugging Face hub) for its weights, which it takes from its cache when it has them.
When they cannot be had (no network and no cached copy, a refused download), the library's
error is logged as a warning that names the local-file alternative, and the model stays at
random init. ``HF_HUB_OFFLINE=1`` means: never download, use cached copies only. huggingface_hub
obeys it for timm's hub weights, and this module applies it to torchvision's and timm's URL
weights, which go through torch.hub and have no such switch. Set it on machines without network:
without it the hub keeps retrying a lost connection before it gives up. ``weights=path`` loads a
local ``.safetensors`` or ``.pth``/``.pt``/``.bin`` state dict (``torch.load(weights_only=True)``,
never arbitrary pickles).
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import ConfigError, WeightsError, unknown_name

log = logging.getLogger(__name__)

BARE_NAME_ORDER: tuple[str, ...] = ("torchvision", "timm")
"""Libraries searched, in order, for a model name given without a ``tv:``/``timm:`` prefix."""

PREFIXES: dict[str, str] = {"tv": "torchvision", "torchvision": "torchvision", "timm": "timm"}
"""Accepted name prefixes (``prefix:name``) and the library each selects."""

DEFAULT_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
DEFAULT_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Normalization used when neither the caller nor loaded pretrained weights give one."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".bin")

# keys a checkpoint dict may nest its state dict under (tried in this order)
_NESTED_KEYS = ("state_dict", "model", "model_state_dict")
# prefixes added by DistributedDataParallel / torch.compile; stripped before matching
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ----------------------------------------------------------------------------- the wrapper


class NormalizedClassifier(nn.Module):
    """``net((x - mean) / std)`` for images ``x`` in [0, 1]; ``mean``/``std`` are 1×C×1×1 buffers.

    The buffers are persistent, so a saved state dict (``mean``, ``std``, ``net.*``) carries the
    normalization with the weights.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: list[float] | tuple[float, ...], std: list[float] | tuple[float, ...]):
        super().__init__()
        if len(mean) != len(std):
            raise ConfigError(f"mean has {len(mean)} values but std has {len(std)}: give one per input channel")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std must be positive, got {list(std)}")
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels in [0, 1] → the net's normalized input."""
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) in [0, 1] → logits (B, num_classes)
        return self.net(self.normalize(x))


@dataclass
class ModelInfo:
    """What was built: recorded beside the outputs and used by later stages."""

    source: str
    """"torchvision" or "timm"."""
    name: str
    """Canonical name within the library, e.g. "vgg16" or "resnet18.a1_in1k"."""
    spec: str
    """The name as the user typed it."""
    num_classes: int
    in_chans: int
    input_size: int
    mean: list[float]
    std: list[float]
    weights: str
    """Where the weights came from: "random-init", "pretrained (torchvision DEFAULT)", "file:<path>", ..."""
    head: str = ""
    """Module name of the classifier head inside ``net`` (e.g. "classifier.6", "fc", "heads.head")."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- names


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


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (distinct) parameters; ``trainable_only`` counts those with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------- heads


def find_head(net: nn.Module) -> tuple[str, nn.Module]:
    """The classifier head of ``net``: ``(module name, module)``.

    timm models report it via ``get_classifier()``. Otherwise it is the last ``nn.Linear`` in
    registration order (vgg/alexnet ``classifier.6``, resnet/regnet ``fc``, vit ``heads.head``,
    ...), or, for nets with no Linear at all (squeezenet), the last 1×1 ``nn.Conv2d``.
    """
    modules = dict(net.named_modules())
    get_classifier = getattr(net, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        if isinstance(head, (nn.Linear, nn.Conv2d)):
            for name, m in modules.items():
                if m is head:
                    return name, m
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [(n, m) for n, m in modules.items() if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)]
    if convs:
        return convs[-1]
    raise ConfigError(
        f"cannot find a classifier head (Linear or 1x1 Conv2d) in {type(net).__name__}: "
        "use a classification model (see `compress list models`)"
    )


def replace_head(net: nn.Module, num_classes: int) -> str:
    """Swap the head found by :func:`find_head` for a fresh one with ``num_classes`` outputs.

    Keeps the input width and whether it has a bias; returns the head's module name. A head that
    already has ``num_classes`` outputs is left as it is (e.g. ImageNet weights for 1000 classes).
    """
    name, head = find_head(net)
    out = head.out_features if isinstance(head, nn.Linear) else head.out_channels
    if out == num_classes:
        return name
    new: nn.Module
    if isinstance(head, nn.Linear):
        new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    else:
        new = nn.Conv2d(head.in_channels, num_classes, kernel_size=1, bias=head.bias is not None)
    new = new.to(device=head.weight.device, dtype=head.weight.dtype)
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, attr, new)
    return name


def _drop_aux_heads(net: nn.Module) -> None:
    """Inception v3 / GoogLeNet: drop the auxiliary classifiers so forward returns a tensor."""
    if getattr(net, "aux_logits", False):
        net.aux_logits = False
        for attr in ("AuxLogits", "aux1", "aux2"):
            if hasattr(net, attr):
                setattr(net, attr, None)


# ----------------------------------------------------------------------------- pretrained


class _PretrainedUnavailable(Exception):
    """Internal: the library's pretrained weights could not be had (reason in the message)."""


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it, so torchvision and timm obey one switch."""
    from huggingface_hub import constants  # installed with timm

    return bool(constants.HF_HUB_OFFLINE)


def _torch_hub_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps the download of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:160]}" if text else type(err).__name__


def _tv_pretrained(
    name: str, num_classes: int, input_size: int, extra: dict[str, Any]
) -> tuple[nn.Module, list[float], list[float], str]:
    import torchvision.models as tvm

    try:
        weights = tvm.get_model_weights(name).DEFAULT
    except Exception as err:  # no weights enum for this model
        raise _PretrainedUnavailable(f"torchvision has no pretrained weights for {name} ({_short(err)})") from None
    cached = _torch_hub_file(weights.url)
    if _hub_offline() and not cached.is_file():
        # torchvision has no offline switch of its own: it would try the download
        raise _PretrainedUnavailable(f"offline (HF_HUB_OFFLINE=1) and {cached} not cached")
    try:
        if name.startswith("vit_") and "image_size" in extra and extra["image_size"] != weights.meta["min_size"][0]:
            # ImageNet weights are for 224 px: interpolate the position embeddings to our size
            from torchvision.models.vision_transformer import interpolate_embeddings

            src = tvm.get_model(name, weights=weights)
            state = interpolate_embeddings(extra["image_size"], src.patch_size, src.state_dict())
            net = tvm.get_model(name, weights=None, **extra)
            net.load_state_dict(state)
        else:
            net = tvm.get_model(name, weights=weights)
    except Exception as err:  # no network, a refused or corrupt download: all end in random init
        raise _PretrainedUnavailable(_short(err)) from None
    tf = weights.transforms()
    mean = [float(v) for v in getattr(tf, "mean", IMAGENET_MEAN)]
    std = [float(v) for v in getattr(tf, "std", IMAGENET_STD)]
    _drop_aux_heads(net)
    replace_head(net, num_classes)
    return net, mean, std, f"pretrained (torchvision {weights})"


def _timm_pretrained(name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, list[float], list[float], str]:
    """timm's own loader: its Hugging Face hub download obeys ``HF_HUB_OFFLINE`` and uses the
    hub cache; its URL weights go through torch.hub, which has no offline switch, so that case is
    checked here."""
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise _PretrainedUnavailable(f"timm has no pretrained weights for {name}")
    hub_id, url, file = getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None), getattr(cfg, "file", None)
    if not (hub_id or url or file):
        # timm would log a warning and hand back random init labelled as pretrained
        raise _PretrainedUnavailable(f"timm lists no weight source for {name}")
    if _hub_offline() and url and not (hub_id or file) and not _torch_hub_file(url).is_file():
        raise _PretrainedUnavailable(f"offline (HF_HUB_OFFLINE=1) and {_torch_hub_file(url)} not cached")
    try:
        net = _timm_create(timm, name, pretrained=True, **kwargs)
    except Exception as err:  # no network, no cached copy, a corrupt download: all end in random init
        from huggingface_hub.utils import LocalEntryNotFoundError

        if _hub_offline() and isinstance(err, LocalEntryNotFoundError):  # its text blames the connection
            raise _PretrainedUnavailable(f"offline (HF_HUB_OFFLINE=1) and {hub_id} not cached") from None
        raise _PretrainedUnavailable(_short(err)) from None
    pcfg = getattr(net, "pretrained_cfg", {}) or {}
    mean = [float(v) for v in pcfg.get("mean", IMAGENET_MEAN)]
    std = [float(v) for v in pcfg.get("std", IMAGENET_STD)]
    return net, mean, std, f"pretrained (timm {pcfg.get('hf_hub_id') or name})"


def _timm_create(timm: Any, name: str, **kwargs: Any) -> nn.Module:
    """timm.create_model, dropping ``img_size`` for architectures that do not take it (CNNs)."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as err:
        if "img_size" in kwargs and "img_size" in str(err):
            kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
            return timm.create_model(name, **kwargs)
        raise


# ----------------------------------------------------------------------------- weight files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local state dict: ``.safetensors`` or ``.pth``/``.pt``/``.bin`` (weights_only).

    A ``.pth`` may hold the state dict itself or a dict with it under "state_dict", "model" or
    "model_state_dict". Raises WeightsError (missing, unreadable, corrupt, not a state dict).
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p} (give an existing .safetensors/.pth file in model.weights)")
    suffix = p.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(
            f"weights file {p}: unsupported extension {suffix or '(none)'}; use one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:
        hint = "re-save it with torch.save(model.state_dict(), path) or safetensors.torch.save_file"
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            # torch's own text is long and styled; the point is that nothing in it was run
            raise WeightsError(
                f"cannot read weights file {p}: it holds Python objects, not only tensors (refused: "
                f"unpickling them could run code); {hint}"
            ) from None
        raise WeightsError(f"cannot read weights file {p} (corrupt or truncated? {_short(err)}): {hint}") from None
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(
            f"weights file {p} does not hold a state dict (got {type(obj).__name__}): save model.state_dict()"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"weights file {p} is not a state dict: {len(bad)} entries are not tensors (e.g. {bad[0]!r}); "
            "save model.state_dict() or nest it under 'state_dict'"
        )
    return dict(obj)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _split_wrapper(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """State dict of a NormalizedClassifier (``mean``, ``std``, ``net.*``) → (net state, {mean, std})."""
    state = _strip_prefixes(state)
    norm_keys = {"mean", "std"}
    if any(k.startswith("net.") for k in state) and all(k.startswith("net.") or k in norm_keys for k in state):
        net_state = _strip_prefixes({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        return net_state, {k: v for k, v in state.items() if k in norm_keys}
    return state, {}


def _names(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_net_weights(net: nn.Module, path: str | Path, head: str | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """Load a weight file into ``net`` (the bare network, not the wrapper), strictly.

    Keys may be for the bare net or for a :class:`NormalizedClassifier` (``net.`` prefix; its
    ``mean``/``std`` are returned). Head entries that are missing or have another number of
    classes are skipped (logged): the head keeps its fresh init. Any other missing, unexpected
    or wrongly shaped entry raises WeightsError. Returns (description, {mean, std} from the file).
    """
    p = Path(path)
    state, norm = _split_wrapper(read_state_dict(p))
    if head is None:
        head = find_head(net)[0]
    head_prefix = head + "." if head else ""
    own = net.state_dict()

    def in_head(k: str) -> bool:
        return bool(head_prefix) and k.startswith(head_prefix)

    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    head_skipped = [k for k in missing + wrong if in_head(k)]
    missing = [k for k in missing if not in_head(k)]
    wrong_body = [k for k in wrong if not in_head(k)]
    if missing or unexpected or wrong_body:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
        if wrong_body:
            k = wrong_body[0]
            parts.append(
                f"{len(wrong_body)} with another shape "
                f"({k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
            )
        raise WeightsError(
            f"weights file {p} does not match the model: {'; '.join(parts)}; "
            "check model.name (and input_size for ViTs) or re-save the weights from this architecture"
        )
    load = {k: v for k, v in state.items() if k not in head_skipped}
    try:
        net.load_state_dict(load, strict=False)
    except RuntimeError as err:
        raise WeightsError(f"cannot load weights file {p}: {_short(err)}") from None
    desc = f"file:{p}"
    if head_skipped:
        log.info("weights %s: classifier head %r left at fresh init (%s)", p, head, _names(head_skipped))
        desc += f" (head {head} fresh: the file's head has another shape or is absent)"
    return desc, norm


# ----------------------------------------------------------------------------- factory


def _check_channels(values: list[float] | tuple[float, ...] | None, what: str, in_chans: int) -> list[float] | None:
    if values is None:
        return None
    vals = [float(v) for v in values]
    if len(vals) == 1 and in_chans > 1:
        vals = vals * in_chans
    if len(vals) != in_chans:
        raise ConfigError(
            f"{what} has {len(vals)} values but the model takes {in_chans} channels: give one per channel"
        )
    return vals


def _tv_extra_kwargs(name: str, in_chans: int, input_size: int) -> dict[str, Any]:
    """Extra torchvision constructor kwargs; rejects what torchvision cannot build."""
    if in_chans != 3:
        raise ConfigError(f"torchvision models take 3 input channels, not {in_chans}: use in_chans=3 or a timm: model")
    extra: dict[str, Any] = {}
    m = re.fullmatch(r"vit_[a-z]_(\d+)", name)
    if m:
        patch = int(m.group(1))
        if input_size % patch:
            raise ConfigError(
                f"{name} needs input_size divisible by its patch size {patch}, got {input_size}: "
                f"set model.input_size to e.g. {max(patch, round(input_size / patch) * patch)}"
            )
        extra["image_size"] = input_size
    if name in ("googlenet", "inception_v3"):
        extra["aux_logits"] = False
        extra["init_weights"] = True  # silences torchvision's FutureWarning; the init it used anyway
    return extra


def _pick_norm(
    given: list[float] | None, trained: list[float] | None, default: float, in_chans: int, what: str
) -> list[float]:
    if given is None:
        return list(trained) if trained is not None else [default] * in_chans
    if trained is not None and not torch.allclose(torch.tensor(given), torch.tensor(trained), atol=1e-4):
        log.warning(
            "%s %s overrides the %s the weights were trained with (%s): pass none to keep theirs",
            what,
            [round(v, 4) for v in given],
            what,
            [round(v, 4) for v in trained],
        )
    return list(given)


def _check_forward(net: nn.Module, in_chans: int, input_size: int, num_classes: int, spec: str) -> None:
    """One zero image through the net, so a too small input_size fails here, clearly."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, in_chans, input_size, input_size))
    except Exception as err:
        raise ConfigError(
            f"model {spec!r} does not run on {input_size}x{input_size} inputs ({_short(err)}): "
            "increase model.input_size"
        ) from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"model {spec!r} returns {got}, not (batch, {num_classes}) logits: use a classification model"
        )


def create_model(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    weights: str | Path | None = None,
    pretrained: bool = False,
    mean: list[float] | tuple[float, ...] | None = None,
    std: list[float] | tuple[float, ...] | None = None,
    input_size: int = 32,
) -> tuple[NormalizedClassifier, ModelInfo]:
    """Build ``name`` for ``num_classes`` classes, wrapped in a :class:`NormalizedClassifier`.

    Args:
        name: bare (``vgg16``: torchvision first, then timm — :data:`BARE_NAME_ORDER`) or
            prefixed (``tv:vgg16``, ``timm:vgg16``, ``timm:resnet18.a1_in1k``).
        num_classes: outputs of the (replaced) classifier head.
        in_chans: input channels (torchvision models: 3 only).
        weights: local ``.safetensors``/``.pth``/``.pt``/``.bin`` state dict, for the bare net or
            for a NormalizedClassifier. Takes precedence over ``pretrained``. A head with another
            number of classes is skipped; any other mismatch raises WeightsError.
        pretrained: try the library's pretrained weights; offline this logs a warning and keeps
            random init (``ModelInfo.weights`` says why).
        mean, std: per-channel normalization in [0, 1] pixel units. Precedence: these
            arguments; else ``mean``/``std`` stored in a NormalizedClassifier weight file; else
            the library's values when pretrained weights were really loaded (ImageNet); else
            :data:`DEFAULT_MEAN`/:data:`DEFAULT_STD` (0.5). Passing them overrides the statistics
            a pretrained or saved net was trained with (logged as a warning when they differ).
        input_size: square input side; ViTs are built for it (torchvision: multiple of the patch).

    Returns:
        (model in train mode on the CPU, :class:`ModelInfo`).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ConfigError(f"in_chans must be a positive int, got {in_chans!r}")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ConfigError(f"input_size must be a positive int, got {input_size!r}")
    mean_arg = _check_channels(mean, "mean", in_chans)
    std_arg = _check_channels(std, "std", in_chans)
    source, canonical = resolve_name(name)

    if weights is not None and pretrained:
        log.info("model.weights is set: loading %s instead of the library's pretrained weights", weights)
        pretrained = False

    lib_mean: list[float] | None = None
    lib_std: list[float] | None = None
    desc = "random-init"
    net: nn.Module | None = None
    timm_kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans, "img_size": input_size}
    tv_extra = _tv_extra_kwargs(canonical, in_chans, input_size) if source == "torchvision" else {}

    if pretrained:
        try:
            if source == "torchvision":
                net, lib_mean, lib_std, desc = _tv_pretrained(canonical, num_classes, input_size, tv_extra)
            else:
                net, lib_mean, lib_std, desc = _timm_pretrained(canonical, timm_kwargs)
        except _PretrainedUnavailable as err:
            log.warning(
                "pretrained weights for %s:%s unavailable (%s); continuing from random init. "
                "To start from trained weights offline, give a local file: model.weights=<path.safetensors|.pth> "
                "(CLI --weights), or train the dense baseline first (baseline.epochs > 0)%s",
                source,
                canonical,
                err,
                ""
                if _hub_offline()
                else "; on a machine without network, HF_HUB_OFFLINE=1 skips the download attempts",
            )
            desc = f"random-init (pretrained unavailable: {err})"

    if net is None:
        if source == "torchvision":
            import torchvision.models as tvm

            net = tvm.get_model(canonical, weights=None, num_classes=num_classes, **tv_extra)
        else:
            import timm

            net = _timm_create(timm, canonical, pretrained=False, **timm_kwargs)

    head, _ = find_head(net)
    file_norm: dict[str, torch.Tensor] = {}
    if weights is not None:
        desc, file_norm = load_net_weights(net, weights, head=head)

    # normalization: explicit > stored with the weights > pretrained library > 0.5
    stored = {k: v.flatten().tolist() for k, v in file_norm.items()}
    if any(len(v) != in_chans for v in stored.values()):
        raise WeightsError(
            f"weights file {weights}: stored mean/std do not have {in_chans} channels; re-save the model"
        )
    trained_mean = stored.get("mean", lib_mean)
    trained_std = stored.get("std", lib_std)
    final_mean = _pick_norm(mean_arg, trained_mean, DEFAULT_MEAN[0], in_chans, "mean")
    final_std = _pick_norm(std_arg, trained_std, DEFAULT_STD[0], in_chans, "std")

    _check_forward(net, in_chans, input_size, num_classes, name)
    model = NormalizedClassifier(net, final_mean, final_std)
    info = ModelInfo(
        source=source,
        name=canonical,
        spec=name,
        num_classes=num_classes,
        in_chans=in_chans,
        input_size=input_size,
        mean=[float(v) for v in final_mean],
        std=[float(v) for v in final_std],
        weights=desc,
        head=head,
    )
    log.info(
        "model %s:%s, %d classes, %d parameters, weights: %s",
        source,
        canonical,
        num_classes,
        count_parameters(model),
        desc,
    )
    return model, info

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

from .classifier import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelInfo,
    NormalizedClassifier,
    count_parameters,
)
from .factory import create_model
from .heads import find_head, replace_head
from .names import BARE_NAME_ORDER, PREFIXES, list_models, resolve_name
from .weights import WEIGHT_SUFFIXES, load_net_weights, read_state_dict

__all__ = [
    "BARE_NAME_ORDER",
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PREFIXES",
    "WEIGHT_SUFFIXES",
    "ModelInfo",
    "NormalizedClassifier",
    "count_parameters",
    "create_model",
    "find_head",
    "list_models",
    "load_net_weights",
    "read_state_dict",
    "replace_head",
    "resolve_name",
]

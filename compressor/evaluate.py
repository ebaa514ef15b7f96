"""Robustness evaluation: clean accuracy, accuracy under attack, worst case, sensitivity (eq. 1).

What :func:`evaluate` computes (all accuracies are fractions in [0, 1]):

* ``clean_accuracy``: on every sample of the loader (``n_clean``).
* The attacks run on the first ``max_samples`` samples in loader order (``n_attacked``; use an
  unshuffled loader), one attack call per batch. Batch ``b`` is attacked with seed
  ``seed + b`` (or ``options["seed"] + b``), so two models see the same random draws and a
  dense and a compressed model are compared on equal terms.
* ``clean_accuracy_attacked``: clean accuracy on those attacked samples (the ε = 0 point).
* ``adversarial_accuracy[attack][str(eps)]``: accuracy on the adversarial images (a sample
  counts if the prediction on x' is its label).
* ``worst_case_accuracy[str(eps)]`` for every ε of any attack: share of attacked samples that
  are correct on the clean image *and* on the adversarial image of every attack at every
  ε' <= ε — the robust accuracy against the whole configured suite up to that budget. All ε
  share one unit (``eps_unit``); an ℓ2 attack (``pgd`` with ``norm="l2"``) enters with its
  ℓ2 radius as its ε, so keep ℓ2 attacks out of a suite whose worst case you report.
* ``sensitivity[attack][str(eps)]``: the paper's eq. (1),
  S = ‖f(x') − f(x)‖₂/‖f(x)‖₂ · ‖x‖₂/‖x' − x‖₂ on logits and pixel-space images, per sample,
  averaged over the samples with x' ≠ x (None when there are none).
* ``timing``: seconds for the clean pass and for each attack and ε, and the total (under
  torch.distributed: this process's own seconds). The FGSM family (``fgsm``, ``l1_fgsm``,
  ``l2_fgsm``) takes one gradient per batch at the clean images for all its ε: the first ε's
  seconds include it, the others' are only the step.

Under torch.distributed (``dist`` given, several processes) every process evaluates its shard
of the validation set, as laid out by ``build_data(rank=, world_size=)``: whole global batches
``rank, rank + W, ...`` (:class:`~compressor.data.ShardBatchSampler`). Batch seeds use the
*global* batch index and ``max_samples`` means the first ``max_samples`` images of the global
(one-process) order, so every attack sees the images and random draws one process would; the
counts and sums are then all-reduced, so every process returns the figures of the whole set.

Attack keys are the attack names; a name given twice gets ``#2``, ``#3``... appended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .attacks.suite import BuiltAttack, build_suite
from .errors import ConfigError, DataError
from .recipe import EvaluateSection
from .runtime import DistContext, jsonable, ort_session
from .runtime.batches import split_batch
from .sections import resolve_section

_log = logging.getLogger(__name__)

__all__ = ["EvalResult", "OnnxEvalResult", "evaluate", "evaluate_onnx"]


@dataclass
class EvalResult:
    """Result of :func:`evaluate`; see the module docstring for the exact definitions."""

    clean_accuracy: float
    n_clean: int
    n_attacked: int
    clean_accuracy_attacked: float
    adversarial_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    worst_case_accuracy: dict[str, float] = field(default_factory=dict)
    sensitivity: dict[str, dict[str, float | None]] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    adversarial: dict[tuple[str, float], Tensor] = field(default_factory=dict, repr=False)
    """With ``keep_adversarial``: the adversarial images per (attack key, ε), in loader order
    (CPU); reused to score the exported ONNX model on the very images measured here."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (non-finite numbers become None; no image tensors)."""
        return jsonable({f.name: getattr(self, f.name) for f in fields(self) if f.name != "adversarial"})


@dataclass
class OnnxEvalResult:
    """Result of :func:`evaluate_onnx`.

    ``transfer_accuracy``: accuracy of the ONNX model on adversarial images crafted against
    ``torch_model``; ``torch_adversarial_accuracy``: the torch model's on the same images;
    ``agreement_*``: share of samples where torch and ONNX predict the same class.
    """

    clean_accuracy: float
    n_clean: int
    n_attacked: int = 0
    torch_clean_accuracy: float | None = None
    agreement_clean: float | None = None
    max_abs_logit_diff: float | None = None
    transfer_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    torch_adversarial_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    agreement_adversarial: dict[str, dict[str, float]] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (non-finite numbers become None)."""
        return jsonable(asdict(self))


# ----------------------------------------------------------------------------- shared parts


def _build_attacks(
    model: nn.Module, attacks: Iterable[Any], section: EvaluateSection, std: Sequence[float] | None
) -> tuple[list[BuiltAttack], list[dict[str, Any]]]:
    """Create every (attack, ε) up front so a bad name or option fails before any work."""
    common = {"eps_unit": section.eps_unit, "std": std, "round_8bit": section.round_8bit, "seed": section.seed}
    return build_suite(model, attacks, common)


def check_attacks(attacks: Iterable[Any], section: EvaluateSection | None = None, **options: Any) -> None:
    """Raise ConfigError/UnknownNameError for a bad attack name, option or option value, at once.

    Builds every (attack, ε) on a stand-in model, as evaluation will on the real one, with the
    section's (or the keyword shortcuts') ``eps_unit``, ``round_8bit`` and ``seed``. The attack
    options are checked by the attacks themselves, so that a bad value is named with its range.
    """
    section = resolve_section(EvaluateSection, section, options, source="check_attacks")
    _build_attacks(nn.Identity(), attacks, section, std=(1.0, 1.0, 1.0))


def _settings(section: EvaluateSection, std: Sequence[float] | None, described: list[dict[str, Any]]) -> dict:
    return {
        "eps_unit": section.eps_unit,
        "std": list(std) if std is not None else None,
        "round_8bit": section.round_8bit,
        "seed": section.seed,
        "max_samples": section.max_samples,
        "attacks": described,
    }


def _unpack(batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    x, y = split_batch(batch)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()


def _model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _shard_layout(loader: Any, dist: DistContext | None) -> tuple[list[int], int] | None:
    """(global batch index of each local batch, global batch size) under several processes."""
    if dist is None or not dist.enabled or dist.world_size <= 1:
        return None
    sampler = getattr(loader, "batch_sampler", None)
    if not hasattr(sampler, "global_batches") or not hasattr(sampler, "batch_size"):
        raise ConfigError(
            "evaluate(dist=...) with several processes needs this process's validation loader from "
            "compressor.data.build_data(rank=, world_size=) (batches sharded by ShardBatchSampler)"
        )
    return list(sampler.global_batches), int(sampler.batch_size)


@contextmanager
def _eval_mode(model: nn.Module | None) -> Iterator[None]:
    """``model`` in eval mode for the block; every submodule's own mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()] if model is not None else []
    if model is not None:
        model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eps_key(e: float) -> str:
    return str(float(e))


# ----------------------------------------------------------------------------- evaluate


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    section: EvaluateSection | None = None,
    *,
    std: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    progress: Callable[[int], Any] | None = None,
    dist: DistContext | None = None,
    keep_adversarial: bool = False,
    **options: Any,
) -> EvalResult:
    """Clean and adversarial accuracy, worst case and sensitivity of ``model``.

    Args:
        model: classifier on [0, 1] NCHW images (normalization inside), already on ``device``.
        loader: yields ``(images, labels)``; images in [0, 1]. Keep it unshuffled.
        section: the recipe's ``evaluate`` section (default: its defaults): the attacks, the
            samples attacked (``max_samples``), ``eps_unit``, ``round_8bit`` and the attacks'
            base ``seed`` (batch b uses ``seed + b``). ``options``: keyword shortcuts for its
            keys (``evaluate(model, loader, attacks=[...], max_samples=64)``), validated as
            recipe keys are.
        std: the model's normalization, passed to every attack (see ``compressor.attacks.base``).
        device: where batches go (default: the model's device).
        progress: called with the number of samples of each finished batch.
        dist: a :class:`~compressor.runtime.DistContext`; with several processes, ``loader``
            must be this process's validation loader from ``build_data(rank=, world_size=)``
            and the results are those of the whole set (see the module docstring).
        keep_adversarial: return the adversarial images (``EvalResult.adversarial``; this
            process's samples only).
    """
    section = resolve_section(EvaluateSection, section, options, source="evaluate")
    max_samples = section.max_samples
    shard = _shard_layout(loader, dist)
    dev = _model_device(model, device)
    built, described = _build_attacks(model, section.attacks, section, std)
    pairs = [(b.key, b.eps) for b in built]
    ok = {p: [] for p in pairs}
    sens = {p: [0.0, 0] for p in pairs}
    secs = {p: 0.0 for p in pairs}
    kept: dict[tuple[str, float], list[Tensor]] = {p: [] for p in pairs} if keep_adversarial else {}
    clean_ok: list[Tensor] = []
    n_clean = n_correct = n_attacked = 0
    t_start = time.perf_counter()
    t_clean = 0.0
    with _eval_mode(model):
        for b, batch in enumerate(loader):
            x, y = _unpack(batch, dev)
            # g: the batch's index in the global order, start: its first sample's position there
            g, start = (shard[0][b], shard[0][b] * shard[1]) if shard is not None else (b, n_clean)
            t0 = time.perf_counter()
            with torch.no_grad():
                z = model(x)
            pred = z.argmax(dim=1)
            n_correct += int((pred == y).sum())
            _sync(dev)
            t_clean += time.perf_counter() - t0
            n_clean += len(x)
            take = len(x) if max_samples is None else max(0, min(len(x), max_samples - start))
            if take > 0:
                xa, ya, za = x[:take], y[:take], z[:take]
                clean_ok.append((pred[:take] == ya).cpu())
                x_norm = xa.flatten(1).norm(dim=1)
                z_norm = za.norm(dim=1).clamp_min(1e-12)
                memos: dict[str, dict] = {}  # per attack setting: its gradient at this batch (FGSM family)
                for item in built:
                    p = (item.key, item.eps)
                    item.attack.seed = item.seed + g
                    t0 = time.perf_counter()
                    with item.attack.sharing_clean_gradient(memos.setdefault(item.key, {})):
                        adv = item.attack(xa, ya)
                    _sync(dev)
                    secs[p] += time.perf_counter() - t0
                    with torch.no_grad():
                        za_adv = model(adv)
                    ok[p].append((za_adv.argmax(dim=1) == ya).cpu())
                    if keep_adversarial:
                        kept[p].append(adv.cpu())
                    d = (adv - xa).flatten(1).norm(dim=1)
                    moved = d > 0
                    if moved.any():
                        s = (za_adv - za).norm(dim=1) / z_norm * x_norm / d.clamp_min(1e-30)
                        sens[p][0] += float(s[moved].sum())
                        sens[p][1] += int(moved.sum())
            n_attacked += max(take, 0)
            if progress is not None:
                progress(len(x))

    # Everything below is a ratio of sums; the sums are all-reduced under torch.distributed.
    clean_vec = torch.cat(clean_ok) if clean_ok else torch.zeros(0, dtype=torch.bool)
    ok_vec = {p: torch.cat(v) if v else torch.zeros(0, dtype=torch.bool) for p, v in ok.items()}
    eps_sorted = sorted({e for _, e in pairs})
    worst_count = []
    for e in eps_sorted:
        robust = clean_vec.clone()
        for p, v in ok_vec.items():
            if p[1] <= e:
                robust &= v
        worst_count.append(int(robust.sum()))
    sums = [n_clean, n_correct, n_attacked, int(clean_vec.sum())]
    sums += [int(ok_vec[p].sum()) for p in pairs] + [sens[p][0] for p in pairs] + [sens[p][1] for p in pairs]
    sums += worst_count
    if shard is not None:
        sums = dist.all_reduce_sum(torch.tensor(sums, dtype=torch.float64, device=dev)).cpu().tolist()
    n_clean, n_correct, n_attacked, n_clean_att = (int(round(v)) for v in sums[:4])
    k = len(pairs)
    ok_sum = dict(zip(pairs, sums[4 : 4 + k]))
    sens_sum = dict(zip(pairs, zip(sums[4 + k : 4 + 2 * k], sums[4 + 2 * k : 4 + 3 * k])))
    worst_sum = sums[4 + 3 * k :]
    if n_clean == 0:
        raise DataError("the loader yielded no samples")

    _log.info(
        "evaluated %d samples (%d attacked, %d attack settings) in %.1f s",
        n_clean,
        n_attacked,
        len(built),
        time.perf_counter() - t_start,
    )
    adv_acc: dict[str, dict[str, float]] = {}
    sensitivity: dict[str, dict[str, float | None]] = {}
    attack_secs: dict[str, dict[str, float]] = {}
    nan = float("nan")
    for key, e in pairs:
        adv_acc.setdefault(key, {})[_eps_key(e)] = ok_sum[(key, e)] / n_attacked if n_attacked else nan
        total, count = sens_sum[(key, e)]
        sensitivity.setdefault(key, {})[_eps_key(e)] = total / count if count else None
        attack_secs.setdefault(key, {})[_eps_key(e)] = secs[(key, e)]
    worst = {_eps_key(e): (c / n_attacked if n_attacked else nan) for e, c in zip(eps_sorted, worst_sum)}
    return EvalResult(
        clean_accuracy=n_correct / n_clean,
        n_clean=n_clean,
        n_attacked=n_attacked,
        clean_accuracy_attacked=n_clean_att / n_attacked if n_attacked else nan,
        adversarial_accuracy=adv_acc,
        worst_case_accuracy=worst,
        sensitivity=sensitivity,
        timing={
            "clean_seconds": t_clean,
            "attack_seconds": attack_secs,
            "total_seconds": time.perf_counter() - t_start,
        },
        settings=_settings(section, std, described),
        adversarial={p: torch.cat(v) for p, v in kept.items() if v},
    )


# ----------------------------------------------------------------------------- ONNX


def _onnx_logits(session, x: Tensor) -> Tensor:
    """Run the ONNX model on a batch; handles exports with a fixed batch size by chunking."""
    inp = session.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    arr = x.detach().cpu().numpy().astype(dtype, copy=False)
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    if fixed is None or fixed == len(arr):
        out = session.run(None, {inp.name: arr})[0]
    else:
        parts = []
        for i in range(0, len(arr), fixed):
            chunk = arr[i : i + fixed]
            pad = fixed - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), dtype=dtype)])
            parts.append(session.run(None, {inp.name: chunk})[0][: fixed - pad])
        out = np.concatenate(parts)
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def _precomputed(adversarial: Mapping[tuple[str, float], Tensor], key: tuple[str, float], start: int, n: int) -> Tensor:
    images = adversarial.get(key)
    if images is None or images.shape[0] < start + n:
        have = "none" if images is None else f"{images.shape[0]}"
        raise ConfigError(
            f"evaluate_onnx: the precomputed adversarial images lack {key[0]} eps={key[1]} samples "
            f"{start}..{start + n - 1} (have {have}); pass the EvalResult.adversarial of evaluate() "
            "run with the same loader, attacks and max_samples"
        )
    return images[start : start + n]


def evaluate_onnx(
    onnx_path: str | Path,
    loader: Iterable[Any],
    section: EvaluateSection | None = None,
    *,
    torch_model: nn.Module | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    progress: Callable[[int], Any] | None = None,
    adversarial: Mapping[tuple[str, float], Tensor] | None = None,
    **options: Any,
) -> OnnxEvalResult:
    """Accuracy of the exported ONNX model under onnxruntime (CPU provider).

    With ``torch_model``: also its clean accuracy, the torch/ONNX prediction agreement and the
    largest logit difference, and the attacks of ``section`` (the recipe's ``evaluate``
    section, default its defaults; ``options`` are keyword shortcuts for its keys): adversarial
    images are crafted against ``torch_model`` on the first ``max_samples`` samples (same seeds
    as :func:`evaluate`) and scored by both models — does the attack transfer to the deployed
    artifact, and do the two still agree there? ``adversarial``: the images
    ``evaluate(torch_model, loader, section, keep_adversarial=True)`` made with the same
    settings (``EvalResult.adversarial``); they are scored instead of crafted again. Without
    ``torch_model`` only the clean accuracy is measured (attacks need the model's gradients).
    """
    if options.get("attacks") and torch_model is None:
        raise ConfigError("evaluate_onnx: attacks need torch_model (the examples are crafted against it)")
    section = resolve_section(EvaluateSection, section, options, source="evaluate_onnx")
    max_samples = section.max_samples
    session = ort_session(onnx_path)
    built, described = [], []
    dev = torch.device("cpu")
    if torch_model is not None:
        dev = _model_device(torch_model, device)
        built, described = _build_attacks(torch_model, section.attacks, section, std)
    pairs = [(b.key, b.eps) for b in built]
    onnx_ok = {p: [] for p in pairs}
    torch_ok = {p: [] for p in pairs}
    agree = {p: [] for p in pairs}
    n_clean = n_onnx = n_torch = n_agree = n_attacked = 0
    max_diff = 0.0
    t_start = time.perf_counter()
    with _eval_mode(torch_model):
        for b, batch in enumerate(loader):
            x, y = _unpack(batch, dev)
            z_onnx = _onnx_logits(session, x)
            y_cpu = y.cpu()
            n_onnx += int((z_onnx.argmax(dim=1) == y_cpu).sum())
            n_clean += len(x)
            if torch_model is not None:
                with torch.no_grad():
                    z_torch = torch_model(x).float().cpu()
                n_torch += int((z_torch.argmax(dim=1) == y_cpu).sum())
                n_agree += int((z_torch.argmax(dim=1) == z_onnx.argmax(dim=1)).sum())
                max_diff = max(max_diff, float((z_torch - z_onnx).abs().max()))
            take = len(x) if max_samples is None else min(len(x), max_samples - n_attacked)
            if take > 0 and built:
                xa, ya = x[:take], y[:take]
                memos: dict[str, dict] = {}
                for item in built:
                    p = (item.key, item.eps)
                    if adversarial is not None:
                        adv = _precomputed(adversarial, p, n_attacked, take).to(dev)
                    else:
                        item.attack.seed = item.seed + b
                        with item.attack.sharing_clean_gradient(memos.setdefault(item.key, {})):
                            adv = item.attack(xa, ya)
                    with torch.no_grad():
                        pt = torch_model(adv).argmax(dim=1).cpu()
                    po = _onnx_logits(session, adv).argmax(dim=1)
                    onnx_ok[p].append(po == ya.cpu())
                    torch_ok[p].append(pt == ya.cpu())
                    agree[p].append(po == pt)
                n_attacked += take
            if progress is not None:
                progress(len(x))
    if n_clean == 0:
        raise DataError("the loader yielded no samples")

    def table(d: dict[tuple[str, float], list[Tensor]]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for (key, e), v in d.items():
            out.setdefault(key, {})[_eps_key(e)] = float(torch.cat(v).float().mean())
        return out

    has_torch = torch_model is not None
    return OnnxEvalResult(
        clean_accuracy=n_onnx / n_clean,
        n_clean=n_clean,
        n_attacked=n_attacked if built else 0,
        torch_clean_accuracy=n_torch / n_clean if has_torch else None,
        agreement_clean=n_agree / n_clean if has_torch else None,
        max_abs_logit_diff=max_diff if has_torch else None,
        transfer_accuracy=table(onnx_ok),
        torch_adversarial_accuracy=table(torch_ok),
        agreement_adversarial=table(agree),
        timing={"total_seconds": time.perf_counter() - t_start},
        settings={"onnx_path": str(onnx_path), **_settings(section, std, described)},
    )

"""The recipe schema: one pydantic section per pipeline stage (model → data → baseline →
factorize → train → evaluate → export), every key typed, bounded and documented; its attribute
docstrings become docs/recipes.md."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LatencySettingsLike = Any
"""compressor.latency.LatencySettings (imported where used: latency/ imports torch and onnx)."""

MAX_SEED = 2**32 - 1
"""Largest accepted seed (seeds are combined with epochs and steps into torch generator seeds)."""


class _Section(BaseModel):
    # strict: unknown keys raise, and no type juggling: a YAML true is not the number 1, "0.1" is
    # not a float, 2.5 is not an int (ints are still accepted where a float is expected);
    # NaN and infinities are refused everywhere
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, strict=True, allow_inf_nan=False
    )


class ModelSection(_Section):
    name: str = "vgg16"
    """Model name: bare (see docs: torchvision first, then timm) or prefixed `tv:` / `timm:`."""
    weights: str | None = None
    """Local weight file (.safetensors, or .pth/.pt state dict read with weights_only=True)."""
    pretrained: bool = False
    """Ask the library for its pretrained weights (hub/cache); falls back to random init offline."""
    input_size: int = Field(32, ge=8, le=1024)
    """Square input side in pixels; images are resized to it."""


class DataSection(_Section):
    name: str = "digits"
    """digits (embedded), fashion-mnist, mnist, cifar10, cifar100, imagefolder (case and `_`/`-` do not matter)."""
    root: str | None = None
    """Folder of the data set (fashion-mnist defaults to the Debian package's files)."""
    download: bool = False
    """Let torchvision download mnist/cifar into root (needs network)."""
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of the training images held out for validation (deterministic by seed)."""
    train_subset: int | None = Field(None, ge=1, le=10**9)
    """Use at most this many training images (random, by seed)."""
    val_subset: int | None = Field(None, ge=1, le=10**9)
    """Use at most this many validation images."""
    batch_size: int = Field(32, ge=1, le=65536)
    """Global training batch: under torchrun each of W processes loads batch_size / W (must divide), so one recipe gives the same optimization on any number of processes."""
    eval_batch_size: int = Field(128, ge=1, le=65536)
    """Batch size for evaluation and attacks (per process; under torchrun whole batches are sharded)."""
    num_workers: int = Field(0, ge=0, le=64)
    """DataLoader worker processes."""
    augment: bool = False
    """Random crop + horizontal flip on the training split."""

    @field_validator("name")
    @classmethod
    def _canonical_name(cls, v: str) -> str:
        return v.strip().lower().replace("_", "-")


class OptimSection(_Section):
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    """Optimizer of the cores and dense parameters (bases are never in it)."""
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    """Learning rate."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD momentum."""
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    """Weight decay (decoupled for adamw)."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """Per-step learning-rate schedule."""
    grad_clip: float | None = Field(None, gt=0.0)
    """Clip the global gradient norm to this value (None: no clipping)."""
    val_every: int = Field(1, ge=0, le=10000)
    """Score the validation set after every N-th epoch and after the last (0: never); the history shows null for the others."""
    amp: Literal["auto", "off", "bf16"] = "auto"
    """bf16 autocast: auto = on CUDA only."""
    checkpoint_every: int = Field(1, ge=0, le=10000)
    """Checkpoint every N epochs (0: never) when the run has a checkpoint file; a checkpoint is also written at the end."""

    def loss_terms(self) -> list[tuple[str, dict[str, Any]]]:
        """The terms of the objective besides the cross-entropy, as (registry name, options)
        for :func:`compressor.train.losses.create`: none for plain (dense) training."""
        return []


class BaselineSection(OptimSection):
    lr: float = Field(1e-4, gt=0.0, le=10.0)
    """Learning rate (smaller than RobustDLRT's: the dense weights are only fine-tuned)."""
    epochs: int = Field(0, ge=0, le=10000)
    """Dense fine-tuning epochs before compression (0: take the model as it is)."""


class FactorizeSection(_Section):
    init: Literal["activations", "svd"] = "activations"
    """Initial bases: `activations` = chosen in the metric of the layers' activations on `calibration_batches` training batches (keeps briefly trained, flat-spectrum weights accurate; see compressor/calibration.py); `svd` = SVD / HOSVD of the weights alone."""
    calibration_batches: int = Field(8, ge=1, le=100000)
    """Training batches run through the dense model for `init: activations`."""
    init_rank: int | float | None = 150
    """Initial rank: an int, a float in (0, 1] = that fraction of each layer's full rank, or null = each layer's cap."""
    init_tol: float | None = Field(None, gt=0.0, lt=1.0)
    """If set, initial rank by energy: the smallest r with ‖σ[r:]‖ < init_tol·‖σ‖, at most init_rank (null: r_max); σ² = the activation spectrum for `init: activations`, the weight's squared singular values for `svd`."""
    r_min: int = Field(2, ge=1, le=10**6)
    """Smallest rank truncation may choose."""
    r_max: int = Field(200, ge=1, le=10**6)
    """Largest rank (augmentation stops here). Each layer is further capped at its break-even rank (the largest rank at which it is still smaller and cheaper than dense); a layer that saves nothing even at r_min stays dense."""
    include: list[str] = Field(default_factory=list)
    """Glob patterns on module names to factorize (empty: every eligible layer)."""
    exclude: list[str] = Field(default_factory=list)
    """Glob patterns on module names to keep dense."""
    keep_first_conv: bool = True
    """Keep the first conv dense (the paper's choice)."""
    keep_classifier: bool = True
    """Keep the final classifier dense (the paper's choice)."""

    @field_validator("init_rank")
    @classmethod
    def _check_init_rank(cls, v: int | float | None) -> int | float | None:
        if v is None:
            return v
        if isinstance(v, bool):
            raise ValueError("must be an int rank or a float fraction in (0, 1]")
        if isinstance(v, int) and not 1 <= v <= 10**6:
            raise ValueError("an int rank must be in [1, 1000000]")
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError("a float fraction must be in (0, 1]")
        return v

    @model_validator(mode="after")
    def _check_bounds(self) -> FactorizeSection:
        if self.r_min > self.r_max:
            raise ValueError(f"r_min ({self.r_min}) must be <= r_max ({self.r_max})")
        return self


class AdversarialSection(_Section):
    attack: Literal["none", "fgsm", "pgd"] = "none"
    """Train on adversarial examples crafted against the current model each step: fgsm = one sign step from a random start (FGSM-RS, Wong et al. 2020), pgd = `steps` projected sign steps from a random start (Madry et al. 2018); none = clean training."""
    eps: float = Field(8 / 255, ge=0.0, le=1.0)
    """ℓ∞ budget in pixel units ([0, 1] images)."""
    steps: int = Field(7, ge=1, le=1000)
    """PGD steps (fgsm always takes one)."""
    alpha: float | None = Field(None, gt=0.0, le=1.0)
    """Step size in pixel units (null: 1.25·eps for fgsm, 2.5·eps/steps for pgd)."""


class DistillSection(_Section):
    weight: float = Field(0.0, ge=0.0, le=1.0)
    """Distillation from the dense model: the data loss is (1 − weight)·CE + weight·T²·KL(teacher_T ‖ student_T) on the logits (Hinton et al. 2015); with `adversarial` on, the student's logits on the adversarial examples against the teacher's on the clean images (ARD, RSLAD). 0: off, and no teacher is kept."""
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    """Softmax temperature T of both models' logits (the loss is scaled by T²)."""


class TargetSection(_Section):
    params: float | None = Field(None, gt=0.0, le=1.0)
    """Budget: the compressed model's parameters as a fraction of the dense model's (e.g. 0.05). At most one of params, macs and latency."""
    macs: float | None = Field(None, gt=0.0, le=1.0)
    """Budget: multiply-adds per image at model.input_size as a fraction of the dense model's (e.g. 0.2)."""
    latency: float | None = Field(None, gt=0.0, le=1.0)
    """Budget: the compressed model's onnxruntime CPU latency as a fraction of the dense model's (e.g. 0.2: 5× faster), at `batch`, `threads`, `input_size` and `precision` below, predicted by a latency model of this machine: every factorized layer's export forms timed on a grid of ranks, cached in ~/.cache/compressor/latency ($COMPRESSOR_CACHE_DIR/latency); each layer is exported in its fastest measured form, dense included (see docs/dlrt.md)."""
    batch: int = Field(32, ge=1, le=65536)
    """With `latency`: the batch size the latency is measured at (the export reports batch 1 and 32)."""
    threads: int | None = Field(None, ge=1, le=256)
    """With `latency`: onnxruntime intra-op threads (null: export.latency_threads)."""
    input_size: int | None = Field(None, ge=8, le=1024)
    """With `latency`: the square input side the latency is measured at (null: model.input_size); e.g. 224 to train at 32 px and deploy at 224."""
    precision: Literal["fp32", "int8"] = "fp32"
    """With `latency`: the graph the target applies to: fp32, or int8 (the static QDQ INT8 graph; needs export.int8), both against the dense FP32 model."""
    ramp: float = Field(0.5, gt=0.0, le=1.0)
    """Share of the rank-adaptive truncations over which the budget is reached, from the factorized model's cost (gradually, so that accuracy can follow)."""
    multiple: int = Field(1, ge=1, le=256)
    """With a budget: every rank moves in steps of this many directions and ends on a multiple of it (8: onnxruntime's CPU kernels ran Tucker convs at multiples of 8 faster than at one rank fewer, see BENCHMARKS.md); a layer's minimum rank, and a rank smaller than one step, stay as they are. With `latency`, 1 means 8, the step of the measured grid."""

    @model_validator(mode="after")
    def _one_budget(self) -> TargetSection:
        given = [k for k in ("params", "macs", "latency") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of params, macs and latency, not {' and '.join(given)}")
        if self.latency is None:
            defaults = {"batch": 32, "threads": None, "input_size": None, "precision": "fp32"}
            stray = [k for k, v in defaults.items() if getattr(self, k) != v]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)}: only a latency target is measured at a batch, threads, input size "
                    "and precision; set train.target.latency too, or leave them out"
                )
        return self

    @property
    def kind(self) -> str | None:
        return next((k for k in ("params", "macs", "latency") if getattr(self, k) is not None), None)

    @property
    def fraction(self) -> float | None:
        kind = self.kind
        return getattr(self, kind) if kind is not None else None

    def latency_settings(self, *, in_chans: int, input_size: int, threads: int = 2) -> LatencySettingsLike | None:
        """How the latency target is measured (None without one): ``input_size`` and ``threads``
        stand in for this section's unset ones (:meth:`Recipe.latency_settings` passes the
        model's and the export's)."""
        if self.latency is None:
            return None
        from ..latency import LatencySettings

        return LatencySettings(
            batch=self.batch,
            threads=self.threads or threads,
            input_size=self.input_size or input_size,
            in_chans=in_chans,
            precision=self.precision,
        )


class TrainSection(OptimSection):
    # RobustDLRT's defaults are the reference code's (and recipes/robust.yaml's): AdamW 5e-4,
    # clipped at 1.0, so that compress(model, loader, beta) without a recipe trains as tested
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    """Optimizer of the cores and dense parameters (bases are never in it)."""
    lr: float = Field(5e-4, gt=0.0, le=10.0)
    """Learning rate."""
    grad_clip: float | None = Field(1.0, gt=0.0)
    """Clip the global gradient norm to this value (None: no clipping)."""
    epochs: int = Field(3, ge=0, le=10000)
    """Rank-adaptive RobustDLRT epochs."""
    finetune_epochs: int = Field(0, ge=0, le=10000)
    """Fixed-rank epochs after the rank-adaptive ones (cores only)."""
    beta: float = Field(0.075, ge=0.0, le=100.0)
    """Spectral regularizer strength β (0: plain DLRT)."""
    tau: float = Field(0.1, ge=0.0, lt=1.0)
    """Relative truncation tolerance τ."""
    coefficient_steps: int = Field(10, ge=2, le=100000)
    """Batches per DLRT cycle s*: augment on the first, truncate after the last."""
    bn_batches: int = Field(16, ge=0, le=100000)
    """After training, re-estimate the BatchNorm running statistics over this many training batches (the ranks changed what every layer outputs); 0: keep them as training left them."""
    regularizer: Literal["spectral", "nuclear"] = "spectral"
    """What β weighs: spectral = the paper's R(S), which equalizes each core's spectrum; nuclear = ‖S‖_* (sum of singular values), which drives small singular values to zero."""
    kappa_max: float | None = Field(None, ge=1.0, le=1e8)
    """If set, after every optimizer step and every truncation each core's singular values are raised to at least σ_max/kappa_max (CondLR's hard bound), so every κ ≤ kappa_max; within a DLRT cycle only the directions a layer had before augmenting are floored (see docs/dlrt.md); combines with β."""
    adversarial: AdversarialSection = Field(default_factory=AdversarialSection)
    """Adversarial fine-tuning: the examples each step trains on (with any of the above)."""
    distill: DistillSection = Field(default_factory=DistillSection)
    """Knowledge distillation from the dense model (the teacher), combinable with everything above (see docs/dlrt.md)."""
    target: TargetSection = Field(default_factory=TargetSection)
    """A budget the truncations choose all layers' ranks together for (see docs/dlrt.md); with a budget, tau is not used: the model ends at the budget."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N (the device of the whole run)."""

    def loss_terms(self) -> list[tuple[str, dict[str, Any]]]:
        """``adversarial``, ``beta`` with ``regularizer`` and ``distill`` as loss terms, in the
        order the trainer applies them: the recipe's keys are how users name the terms; the
        registry (:mod:`compressor.train.losses`) is how the trainer sees them."""
        terms: list[tuple[str, dict[str, Any]]] = []
        if self.adversarial.attack != "none":
            terms.append(("adversarial", self.adversarial.model_dump()))
        if self.beta > 0:
            terms.append((self.regularizer, {"weight": self.beta}))
        if self.distill.weight > 0:
            terms.append(("distill", self.distill.model_dump()))
        return terms


class AttackSpec(_Section):
    name: str
    """Attack name (compress list attacks)."""
    eps: list[float] = Field(min_length=1)
    """Perturbation budgets, in evaluate.eps_unit units."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Attack options (steps, alpha, norm, ...)."""

    @field_validator("options")
    @classmethod
    def _check_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        # plain values only, so that the resolved recipe.yaml reads back as the same recipe
        def plain(x: Any) -> bool:
            if isinstance(x, list):
                return all(plain(i) for i in x)
            return x is None or isinstance(x, (str, bool, int)) or (isinstance(x, float) and math.isfinite(x))

        for key, value in v.items():
            if not plain(value):
                raise ValueError(
                    f"option {key!r}: give a number, string, boolean, null or a list of them, "
                    f"not {type(value).__name__}"
                )
        return v

    @field_validator("eps")
    @classmethod
    def _check_eps(cls, v: list[float]) -> list[float]:
        for e in v:
            if not 0.0 <= e <= 1.0:
                raise ValueError(f"eps {e} is outside [0, 1] (pixel units on [0, 1] images)")
        return v


def _default_attacks() -> list[AttackSpec]:
    return [
        AttackSpec(name="l2_fgsm", eps=[0.05, 0.1, 0.3]),
        AttackSpec(name="jitter", eps=[0.035, 0.045]),
        AttackSpec(name="pgd", eps=[8 / 255], options={"steps": 10}),
    ]


class EvaluateSection(_Section):
    attacks: list[AttackSpec] = Field(default_factory=_default_attacks)
    """Attacks to run on the dense and the compressed model (same seeds)."""
    eps_unit: Literal["pixel", "normalized"] = "pixel"
    """pixel: ε on [0,1] images (standard). normalized: ε in normalized units (the paper's code)."""
    round_8bit: bool = False
    """Round adversarial images to 8 bits before scoring (the paper scored saved PNGs)."""
    max_samples: int | None = Field(512, ge=1, le=10**9)
    """Attack at most this many validation images (clean accuracy uses all)."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed of the attacks' randomness (random starts, noise)."""


class ExportSection(_Section):
    safetensors: bool = True
    """Write model.safetensors (exact-size factors + manifest)."""
    onnx: bool = True
    """Write model.onnx (factorized structure kept) with structure and parity checks."""
    opset: int = Field(18, ge=17, le=23)
    """ONNX opset."""
    int8: bool = False
    """Also write a static-QDQ INT8 ONNX model, calibrated on training images (docs/int8.md)."""
    int8_max_drop: float = Field(0.01, ge=0.0, le=1.0)
    """INT8 clean accuracy may fall this far (a fraction: 0.01 is 1 point) below the FP32 ONNX model's on the validation split; beyond it the check tries the INT8 remedies (calibration chosen by validation, the first and last layers in float, the most sensitive layers in float) until it holds."""
    int8_activations: Literal["auto", "uint8", "int8"] = "auto"
    """INT8 activation type: `auto` is what onnxruntime's CPU kernels fuse where the export runs (uint8 on x86-64, int8 on ARM)."""
    latency: bool = True
    """Measure onnxruntime latency of the dense and the compressed model (batch 1 and 32), side by side."""
    latency_threads: int = Field(2, ge=1, le=256)
    """onnxruntime intra-op threads for the latency measurement."""
    latency_repeats: int = Field(30, ge=3, le=100000)
    """Timed runs per model and batch size, after 5 warm-up runs, in blocks of 10 taking turns between the
    models; the report quotes their median."""


class Recipe(_Section):
    run_name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    """Folder name of the run under output_dir: one path component of letters, digits, . _ - (no `/`, no leading `.`), so the run stays inside output_dir."""
    output_dir: str = "exported"
    """Where run folders are written (relative to the working directory; `~` is expanded). Only `<output_dir>/<run_name>/` and its hidden staging folder `.<run_name>.partial/` are written."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed of everything random: split, init, batch order, attacks."""
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    baseline: BaselineSection = Field(default_factory=BaselineSection)
    factorize: FactorizeSection = Field(default_factory=FactorizeSection)
    train: TrainSection = Field(default_factory=TrainSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    export: ExportSection = Field(default_factory=ExportSection)

    @model_validator(mode="after")
    def _latency_target_graph(self) -> Recipe:
        target = self.train.target
        if target.latency is not None and target.precision == "int8" and not (self.export.onnx and self.export.int8):
            raise ValueError(
                "train.target.precision int8 targets the INT8 graph: set export.int8 (and export.onnx) true, "
                "or use precision fp32"
            )
        return self

    def latency_settings(self, in_chans: int = 3) -> LatencySettingsLike | None:
        """How ``train.target.latency`` is measured (None without one), the defaults resolved
        (threads: the export's, input size: the model's), as :class:`compressor.latency.LatencySettings`."""
        return self.train.target.latency_settings(
            in_chans=in_chans, input_size=self.model.input_size, threads=self.export.latency_threads
        )

    def resolved_train(self) -> TrainSection:
        """``train`` with a latency target's threads and input size filled in from the export and
        the model sections (the trainer sees only its own section); unchanged without one."""
        t = self.train.target
        if t.latency is None:
            return self.train
        target = t.model_copy(
            update={
                "threads": t.threads or self.export.latency_threads,
                "input_size": t.input_size or self.model.input_size,
            }
        )
        return self.train.model_copy(update={"target": target})

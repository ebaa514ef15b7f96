"""Distillation from the dense model (issue 31): the ``distill`` loss term.

- the KD loss is T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) on fixed logits, and the data loss
  (1 − w)·CE + w·KD;
- the teacher takes no gradients and stays in eval mode (BatchNorm statistics unchanged), runs
  under the student's autocast, and with adversarial training sees the clean batch;
- KD, β and adversarial training run together; the report lists the terms;
- compress() copies the model as the teacher only when distillation is on;
- under two gloo processes KD gives what one process gives with the same global batch.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import weakref
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import train_config
from test_distributed import GLOBAL_BATCH, _close, _Double, _free_port, _set_epoch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor import api, compress
from compressor.data import build_data
from compressor.errors import ConfigError, UnknownNameError
from compressor.factorize import factorize_
from compressor.layers import low_rank_layers
from compressor.recipe import AdversarialSection, DataSection, DistillSection, TrainSection, recipe_from_dict
from compressor.runtime import DistContext
from compressor.train import Trainer
from compressor.train.losses import TrainingContext, create, list_terms
from compressor.train.losses.distill import kd_loss

ROOT = Path(__file__).resolve().parents[1]


def _net(seed: int = 0, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), *([nn.BatchNorm2d(8)] if bn else []), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4),
    )  # fmt: skip


def _student(dense: nn.Module) -> nn.Module:
    model = copy.deepcopy(dense)
    factorize_(model, init_rank=4, r_min=2, r_max=8, keep_first_conv=False, seed=0)
    assert low_rank_layers(model)
    return model


def _loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)  # unshuffled: step i sees batch i


def _no_epoch(loader, epoch: int) -> None:
    pass


# ----------------------------------------------------------------------------- the formula


def test_kd_loss_is_its_formula_on_fixed_logits() -> None:
    student = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], dtype=torch.float64)
    teacher = torch.tensor([[1.0, 0.0, -1.0], [-0.5, 2.5, 0.5]], dtype=torch.float64)
    for t in (1.0, 2.0, 4.0):
        p_t = torch.softmax(teacher / t, 1)
        p_s = torch.softmax(student / t, 1)
        expected = t * t * float((p_t * (p_t.log() - p_s.log())).sum()) / 2  # Σ over the batch / N
        assert float(kd_loss(student, teacher, t)) == pytest.approx(expected, rel=1e-12)
    assert float(kd_loss(teacher, teacher, 3.0)) == pytest.approx(0.0, abs=1e-12)  # KL(p ‖ p) = 0


def test_data_loss_blends_cross_entropy_and_kd() -> None:
    """(1 − w)·CE + w·T²·KL on the logits, the teacher's taken on the clean batch."""
    teacher = nn.Linear(5, 3).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 1])
    logits = torch.randn(4, 3, dtype=torch.float64)
    ctx = TrainingContext(nn.Linear(5, 3), {}, torch.device("cpu"), teacher=teacher)
    term = create("distill", ctx, weight=0.3, temperature=2.0)
    ce = F.cross_entropy(logits, y)
    with torch.no_grad():
        kd = kd_loss(logits, teacher(x), 2.0)
    assert float(term.data_loss(ce, logits, x, y)) == pytest.approx(float(0.7 * ce + 0.3 * kd), rel=1e-12)
    assert term.data_weight == pytest.approx(0.7)
    assert term.describe() == {"term": "distill", "weight": 0.3, "temperature": 2.0}


# ----------------------------------------------------------------------------- the recipe


def test_distill_section_is_off_by_default_and_bounded() -> None:
    assert TrainSection().distill == DistillSection(weight=0.0, temperature=4.0)
    assert [name for name, _ in TrainSection().loss_terms()] == ["spectral"]
    for key, value in [("weight", 1.5), ("weight", -0.1), ("temperature", 0.0), ("temperature", 1e3)]:
        with pytest.raises(ConfigError, match=f"train.distill.{key}"):
            recipe_from_dict({"train": {"distill": {key: value}}})
    train = TrainSection(beta=0.1, regularizer="nuclear", adversarial=AdversarialSection(attack="fgsm"),
                         distill=DistillSection(weight=0.5, temperature=2.0))  # fmt: skip
    assert [name for name, _ in train.loss_terms()] == ["adversarial", "nuclear", "distill"]
    assert set(list_terms()) >= {"adversarial", "distill", "nuclear", "spectral"}


def test_unknown_term_lists_the_valid_names() -> None:
    ctx = TrainingContext(nn.Linear(2, 2), {}, torch.device("cpu"))
    with pytest.raises(UnknownNameError, match="spectral"):
        create("spectrl", ctx, weight=1.0)


def test_distillation_without_a_teacher_is_refused() -> None:
    cfg = train_config(1, distill=DistillSection(weight=0.5))
    with pytest.raises(ConfigError, match="teacher"):
        Trainer(_student(_net()), _loader(), cfg, set_epoch=_no_epoch)


def test_no_teacher_is_kept_when_distillation_is_off() -> None:
    teacher = _net(1)
    alive = weakref.ref(teacher)
    trainer = Trainer(_student(_net()), _loader(), train_config(1), set_epoch=_no_epoch, teacher=teacher)
    del teacher
    gc.collect()
    assert alive() is None  # the trainer holds no reference: no memory spent on it
    assert trainer.terms == [] and trainer.loss_summary() == [{"term": "cross_entropy", "weight": 1}]


# ----------------------------------------------------------------------------- the teacher in training


def test_teacher_takes_no_gradients_and_keeps_its_statistics() -> None:
    teacher = _net(1)
    teacher.train()  # the trainer must put it in eval mode itself
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes = []
    teacher.register_forward_pre_hook(lambda m, inp: modes.append(m.training))
    cfg = train_config(1, lr=1e-2, coefficient_steps=2, distill=DistillSection(weight=0.5, temperature=2.0))
    history = Trainer(_student(_net()), _loader(), cfg, set_epoch=_no_epoch, teacher=teacher).fit()
    assert modes == [False] * len(_loader())  # one eval-mode forward per step
    assert all(p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert any("running_mean" in k for k in after)
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # weights and BatchNorm statistics (and its batch count)
    assert math.isfinite(history.epochs[-1]["train_loss"])


def test_teacher_runs_under_the_students_autocast() -> None:
    """amp: bf16 on the CPU autocasts the student; the teacher's forward runs under it too."""
    teacher = _net(1, bn=False)
    dtypes = []
    teacher[-1].register_forward_hook(lambda m, inp, out: dtypes.append(out.dtype))
    cfg = train_config(1, lr=1e-2, coefficient_steps=2, amp="bf16", distill=DistillSection(weight=0.5))
    Trainer(_student(_net(bn=False)), _loader(16), cfg, set_epoch=_no_epoch, teacher=teacher).fit()
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_kd_beta_and_adversarial_run_together_teacher_on_clean_images() -> None:
    eps = 0.05
    teacher, student = _net(1), _student(_net())
    seen_teacher, seen_student = [], []
    teacher.register_forward_pre_hook(lambda m, inp: seen_teacher.append(inp[0].detach().clone()))
    first = next(iter(low_rank_layers(student).values()))
    first.register_forward_pre_hook(lambda m, inp: seen_student.append(inp[0].detach().clone()) if m.training else None)
    cfg = train_config(
        2,
        lr=1e-2,
        coefficient_steps=2,
        beta=0.1,
        adversarial=AdversarialSection(attack="pgd", eps=eps, steps=2),
        distill=DistillSection(weight=0.5, temperature=4.0),
    )
    trainer = Trainer(student, _loader(), cfg, set_epoch=_no_epoch, teacher=teacher)
    history = trainer.fit()
    assert [t["term"] for t in history.loss_terms] == ["cross_entropy", "adversarial", "spectral", "distill"]
    assert history.loss_terms[0]["weight"] == pytest.approx(0.5) and history.loss_terms[2]["weight"] == 0.1
    assert all(math.isfinite(e["train_loss"]) and e["regularizer"] > 0 for e in history.epochs)
    assert history.nonfinite_steps == 0
    clean = [x for x, _ in _loader()] * 2
    assert len(seen_teacher) == len(clean)  # one teacher forward per step, none inside the attack
    for x_t, x in zip(seen_teacher, clean):
        assert torch.equal(x_t, x)  # the teacher's target: its soft label of the clean batch
    # the student trained on the adversarial images (the first factorized layer's input is
    # after the first conv: compare the run against one without the attack instead)
    plain = _student(_net())
    plain_seen = []
    head = next(iter(low_rank_layers(plain).values()))
    head.register_forward_pre_hook(lambda m, inp: plain_seen.append(inp[0].detach().clone()) if m.training else None)
    cfg_clean = train_config(1, lr=1e-2, coefficient_steps=2, beta=0.1, distill=DistillSection(weight=0.5))
    Trainer(plain, _loader(), cfg_clean, set_epoch=_no_epoch, teacher=_net(1)).fit()
    assert not torch.equal(seen_student[0], plain_seen[0])  # same weights at step 0, other inputs


# ----------------------------------------------------------------------------- compress()


def test_compress_copies_the_model_as_teacher_only_when_distilling(monkeypatch) -> None:
    made = []
    original = api._frozen_copy

    def spy(model):
        made.append(original(model))
        return made[-1]

    monkeypatch.setattr(api, "_frozen_copy", spy)
    small = {"train.epochs": 1, "train.bn_batches": 0, "factorize.calibration_batches": 1}
    model = _net()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    off = compress(model, _loader(), overrides=small, device="cpu")
    assert made == [] and [t["term"] for t in off.report["loss_terms"]] == ["cross_entropy", "spectral"]
    on = compress(model, _loader(), overrides={**small, "train.distill.weight": 0.4}, device="cpu")
    assert len(made) == 1
    teacher = made[0]
    assert not low_rank_layers(teacher) and not teacher.training  # the dense model, frozen
    assert all(not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, dense[k]), k
    terms = {t["term"]: t for t in on.report["loss_terms"]}
    assert terms["distill"] == {"term": "distill", "weight": 0.4, "temperature": 4.0}
    assert terms["cross_entropy"]["weight"] == pytest.approx(0.6)


# ----------------------------------------------------------------------------- 2 processes = 1


def _dist_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10),
    ).double()  # fmt: skip


def _train_kd(rank: int, world: int) -> dict:
    data = build_data(
        DataSection(name="digits", train_subset=96, val_subset=16, batch_size=GLOBAL_BATCH, eval_batch_size=16),
        input_size=8,
        seed=0,
        rank=rank,
        world_size=world,
    )
    dense = _dist_net()
    teacher = copy.deepcopy(dense)
    with torch.no_grad():  # a teacher that differs from the student's start
        for p in teacher.parameters():
            p.mul_(1.5)
    model = dense
    factorize_(model, init_rank=4, r_min=2, r_max=8, seed=0)
    cfg = train_config(2, lr=3e-2, schedule="constant", beta=0.05, tau=0.3, coefficient_steps=3, amp="off",
                       distill=DistillSection(weight=0.5, temperature=3.0))  # fmt: skip
    torch.manual_seed(1)
    trainer = Trainer(
        model, _Double(data.train_loader), cfg, seed=0, dist=DistContext(), set_epoch=_set_epoch, teacher=teacher
    )
    history = trainer.fit()
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "ranks": {n: l.ranks for n, l in low_rank_layers(model).items()},
        "history": [
            {k: e[k] for k in ("train_loss", "train_accuracy", "regularizer", "layers")} for e in history.epochs
        ],
        "terms": [t["term"] for t in history.loss_terms],
    }


def _kd_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        torch.save(_train_kd(rank, world), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_distill_like_one(tmp_path) -> None:
    one = _train_kd(0, 1)
    mp.set_forkserver_preload(["torch", "compressor.data", "compressor.train", __name__])
    mp.start_processes(
        _kd_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="forkserver"
    )
    assert one["terms"] == ["cross_entropy", "spectral", "distill"]
    assert any(rk != (4,) and rk != (4, 4) for rk in one["ranks"].values()), "ranks never changed"
    for r in range(2):
        two = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert two["ranks"] == one["ranks"], r
        _close(two["history"], one["history"], 1e-9)
        _close(two["state"], one["state"], 1e-9)  # float64: weights equal to rounding


# ----------------------------------------------------------------------------- the pipeline


class _Stop(Exception):
    pass


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_pipeline_distills_from_the_dense_baseline(tmp_path, monkeypatch, weight) -> None:
    """The compress command's teacher is the model after the dense baseline stage, before it is
    factorized; with distillation off there is none."""
    from compressor import pipeline
    from compressor.recipe import load_recipe

    seen = {}

    def capture(model, *args, teacher=None, **kwargs):
        seen["model"], seen["dense"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        seen["teacher"] = teacher
        raise _Stop

    monkeypatch.setattr(pipeline, "factorize_and_train", capture)
    recipe = load_recipe(
        ROOT / "recipes" / "tiny.yaml",
        [
            f"output_dir={tmp_path}",
            f"train.distill.weight={weight}",
            "evaluate.attacks=[{name: fgsm, eps: [0.03]}]",
            "evaluate.max_samples=4",
            "data.train_subset=32",
            "data.val_subset=16",
        ],
    )
    with pytest.raises(_Stop):
        pipeline.run(recipe)
    if weight == 0:
        assert seen["teacher"] is None
        return
    teacher = seen["teacher"]
    assert not low_rank_layers(teacher)
    state = teacher.state_dict()
    assert state.keys() == seen["dense"].keys()
    for k, v in seen["dense"].items():
        assert torch.equal(state[k], v), k  # the dense model after the baseline epoch
    assert teacher is not seen["model"]  # a copy: the model itself is factorized next

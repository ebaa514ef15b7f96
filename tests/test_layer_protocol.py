"""The layer protocol: every registered factorized layer type describes itself (costs, export
forms, serialization, budget offer, latency key), and code outside ``compressor/layers`` asks
the layer instead of testing its type, so that a new type registered here (a toy low-rank
Conv1d) is factorized, counted, budgeted, saved, reloaded and exported with no edit elsewhere."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import compressor
from compressor.export import export_onnx, load_into, parity_check, plan_export, save_compressed
from compressor.factorize import break_even_rank, factorize_
from compressor.functional import top_singular
from compressor.layers import (
    LatencyKey,
    LowRankLayer,
    layer_kinds,
    layer_type,
    layer_type_for,
    low_rank_layers,
    register_layer_type,
    unregister_layer_type,
)
from compressor.runtime import compression_stats, count_macs, macs_by_layer
from compressor.runtime.costs import area2d, conv_costs, linear_costs
from compressor.train.budget import Budget

# A dense example of every registered kind: (module, a forward input). A new registered type
# must add its own here, or test_every_registered_type_has_an_example fails.
EXAMPLES = {
    "linear": (lambda: nn.Linear(12, 10), lambda g: torch.randn(3, 5, 12, generator=g, dtype=torch.float64)),
    "conv": (
        lambda: nn.Conv2d(6, 8, (3, 3), stride=2, padding=1),
        lambda g: torch.randn(2, 6, 9, 9, generator=g, dtype=torch.float64),
    ),
}
RANKS = {"linear": (4,), "conv": (5, 3)}


def _layer(kind: str, ranks: tuple[int, ...] | None = None) -> LowRankLayer:
    """A layer of ``kind`` built through the registry, with random factors (float64)."""
    dense = EXAMPLES[kind][0]()
    layer = layer_type(kind).empty_like(dense, ranks or RANKS[kind], 1, 100).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def _op_macs(module: nn.Module, x: Tensor) -> int:
    """Multiply-adds of the plain Conv/Linear ops ``module`` runs on ``x``, per leading index."""
    total = 0

    def hook(m: nn.Module, inputs: tuple, out: Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Linear):
            total += out.numel() * m.in_features
        else:
            total += out.numel() * (m.in_channels // m.groups) * m.weight[0, 0].numel()

    ops = (nn.Linear, nn.Conv1d, nn.Conv2d)
    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, ops)]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return total // x.shape[0]


def _header(state: dict[str, Tensor]) -> dict[str, dict[str, list[int]]]:
    return {k: {"shape": list(v.shape)} for k, v in state.items()}


# ----------------------------------------------------------------------------- every registered type


def test_every_registered_type_has_an_example() -> None:
    assert set(layer_kinds()) >= {"linear", "conv"}
    assert set(layer_kinds()) <= EXAMPLES.keys(), "add an example of the new layer type to EXAMPLES"


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_the_registry_maps_kind_and_dense_module_to_the_type(kind: str) -> None:
    cls = layer_type(kind)
    dense = EXAMPLES[kind][0]()
    assert cls.kind == kind and isinstance(dense, cls.dense_type)
    assert layer_type_for(dense) is cls
    assert layer_type_for(_layer(kind)) is None  # factorized already
    assert layer_type_for(nn.ReLU()) is None
    with pytest.raises(KeyError, match="unknown layer kind"):
        layer_type("no-such-kind")


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_costs_are_the_ops_each_form_runs_and_forms_compute_the_layer(kind: str) -> None:
    layer = _layer(kind).eval()
    x = EXAMPLES[kind][1](torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = layer(x)
    out_px, in_px = layer.sample_counts(x, y)
    costs = layer.costs(out_px=out_px, in_px=in_px)
    assert set(costs) == set(layer.forms) and layer.trained_form in layer.forms and "dense" in layer.forms
    assert set(layer.export_forms) <= set(layer.forms)
    assert costs[layer.trained_form][0] == layer.num_parameters() == layer.costs()[layer.trained_form][0]
    assert costs["dense"][0] == layer.dense_num_parameters()
    for form in layer.forms:
        plain = layer.export_module(form).eval()
        assert all(p.dtype == torch.float32 for p in plain.parameters())
        assert sum(p.numel() for p in plain.parameters()) == costs[form][0], form
        assert _op_macs(plain, x.float()) == costs[form][1], form
        with torch.no_grad():
            got = plain(x.float()).double()
        assert (got - y).abs().max() <= 1e-5 * y.abs().max(), form
    with pytest.raises(ValueError, match="unknown form"):
        layer.export_module("no-such-form")


def test_costs_are_the_runtime_formulas() -> None:
    lin, conv = _layer("linear", (3,)), _layer("conv", (4, 2))
    assert lin.costs(out_px=7) == linear_costs(12, 10, 3, bias=True, tokens=7)
    assert lin.costs((5,)) == linear_costs(12, 10, 5, bias=True)
    assert conv.costs(out_px=25, in_px=81) == conv_costs(6, 8, 9, 4, 2, bias=True, out_px=25, in_px=81)
    assert conv.costs() == conv_costs(6, 8, area2d(3), 4, 2, stride_area=area2d(2), bias=True)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_serialization_round_trip_through_the_registry(kind: str) -> None:
    layer = _layer(kind).eval()
    x = EXAMPLES[kind][1](torch.Generator().manual_seed(2))
    entry = json.loads(json.dumps(layer.manifest_entry()))
    assert entry["kind"] == kind and len(entry["ranks"]) == layer.n_modes == len(layer.ranks)
    rebuilt = layer_type(entry["kind"]).empty_like(EXAMPLES[kind][0](), entry["ranks"], entry["r_min"], entry["r_max"])
    rebuilt = rebuilt.double()
    rebuilt.load_state_dict(layer.state_dict())
    rebuilt.apply_manifest_entry_(entry)
    assert rebuilt.manifest_entry() == entry
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), layer(x))
    header = _header(layer.state_dict())
    assert layer_type(kind).stored_factor_error("m", layer.ranks, {f"m.{k}": v for k, v in header.items()}) is None
    wrong = tuple(r + 1 for r in layer.ranks)
    error = layer_type(kind).stored_factor_error("m", wrong, {f"m.{k}": v for k, v in header.items()})
    assert error is not None and "as the manifest says" in error
    missing = {f"m.{k}": v for k, v in header.items() if k != next(iter(layer.factor_ranks(layer.ranks)))}
    assert "has no tensor" in layer_type(kind).stored_factor_error("m", layer.ranks, missing)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_budget_offer_is_consistent_with_the_costs(kind: str) -> None:
    layer = _layer(kind)
    spectra = layer.spectra()
    assert len(spectra) == len(layer.rank_caps) == len(layer.ranks) == layer.n_modes
    for s, r, cap in zip(spectra, layer.ranks, layer.rank_caps, strict=True):
        assert s.dtype == torch.float32 and len(s) >= r and r <= cap
        assert bool((s[:-1] >= s[1:]).all()) and bool((s >= 0).all())
    assert layer.cost_of_ranks("params")(layer.ranks) == layer.num_parameters()
    smaller = tuple(max(1, r - 1) for r in layer.ranks)
    macs = layer.cost_of_ranks("macs", out_px=6, in_px=20)
    assert macs(smaller) == layer.costs(smaller, out_px=6, in_px=20)[layer.trained_form][1]
    assert macs(smaller) < macs(layer.ranks)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_latency_key_names_the_shape_not_the_ranks(kind: str) -> None:
    a, b = _layer(kind), _layer(kind, tuple(1 for _ in RANKS[kind]))
    shape = EXAMPLES[kind][1](torch.Generator().manual_seed(3)).shape
    key = a.latency_key(shape)
    assert isinstance(key, LatencyKey) and key.kind == kind
    assert key == b.latency_key(shape) and hash(key) == hash(b.latency_key(shape))
    assert key == a.latency_key((7, *shape[1:])), "the batch is not part of the key"
    bigger = (*shape[:-2], shape[-2] * 2, shape[-1])
    assert a.latency_key(bigger) != key
    json.dumps(key.to_dict())


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_break_even_rank_is_where_the_type_stops_saving(kind: str) -> None:
    dense, cls = EXAMPLES[kind][0](), layer_type(kind)
    r = break_even_rank(dense, 1000)
    assert 0 < r <= cls.full_rank(dense)
    assert cls.saves(dense, r) and (r == cls.full_rank(dense) or not cls.saves(dense, r + 1))


# ----------------------------------------------------------------------------- code outside layers/


_SOURCE = Path(compressor.__file__).parent


def _python_files_outside_layers() -> list[Path]:
    return [p for p in _SOURCE.rglob("*.py") if p.relative_to(_SOURCE).parts[0] != "layers"]


def test_no_code_outside_layers_tests_a_layer_type() -> None:
    classes = {"LowRankLayer", "LowRankLinear", "TuckerConv2d", "ProjectedMultiheadAttention"}
    found = []
    for path in _python_files_outside_layers():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                names = {getattr(n, "id", None) or getattr(n, "attr", None) for n in ast.walk(node.args[1])}
                if names & classes:
                    found.append(f"{path.relative_to(_SOURCE)}:{node.lineno}")
            if isinstance(node, ast.Constant) and node.value in layer_kinds():
                found.append(f"{path.relative_to(_SOURCE)}:{node.lineno} (kind string {node.value!r})")
    assert not found, found


def test_runtime_imports_no_layers() -> None:
    for path in (_SOURCE / "runtime").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                assert "layers" not in module.split("."), f"{path.name} imports {module}"
            elif isinstance(node, ast.Import):
                assert not any("layers" in a.name.split(".") for a in node.names), path.name


# ----------------------------------------------------------------------------- a new type, no edit elsewhere


class LowRankConv1d(LowRankLayer):
    """A toy type: a 1-D conv's kernel unfolded to W (C_out × C_in·k) = U S Vᵀ, run as a k-wide
    conv C_in→r (Vᵀ), a 1×1 r→r (S) and a 1×1 r→C_out (U, bias). Training (augment_/truncate_)
    is left out: the test exercises what the rest of the package asks of a layer type."""

    kind = "toy_conv1d"
    dense_type = nn.Conv1d
    forms = ("unmerged", "dense")
    trained_form = "unmerged"
    export_forms = ("unmerged", "dense")

    def __init__(self, dense: nn.Conv1d, rank: int, *, r_min: int = 1, r_max: int | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = dense.in_channels, dense.out_channels
        self.k, self.stride, self.padding = dense.kernel_size[0], dense.stride, dense.padding
        full = min(self.out_channels, self.in_channels * self.k)
        self.r_max = min(r_max or full, full)
        self.r_min = min(r_min, self.r_max)
        kw = {"dtype": dense.weight.dtype}
        self.U = nn.Parameter(torch.zeros(self.out_channels, rank, **kw), requires_grad=False)
        self.S = nn.Parameter(torch.zeros(rank, rank, **kw))
        self.V = nn.Parameter(torch.zeros(self.in_channels * self.k, rank, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_channels, **kw)) if dense.bias is not None else None
        self.register_buffer("rank_state", torch.tensor([rank], dtype=torch.long))

    @classmethod
    def from_dense(cls, dense, rank=None, *, tol=None, r_min=1, r_max=None, seed=0) -> LowRankConv1d:
        w = dense.weight.detach().reshape(dense.out_channels, -1)
        r = min(rank or r_max or min(w.shape), r_max or min(w.shape))
        layer = cls(dense, r, r_min=r_min, r_max=r_max)
        u, s, v = top_singular(w, r, seed=seed)
        with torch.no_grad():
            for p, value in ((layer.U, u), (layer.S, torch.diag(s)), (layer.V, v)):
                p.copy_(value)
            if dense.bias is not None:
                layer.bias.copy_(dense.bias)
        return layer

    def _kernel(self, v: Tensor) -> Tensor:
        return v.mT.reshape(-1, self.in_channels, self.k)

    def forward(self, x: Tensor) -> Tensor:
        h = F.conv1d(x, self._kernel(self.V), None, self.stride, self.padding)
        return F.conv1d(F.conv1d(h, self.S[:, :, None]), self.U[:, :, None], self.bias)

    @property
    def core(self) -> nn.Parameter:
        return self.S

    def bases(self) -> list[nn.Parameter]:
        return [self.U, self.V]

    def core_matrix(self) -> Tensor:
        return self.S

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.S.shape[0],)

    def set_ranks_(self, ranks: tuple[int, ...]) -> None:
        (r,) = ranks
        for p, shape in ((self.U, (self.out_channels, r)), (self.S, (r, r)), (self.V, (self.V.shape[0], r))):
            p.data = p.new_zeros(shape)
        self.rank_state.copy_(torch.tensor([r]))

    def dense_num_parameters(self) -> int:
        return self.out_channels * self.in_channels * self.k + (self.out_channels if self.bias is not None else 0)

    def costs(self, ranks=None, *, out_px=1, in_px=None):
        (r,) = self.ranks if ranks is None else ranks
        c = linear_costs(self.in_channels * self.k, self.out_channels, r, bias=self.bias is not None, tokens=out_px)
        return {"unmerged": c["unmerged"], "dense": c["dense"]}

    def sample_counts(self, inputs: Tensor, output: Tensor) -> tuple[int, int]:
        return output.shape[-1], inputs.shape[-1]

    @torch.no_grad()
    def export_module(self, form: str) -> nn.Module:
        def conv(w: Tensor, bias: Tensor | None, **kw) -> nn.Conv1d:
            m = nn.Conv1d(w.shape[1], w.shape[0], w.shape[2], bias=bias is not None, **kw)
            m.weight.copy_(w)
            if bias is not None:
                m.bias.copy_(bias)
            return m

        f32, spatial = torch.float32, {"stride": self.stride, "padding": self.padding}
        u, s, v = (t.detach().double() for t in (self.U, self.S, self.V))
        bias = self.bias.detach().float() if self.bias is not None else None
        if form == "dense":
            return conv(self._kernel(v @ s.mT @ u.mT).to(f32), bias, **spatial)
        if form == "unmerged":
            return nn.Sequential(
                conv(self._kernel(v).to(f32), None, **spatial), conv(s[:, :, None].to(f32), None),
                conv(u[:, :, None].to(f32), bias),
            )  # fmt: skip
        raise ValueError(f"unknown form {form!r}")

    @classmethod
    def empty_like(cls, dense, ranks, r_min, r_max) -> LowRankConv1d:
        return cls(dense, int(ranks[0]), r_min=r_min, r_max=r_max)

    @classmethod
    def factor_ranks(cls, ranks):
        return {"S": (0, ranks[0]), "U": (1, ranks[0]), "V": (1, ranks[0])}

    @classmethod
    def full_rank(cls, dense) -> int:
        return min(dense.out_channels, dense.in_channels * dense.kernel_size[0])

    @classmethod
    def saves(cls, dense, r) -> bool:
        c = linear_costs(dense.in_channels * dense.kernel_size[0], dense.out_channels, r)
        return c["unmerged"][0] < c["dense"][0]

    def latency_key(self, input_shape) -> LatencyKey:
        return LatencyKey(self.kind, (("channels", (self.in_channels, self.out_channels)), ("length", input_shape[-1])))


class _Sequence(nn.Module):
    """An image model with a 1-D conv over the flattened pixels (the toy type's candidate)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.seq = nn.Conv1d(8, 32, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.seq(F.relu(self.stem(x)).flatten(2)))
        return self.head(h.mean(-1))


@pytest.fixture
def toy_type():
    register_layer_type(LowRankConv1d)
    try:
        yield LowRankConv1d
    finally:
        unregister_layer_type(LowRankConv1d.kind)


def test_a_registered_toy_type_needs_no_edit_elsewhere(toy_type, tmp_path) -> None:
    torch.manual_seed(0)
    model = _Sequence().eval()
    dense_macs = macs_by_layer(model, 8)
    report = factorize_(model, init="svd", init_rank=6, r_max=16)
    decision = next(d for d in report.layers if d.name == "seq")
    assert decision.factorized and decision.kind == toy_type.kind, decision
    layer = low_rank_layers(model)["seq"]
    assert isinstance(layer, toy_type) and layer.ranks == (6,)

    # the cost model asks the layer (64 positions of the flattened 8×8 image)
    macs = macs_by_layer(model, 8)
    assert macs["seq"] == layer.costs(out_px=64)["unmerged"][1]
    assert macs_by_layer(model, 8, dense_equivalent=True)["seq"] == layer.costs(out_px=64)["dense"][1]
    assert {k: v for k, v in macs.items() if k != "seq"} == {k: v for k, v in dense_macs.items() if k != "seq"}
    assert count_macs(model, 8) == sum(macs.values())
    stats = compression_stats(model)
    assert stats.params_dense - stats.params == layer.dense_num_parameters() - layer.num_parameters() > 0

    # a budget allocates its rank from its spectrum and cost
    budget = Budget(model, "params", 0.9, input_size=8)
    assert set(budget.caps()) == {"seq"}

    # saved and reloaded through the registry, exactly
    x = torch.rand(2, 3, 8, 8)
    path = tmp_path / "toy.safetensors"
    manifest = save_compressed(model, path)
    assert manifest["layers"]["seq"]["kind"] == toy_type.kind
    loaded, _ = load_into(path, model=_Sequence())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    # exported in a form the plan chooses among the type's own, with parity
    assert plan_export(model, "none")["seq"].form == "unmerged"
    info = export_onnx(model, tmp_path / "toy.onnx", input_size=8, simplify=False)
    assert info.plan["seq"] in toy_type.export_forms and info.structure["matches"], info.structure
    assert parity_check(tmp_path / "toy.onnx", model)["passed"]

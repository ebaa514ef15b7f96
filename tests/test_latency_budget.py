"""A latency target (train.target.latency): the allocation meets it on given per-layer tables and
keeps a layer dense where dense is faster; the tables interpolate exactly at grid points and
stay between them; the cache is used only under its own key; the recipe refuses what cannot
be measured. Nothing here times anything: tables and timers are injected."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import compressor.latency.model as latency_model_module
import compressor.latency.settings as latency_settings
from compressor.errors import ConfigError
from compressor.export.forms import plan_export
from compressor.factorize import factorize_
from compressor.functional import truncation_rank
from compressor.latency import (
    Calibration,
    FormTable,
    LatencyCache,
    LatencyModel,
    LatencySettings,
    LayerTable,
    build_latency_model,
    form_ops,
    network_in_forms,
    rank_grid,
    set_export_forms,
)
from compressor.latency.graphs import form_graph
from compressor.latency.table import lower_envelope
from compressor.layers import low_rank_layers
from compressor.recipe import load_recipe
from compressor.stages import budget_preview_lines
from compressor.train.budget import Budget, LayerOffer, allocate_ranks

# ----------------------------------------------------------------------------- a small network


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 48, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(48, 48, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(48, 40),
        nn.ReLU(),
        nn.Linear(40, 10),
    )
    factorize_(net, init="svd", init_rank=None, r_min=1, r_max=64, keep_first_conv=True, keep_classifier=True)
    return net


def _tucker_table(caps: tuple[int, int], per_rank: float, dense: float) -> LayerTable:
    """tucker3 costs per_rank·(r_out + r_in) ms on the grid; dense a constant."""
    axes = (rank_grid(caps[0], coarse=True), rank_grid(caps[1], coarse=True))
    values = [[per_rank * (a + b) for b in axes[1]] for a in axes[0]]
    return LayerTable({"tucker3": FormTable((0, 1), axes, values), "dense": FormTable((), (), dense)})


def _linear_table(cap: int, per_rank: float, dense: float) -> LayerTable:
    axis = rank_grid(cap)
    return LayerTable(
        {"merged": FormTable((0,), (axis,), [per_rank * r for r in axis]), "dense": FormTable((), (), dense)}
    )


def _fake_latency(net: nn.Module, tables: dict[str, LayerTable], rest: float) -> LatencyModel:
    """A latency model on given tables, its calibration chosen so that the network takes
    ``rest`` + the sum of its layers' tables."""
    layers = low_rank_layers(net)
    forms = {n: tuple(t.forms) for n, t in tables.items()}
    small = {n: tuple(min(8, c) for c in layers[n].rank_caps) for n in tables}
    versions = {
        "dense": {n: ("dense", tuple(layers[n].ranks)) for n in tables},
        "smallest": {n: (tables[n].fastest(small[n], forms[n])[0], small[n]) for n in tables},
    }
    networks = {
        label: rest + sum(tables[n].predict(f, r) for n, (f, r) in version.items())
        for label, version in versions.items()
    }
    return LatencyModel(LatencySettings(), tables, forms, Calibration(networks), versions)


# ----------------------------------------------------------------------------- allocation


def test_allocation_meets_a_latency_target_on_given_tables():
    net = _model()
    layers = low_rank_layers(net)
    assert set(layers) == {"2", "4", "8"}
    tables = {
        "2": _tucker_table(layers["2"].rank_caps, 0.02, 5.0),
        "4": _tucker_table(layers["4"].rank_caps, 0.05, 8.0),
        "8": _linear_table(layers["8"].rank_caps[0], 0.03, 2.0),
    }
    fake = _fake_latency(net, tables, rest=1.0)
    assert fake.network_ms(10.0) == pytest.approx(11.0) and fake.tables_budget(11.0) == pytest.approx(10.0)
    full = {n: tuple(r // 8 * 8 for r in layer.ranks) for n, layer in layers.items()}  # where the allocation starts
    start = fake.network_ms(sum(fake.layer_ms(n, r)[1] for n, r in full.items()))
    for share in (0.8, 0.6, 0.4):
        fraction = share * start / 16.0
        budget = Budget(net, "latency", fraction, input_size=8, latency_model=fake)
        assert budget.dense == pytest.approx(16.0) and budget.multiple == 8  # 1 means the grid's step
        ranks = budget.preview()
        reached = budget.cost(ranks)
        assert reached <= fraction * 16.0 + 1e-9
        # one step of 8 directions back anywhere would not fit: the target is met, not undershot
        back = [
            budget.layer_cost(n, tuple(min(f, r + 8) if i == m else r for i, (r, f) in enumerate(zip(rk, full[n]))))
            - budget.layer_cost(n, rk)
            for n, rk in ranks.items()
            for m in range(len(rk))
        ]
        assert reached + max(back) > fraction * 16.0


def test_a_latency_budget_ends_with_no_direction_tau_drops_while_macs_offer_every_one():
    # at a loose target, nearly flat tables keep every nonzero direction, those carrying no energy
    # included (ill-conditioned cores); τ bounds a latency budget's ranks at the last truncation
    net = _model()
    layers = low_rank_layers(net)
    tables = {
        "2": _tucker_table(layers["2"].rank_caps, 1e-6, 5.0),
        "4": _tucker_table(layers["4"].rank_caps, 1e-6, 8.0),
        "8": _linear_table(layers["8"].rank_caps[0], 1e-6, 2.0),
    }
    fake, tau = _fake_latency(net, tables, rest=1.0), 0.3
    tau_ranks = {
        n: [truncation_rank(s, tau, layer.r_min, c) for s, c in zip(layer.spectra(), layer.rank_caps)]
        for n, layer in layers.items()
    }
    budget = Budget(net, "latency", 0.99, input_size=8, latency_model=fake, tau=tau)
    last = budget.caps(last=True)
    assert all(r <= t for n, rk in last.items() for r, t in zip(rk, tau_ranks[n]))
    during = budget.caps()  # before the last truncation every direction is on offer (it may grow back)
    assert any(r > t for n, rk in during.items() for r, t in zip(rk, tau_ranks[n]))
    macs = Budget(net, "macs", 0.99, input_size=8, tau=tau)  # τ never bounds a MAC budget
    assert macs.caps(last=True) == Budget(net, "macs", 0.99, input_size=8).caps(last=True)


def test_a_layer_whose_dense_form_is_faster_stays_dense_and_is_exported_dense():
    net = _model()
    layers = low_rank_layers(net)
    tables = {
        "2": _tucker_table(layers["2"].rank_caps, 0.02, 5.0),
        "4": _tucker_table(layers["4"].rank_caps, 1.0, 0.5),  # dense always faster
        "8": _linear_table(layers["8"].rank_caps[0], 0.03, 2.0),
    }
    fake = _fake_latency(net, tables, rest=1.0)
    budget = Budget(net, "latency", 0.8, input_size=8, latency_model=fake)
    ranks = budget.preview()
    assert ranks["4"] == tuple(layers["4"].ranks)  # no rank is worth dropping: the time would not change
    for n, r in ranks.items():
        layers[n].set_ranks_(r)
    forms = set_export_forms(net, fake)
    assert forms["4"] == "dense" and forms["2"] == "tucker3"
    assert plan_export(net)["4"].form == "dense"
    assert plan_export(net)["2"].form == "tucker3"


def test_a_flat_cost_is_jumped_over_instead_of_blocking_the_layer():
    """A cost flat over the top ranks (dense fastest there) is priced as the jump to the first
    rank that saves time, so that layer gives up directions before another one loses nearly all."""
    flat = lambda r: 10.0 if r[0] > 64 else 0.05 * r[0]  # noqa: E731  (dense until rank 64)
    decaying = torch.tensor([0.97**i for i in range(64)], dtype=torch.float64)
    offers = {
        "flat": LayerOffer([torch.ones(128, dtype=torch.float64)], (128,), (8,), flat),
        "linear": LayerOffer([decaying], (64,), (8,), lambda r: 0.2 * r[0]),
    }
    ranks = allocate_ranks(offers, budget=8.0, multiple=8)
    assert flat(ranks["flat"]) + 0.2 * ranks["linear"][0] <= 8.0
    assert ranks["flat"][0] <= 64 and ranks["linear"][0] > 8


def test_the_calibration_curve_passes_through_every_version_and_never_decreases():
    from compressor.latency.model import _along, _curve

    curve = _curve([(50.0, 400.0), (5.0, 60.0), (20.0, 90.0)])
    for x, y in ((50.0, 400.0), (5.0, 60.0), (20.0, 90.0)):
        assert _along(curve, x) == pytest.approx(y)
    assert _along(curve, 12.5) == pytest.approx(75.0) and _along(curve, 100.0) > 400.0
    noisy = _curve([(5.0, 60.0), (20.0, 50.0), (50.0, 400.0)])  # a bigger version timed faster: pooled
    ys = [y for _, y in noisy]
    assert ys == sorted(ys) and _along(noisy, 50.0) == pytest.approx(400.0)
    assert _along(_curve([(10.0, 30.0)]), 5.0) == pytest.approx(15.0)  # one version: through the origin


# ----------------------------------------------------------------------------- tables


def test_interpolation_is_exact_at_grid_points_and_between_neighbours():
    axes = ((8, 16, 32, 57), (8, 16, 32))
    f = lambda a, b: 1.0 + 0.3 * a + 0.1 * b + 0.01 * a * b  # noqa: E731  (bilinear: reproduced exactly)
    table = FormTable((0, 1), axes, [[f(a, b) for b in axes[1]] for a in axes[0]])
    for a in axes[0]:
        for b in axes[1]:
            assert table.predict((a, b)) == pytest.approx(f(a, b))
    assert table.predict((20, 12)) == pytest.approx(f(20, 12))
    noisy = FormTable((0,), ((8, 16, 24, 32),), [3.0, 1.0, 7.0, 5.0])
    for r in range(8, 33):
        lo, hi = (r - 1) // 8 * 8 if r % 8 else r, -(-r // 8) * 8
        around = [noisy.predict((max(8, lo),)), noisy.predict((min(32, hi),))]
        assert min(around) - 1e-12 <= noisy.predict((r,)) <= max(around) + 1e-12
    assert noisy.predict((2,)) == 3.0 and noisy.predict((40,)) == 5.0  # clamped at the edges
    envelope = lower_envelope(noisy.values)
    assert envelope == [1.0, 1.0, 5.0, 5.0]
    assert all(x <= y for x, y in zip(envelope, envelope[1:]))


def test_rank_grid_holds_the_cap_and_multiples_of_8():
    for cap in (5, 57, 64, 200, 512):
        for coarse in (False, True):
            grid = rank_grid(cap, coarse=coarse)
            assert grid[-1] == cap and list(grid) == sorted(set(grid))
            assert all(r % 8 == 0 for r in grid[:-1])
    assert rank_grid(64) == (8, 16, 24, 32, 40, 48, 56, 64)


def test_a_form_graph_is_valid_onnx_for_convs_and_linears():
    net = _model()
    layers = low_rank_layers(net)
    for name, shape in (("4", (2, 8, 6, 6)), ("8", (2, 48))):
        for form in layers[name].export_forms:
            form_graph([tuple(op) for op in form_ops(layers[name], form)], shape, check=True)


# ----------------------------------------------------------------------------- the cache


class _CountingTimer:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graphs, threads):
        self.graphs += len(graphs)
        return [float(p.stat().st_size % 97 + 1) for p, _ in graphs]


@pytest.fixture
def no_network_export(monkeypatch):
    """The calibration exports two whole networks; here it only counts."""
    calls = []

    def fake(model, versions, settings, timer):
        calls.append(settings)
        return Calibration({label: 10.0 / (i + 1) for i, label in enumerate(versions)})

    monkeypatch.setattr(latency_model_module, "calibrate", fake)
    return calls


def test_the_cache_is_reused_under_its_key_and_rebuilt_under_another(tmp_path, monkeypatch, no_network_export):
    net = _model()
    cache = LatencyCache(tmp_path)
    settings = LatencySettings(batch=2, threads=1, input_size=8)

    def build(s: LatencySettings = settings) -> _CountingTimer:
        timer = _CountingTimer()
        built = build_latency_model(net, s, cache=cache, timer=timer)
        assert built.measured_graphs == timer.graphs + (3 if timer.graphs else 0)
        return timer

    assert build().graphs > 0 and len(no_network_export) == 1
    assert build().graphs == 0 and len(no_network_export) == 1  # the same key: nothing measured
    assert build(LatencySettings(batch=2, threads=2, input_size=8)).graphs > 0  # other threads
    assert build(LatencySettings(batch=4, threads=1, input_size=8)).graphs > 0  # other batch
    monkeypatch.setattr(latency_settings, "onnxruntime_version", lambda: "0.0.0-other")
    assert build().graphs > 0  # other onnxruntime
    monkeypatch.setattr(latency_settings, "cpu_model", lambda: "Another CPU")
    assert build().graphs > 0  # other CPU
    assert build().graphs == 0


def test_an_entry_stored_for_another_key_is_not_used(tmp_path, no_network_export):
    net = _model()
    cache = LatencyCache(tmp_path)
    settings = LatencySettings(batch=2, threads=1, input_size=8)
    build_latency_model(net, settings, cache=cache, timer=_CountingTimer())
    for path in tmp_path.glob("*.json"):  # every file now claims to hold other threads' figures
        doc = json.loads(path.read_text())
        doc["key"]["threads"] = 7
        path.write_text(json.dumps(doc))
    timer = _CountingTimer()
    build_latency_model(net, settings, cache=cache, timer=timer)
    assert timer.graphs > 0


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path))
    assert LatencyCache().folder == tmp_path / "latency"


# ----------------------------------------------------------------------------- recipe and dry run


def test_recipe_latency_target_and_its_settings():
    r = load_recipe(None, ["train.target.latency=0.2", "export.latency_threads=3", "model.input_size=40"])
    assert r.train.target.kind == "latency" and r.train.target.fraction == 0.2
    s = r.latency_settings(in_chans=1)
    assert (s.batch, s.threads, s.input_size, s.in_chans, s.precision) == (32, 3, 40, 1, "fp32")
    resolved = r.resolved_train().target
    assert (resolved.threads, resolved.input_size) == (3, 40)
    assert load_recipe(None, []).resolved_train() is not None and load_recipe(None, []).latency_settings() is None
    r = load_recipe(None, ["train.target.latency=0.1", "train.target.batch=1", "train.target.input_size=224"])
    assert (r.latency_settings().batch, r.latency_settings().input_size) == (1, 224)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["train.target.latency=0.2", "train.target.macs=0.2"], "not macs and latency"),
        (["train.target.batch=1"], "set train.target.latency too"),
        (["train.target.latency=0"], "greater than 0"),
        (["train.target.latency=1.5"], "less than or equal to 1"),
        (["train.target.latency=0.2", "train.target.precision=fp16"], "fp32"),
        (["train.target.latency=0.2", "train.target.precision=int8", "export.int8=false"], "export.int8"),
    ],
)
def test_recipe_refuses_what_a_latency_target_cannot_measure(overrides, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_recipe(None, overrides)


@pytest.mark.parametrize("kind", ["params", "macs", "latency"])
def test_dry_run_with_a_budget_says_what_tau_does(kind):
    preview = {
        "kind": kind,
        "fraction": 0.2,
        "dense": 100.0,
        "target": 20.0,
        "initial": 60.0,
        "reached": 19.0,
        "multiple": 8,
        "layers": {"conv": {"initial": [32, 32], "ranks": [16, 8], "cost": 5.0, "form": "tucker3"}},
        "latency": {"settings": LatencySettings().to_dict()},
    }
    text = "\n".join(budget_preview_lines(preview))
    said = "τ (train.tau) only bounds them at the last truncation" if kind == "latency" else "τ (train.tau) is not used"
    assert said in text and "16,8" in text
    assert "RobustDLRT then adapts them (tolerance train.tau)" not in text
    assert ("tucker3" in text) == (kind == "latency")


def test_network_in_forms_writes_each_layer_in_its_form_at_its_ranks():
    net = _model()
    choice = {"4": ("fold_in", (16, 8)), "8": ("merged", (8,))}
    plain = network_in_forms(net, choice)
    assert set(low_rank_layers(plain)) == {"2"}  # the layer not chosen stays as it is
    assert [tuple(m.weight.shape) for m in plain[4]] == [(16, 48, 3, 3), (48, 16, 1, 1)]
    assert [tuple(m.weight.shape) for m in plain[8]] == [(8, 48), (40, 8)]
    assert plain(torch.rand(2, 3, 8, 8)).shape == (2, 10)


def test_an_int8_form_graph_is_quantized_to_qdq():
    from compressor.latency.quantized import quantize_graph

    net = _model()
    ops = [tuple(op) for op in form_ops(low_rank_layers(net)["8"], "merged")]
    proto = quantize_graph(form_graph(ops, (4, 48)), (4, 48))
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)


@pytest.mark.parametrize("target", ["params", "macs"])
def test_dry_run_preview_allocates_at_the_target(target):
    from compressor.stages import budget_preview

    net = _model()
    recipe = load_recipe(None, [f"train.target.{target}=0.5", "model.input_size=8"])
    preview = budget_preview(net, recipe, in_chans=3)
    assert preview["reached"] <= preview["target"] <= preview["initial"]
    assert all(r <= i for d in preview["layers"].values() for r, i in zip(d["ranks"], d["initial"]))


def test_check_budget_refuses_an_unreachable_latency_and_reports_what_its_build_timed(monkeypatch):
    """The pipeline's check before anything is written: a latency target below the floor (every
    layer at its smallest rank, plus what is not factorized) is refused; a reachable one passes
    and returns how many graphs its build timed, which the report counts as this run's."""
    import compressor.latency as latency_pkg
    from compressor.errors import UnreachableTargetError
    from compressor.stages import check_budget

    torch.manual_seed(0)  # _model's layers, not factorized
    dense = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 48, 3, padding=1), nn.ReLU(),
        nn.Conv2d(48, 48, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 10),
    )  # fmt: skip

    def fake_build(model, settings):  # per_rank 0.01 ms per rank and mode, 5 ms the layers not factorized
        layers = low_rank_layers(model)
        tables = {n: _tucker_table(tuple(l.rank_caps), 0.01, 2.0) for n, l in layers.items() if len(l.rank_caps) == 2}
        tables |= {n: _linear_table(l.rank_caps[0], 0.01, 1.0) for n, l in layers.items() if len(l.rank_caps) == 1}
        built = _fake_latency(model, tables, rest=5.0)
        built.measured_graphs, built.seconds = 42, 1.5
        return built

    monkeypatch.setattr(latency_pkg, "build_latency_model", fake_build)
    fixed = ["model.input_size=8", "factorize.r_min=1", "factorize.init_rank=null"]
    assert check_budget(dense, load_recipe(None, fixed), 3) is None  # no target: nothing to check
    assert check_budget(dense, load_recipe(None, [*fixed, "train.target.latency=0.9"]), 3) == {
        "measured_graphs": 42,
        "seconds": 1.5,
    }
    with pytest.raises(UnreachableTargetError, match="out of reach") as err:
        check_budget(dense, load_recipe(None, [*fixed, "train.target.latency=0.3"]), 3)
    assert 0.3 < err.value.floor < 1
    assert low_rank_layers(dense) == {}  # the check factorized a copy

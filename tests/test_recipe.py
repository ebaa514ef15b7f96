"""Recipes: any document is either a valid Recipe or one clean ConfigError, never another
exception; ``--set`` overrides parse as documented; the resolved recipe round-trips through YAML;
docs/recipes.md is generated from the schema and up to date."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from compressor.errors import ConfigError
from compressor.recipe import (
    Recipe,
    _SafeDumper,
    apply_overrides,
    load_recipe,
    load_recipe_dict,
    parse_override,
    recipe_differences,
    recipe_from_dict,
    recipe_to_yaml,
    reference_markdown,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
BASE = Recipe().model_dump(mode="json")  # every key, at its default

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a nested document (mapping keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


BASE_PATHS = _paths(BASE)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1.5, max_value=1.5),
    st.text(max_size=12),
    st.sampled_from(
        [
            "vgg16",
            "cpu",
            "cuda",
            "auto",
            "adam",
            "cosine",
            "pgd",
            "pixel",
            "1e-3",
            "yes",
            "~",
            "../x",
            "run",
            "digits",
            "0.1",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner, max_size=3)
    ),
    max_leaves=6,
)
keys = st.one_of(st.sampled_from(sorted({str(p[-1]) for p in BASE_PATHS})), st.text(max_size=8))


def _set(doc: Any, path: tuple, value: Any) -> None:
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


@st.composite
def mutated_documents(draw) -> Any:
    """A valid recipe (the defaults or a shipped one) with a few random edits: replaced values,
    deleted keys, added (unknown) keys, whole sections swapped for junk."""
    doc = copy.deepcopy(draw(st.sampled_from([BASE] + [load_recipe_dict(p) for p in RECIPES])))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(doc)
        action = draw(st.sampled_from(["replace", "delete", "add", "root"]))
        if action == "root" or not paths:
            if draw(st.booleans()):
                return draw(values)
            doc = {draw(keys): draw(values)} if draw(st.booleans()) else doc
            continue
        path = draw(st.sampled_from(paths))
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        if action == "replace":
            _set(doc, path, draw(values))
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
    return doc


def _assert_clean(err: ConfigError, source: str = "recipe") -> None:
    text = str(err)
    assert text and "\n" not in text and "Traceback" not in text
    assert text.startswith(source)


@SETTINGS
@given(mutated_documents())
def test_any_document_is_a_recipe_or_a_clean_error(doc: Any) -> None:
    try:
        recipe = recipe_from_dict(doc)
    except ConfigError as err:
        _assert_clean(err)
        return
    # accepted: every value has its declared type, and the result survives the YAML round trip
    assert isinstance(recipe, Recipe)
    assert recipe.factorize.r_min <= recipe.factorize.r_max
    assert 0.0 <= recipe.train.tau < 1.0 and recipe.train.beta >= 0.0
    assert all(math.isfinite(e) and 0.0 <= e <= 1.0 for a in recipe.evaluate.attacks for e in a.eps)
    assert recipe_from_dict(yaml.safe_load(recipe_to_yaml(recipe))) == recipe


@SETTINGS
@given(st.text(max_size=200))
def test_any_yaml_text_is_a_recipe_or_a_clean_error(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.getbasetemp() / "random.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)


@SETTINGS
@given(mutated_documents(), st.lists(st.tuples(st.lists(keys, min_size=1, max_size=3), values), max_size=3))
def test_overrides_on_any_document_give_a_recipe_or_a_clean_error(doc: Any, overrides) -> None:
    assume(isinstance(doc, dict))
    texts = [f"{'.'.join(k)}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in overrides]
    try:
        recipe_from_dict(apply_overrides(doc, texts))
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)


@SETTINGS
@given(st.lists(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True), min_size=1, max_size=4), values)
def test_set_parses_key_path_and_yaml_value(path: list[str], value: Any) -> None:
    # written by the recipe dumper, which quotes the strings our loader reads as numbers ('0E0')
    text = yaml.dump(value, Dumper=_SafeDumper, default_flow_style=True, width=10**6).strip()
    if text.endswith("\n..."):
        text = text[:-4].strip()
    key, parsed = parse_override(f"{'.'.join(path)}={text}")
    assert key == path
    same = yaml.safe_dump(parsed, sort_keys=True) == yaml.safe_dump(value, sort_keys=True)  # NaN-proof equality
    assert same or (parsed == "" and value in ("", None))


def test_set_values_are_read_as_yaml() -> None:
    assert parse_override("train.beta=0.1") == (["train", "beta"], 0.1)
    assert parse_override("model.pretrained=true") == (["model", "pretrained"], True)
    assert parse_override("factorize.include=[a, 'b*']") == (["factorize", "include"], ["a", "b*"])
    assert parse_override("run_name=a=b") == (["run_name"], "a=b")  # the first '=' splits
    assert parse_override(" data.root = /x y ") == (["data", "root"], "/x y")
    assert parse_override("model.weights=") == (["model", "weights"], "")
    assert parse_override("run_name=1E3") == (["run_name"], 1000.0)  # YAML 1.2 floats, unlike PyYAML's 1.1
    assert parse_override("run_name='1E3'") == (["run_name"], "1E3")
    recipe = load_recipe(None, ["train.beta=0.2", "factorize.r_max=64", "evaluate.attacks=[{name: pgd, eps: [0.01]}]"])
    assert recipe.train.beta == 0.2 and recipe.factorize.r_max == 64 and recipe.evaluate.attacks[0].name == "pgd"
    assert load_recipe(None, {"train.tau": 0.05}).train.tau == 0.05


def test_default_training_is_the_main_recipes() -> None:
    """compress(model, loader, beta) without a recipe trains with robust.yaml's optimizer settings."""
    default, robust = load_recipe(None).train, load_recipe(ROOT / "recipes" / "robust.yaml").train
    keys = ("optimizer", "lr", "grad_clip", "schedule", "tau", "coefficient_steps", "beta")
    assert {k: getattr(default, k) for k in keys} == {k: getattr(robust, k) for k in keys}


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-3", 0.001),
        ("5E-4", 0.0005),
        ("-2.5e+1", -25.0),
        (".5e1", 5.0),
        ("1.0e-3", 0.001),
        ("1e", "1e"),
        ("e3", "e3"),
        ("0x1f", 31),
    ],
)
def test_exponent_floats_read_as_numbers(text: str, value, tmp_path) -> None:
    """PyYAML (YAML 1.1) reads 1e-3 as a string; recipes read it as the number everyone means."""
    assert parse_override(f"train.lr={text}")[1] == value
    assert type(parse_override(f"train.lr={text}")[1]) is type(value)
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 1e-3\n  beta: 7.5e-2\n")
    recipe = load_recipe(path, ["baseline.lr=2e-4"])
    assert (recipe.train.lr, recipe.train.beta, recipe.baseline.lr) == (0.001, 0.075, 0.0002)


@pytest.mark.parametrize(
    "text, match",
    [
        ("train.beta", "expected key=value"),
        ("=1", "empty key"),
        ("train..beta=1", "empty key"),
        ("train.=1", "empty key"),
        ("train.beta=[0.1", "not valid YAML"),
        ("train.beta={a", "not valid YAML"),
    ],
)
def test_malformed_set_is_a_clean_error(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_override(text)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.beta=0.1", "train.beta.x=1"], "'beta' is not a section"),
        (["train.betta=0.1"], "'train.betta': unknown key"),
        (["train.epochs=true"], "'train.epochs': Input should be a valid integer (got True)"),
        (["factorize.init_rank=2.0"], "'factorize.init_rank'"),
        (["evaluate.attacks.0=1"], "'evaluate.attacks'"),
        (["seed=4294967296"], "'seed'"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(None, overrides)
    assert key in str(info.value)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_round_trip(path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(path)
    dumped = tmp_path / "recipe.yaml"
    dumped.write_text(recipe_to_yaml(recipe))
    again = load_recipe(dumped)
    assert again == recipe
    assert recipe_to_yaml(again) == recipe_to_yaml(recipe)  # the dump is a fixed point
    assert recipe_differences(recipe.model_dump(mode="json"), again.model_dump(mode="json")) == []


@settings(SETTINGS, max_examples=40)
@given(mutated_documents(), mutated_documents())
def test_recipe_differences_name_exactly_the_changed_keys(a: Any, b: Any) -> None:
    assume(isinstance(a, dict) and isinstance(b, dict))
    diff = recipe_differences(a, b)
    assert diff == recipe_differences(a, b) and set(diff) == set(recipe_differences(b, a))
    if not diff:
        assert yaml.safe_dump(a, sort_keys=True) == yaml.safe_dump(b, sort_keys=True)


def test_recipe_differences_examples() -> None:
    a = Recipe().model_dump(mode="json")
    b = copy.deepcopy(a)
    b["train"]["beta"] = 0.5
    b["seed"] = 1
    b["evaluate"]["attacks"] = []
    assert recipe_differences(a, b) == ["seed", "train.beta", "evaluate.attacks"]
    assert recipe_differences(a, a) == []
    assert recipe_differences({"x": 1}, {"x": 1.0}) == ["x"]  # an int rank is not a float fraction
    assert recipe_differences({"run_name": None}, {}) == ["run_name"]  # absent means the default, not null


def test_docs_recipes_md_is_up_to_date() -> None:
    """Regenerate with: python -m compressor.recipe > docs/recipes.md"""
    assert (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8") == reference_markdown()


def test_every_key_is_documented() -> None:
    doc = reference_markdown()
    for path in _paths(BASE):
        if all(isinstance(p, str) for p in path) and not isinstance(_get(BASE, path), dict):
            assert f"`{'.'.join(path)}`" in doc, path


def _get(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc

"""Every numeric attack option has a range, checked when the attack is built.

Absurd values (``steps=10**9``, negative, infinite or NaN step sizes, ...) must be refused
with a one-line ConfigError that names the option, the value and the range, so that a recipe
is refused before any work (``compressor.evaluate.check_attacks`` builds the attacks on a
stand-in model); defaults and typical values must be accepted.
"""

from __future__ import annotations

import inspect
import math

import pytest
from torch import nn

from compressor.attacks import Attack, attack_options, create_attack, list_attacks
from compressor.attacks.base import MAX_SEED, MAX_STEPS
from compressor.errors import ConfigError
from compressor.evaluate import check_attacks

INF, NAN = float("inf"), float("nan")
STEPS = {"ok": [1, 3, 20, MAX_STEPS], "bad": [0, -1, MAX_STEPS + 1, 10**9, 2.5, True, INF, "10", None]}
LINF_ALPHA = {"ok": [0.001, 2 / 255, 0.5, 1.0], "bad": [0, 0.0, -0.01, 1.5, 1e9, INF, -INF, NAN, True, "0.1"]}

# attack -> option -> accepted and refused values; "*" holds the options every attack shares
TABLE: dict[str, dict[str, dict[str, list]]] = {
    "*": {
        "seed": {"ok": [0, 1, 12345, MAX_SEED], "bad": [-1, MAX_SEED + 1, 10**30, 1.5, True, "3", None]},
        "std": {
            "ok": [(0.5,), (0.229, 0.224, 0.225), [1.0, 1.0, 1.0]],
            "bad": [(), (0.0,), (-0.2,), (INF,), (NAN,), (0.2, -1.0, 0.2)],
        },
    },
    "apgd": {
        "steps": STEPS,
        "rho": {"ok": [0.01, 0.75, 1.0], "bad": [0, -0.5, 1.01, 1e9, INF, NAN, True]},
        "momentum": {"ok": [0.1, 0.75, 1.0], "bad": [0, -0.5, 1.01, 1e9, INF, NAN, True]},
    },
    "fgsm": {},
    "jitter": {
        "steps": STEPS,
        "alpha": {"ok": [None, *LINF_ALPHA["ok"]], "bad": LINF_ALPHA["bad"]},
        "scale": {"ok": [0.5, 10, 10.0, 100], "bad": [0, -1, 100.5, 1e9, INF, NAN, True]},
        "sigma": {"ok": [0, 0.0, 0.1, 1.0], "bad": [-0.1, 1.5, 1e9, INF, NAN, True]},
    },
    "l1_fgsm": {
        "alpha": {"ok": [None, *LINF_ALPHA["ok"]], "bad": LINF_ALPHA["bad"]},
        "data_std": {
            "ok": [None, (0.5, 1.0, 2.0), [0.247, 0.243, 0.261], (0.001,), (10.0,)],
            "bad": [(), (0.0,), (-0.5,), (1e-30,), (58.4, 57.1, 57.4), (1e9,), (INF,), (NAN,), 0.5, "0.5"],
        },
    },
    "l2_fgsm": {
        "steps": STEPS,
        "alpha": {"ok": [None, *LINF_ALPHA["ok"]], "bad": LINF_ALPHA["bad"]},
    },
    "mixup": {
        "steps": STEPS,
        "alpha": {"ok": LINF_ALPHA["ok"], "bad": [*LINF_ALPHA["bad"], None]},
        "beta": {"ok": [0, 1e-3, 1.0, 1000], "bad": [-1e-3, 1000.5, 1e9, INF, NAN, True, None]},
        "decay": {"ok": [0, 0.5, 1.0], "bad": [-0.1, 1.1, 1e9, INF, NAN, True, None]},
        "scale_exponents": {
            "ok": [(0, 1, 2, 3, 4), [1, 2, 3, 4, 5], [0], list(range(9))],
            "bad": [[], [0] * 10, [-1], [9], [10**9], [0.5], [True], "01", 3, None],
        },
        "lam_beta": {"ok": [None, 1e-3, 1.0, 1000], "bad": [0, -1, 1000.5, 1e9, INF, NAN, True]},
    },
    "pgd": {
        "steps": STEPS,
        "alpha": {"ok": [None, *LINF_ALPHA["ok"]], "bad": LINF_ALPHA["bad"]},
    },
}


def _cases(kind: str) -> list:
    out = []
    for name in list_attacks():
        for option, values in {**TABLE["*"], **TABLE.get(name, {})}.items():
            out += [pytest.param(name, option, v, id=f"{name}-{option}-{v!r}") for v in values[kind]]
    return out


def _is_numeric(annotation: str) -> bool:
    return any(word in annotation for word in ("int", "float")) and "bool" not in annotation


def test_every_numeric_option_has_a_row():
    """A new numeric option must come with its bounds (and a row here)."""
    assert set(list_attacks()) <= set(TABLE), "add the new attack to TABLE"
    for name in list_attacks():
        rows = {**TABLE["*"], **TABLE[name]}
        for klass in type(create_attack(name, nn.Identity())).__mro__:
            if not issubclass(klass, Attack) or "__init__" not in klass.__dict__:
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name in ("self", "model", "eps") or p.kind is p.VAR_KEYWORD:
                    continue
                assert p.name in attack_options(name)
                if _is_numeric(str(p.annotation)):
                    assert p.name in rows, f"{name}: numeric option {p.name!r} has no row in TABLE"


@pytest.mark.parametrize("name", list_attacks())
def test_defaults_accepted(name):
    create_attack(name, nn.Identity())
    check_attacks([{"name": name, "eps": [0.0, 8 / 255, 1.0]}])


@pytest.mark.parametrize("name, option, value", _cases("ok"))
def test_typical_values_accepted(name, option, value):
    create_attack(name, nn.Identity(), eps=0.1, **{option: value})


@pytest.mark.parametrize("name, option, value", _cases("bad"))
def test_absurd_values_refused(name, option, value):
    with pytest.raises(ConfigError) as err:
        create_attack(name, nn.Identity(), eps=0.1, **{option: value})
    msg = str(err.value)
    assert "\n" not in msg and option in msg, msg
    if isinstance(value, (int, float)) and not isinstance(value, bool) and option != "std":
        assert repr(value) in msg, msg
        assert "[" in msg or "(" in msg, msg  # the allowed range


def test_pgd_l2_alpha_range():
    # the ℓ2 ball grows with the image size: an ℓ2 step may exceed 1, within a bound
    for alpha in (0.1, 1.5, 100.0):
        assert create_attack("pgd", nn.Identity(), eps=0.5, norm="l2", alpha=alpha).alpha == alpha
    for alpha in (0, -1.0, 100.5, 1e9, INF, NAN):
        with pytest.raises(ConfigError, match="alpha"):
            create_attack("pgd", nn.Identity(), eps=0.5, norm="l2", alpha=alpha)


def test_derived_alpha_is_not_checked():
    # alpha = eps (or 2.5·eps/steps) follows ε, which has its own check; ε = 0 is allowed
    assert create_attack("jitter", nn.Identity(), eps=0.0).alpha == 0.0
    assert create_attack("pgd", nn.Identity(), eps=0.0).alpha == 0.0


def test_model_std_has_no_upper_bound():
    # std comes from the model; evaluation must not refuse what the model accepted
    atk = create_attack("l1_fgsm", nn.Identity(), eps=0.1, eps_unit="normalized", std=(58.4, 57.1, 57.4))
    assert atk.data_std == (58.4, 57.1, 57.4)


def test_recipe_check_refuses_before_any_work():
    """The CLI's check: attacks built on a stand-in model, so a recipe never starts."""
    with pytest.raises(ConfigError, match=r"pgd: steps must be an integer in \[1, 10000\], got 1000000000"):
        check_attacks([{"name": "pgd", "eps": [0.03], "options": {"steps": 10**9}}])
    with pytest.raises(ConfigError, match="mixup: decay"):
        check_attacks([{"name": "mixup", "eps": [0.03], "options": {"decay": 5.0}}])
    with pytest.raises(ConfigError, match="seed"):
        check_attacks([{"name": "fgsm", "eps": [0.03]}], seed=-1)
    check_attacks(
        [
            {"name": "pgd", "eps": [0.03], "options": {"steps": 50, "alpha": 0.01}},
            {"name": "apgd", "eps": [0.03], "options": {"steps": 100}},
            {"name": "jitter", "eps": [0.035], "options": {"sigma": 0.0, "scale": 5}},
        ],
        eps_unit="normalized",
    )


def test_values_are_stored_as_plain_numbers():
    import numpy as np

    atk = create_attack("apgd", nn.Identity(), steps=np.int64(7), rho=np.float32(0.5))
    assert type(atk.steps) is int and atk.steps == 7
    assert type(atk.rho) is float and math.isclose(atk.rho, 0.5)

"""Bad input is refused cleanly: exit code 2, one line on stderr naming the input, no traceback,
and every file and folder exactly as it was (no run folder, no staging folder, no output dir).

A corpus of bad inputs goes through ``compressor.cli.main`` in-process (fast); three go through
a real ``python -m compressor.cli`` process. Unsafe files (a pickle that would run code, a YAML
python tag) are refused without running anything.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from compressor.cli import main

ROOT = Path(__file__).resolve().parents[1]


RECIPE = {
    "run_name": "bad",
    "seed": 0,
    "model": {"name": "timm:test_efficientnet", "input_size": 16},
    "data": {"name": "digits", "train_subset": 32, "val_subset": 16, "batch_size": 16},
    "baseline": {"epochs": 0},
    "factorize": {"init_rank": 8, "r_min": 2, "r_max": 16},
    "train": {"epochs": 1, "coefficient_steps": 2, "device": "cpu"},
    "evaluate": {"max_samples": 8, "attacks": [{"name": "fgsm", "eps": [0.03]}]},
    "export": {"onnx": False, "latency": False},
}


class _Exploit:
    """Unpickling this would create the file ``marker``: weights_only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Every bad (and one good) input file, in one folder."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("inputs")
    (d / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    (d / "malformed.yaml").write_text("model: [unclosed\n  name: vgg16\n")
    (d / "list.yaml").write_text("- model\n- data\n")
    (d / "scalar.yaml").write_text("42\n")
    (d / "unknown_nested.yaml").write_text(yaml.safe_dump({**RECIPE, "train": {**RECIPE["train"], "betta": 0.1}}))
    (d / "wrong_type.yaml").write_text(yaml.safe_dump({**RECIPE, "train": {**RECIPE["train"], "epochs": "three"}}))
    (d / "python_tag.yaml").write_text(f"!!python/object/apply:pathlib.Path.touch [{str(d / 'pwned-yaml')!r}]\n")
    (d / "empty_root").mkdir()
    (d / "a_file").write_text("not a folder\n")
    (d / "garbage.safetensors").write_bytes(os.urandom(64))
    save_file({"w": torch.zeros(64, 64)}, str(d / "plain.safetensors"))
    (d / "truncated.safetensors").write_bytes((d / "plain.safetensors").read_bytes()[:5000])
    torch.save({"w": torch.zeros(64, 64)}, d / "full.pth")
    (d / "truncated.pth").write_bytes((d / "full.pth").read_bytes()[:3000])
    (d / "full.pth").unlink()
    torch.save({"state_dict": _Exploit(d / "pwned-pickle")}, d / "exploit.pth")
    save_file({"features.0.weight": torch.zeros(8, 3, 3, 3)}, str(d / "mismatch.safetensors"))
    (d / "weights.npy").write_bytes(b"\x93NUMPY")
    (d / "model.onnx").write_bytes(b"\x08\x07junk")
    return d


def _listing(*roots: Path) -> list[str]:
    """Every path under the roots, hidden ones included, with sizes: 'nothing changed' means equal."""
    out = []
    for root in roots:
        for p in sorted(root.rglob("*")):
            out.append(f"{p} {p.stat().st_size if p.is_file() else 'dir'}")
    return out


def _setup_existing_run(out: Path) -> None:
    (out / "bad").mkdir(parents=True)
    (out / "bad" / "report.json").write_text("{}\n")


def _setup_interrupted_run(out: Path) -> None:
    (out / ".bad.partial").mkdir(parents=True)
    (out / ".bad.partial" / "train.ckpt").write_bytes(b"\0" * 10)


def _setup_staged_recipe(out: Path, files: Path) -> None:
    from compressor.recipe import load_recipe, recipe_to_yaml

    (out / ".bad.partial").mkdir(parents=True)
    recipe = load_recipe(files / "recipe.yaml", [f"output_dir={out}"])
    (out / ".bad.partial" / "recipe.yaml").write_text(recipe_to_yaml(recipe))


# (id, arguments, a fragment the one line must hold, set-up of the output folder)
# {r}: the good recipe, {f}: the folder of input files, {o}: the output folder
CASES = [
    ("unknown model", ["--model", "nosuchnet_xyz"], "unknown model 'nosuchnet_xyz'", None),
    ("unknown model prefix", ["--model", "hub:resnet18"], "unknown model prefix", None),
    ("unknown data set", ["--data", "nodata"], "unknown data set 'nodata'", None),
    ("unknown attack", ["--set", "evaluate.attacks=[{name: nope, eps: [0.1]}]"], "unknown attack 'nope'", None),
    (
        "unknown attack option",
        ["--set", "evaluate.attacks=[{name: pgd, eps: [0.1], options: {stepz: 2}}]"],
        "stepz",
        None,
    ),
    (
        "bad attack option value",
        ["--set", "evaluate.attacks=[{name: pgd, eps: [0.1], options: {steps: 0}}]"],
        "steps",
        None,
    ),
    ("malformed yaml", ["--recipe", "{f}/malformed.yaml"], "not valid YAML at line", None),
    ("list yaml", ["--recipe", "{f}/list.yaml"], "must be a YAML mapping", None),
    ("scalar yaml", ["--recipe", "{f}/scalar.yaml"], "must be a YAML mapping", None),
    ("unknown nested key", ["--recipe", "{f}/unknown_nested.yaml"], "'train.betta': unknown key", None),
    ("wrong type in file", ["--recipe", "{f}/wrong_type.yaml"], "'train.epochs'", None),
    ("bool for a number", ["--set", "train.beta=true"], "'train.beta'", None),
    ("float for an int", ["--set", "data.batch_size=2.5"], "'data.batch_size'", None),
    ("section replaced by a scalar", ["--set", "train=5"], "'train'", None),
    ("beta out of range", ["--set", "train.beta=-0.1"], "'train.beta'", None),
    ("tau out of range", ["--set", "train.tau=1.0"], "'train.tau'", None),
    ("nan", ["--set", "train.lr=.nan"], "'train.lr'", None),
    ("eps out of range", ["--set", "evaluate.attacks=[{name: fgsm, eps: [1.5]}]"], "eps", None),
    (
        "r_min > r_max",
        ["--set", "factorize.r_min=20", "--set", "factorize.r_max=4"],
        "r_min (20) must be <= r_max (4)",
        None,
    ),
    ("rank zero", ["--set", "factorize.init_rank=0"], "'factorize.init_rank'", None),
    ("negative seed", ["--seed", "-1"], "'seed'", None),
    ("missing recipe file", ["--recipe", "{f}/nope.yaml"], "recipe file not found", None),
    ("yaml python tag", ["--recipe", "{f}/python_tag.yaml"], "not valid YAML", None),
    ("missing data root", ["--data", "imagefolder", "--data-root", "{f}/nope"], "data.root", None),
    ("data root is a file", ["--data", "imagefolder", "--data-root", "{f}/a_file"], "data.root", None),
    ("empty data root", ["--data", "imagefolder", "--data-root", "{f}/empty_root"], "empty_root", None),
    ("weights missing", ["--weights", "{f}/nope.pth"], "nope.pth", None),
    ("weights unsupported suffix", ["--weights", "{f}/weights.npy"], "weights.npy", None),
    ("weights garbage", ["--weights", "{f}/garbage.safetensors"], "garbage.safetensors", None),
    ("weights truncated safetensors", ["--weights", "{f}/truncated.safetensors"], "truncated.safetensors", None),
    ("weights truncated pth", ["--weights", "{f}/truncated.pth"], "truncated.pth", None),
    ("weights pickle exploit", ["--weights", "{f}/exploit.pth"], "Python objects", None),
    ("weights mismatched", ["--weights", "{f}/mismatch.safetensors"], "does not match the model", None),
    ("output under a file", ["--output-dir", "{f}/a_file/sub"], "a_file is a file", None),
    ("existing run folder", [], "already exists", _setup_existing_run),
    ("interrupted run without --resume", [], "--resume", _setup_interrupted_run),
    ("resume with nothing to resume", ["--resume"], "no interrupted run", None),
    ("resume a finished run", ["--resume"], "nothing to resume", _setup_existing_run),
    (
        "resume with another recipe",
        ["--resume", "--set", "train.beta=0.2", "--seed", "5"],
        "differs from the interrupted run's",
        _setup_staged_recipe,
    ),
    ("run name escapes", ["--run-name", "../escape"], "'run_name'", None),
    ("run name hidden", ["--run-name", ".hidden"], "'run_name'", None),
    ("set without =", ["--set", "train.beta"], "expected key=value", None),
    ("set empty key", ["--set", "train..beta=1"], "empty key", None),
    ("set bad yaml value", ["--set", "train.beta=[0.1"], "not valid YAML", None),
    ("set into a value", ["--set", "train.beta=0.1", "--set", "train.beta.x=1"], "not a section", None),
    ("unreachable budget", ["--set", "train.target.params=0.001"], "train.target.params = 0.001 is out of reach", None),
    ("bad device", ["--device", "gpu0"], "train.device 'gpu0'", None),
    ("meta device", ["--device", "meta"], "train.device 'meta'", None),
    ("missing cuda device", ["--device", "cuda:99"], "train.device 'cuda:99'", None),
    ("bad seed flag", ["--seed", "x"], "--seed", None),
    ("unknown flag", ["--frobnicate"], "--frobnicate", None),
]
EXPORT_CASES = [
    ("export garbage", ["{f}/garbage.safetensors"], "not a valid safetensors file"),
    ("export truncated", ["{f}/truncated.safetensors"], "truncated"),
    ("export plain state dict", ["{f}/plain.safetensors"], "no compressor manifest"),
    ("export onnx file", ["{f}/model.onnx"], "reads the model.safetensors"),
    ("export missing file", ["{f}/nope.safetensors"], "not found"),
    ("export bad opset", ["{f}/plain.safetensors", "--opset", "9"], "--opset 9"),
    ("export bad out", ["{f}/plain.safetensors", "--out", "{f}/a_file/x"], "no compressor manifest"),
]


def _fill(args: list[str], files: Path, out: Path) -> list[str]:
    subs = {"{r}": str(files / "recipe.yaml"), "{f}": str(files), "{o}": str(out)}
    filled = []
    for a in args:
        for key, value in subs.items():
            a = a.replace(key, value)
        filled.append(a)
    return filled


def _check_refused(code: int, err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("compress") and "error:" in lines[0], lines
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_leaves_everything_as_it_was(case, files: Path, tmp_path: Path, capsys) -> None:
    _, args, fragment, setup = case
    out = tmp_path / "out"
    if setup is _setup_staged_recipe:
        setup(out, files)
    elif setup is not None:
        setup(out)
    argv = ["--recipe", str(files / "recipe.yaml"), "--output-dir", str(out)] + _fill(args, files, out)
    before = _listing(tmp_path, files)
    code = main(argv)
    captured = capsys.readouterr()
    _check_refused(code, captured.err, fragment)
    assert captured.out == ""
    assert _listing(tmp_path, files) == before, "a refused run changed the file system"
    assert not (files / "pwned-yaml").exists() and not (files / "pwned-pickle").exists()


@pytest.mark.parametrize("case", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_bad_export_input_is_refused(case, files: Path, capsys) -> None:
    _, args, fragment = case
    before = _listing(files)
    code = main(["export", *_fill(args, files, files)])
    _check_refused(code, capsys.readouterr().err, fragment)
    assert _listing(files) == before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_output_folder(files: Path, tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        before = _listing(tmp_path)
        code = main(["--recipe", str(files / "recipe.yaml"), "--output-dir", str(locked / "runs")])
        _check_refused(code, capsys.readouterr().err, "locked")
        assert _listing(tmp_path) == before
    finally:
        locked.chmod(0o700)


def test_unsafe_files_run_nothing(files: Path) -> None:
    """The exploit files really are exploits: plain pickle / yaml.unsafe_load would run them."""
    from compressor.errors import WeightsError
    from compressor.models import read_state_dict

    with pytest.raises(WeightsError, match="Python objects"):
        read_state_dict(files / "exploit.pth")
    assert not (files / "pwned-pickle").exists()
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load((files / "python_tag.yaml").read_text())
    assert not (files / "pwned-yaml").exists()
    with pytest.raises(pickle.UnpicklingError):  # a fresh reading of the same file with weights_only
        torch.load(files / "exploit.pth", weights_only=True)


def test_corrupt_onnx_is_refused(files: Path) -> None:
    """The ONNX reader behind the structure check and onnxruntime: corrupt files fail cleanly."""
    from compressor.errors import WeightsError
    from compressor.export import parity_check, structure_check

    for check in (structure_check, parity_check):
        with pytest.raises(WeightsError, match="model.onnx"):
            check(files / "model.onnx", torch.nn.Identity())


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--recipe", "{f}/malformed.yaml", "--output-dir", "{o}"], "not valid YAML"),
        (["--recipe", "{r}", "--weights", "{f}/garbage.safetensors", "--output-dir", "{o}"], "garbage.safetensors"),
        (["export", "{f}/truncated.safetensors"], "truncated"),
    ],
    ids=["malformed recipe", "corrupt weights", "export truncated file"],
)
def test_a_real_process_exits_2_with_one_line(args, fragment, files: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    before = _listing(tmp_path, files)
    proc = subprocess.run(
        [sys.executable, "-m", "compressor.cli", *_fill(args, files, out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    _check_refused(proc.returncode, proc.stderr, fragment)
    assert proc.stdout == ""
    assert _listing(tmp_path, files) == before

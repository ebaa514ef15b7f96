"""examples/predict.py, the torch-free deploy example, reproduces the PyTorch model's accuracy.

One small model is trained on scikit-learn's digits, factorized and exported (shared by the
tests). The validation images are written at their native 8×8 resolution into class folders and
the example is run in a subprocess where ``import torch`` and ``import compressor`` fail: it must
do the whole preprocessing (gray → 3 channels, bilinear enlarge to 32×32, [0, 1]) itself from the
ONNX metadata, and land on PyTorch's accuracy and per-image probabilities.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "predict.py"
MARK = "@@loaded-modules@@ "

# Runs the example as __main__ with torch and compressor unimportable (a None entry in
# sys.modules makes `import x` raise ImportError), then reports on stdout which of those
# packages (or their submodules) ended up loaded anyway.
_RUNNER = """
import json, runpy, sys
blocked = ("torch", "torchvision", "timm", "compressor")
for name in blocked:
    sys.modules[name] = None
script, args = sys.argv[1], json.loads(sys.argv[2])
sys.argv = [script, *args]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    code = exc.code
loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in blocked)
sys.stdout.write("\\n@@loaded-modules@@ " + json.dumps(loaded) + "\\n")
sys.stdout.flush()
sys.exit(code)
"""


def run_example(*args: str | Path, cwd: Path) -> SimpleNamespace:
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(EXAMPLE), json.dumps([str(a) for a in args])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    out, _, tail = proc.stdout.rpartition(MARK)
    assert tail, f"the runner did not finish: rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert json.loads(tail) == [], f"the example imported {tail.strip()}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return SimpleNamespace(rc=proc.returncode, lines=out.strip().splitlines(), stderr=proc.stderr)


def parse_predictions(lines: list[str]) -> dict[str, list[tuple[str, float]]]:
    """``path: name p, name p, ...`` lines → {path: [(name, p), ...]}."""
    preds = {}
    for line in lines:
        if line.startswith("accuracy "):
            continue
        path, _, rest = line.rpartition(": ")
        preds[path] = [(name, float(p)) for name, p in (item.rsplit(" ", 1) for item in rest.split(", "))]
    return preds


def parse_accuracy(lines: list[str]) -> tuple[float, int]:
    acc_lines = [line for line in lines if line.startswith("accuracy ")]
    assert len(acc_lines) == 1, lines[-5:]
    _, acc, _, n, _ = acc_lines[0].split()
    return float(acc), int(n)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained, factorized, exported digits model; its PyTorch accuracy and per-image
    probabilities; the validation images as native 8×8 .npy files in class folders."""
    from sklearn.datasets import load_digits

    from compressor.check import check_export
    from compressor.data import build_data, set_epoch
    from compressor.export import export_model
    from compressor.factorize import factorize_
    from compressor.models import create_model
    from compressor.recipe import recipe_from_dict
    from compressor.train import clean_accuracy

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("example")
    rec = recipe_from_dict({"data": {"name": "digits"}, "model": {"name": "timm:test_convnext", "input_size": 32}})
    data = build_data(rec.data, input_size=32, seed=0)
    model, info = create_model(
        "timm:test_convnext", data.num_classes, in_chans=data.in_chans, mean=data.mean, std=data.std, input_size=32
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(5):  # ~220 steps: ~95 % validation accuracy (chance: 10 %)
        set_epoch(data.train_loader, epoch)
        for x, y in data.train_loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    factorize_(model, init_rank=8, r_max=16)
    model.eval()
    result = export_model(
        model,
        tmp / "export",
        input_size=32,
        in_chans=3,
        model_info=info.to_dict(),
        class_names=data.class_names,
        preprocess=data.preprocess,
        latency=False,
    )
    result = check_export(model, result)
    assert result.ok and result.parity["passed"], result.parity

    device = torch.device("cpu")
    accuracy = clean_accuracy(model, data.val_loader, device)
    with torch.no_grad():
        probs = torch.cat([model(x).softmax(1) for x, _ in data.val_loader]).double().numpy()

    # the validation split as indices into the source: load_digits() order
    indices = list(data.val_dataset.indices)
    digits = load_digits()
    assert data.val_dataset.targets.tolist() == digits.target[indices].tolist()
    val = tmp / "val"
    files = {}
    for row, i in enumerate(indices):
        folder = val / data.class_names[digits.target[i]]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i}.npy"
        np.save(path, digits.images[i] / 16.0)  # 8×8 float in [0, 1]: the data set's native images
        files[str(path)] = row
    assert len(files) == data.n_val == len(probs)
    return SimpleNamespace(
        tmp=tmp,
        onnx=tmp / "export" / result.files["onnx"],
        data=data,
        accuracy=accuracy,
        probs=probs,
        val=val,
        files=files,
        indices=indices,
        images=digits.images,
        targets=digits.target,
    )


def test_example_reproduces_pytorch_accuracy_without_torch(exported):
    e = exported
    n = e.data.n_val
    assert e.accuracy > 0.8, f"the model did not learn (accuracy {e.accuracy:.3f}): the comparison would be weak"
    r = run_example(e.onnx, e.val, "--labels-from-folders", "--threads", "1", cwd=e.tmp)
    assert r.rc == 0, r.stderr
    acc, count = parse_accuracy(r.lines)
    assert count == n
    assert abs(acc - e.accuracy) <= 1 / n + 1e-9, f"example {acc:.4f} vs PyTorch {e.accuracy:.4f} on {n} images"

    # image by image: the same top-1 class and the same probability (printed to 4 decimals)
    preds = parse_predictions(r.lines)
    assert set(preds) == set(e.files)
    names = e.data.class_names
    for path, row in e.files.items():
        top = preds[path]
        assert len(top) == 3 and all(name in names for name, _ in top)
        ref = e.probs[row]
        best = int(ref.argmax())
        second = np.sort(ref)[-2]
        assert top[0][0] == names[best] or ref[best] - second < 1e-3, (path, top, ref)
        assert abs(top[0][1] - ref[names.index(top[0][0])]) < 1e-3, (path, top, ref)


def test_example_reads_8bit_image_files_and_color_arrays(exported):
    """The same images as gray PNG, RGB PNG, uint8 H×W×3 .npy and float H×W×3 .npy: each goes
    through another colour path (pillow 'L', luma weights) to the same gray input."""
    e = exported
    root = e.tmp / "mixed"
    for k, (path, row) in enumerate(sorted(e.files.items())):
        i = e.indices[row]
        gray = e.images[i] / 16.0
        u8 = np.round(gray * 255).astype(np.uint8)
        folder = root / Path(path).parent.name
        folder.mkdir(parents=True, exist_ok=True)
        kind = k % 4
        if kind == 0:
            Image.fromarray(u8).save(folder / f"{i}.png")
        elif kind == 1:
            Image.fromarray(np.stack([u8] * 3, axis=-1)).save(folder / f"{i}.png")
        elif kind == 2:
            np.save(folder / f"{i}.npy", np.stack([u8] * 3, axis=-1))
        else:
            np.save(folder / f"{i}.npy", np.stack([gray] * 3, axis=-1).astype(np.float32))
    r = run_example(e.onnx, root, "--labels-from-folders", "--quiet", "--threads", "1", cwd=e.tmp)
    assert r.rc == 0, r.stderr
    assert len(r.lines) == 1  # --quiet: the accuracy only
    acc, count = parse_accuracy(r.lines)
    n = e.data.n_val
    # 8-bit files round each pixel by up to 0.5/255: allow one more image than for the exact arrays
    assert count == n and abs(acc - e.accuracy) <= 2 / n + 1e-9, (acc, e.accuracy)


def test_top_k_names_classes_of_the_model(exported):
    e = exported
    path, row = next(iter(e.files.items()))
    r = run_example(e.onnx, path, "--top-k", "2", cwd=e.tmp)
    assert r.rc == 0, r.stderr
    assert len(r.lines) == 1
    (top,) = parse_predictions(r.lines).values()
    names = e.data.class_names
    assert len(top) == 2 and all(name in names for name, _ in top) and top[0][0] != top[1][0]
    assert top[0][1] >= top[1][1]
    assert top[0][0] == names[int(e.probs[row].argmax())]


def test_model_without_metadata_falls_back_to_class_indices(exported):
    import onnx

    e = exported
    model = onnx.load(e.onnx)
    del model.metadata_props[:]
    bare = e.tmp / "bare.onnx"
    onnx.save(model, bare)
    some = sorted(e.files.items())[:5]
    r = run_example(bare, *(p for p, _ in some), "--top-k", "1", cwd=e.tmp)
    assert r.rc == 0, r.stderr
    assert "no compressor.deployment metadata" in r.stderr
    preds = parse_predictions(r.lines)
    for path, row in some:
        # gray 8×8 arrays repeated to RGB: the same input, so the same class, named by index
        assert preds[path][0][0] == f"class {int(e.probs[row].argmax())}"


@pytest.mark.parametrize("case", ["missing model", "no images", "unreadable image", "missing input"])
def test_bad_input_exits_2_with_one_line(exported, case):
    e = exported
    empty = e.tmp / "empty"
    empty.mkdir(exist_ok=True)
    bad = e.tmp / "bad.png"
    bad.write_bytes(b"not an image")
    args = {
        "missing model": (e.tmp / "nope.onnx", e.val),
        "no images": (e.onnx, empty),
        "unreadable image": (e.onnx, bad),
        "missing input": (e.onnx, e.tmp / "nowhere"),
    }[case]
    r = run_example(*args, cwd=e.tmp)
    assert r.rc == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.lines == []


@pytest.mark.parametrize(
    "shape, size",
    [((8, 8), (32, 32)), ((7, 13), (32, 32)), ((64, 64), (32, 32)), ((100, 37), (32, 32)), ((40, 20), (32, 32))],
)
def test_resize_matches_torch_bilinear(shape, size):
    """Enlarging (numpy) and shrinking (pillow, antialiased) equal F.interpolate with the
    data pipeline's settings; the digits test above only enlarges."""
    import runpy

    import torch.nn.functional as F

    resize = runpy.run_path(str(EXAMPLE), run_name="predict_example")["resize"]
    x = np.random.default_rng(0).random((3, *shape)).astype(np.float32)
    shrink = size[0] < shape[0] or size[1] < shape[1]
    ref = F.interpolate(torch.from_numpy(x)[None], size=size, mode="bilinear", align_corners=False, antialias=shrink)
    got = resize(x, size)
    assert got.dtype == np.float32 and got.shape == (3, *size)
    np.testing.assert_allclose(got, ref[0].numpy(), atol=1e-5)

#!/usr/bin/env python3
"""Classify images with an ONNX model exported by compressor, without torch or compressor.

Needs only the standard library, numpy, onnxruntime and pillow. The model's deployment metadata
(the ``compressor.deployment`` JSON that ``compress export`` writes into the ONNX file) says how an
image becomes an input: colour, resize, value range, layout, and the class names. This script
implements that recipe, so its predictions match the PyTorch model's on the same images.

Inputs are image files (png, jpg, bmp, ...) or ``.npy`` arrays (H×W gray or H×W×C, float in
[0, 1] or uint8 0-255), given as files and/or folders (searched recursively). With
``--labels-from-folders`` each file's parent folder is its true class name and the accuracy is
printed.

Examples:
    python predict.py model.onnx photos/
    python predict.py model.onnx val/ --labels-from-folders --quiet
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image, UnidentifiedImageError

METADATA_KEY = "compressor.deployment"
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".npy"}
)
"""File endings collected from folders (a file named on the command line is read whatever its ending)."""
LUMA = (0.299, 0.587, 0.114)
"""ITU-R 601 luma weights: pillow's RGB → 'L' conversion."""


class InputError(Exception):
    """Bad input (model, image, option): reported as one line on stderr, exit code 2."""


_out_of_range: list[Path] = []
"""Float .npy arrays with values outside [0, 1] (fed as they are; reported once at the end)."""


# ----------------------------------------------------------------------------- the model


@dataclass
class Spec:
    """How an image becomes a model input, and what the outputs mean."""

    input_name: str
    channels: int
    size: tuple[int, int]
    """(height, width) every image is resized to."""
    gray: bool
    """One gray channel (repeated to ``channels``), else RGB."""
    class_names: list[str] | None
    fixed_batch: int | None
    """The batch size the graph was exported with, when it is not dynamic."""
    from_metadata: bool


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def read_spec(sess: ort.InferenceSession) -> Spec:
    """The deployment metadata of ``sess``'s model, with fallbacks from its input signature."""
    inp = sess.get_inputs()[0]
    shape = list(inp.shape) + [None] * (4 - len(inp.shape))
    raw = sess.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    meta: dict[str, Any] = {}
    if raw:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            print(f"warning: the model's {METADATA_KEY} metadata is not JSON; using defaults", file=sys.stderr)
    if not isinstance(meta, dict):
        meta = {}
    prep = meta.get("preprocess") or {}
    meta_shape = (meta.get("input") or {}).get("shape") or [None] * 4

    channels = _int_or_none(shape[1]) or _int_or_none(meta_shape[1]) or 3
    size = (prep.get("resize") or {}).get("size") or [meta_shape[2], meta_shape[3]]
    height = _int_or_none(size[0]) or _int_or_none(shape[2])
    width = _int_or_none(size[1]) or _int_or_none(shape[3])
    if height is None or width is None:
        raise InputError("the model does not say its input size (no metadata, no fixed height and width)")
    color = str(prep.get("color") or "RGB").strip().lower()
    names = meta.get("class_names")
    return Spec(
        input_name=inp.name,
        channels=channels,
        size=(height, width),
        gray=color.startswith("gray") or color.startswith("grey") or channels == 1,
        class_names=[str(n) for n in names] if isinstance(names, list) else None,
        fixed_batch=_int_or_none(shape[0]),
        from_metadata=bool(meta),
    )


def load_model(path: Path, threads: int | None) -> ort.InferenceSession:
    if not path.is_file():
        raise InputError(f"model file {path} not found")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for every kind of bad file
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot load {path} as an ONNX model: {msg}") from None


# ----------------------------------------------------------------------------- images


def collect(paths: Sequence[str]) -> list[Path]:
    """Files named, plus image/.npy files found under folders named (sorted, recursively)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
            )
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    if not files:
        raise InputError(f"no images found in {', '.join(paths)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _from_pillow(img: Image.Image, gray: bool) -> np.ndarray:
    """A pillow image → (C, H, W) float32 in [0, 1], C = 1 (gray) or 3 (RGB)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit gray PNG/TIFF
        x = np.asarray(img, dtype=np.float64) / 65535.0
        x = x[None] if gray else np.repeat(x[None], 3, axis=0)
    elif img.mode == "F":
        x = np.asarray(img, dtype=np.float64)
        x = x[None] if gray else np.repeat(x[None], 3, axis=0)
    elif gray:
        x = np.asarray(img.convert("L"), dtype=np.float64)[None] / 255.0
    else:
        x = np.asarray(img.convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255.0
    return x.astype(np.float32)


def _from_array(a: np.ndarray, gray: bool, path: Path) -> np.ndarray:
    """An .npy array (H×W or H×W×C; uint8 0-255 or float in [0, 1]) → (C, H, W) float32."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]  # drop alpha, as pillow's RGBA → RGB does
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)) or min(a.shape[:2]) < 1:
        raise InputError(f"{path}: array of shape {a.shape}; expected H×W (gray) or H×W×C with C in 1, 3, 4")
    if a.dtype == np.uint8:
        if a.ndim == 3:  # pillow's own integer conversion, identical to reading an 8-bit image file
            return _from_pillow(Image.fromarray(np.ascontiguousarray(a)), gray)
        x = a.astype(np.float64) / 255.0
    elif np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float64)
        if not np.isfinite(x).all():
            raise InputError(f"{path}: the array holds NaN or infinite values")
        if x.min() < 0.0 or x.max() > 1.0:
            _out_of_range.append(path)
    else:
        raise InputError(f"{path}: arrays of {a.dtype} are not supported; use uint8 (0-255) or float in [0, 1]")
    if x.ndim == 2:
        x = x[None] if gray else np.repeat(x[None], 3, axis=0)
    elif gray:
        x = (x[..., 0] * LUMA[0] + x[..., 1] * LUMA[1] + x[..., 2] * LUMA[2])[None]
    else:
        x = x.transpose(2, 0, 1)
    return x.astype(np.float32)


def read_image(path: Path, gray: bool) -> np.ndarray:
    """One file → (C, H, W) float32 with C = 1 (gray) or 3 (RGB), values as the model expects."""
    try:
        if path.suffix.lower() == ".npy":
            return _from_array(np.load(path, allow_pickle=False), gray, path)
        with Image.open(path) as img:
            img.load()
            return _from_pillow(img, gray)
    except InputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, EOFError, ValueError, SyntaxError) as err:
        raise InputError(f"cannot read {path} as an image: {str(err).strip() or type(err).__name__}") from None


def _linear(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of PyTorch's bilinear resize (align_corners=False) along one axis."""
    d = np.arange(n_out, dtype=np.float64)
    src = np.maximum((d + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) → (C, H, W) float32, bilinear, half-pixel centres, antialiased only when shrinking.

    Matches ``F.interpolate(mode="bilinear", align_corners=False, antialias=<shrinking>)``:
    enlarging is plain bilinear (done here), shrinking uses pillow's antialiased bilinear filter on
    a float ('F') image, which is the filter PyTorch's ``antialias=True`` reproduces.
    """
    (h, w), (oh, ow) = x.shape[1:], size
    if (h, w) == (oh, ow):
        return x
    if oh < h or ow < w:
        return np.stack(
            [
                np.asarray(Image.fromarray(np.ascontiguousarray(c, dtype=np.float32)).resize((ow, oh), Image.BILINEAR))
                for c in x
            ]
        ).astype(np.float32)
    y = x.astype(np.float64)
    i0, i1, a = _linear(h, oh)
    y = y[:, i0, :] * (1.0 - a)[None, :, None] + y[:, i1, :] * a[None, :, None]
    j0, j1, b = _linear(w, ow)
    y = y[:, :, j0] * (1.0 - b) + y[:, :, j1] * b
    return y.astype(np.float32)


def preprocess(path: Path, spec: Spec) -> np.ndarray:
    """One file → (channels, H, W) float32: colour, [0, 1] scale, resize, channel repeat."""
    x = resize(read_image(path, spec.gray), spec.size)
    if x.shape[0] != spec.channels:
        x = np.repeat(x[:1], spec.channels, axis=0) if x.shape[0] == 1 else x[:1]
    return x


# ----------------------------------------------------------------------------- prediction


def batches(files: list[Path], n: int) -> Iterator[list[Path]]:
    for start in range(0, len(files), n):
        yield files[start : start + n]


def predict(sess: ort.InferenceSession, spec: Spec, files: list[Path], batch_size: int) -> Iterator[np.ndarray]:
    """Softmax probabilities (len(batch), classes) for each batch of ``files``."""
    n = spec.fixed_batch or batch_size
    for group in batches(files, n):
        x = np.stack([preprocess(f, spec) for f in group])
        if spec.fixed_batch and len(group) < n:  # a graph exported for one batch size: pad the last batch
            x = np.concatenate([x, np.zeros((n - len(group), *x.shape[1:]), np.float32)])
        logits = np.asarray(sess.run(None, {spec.input_name: x})[0], dtype=np.float64)[: len(group)]
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        yield z / z.sum(axis=1, keepdims=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="predict.py",
        description="Classify images with an ONNX model exported by compressor. Preprocessing (colour, "
        "resize, [0, 1] scale) and class names come from the model's deployment metadata; torch is not needed.",
        epilog="Inputs: image files (png, jpg, bmp, gif, tiff, webp, ...) or .npy arrays (H×W gray or H×W×C; "
        "uint8 0-255 or float in [0, 1]), as files and/or folders (searched recursively). "
        "Exit code 2 on bad input (missing model, no images, unreadable image).",
    )
    parser.add_argument("model", help="the exported .onnx file (e.g. model.onnx from compress export)")
    parser.add_argument("inputs", nargs="+", help="image / .npy files and folders of them")
    parser.add_argument("--top-k", type=int, default=3, metavar="K", help="classes printed per image (default 3)")
    parser.add_argument(
        "--labels-from-folders",
        action="store_true",
        help="each file's parent folder name is its true class name: print the top-1 accuracy",
    )
    parser.add_argument("--quiet", action="store_true", help="no line per image (only the accuracy)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per inference (default 64)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime threads (default: all)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    try:
        sess = load_model(Path(args.model), args.threads)
        spec = read_spec(sess)
        files = collect(args.inputs)
        if not spec.from_metadata:
            print(
                f"warning: {args.model} has no {METADATA_KEY} metadata: assuming RGB images, bilinear resize to "
                f"{spec.size[0]}x{spec.size[1]}, values in [0, 1]",
                file=sys.stderr,
            )
        correct = 0
        unknown: set[str] = set()
        done = 0
        for probs in predict(sess, spec, files, args.batch_size):
            names = spec.class_names
            if names is None or len(names) != probs.shape[1]:
                if names is not None:
                    print(
                        f"warning: the metadata names {len(names)} classes but the model has {probs.shape[1]} "
                        "outputs; printing class indices",
                        file=sys.stderr,
                    )
                names = spec.class_names = [f"class {i}" for i in range(probs.shape[1])]
            k = min(args.top_k, probs.shape[1])
            for p in probs:
                path = files[done]
                done += 1
                top = np.argsort(-p, kind="stable")[:k]
                if args.labels_from_folders:
                    truth = path.parent.name
                    correct += names[top[0]] == truth
                    if truth not in names:
                        unknown.add(truth)
                if not args.quiet:
                    print(f"{path}: " + ", ".join(f"{names[i]} {p[i]:.4f}" for i in top))
        if _out_of_range:
            print(
                f"warning: {len(_out_of_range)} float arrays have values outside [0, 1] (e.g. {_out_of_range[0]}); "
                "the model expects [0, 1]: divide 0-255 values by 255",
                file=sys.stderr,
            )
        if args.labels_from_folders:
            if unknown:
                shown = ", ".join(sorted(unknown)[:5])
                print(f"warning: folders not named after a class (counted as wrong): {shown}", file=sys.stderr)
            print(f"accuracy {correct / len(files):.4f} on {len(files)} images")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

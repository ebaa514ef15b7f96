#!/usr/bin/env bash
# On this machine, before a device call: what the GPU machine lacks, into .gpu-wheels/ (git-ignored),
# which the call carries (docs/gpu.md). The GPU image has torch, torchvision, timm, onnx, onnxscript,
# onnxruntime, safetensors, PyYAML, tqdm, matplotlib, scikit-learn, numpy, pytest and hypothesis;
# it lacks pydantic (and its own dependencies), torchattacks (the attack tests' reference) and
# torch-pruning (the decision table's pruning arm), and
# has no package registry. Fashion-MNIST's training files go along for the regime step.
#
#   bash bench/gpu_prepare.sh          # from the repository root; PYTHON=... picks the pip to use
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu-wheels
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LIMIT_MIB=64  # what a device call carries: working tree and carried folders together

# the versions tested here (this checkout's environment); the fallbacks are the ones pinned last
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
WHEELS=(
  "pydantic==$(version pydantic 2.14.4)"
  "pydantic-core==$(version pydantic-core 2.50.5)"
  "annotated-types==$(version annotated-types 0.8.0)"
  "typing-inspection==$(version typing-inspection 0.4.5)"
  "typing-extensions==$(version typing-extensions 4.16.0)"
  "torchattacks==$(version torchattacks 3.5.1)"
  "torch-pruning==$(version torch-pruning 1.6.1)"
)

rm -rf "$DEST"
mkdir -p "$DEST"
# one wheel per name, for CPython 3.12 on x86-64 Linux (the GPU image's Python)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" "${WHEELS[@]}"

FASHION=${FASHION_MNIST_ROOT:-/usr/share/datasets/fashion-mnist}
if [ ! -f "$FASHION/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null; then
  # Debian's dataset-fashion-mnist, unpacked here rather than installed
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null && dpkg-deb -x dataset-fashion-mnist_*.deb root)
  FASHION=$tmp/root/usr/share/datasets/fashion-mnist
fi
if [ -f "$FASHION/train-images-idx3-ubyte.gz" ]; then
  mkdir -p "$DEST/fashion-mnist"  # the training files only: the regime's held-out images are a split of them
  cp "$FASHION"/train-images-idx3-ubyte.gz "$FASHION"/train-labels-idx1-ubyte.gz "$DEST/fashion-mnist/"
else
  echo "gpu_prepare.sh: no Fashion-MNIST found (apt-get install dataset-fashion-mnist): the regime step will fail" >&2
fi

ls -l "$DEST" "$DEST"/fashion-mnist 2>/dev/null || true
carried=$(du -sk "$DEST" | cut -f1)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
total=$(( (carried + tree) / 1024 ))
echo "gpu_prepare.sh: $DEST $((carried / 1024)) MiB + working tree $((tree / 1024)) MiB = $total MiB of $LIMIT_MIB"
if [ "$total" -ge "$LIMIT_MIB" ]; then
  echo "gpu_prepare.sh: over the $LIMIT_MIB MiB a device call carries" >&2
  exit 1
fi

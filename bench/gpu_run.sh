#!/usr/bin/env bash
# On the device machine, from the repository root (docs/gpu.md): install from the carried
# .gpu-wheels/ what its image lacks or has older, then run bench/gpu_check.py; its files go to
# $OUT/gpu (at most 8 come back: the check's 5, pip-list.txt and gpu_run.log).
#
#   bash bench/gpu_run.sh [gpu_check.py options]     # e.g. --budget 300, --steps regime
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/results}/gpu
SITE=/tmp/gpu-site  # installed beside the image's packages, never over them
mkdir -p "$OUT_DIR"

main() {
  rm -rf "$SITE"  # built for this interpreter only, every time
  echo "== what the image has (the whole list: pip-list.txt)"
  "$PY" -m pip list --format=freeze 2>/dev/null >"$OUT_DIR/pip-list.txt"
  grep -i -E "^(torch|torchvision|timm|onnx|onnxscript|onnxruntime|safetensors|pyyaml|tqdm|matplotlib|scikit-learn|numpy|pytest|hypothesis|pydantic|pydantic.core|annotated.types|typing.inspection|typing.extensions|torchattacks|torch.pruning|packaging)==" \
    "$OUT_DIR/pip-list.txt"

  echo "== what is missing or older than the carried wheel"
  need=$("$PY" - <<'EOF'
import importlib.metadata as md
import re
import sys
from pathlib import Path


def key(version):  # release numbers only: enough to tell older from newer for these wheels
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:4])


for whl in sorted(Path(".gpu-wheels").glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or key(have) < key(version):
        print(whl)
    print(f"{name}: carried {version}, image {have}", file=sys.stderr)
EOF
  )
  if [ -n "$need" ]; then
    # shellcheck disable=SC2086  # one path per word
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --root-user-action=ignore --upgrade --target "$SITE" $need || return 3
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import pydantic, torchattacks, torch, compressor; print('imports ok: pydantic', pydantic.VERSION, \
  'torch', torch.__version__, 'cuda', torch.cuda.is_available())" || return 3

  # a fresh machine continues a check that a former call left unfinished (docs/gpu.md)
  if [ -f .gpu-wheels/resume/gpu_check.json ] && [ ! -f bench/results/gpu-check/gpu_check.json ]; then
    mkdir -p bench/results/gpu-check && cp .gpu-wheels/resume/gpu_check.json bench/results/gpu-check/
  fi

  echo "== bench/gpu_check.py"
  PYTHONUNBUFFERED=1 "$PY" bench/gpu_check.py --out "$OUT_DIR" "$@"
}

main "$@" 2>&1 | tee "$OUT_DIR/gpu_run.log"
exit "${PIPESTATUS[0]}"

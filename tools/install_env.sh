#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment with the real
# OpenMMLab stack.  Idempotent: a second run only checks a stamp file.
#
# The first run compiles mmcv 2.1.0 with its C++ ops from source (no wheel
# exists for torch 2.13), which takes about 20 minutes on 2 cores; pip keeps
# the built wheel in its cache, so later environments install in seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMPRECOND_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.mmprecond-stamp"
# Everything that decides the environment's content goes into the stamp, so
# editing the pins (or setup.py) triggers a refresh.
WANT="$(cat "$ROOT/tools/install_env.sh" "$ROOT/setup.py" | sha1sum | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi

echo "[install_env] preparing $VENV (first time: ~20 min, mmcv compiles its ops)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

# setuptools: mmcv's setup.py imports pkg_resources (gone from setuptools 81)
# and torch 2.13 declares setuptools>=77.0.3, so 80.9.0 satisfies both.  It
# is pinned through a constraints file in EVERY pip call below, together with
# the torch that is installed: otherwise the resolver may "fix" a conflict by
# swapping torch, which breaks mmcv's compiled ops (undefined symbols).
# torch 2.13.0 is the CPU build on local disk here; GPU users may install any
# torch>=2.0 before running this script and it is kept.
CONSTRAINTS="$VENV/constraints.txt"
echo "setuptools==80.9.0" > "$CONSTRAINTS"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS")
"${PIP[@]}" setuptools wheel "numpy>=1.24" ninja
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "torch==${MMPRECOND_TORCH_VERSION:-2.13.0}"
fi
TORCH_VERSION="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
echo "torch==${TORCH_VERSION}" >> "$CONSTRAINTS"
"${PIP[@]}" "mmengine==0.10.7"
mmcv_ops_ok() { "$VENV/bin/python" -c "import mmcv.ops" 2>/dev/null; }
if ! mmcv_ops_ok; then
  # Built from source with its C++ ops (no wheel exists for this torch);
  # pip caches the wheel, so later environments install it in seconds.
  MMCV_WITH_OPS=1 FORCE_CUDA="${FORCE_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-2}" \
    "${PIP[@]}" --no-build-isolation "mmcv==2.1.0"
  if ! mmcv_ops_ok; then
    # a cached wheel built against another torch: rebuild against this one
    echo "[install_env] cached mmcv wheel does not match torch ${TORCH_VERSION}; rebuilding"
    MMCV_WITH_OPS=1 FORCE_CUDA="${FORCE_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-2}" \
      "${PIP[@]}" --no-build-isolation --no-cache-dir --force-reinstall \
      --no-deps "mmcv==2.1.0"
  fi
fi
"${PIP[@]}" "mmdet==3.3.0" "mmpretrain==1.2.0" pycocotools
"${PIP[@]}" --no-build-isolation -e "$ROOT[tests]"
"$VENV/bin/python" - <<'PY'
import mmcv, mmdet, mmengine, mmpretrain, torch
from mmcv.ops import nms, roi_align  # noqa: F401  (compiled ops present)
print(f"[install_env] torch {torch.__version__} mmengine {mmengine.__version__} "
      f"mmcv {mmcv.__version__} mmdet {mmdet.__version__} "
      f"mmpretrain {mmpretrain.__version__}")
PY
echo "$WANT" > "$STAMP"

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
# and torch declares setuptools>=77.0.3, so 80.9.0 satisfies both.  It is
# pinned through a constraints file in EVERY pip call below, together with
# the torch that is installed: otherwise the resolver may "fix" a conflict by
# swapping torch, which breaks mmcv's compiled ops (undefined symbols).
#
# torch / torchvision: mmpretrain needs torchvision, and PyPI's torchvision
# does not load beside the CPU-only torch 2.13 wheel; the pair 2.14.1 /
# 0.29.1 (on local disk here, CUDA builds that run on the CPU) works.  GPU
# users may install any torch>=2.0 with its torchvision first: it is kept.
TORCH_PIN="${MMPRECOND_TORCH_VERSION:-2.14.1}"
TORCHVISION_PIN="${MMPRECOND_TORCHVISION_VERSION:-0.29.1}"
CONSTRAINTS="$VENV/constraints.txt"
echo "setuptools==80.9.0" > "$CONSTRAINTS"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS")
"${PIP[@]}" setuptools wheel "numpy>=1.24" ninja
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "[install_env] torch is installed without torchvision; installing" \
         "torch==${TORCH_PIN} torchvision==${TORCHVISION_PIN} in its place"
  fi
  "${PIP[@]}" "torch==${TORCH_PIN}" "torchvision==${TORCHVISION_PIN}"
fi
TORCH_VERSION="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
TV_VERSION="$("$VENV/bin/python" -c 'import torchvision; print(torchvision.__version__)')"
# without the local label (+cu130, +cpu): '==2.14.1' matches the installed
# build, while '==2.14.1+cu130' clashes with a 'torch<=2.14.1' cap.
printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION%%+*}" "${TV_VERSION%%+*}" >> "$CONSTRAINTS"
"${PIP[@]}" "mmengine==0.10.7"
# mmcv 2.1.0 has no wheel for these torch versions: it is compiled once per
# torch version into a wheelhouse (~20 min on 2 cores), reused afterwards.
# (pip's own wheel cache is keyed by the sdist only, so it would hand a wheel
# built against another torch to this environment.)
WHEELHOUSE="${MMPRECOND_WHEELHOUSE:-$HOME/.cache/mmprecond/wheels}/torch-${TORCH_VERSION}"
if ! "$VENV/bin/python" -c "import mmcv.ops" 2>/dev/null; then
  if ! ls "$WHEELHOUSE"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
    echo "[install_env] compiling mmcv 2.1.0 ops for torch ${TORCH_VERSION} (~20 min)"
    mkdir -p "$WHEELHOUSE"
    SRC="$(mktemp -d)"
    "$VENV/bin/python" -m pip download --disable-pip-version-check -q \
      --no-deps --no-binary :all: -d "$SRC" "mmcv==2.1.0"
    tar -xzf "$SRC"/mmcv-2.1.0.tar.gz -C "$SRC"
    # mmcv 2.1.0 hard-codes -std=c++17; torch>=2.14 headers need C++20.
    # The sources compile unchanged as C++20, so only the flag is raised.
    if "$VENV/bin/python" -c "import sys, torch; v = tuple(map(int, torch.__version__.split('.')[:2])); sys.exit(v < (2, 14))"; then
      sed -i 's/-std=c++17/-std=c++20/g' "$SRC"/mmcv-2.1.0/setup.py
    fi
    MMCV_WITH_OPS=1 FORCE_CUDA="${FORCE_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-2}" \
      "$VENV/bin/python" -m pip wheel --disable-pip-version-check -q \
      --no-build-isolation --no-deps --no-cache-dir -c "$CONSTRAINTS" \
      -w "$WHEELHOUSE" "$SRC"/mmcv-2.1.0
    rm -rf "$SRC"
  fi
  "${PIP[@]}" --force-reinstall --no-deps "$WHEELHOUSE"/mmcv-2.1.0-*.whl
  "${PIP[@]}" "$WHEELHOUSE"/mmcv-2.1.0-*.whl  # its pure-Python requirements
fi
"${PIP[@]}" "mmdet==3.3.0" "mmpretrain==1.2.0" pycocotools
# peers: the third-party optimizers compared in docs/benchmarks.md (tested)
"${PIP[@]}" --no-build-isolation -e "$ROOT[tests,peers]"
"$VENV/bin/python" - <<'PY'
import mmcv, mmdet, mmengine, mmpretrain, torch
from mmcv.ops import nms, roi_align  # noqa: F401  (compiled ops present)
from mmpretrain.utils import register_all_modules  # needs torchvision
register_all_modules(init_default_scope=False)
print(f"[install_env] torch {torch.__version__} mmengine {mmengine.__version__} "
      f"mmcv {mmcv.__version__} mmdet {mmdet.__version__} "
      f"mmpretrain {mmpretrain.__version__}")
PY
# mim (`mim train mmprecond CONFIG`): openmim without opendatalab (which
# pulls openxlab and its setuptools~=60.2 pin; only `mim download --dataset`
# runs its `odl` command); the rest of its requirements are small.  pip
# reports the missing opendatalab; that is expected.
"${PIP[@]}" --no-deps "openmim==0.3.9"
"${PIP[@]}" click colorama model-index pandas requests rich tabulate
# (`mim train mmprecond` finds the sources through <site-packages>/mmprecond,
# which the editable install above links: see setup.py)
echo "$WANT" > "$STAMP"

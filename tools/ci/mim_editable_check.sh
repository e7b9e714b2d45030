#!/usr/bin/env bash
# Checks the README's install claim: `pip install -e .` into an existing
# environment is enough for `mim train mmprecond CONFIG`.
#
# The project's .venv already holds an editable mmprecond (possibly of another
# checkout), so the check makes a new venv layered on it: a .pth file puts the
# base environment's site-packages after the new venv's own (torch, mmcv,
# mmdet, setuptools and openmim come from there; `venv --system-site-packages`
# would expose the base *interpreter's* packages, not the base venv's).  It
# installs this checkout editable into the new venv, offline (--no-index
# --no-deps --no-build-isolation), and trains the AdamW demo detector for 2 iterations
# with `python -m mim train mmprecond <config file name>` on a tiny synthetic
# COCO set.  It fails unless mim finds this checkout's package, config and
# tools/train.py, and the run writes iter_2.pth.
#
# usage: tools/ci/mim_editable_check.sh [pip|mim]   (the installer; default pip)
#   $PYTHON: the base interpreter (default .venv/bin/python)
#   $KEEP=1: keep the temporary folder (printed) for inspection
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
INSTALLER="${1:-pip}"
CONFIG=faster-rcnn_r18-tiny_fpn_adamw_synthetic.py
TMP="$(mktemp -d "${TMPDIR:-/tmp}/mim_editable.XXXXXX")"
TMP="$(cd "$TMP" && pwd -P)"
if [[ "${KEEP:-0}" == 1 ]]; then
  echo "[mim_editable] keeping $TMP"
else
  trap 'rm -rf "$TMP"' EXIT
fi
start=$(date +%s)
fail() { echo "[mim_editable] FAIL: $*" >&2; exit 1; }

# --without-pip: the base environment's pip runs, installing into the new venv
"$PY" -m venv --without-pip "$TMP/venv"
VPY="$TMP/venv/bin/python"
"$PY" -c 'import sysconfig; p = sysconfig.get_paths()
print("\n".join(dict.fromkeys([p["purelib"], p["platlib"]])))' \
  > "$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_base_env.pth"
OFFLINE=(--no-index --no-deps --no-build-isolation)
case "$INSTALLER" in
  pip) "$VPY" -m pip install --disable-pip-version-check -q "${OFFLINE[@]}" -e "$ROOT" ;;
  mim) "$VPY" -m mim install "${OFFLINE[@]}" -e "$ROOT" ;;
  *) fail "unknown installer $INSTALLER (pip or mim)" ;;
esac > "$TMP/install.log" 2>&1 || { tail -n 30 "$TMP/install.log" >&2; fail "$INSTALLER install -e"; }

# mim's own lookup, and the package the new venv imports, are this checkout's
# (from $TMP: `python -`/`-m` put the working folder first on sys.path, and
# a source tree's *.egg-info there would decide pkg_resources' answer)
cd "$TMP"
"$VPY" - "$ROOT" <<'PY' || fail "mim does not find this checkout"
import os.path as osp
import sys

from mim.utils import get_installed_path
from mmengine.utils import get_installed_path as mmengine_installed_path

import mmprecond

root = sys.argv[1]
pkg_root = get_installed_path('mmprecond')
print(f'[mim_editable] mim finds mmprecond at {pkg_root}')
if not osp.isdir(pkg_root):
    sys.exit(f'[mim_editable] {pkg_root} does not exist')
ok = osp.samefile(pkg_root, osp.join(root, 'mmprecond'))
# MMEngine resolves `mmprecond::` config paths the same way
ok &= osp.samefile(mmengine_installed_path('mmprecond'), pkg_root)
ok &= osp.samefile(mmprecond.__file__, osp.join(root, 'mmprecond', '__init__.py'))
sys.exit(0 if ok else 1)
PY

# the demo configs read data/synthetic_coco/ relative to the working folder
"$VPY" -m mmprecond.datasets.synthetic coco --out data/synthetic_coco \
  --num-train 4 --num-val 2 > /dev/null
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$VPY" -m mim train mmprecond "$CONFIG" \
  --work-dir "$TMP/work" \
  --cfg-options train_cfg.max_iters=2 val_cfg=None val_dataloader=None \
  val_evaluator=None default_hooks.logger.interval=1 \
  > "$TMP/train.log" 2>&1 || { tail -n 40 "$TMP/train.log" >&2; fail "mim train"; }
grep -F "will use $ROOT/configs/" "$TMP/train.log" \
  || { tail -n 40 "$TMP/train.log" >&2; fail "mim did not take the config from $ROOT/configs"; }
grep -E 'Iter\(train\) \[2/2\]' "$TMP/train.log" | tail -n 1 | cut -c1-200
[[ -f "$TMP/work/iter_2.pth" ]] || { tail -n 40 "$TMP/train.log" >&2; fail "no iter_2.pth"; }
echo "[mim_editable] OK ($INSTALLER install -e, mim train 2 iterations): $(( $(date +%s) - start )) s"

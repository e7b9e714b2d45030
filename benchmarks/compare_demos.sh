#!/usr/bin/env bash
# The comparison of docs/benchmarks.md: the demo Faster R-CNN and the demo
# ResNet-18 classifier, each with SGD, AdamW, NKFAC, AdaNKFAC, KFAC and AdamR,
# 3 seeds, the same budget, through tools/analysis_tools/compare_optimizers.py.
# Finished runs are skipped and interrupted ones resumed when rerun.
#
#   bash benchmarks/compare_demos.sh [det|cls|all]     (default: all)
#
# DET_ITERS / CLS_EPOCHS / SEEDS / WORK override the budget.
set -eo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
WORK=${WORK:-work_dirs/compare_demos}
SEEDS=${SEEDS:-0 1 2}
DET_ITERS=${DET_ITERS:-20}
CLS_EPOCHS=${CLS_EPOCHS:-2}
WHAT=${1:-all}

O=optim_wrapper.optimizer
PRE="optim_wrapper.constructor=PrecondOptimWrapperConstructor"
LOADERS="train_dataloader.num_workers=1 val_dataloader.num_workers=1"

# $1: SGD-family hyper-parameters (the AdamW family keeps the config's);
# $2 / $3: statistics / refresh interval (inverses, AdamR's basis)
settings() {
  local iv="$O.stat_interval=$2;$O.inv_interval=$3"
  echo "sgd:$O.type=SGD;$1"
  echo "adamw:"
  echo "nkfac:$PRE;$O.type=NKFAC;$1;$iv"
  echo "adankfac:$PRE;$O.type=AdaNKFAC;$iv"
  echo "kfac:$PRE;$O.type=KFAC;$1;$iv"
  echo "adamr:$PRE;$O.type=AdamR;$O.stat_interval=$2;$O.basis_interval=$3"
}

if [[ $WHAT == det || $WHAT == all ]]; then
  # statistics every step, refreshes every 5 (warm-started Newton from step 15)
  mapfile -t DET < <(settings "$O.lr=0.02;$O.momentum=0.9;$O.weight_decay=1e-4" 1 5)
  # AdamW: lr 2e-3, wd 0.05 (the demo config); 40 val images keep evaluation short
  $PYTHON tools/analysis_tools/compare_optimizers.py \
    configs/demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py \
    --optimizers "${DET[@]}" --seeds $SEEDS --max-iters "$DET_ITERS" \
    --log-interval 5 --data-root data/synthetic_coco_val40 --num-val 40 \
    --work-dir "$WORK/det" --out-dir docs/benchmarks/det --cfg-options $LOADERS
fi
if [[ $WHAT == cls || $WHAT == all ]]; then
  # 32 iterations per epoch: statistics every 4, refreshes every 20
  mapfile -t CLS < <(settings "$O.lr=0.05;$O.momentum=0.9;$O.weight_decay=1e-4" 4 20)
  $PYTHON tools/analysis_tools/compare_optimizers.py \
    configs/demo/resnet18-tiny_adamw_synthetic-cls.py \
    --optimizers "${CLS[@]}" --seeds $SEEDS --max-epochs "$CLS_EPOCHS" \
    --log-interval 4 --work-dir "$WORK/cls" --out-dir docs/benchmarks/cls \
    --cfg-options $LOADERS
fi

#!/usr/bin/env bash
# The related optimizers (AdaBK's SGDM_BK / AdamW_BK, Shampoo, SGD-PH,
# AdaFisher / AdaFisherW) against SGD and AdamW on the demo ResNet-18
# classifier, 3 seeds, the same budget, through
# tools/analysis_tools/compare_optimizers.py (finished runs are skipped and
# interrupted ones resumed when rerun).
#
#   bash benchmarks/compare_related.sh
#
# CLS_EPOCHS / SEEDS / WORK override the budget; REPORT_ONLY=1 tabulates and
# plots the finished runs without training.
set -eo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
WORK=${WORK:-work_dirs/compare_related}
SEEDS=${SEEDS:-0 1 2}
CLS_EPOCHS=${CLS_EPOCHS:-4}
EXTRA=()
[[ -n ${REPORT_ONLY:-} ]] && EXTRA+=(--report-only)

O=optim_wrapper.optimizer
PRE="optim_wrapper.constructor=PrecondOptimWrapperConstructor"
SGDM="$O.lr=0.05;$O.momentum=0.9;$O.weight_decay=1e-4"
# 32 iterations per epoch: statistics every 4, refreshes every 20
IV="$O.stat_interval=4;$O.refresh_interval=20"
SETTINGS=(
  "sgd:$O.type=SGD;$SGDM"
  "adamw:"
  "sgdm_bk:$PRE;$O.type=SGDM_BK;$SGDM;$IV"
  "adamw_bk:$PRE;$O.type=AdamW_BK;$IV"
  "shampoo:$PRE;$O.type=Shampoo;$SGDM;$O.stat_interval=1;$O.refresh_interval=20"
  "sgd_ph:$PRE;optim_wrapper.type=HessianOptimWrapper;$O.type=SGD_PH;$SGDM"
  "adafisherw:$PRE;$O.type=AdaFisherW;$O.stat_interval=4"
)
$PYTHON tools/analysis_tools/compare_optimizers.py \
  configs/demo/resnet18-tiny_adamw_synthetic-cls.py \
  --optimizers "${SETTINGS[@]}" --seeds $SEEDS "${EXTRA[@]}" --max-epochs "$CLS_EPOCHS" \
  --log-interval 4 --work-dir "$WORK/cls" --out-dir docs/benchmarks/related \
  --cfg-options train_dataloader.num_workers=1 val_dataloader.num_workers=1

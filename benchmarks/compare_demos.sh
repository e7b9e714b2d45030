#!/usr/bin/env bash
# The comparison of docs/benchmarks.md: the demo Faster R-CNN and the demo
# ResNet-18 classifier, each with SGD, AdamW, NKFAC, AdaNKFAC, KFAC and AdamR
# (plus pytorch-optimizer's SOAP, Shampoo and Muon and singd's SINGD when
# `pip install .[peers]` installed them), and the small Swin classifier with
# SGD, AdamW, FSGD, FAdam, AFOpt and Ada_AFOpt; 3 seeds, the same budget,
# through tools/analysis_tools/compare_optimizers.py. Finished runs are
# skipped and interrupted ones resumed when rerun.
#
#   bash benchmarks/compare_demos.sh [det|cls|swin|all]     (default: all)
#
# DET_ITERS / CLS_EPOCHS / SWIN_EPOCHS / SEEDS / WORK override the budget;
# PEERS=0 leaves the peer optimizers out even when installed.
# Equal wall-clock instead of equal iterations: MATCH_TIME=adamw (every
# setting gets the training seconds AdamW needs for the budget above) or
# TIME_BUDGET=SECONDS, with CALIBRATE_ITERS (default 50) iterations of
# s / iter calibration per setting; VAL_POINTS=K validates K times per run.
# Use another WORK for a time-matched comparison, e.g.
#   MATCH_TIME=adamw VAL_POINTS=5 WORK=work_dirs/compare_time \
#     bash benchmarks/compare_demos.sh det
set -eo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
WORK=${WORK:-work_dirs/compare_demos}
SEEDS=${SEEDS:-0 1 2}
DET_ITERS=${DET_ITERS:-300}
CLS_EPOCHS=${CLS_EPOCHS:-10}
SWIN_EPOCHS=${SWIN_EPOCHS:-20}
WHAT=${1:-all}
# REPORT_ONLY=1: tabulate and plot the finished runs, train nothing (after
# running seed groups in parallel, e.g. SEEDS="0 1" and SEEDS=2 at once)
EXTRA=()
[[ -n ${REPORT_ONLY:-} ]] && EXTRA+=(--report-only)
[[ -n ${MATCH_TIME:-} ]] && EXTRA+=(--match-time "$MATCH_TIME")
[[ -n ${TIME_BUDGET:-} ]] && EXTRA+=(--time-budget "$TIME_BUDGET")
[[ -n ${CALIBRATE_ITERS:-} ]] && EXTRA+=(--calibrate-iters "$CALIBRATE_ITERS")
[[ -n ${VAL_POINTS:-} ]] && EXTRA+=(--val-points "$VAL_POINTS")

O=optim_wrapper.optimizer
PRE="optim_wrapper.constructor=PrecondOptimWrapperConstructor"
LOADERS="train_dataloader.num_workers=1 val_dataloader.num_workers=1"

# $1: SGD-family hyper-parameters (the AdamW family keeps the config's);
# $2 / $3: statistics / refresh interval (inverses, AdamR's basis)
settings() {
  local iv="$O.stat_interval=$2;$O.refresh_interval=$3"
  echo "sgd:$O.type=SGD;$1"
  echo "adamw:"
  echo "nkfac:$PRE;$O.type=NKFAC;$1;$iv"
  echo "adankfac:$PRE;$O.type=AdaNKFAC;$iv"
  echo "kfac:$PRE;$O.type=KFAC;$1;$iv"
  echo "adamr:$PRE;$O.type=AdamR;$O.stat_interval=$2;$O.refresh_interval=$3"
  if [[ $WITH_PEERS == 1 ]]; then
    # SOAP (Adam-like) keeps AdamW's lr / wd.  Shampoo (pytorch-optimizer's
    # AdaGrad-like sums, inverse 2k-th roots of a k-dim tensor) does not
    # train at AdamW's lr 2e-3 (chance top-1) and diverges at 0.1; lr 0.02
    # was the best of {0.006, 0.02, 0.1} on the classifier (seed 0), with
    # AdamW's per-step decay 1e-4 (fixed_decay).  SOAP's basis and Shampoo's
    # roots every refresh interval (an SVD per dimension, up to 3136 wide in
    # the detector); SINGD's preconditioner every statistics interval, on
    # SGD's settings.  Muon (Moonlight's lr scaling) on the hidden weights,
    # AdamW on the 1-D parameters and the heads' final layers, both at
    # AdamW's lr / wd; the constructor hands it the model for the names.
    echo "peer_muon:$PRE;$O.type=PeerMuon"
    echo "peer_soap:$O.type=PeerSOAP;$O.precondition_frequency=$3"
    echo "peer_shampoo:$O.type=PeerShampoo;$O.lr=0.02;$O.weight_decay=1e-4;$O.weight_decouple=True;$O.fixed_decay=True;$O.preconditioning_compute_steps=$3"
    echo "peer_singd:$PRE;$O.type=PeerSINGD;$1;$O.T=$2"
  fi
}

# the attention-aware family (FSGD / FAdam / AFOpt / Ada_AFOpt), for Swin
afopt_settings() {
  local iv="$O.stat_interval=$2;$O.refresh_interval=$3"
  echo "sgd:$O.type=SGD;$1"
  echo "adamw:"
  echo "fsgd:$PRE;$O.type=FSGD;$1;$iv"
  echo "fadam:$PRE;$O.type=FAdam;$iv"
  echo "afopt:$PRE;$O.type=AFOpt;$1;$iv"
  echo "ada_afopt:$PRE;$O.type=Ada_AFOpt;$iv"
  if [[ $WITH_PEERS == 1 ]]; then
    echo "peer_muon:$PRE;$O.type=PeerMuon"
  fi
}

WITH_PEERS=0
if [[ ${PEERS:-1} != 0 ]] && $PYTHON -c "import pytorch_optimizer, singd" 2>/dev/null; then
  WITH_PEERS=1
fi

if [[ $WHAT == det || $WHAT == all ]]; then
  # statistics every 5 steps, refreshes every 25 (exact at 0, 25, 50,
  # warm-started Newton afterwards)
  mapfile -t DET < <(settings "$O.lr=0.02;$O.momentum=0.9;$O.weight_decay=1e-4" 5 25)
  # AdamW: lr 2e-3, wd 0.05 (the demo config); 40 val images keep evaluation short
  $PYTHON tools/analysis_tools/compare_optimizers.py \
    configs/demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py \
    --optimizers "${DET[@]}" --seeds $SEEDS "${EXTRA[@]}" --max-iters "$DET_ITERS" \
    --log-interval 5 --data-root data/synthetic_coco_val40 --num-val 40 \
    --work-dir "$WORK/det" --out-dir docs/benchmarks/det --cfg-options $LOADERS
fi
# $1: config, $2: epochs, $3: name (work dir, docs/benchmarks/<name>),
# $4...: the settings; 32 iterations per epoch
classifier() {
  local config=$1 epochs=$2 name=$3
  shift 3
  $PYTHON tools/analysis_tools/compare_optimizers.py "$config" \
    --optimizers "$@" --seeds $SEEDS "${EXTRA[@]}" --max-epochs "$epochs" \
    --log-interval 4 --work-dir "$WORK/$name" --out-dir "docs/benchmarks/$name" \
    --cfg-options $LOADERS
}
# classifiers: statistics every 4 iterations, refreshes every 20
SGD_CLS="$O.lr=0.05;$O.momentum=0.9;$O.weight_decay=1e-4"
if [[ $WHAT == cls || $WHAT == all ]]; then
  mapfile -t CLS < <(settings "$SGD_CLS" 4 20)
  classifier configs/demo/resnet18-tiny_adamw_synthetic-cls.py "$CLS_EPOCHS" cls "${CLS[@]}"
fi
if [[ $WHAT == swin || $WHAT == all ]]; then
  mapfile -t SWIN < <(afopt_settings "$SGD_CLS" 4 20)
  classifier configs/demo/swin-mini_adamw_synthetic-cls.py "$SWIN_EPOCHS" swin "${SWIN[@]}"
fi

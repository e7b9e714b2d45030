# Copyright (c) mmprecond contributors. All rights reserved.
"""Mixed precision with every preconditioned optimizer on a real mmdet detector.

CPU (always): MMEngine's ``AmpOptimWrapper`` refuses to be built without an
accelerator, so these tests drive the same pieces it uses directly:
``torch.autocast('cpu', dtype)`` around the forward pass and, for fp16,
``torch.amp.GradScaler('cpu')`` with a dynamic loss scale, attached to the
optimizer as ``PrecondOptimWrapperConstructor`` attaches the wrapper's
scaler.  The demo's tiny Faster R-CNN (mmdet ResNet + FPN +
RPN + RoI head) cannot run under CPU autocast: mmcv's CPU NMS and RoIAlign
kernels accept fp32 only ("expected scalar type Float but found Half").  So
the CPU tests use a real mmdet RetinaNet (ResNet-18 + FPN + RetinaHead with
focal loss, ``configs/retinanet_r18-tiny_fpn_synthetic.py`` next to this
file), whose training forward needs no mmcv kernel, and the CUDA test uses
the demo Faster R-CNN.

* an injected overflow step (loss scaled to inf) is skipped by the scaler:
  weights, factors and inverses are untouched and the scale is halved;
* fp16 (dynamic loss scale) and bf16 track fp32 within the tolerance below
  over ``STEPS`` steps from the same weights on the same batches.

CUDA (skipped without a GPU): the demo Faster R-CNN trained by MMEngine's
``Runner`` with ``AmpOptimWrapper`` (fp16, dynamic loss scale).
"""
import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import use_coco_root
from mmengine.config import Config
from mmengine.runner import Runner, set_random_seed

import mmprecond  # noqa: F401
from mmprecond.optim import FSGD, KFAC, NKFAC, Ada_AFOpt, AdamR, AdaNKFAC, AFOpt, FAdam

pytest.importorskip('mmdet')
pytestmark = pytest.mark.slow

CPU_AMP_CONFIG = (Path(__file__).parent / 'configs' /
                  'retinanet_r18-tiny_fpn_synthetic.py')
STEPS = 4
#: fp16/bf16 vs fp32 after STEPS steps: ||theta_amp - theta_32|| is at most
#: this fraction of the fp32 run's own movement ||theta_32 - theta_0||, by
#: base update.  Measured with fp16 (CPU, 4 steps): 0.025-0.039 on the SGDM
#: base, 0.28-0.37 on the AdamW base (bf16, tolerance doubled: 0.07-0.12
#: and 0.45-0.56); the AdamW base's first steps are close to
#: lr * sign(g), so coordinates with a near-zero gradient move by a full
#: lr in a direction that rounding decides.
PARAM_TOL = {'sgdm': 0.1, 'adamw': 0.6}
#: and every step's loss within this relative difference of fp32's.
LOSS_RTOL = {torch.float16: 0.01, torch.bfloat16: 0.05}
CONVS = dict(precondition_convs=True)  # RetinaNet has no Linear layer
OPTIMIZERS = [
    (NKFAC, dict(lr=0.01)), (AdaNKFAC, dict(lr=1e-3, weight_decay=0.05)),
    (KFAC, dict(lr=0.01)), (AdamR, dict(lr=1e-3, refresh_interval=2)),
    (FSGD, dict(lr=0.01, **CONVS)), (FAdam, dict(lr=1e-3, **CONVS)),
    (AFOpt, dict(lr=0.01, **CONVS)), (Ada_AFOpt, dict(lr=1e-3, **CONVS))]
IDS = [cls.__name__ for cls, _ in OPTIMIZERS]


@pytest.fixture(scope='module')
def detector(tiny_coco):
    """The demo Faster R-CNN's config, initial weights and 4 fixed batches."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(str(CPU_AMP_CONFIG))
    use_coco_root(cfg, tiny_coco)
    cfg.train_dataloader.batch_size = 2
    init_default_scope('mmdet')
    set_random_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()  # as the Runner does (focal-loss prior on the head)
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == STEPS:
            break
    return dict(init=copy.deepcopy(model.state_dict()), cfg=cfg,
                batches=batches)


def build(detector, cls, kw):
    from mmdet.registry import MODELS
    model = MODELS.build(detector['cfg'].model)
    model.load_state_dict(detector['init'])
    hp = dict(stat_interval=1, **kw)
    if cls is not AdamR:
        hp.setdefault('refresh_interval', 2)
    return model, cls(model.parameters(), model=model, **hp)


def loss_of(model, batch, dtype=None):
    data = model.data_preprocessor(batch, True)
    with torch.autocast('cpu', dtype=dtype or torch.float32,
                        enabled=dtype is not None):
        losses = model(**data, mode='loss')
    loss, _ = model.parse_losses(losses)
    return loss.float()


def train(model, opt, batches, dtype=None, scaler=None, overflow_at=None):
    """Returns the per-step losses; ``overflow_at`` makes one step inf."""
    set_random_seed(0)  # same RPN / RoI sampling draws in every run
    losses = []
    for i, batch in enumerate(batches):
        opt.zero_grad()
        loss = loss_of(model, batch, dtype)
        if i == overflow_at:
            loss = loss * math.inf
        losses.append(float(loss))
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return losses


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize('cls,kw', OPTIMIZERS, ids=IDS)
def test_overflow_step_is_skipped_with_factors_untouched(detector, cls, kw):
    model, opt = build(detector, cls, kw)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0**10)
    opt.attach_grad_scaler(scaler)
    batches = detector['batches']
    train(model, opt, batches[:2], torch.float16, scaler)
    assert opt.steps == 2 and opt.layer_state
    weights = params(model)
    factors = {n: {k: v.clone() for k, v in st.items()}
               for n, st in opt.layer_state.items()}
    scale = scaler.get_scale()
    train(model, opt, batches[2:3], torch.float16, scaler, overflow_at=0)
    assert scaler.get_scale() == scale / 2  # dynamic loss scale backed off
    assert opt.steps == 2  # the optimizer step was not taken
    assert torch.equal(params(model), weights)
    assert set(opt.layer_state) == set(factors)
    for name, st in factors.items():
        for key, value in st.items():
            assert torch.equal(opt.layer_state[name][key], value), (name, key)
    # the next normal step trains again
    train(model, opt, batches[3:4], torch.float16, scaler)
    assert opt.steps == 3 and not torch.equal(params(model), weights)
    assert opt.fallbacks.counts['nonfinite_direction'] == 0


_FP32_RUNS = {}


def fp32_run(detector, cls, kw):
    """Initial and final parameters and losses of the fp32 run (cached)."""
    if cls not in _FP32_RUNS:
        model, opt = build(detector, cls, kw)
        theta0 = params(model)
        losses = train(model, opt, detector['batches'])
        _FP32_RUNS[cls] = (theta0, params(model), losses)
    return _FP32_RUNS[cls]


@pytest.mark.parametrize('cls,kw', OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16],
                         ids=['fp16', 'bf16'])
def test_low_precision_tracks_fp32(detector, cls, kw, dtype):
    batches = detector['batches']
    theta0, theta32, ref_losses = fp32_run(detector, cls, kw)
    model, opt = build(detector, cls, kw)
    scaler = None
    if dtype == torch.float16:
        scaler = torch.amp.GradScaler('cpu')
        opt.attach_grad_scaler(scaler)
    losses = train(model, opt, batches, dtype, scaler)
    assert all(math.isfinite(v) for v in losses)
    moved = (theta32 - theta0).norm()
    gap = (params(model) - theta32).norm()
    print(f'{cls.__name__} {dtype}: gap/moved = {gap / moved:.4f}, '
          f'losses {losses} vs fp32 {ref_losses}')
    tol = PARAM_TOL[opt.base] * (2 if dtype == torch.bfloat16 else 1)
    assert gap <= tol * moved
    for got, want in zip(losses, ref_losses):
        assert abs(got - want) <= LOSS_RTOL[dtype] * want
    assert opt.steps == STEPS  # no step was skipped


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
@pytest.mark.parametrize('cls,kw', OPTIMIZERS, ids=IDS)
def test_cuda_amp_optim_wrapper_runner(cls, kw, tiny_coco, tmp_path):
    from test_mmdet_training import demo_cfg
    optimizer = dict(type=cls.__name__, stat_interval=1, **kw)
    if 'refresh_interval' not in kw:
        optimizer['refresh_interval'] = 2
    cfg = demo_cfg(tiny_coco, tmp_path, optimizer, iters=8)
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.loss_scale = 'dynamic'
    runner = Runner.from_cfg(cfg)
    runner.train()
    opt = runner.optim_wrapper.optimizer
    assert opt.grad_scaler is runner.optim_wrapper.loss_scaler
    assert opt.steps >= 1 and opt.layer_state
    for st in opt.layer_state.values():
        for value in st.values():
            assert torch.isfinite(value).all()

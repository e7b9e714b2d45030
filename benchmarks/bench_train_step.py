# Copyright (c) mmprecond contributors. All rights reserved.
"""Time per training iteration and optimizer-state memory, vs AdamW / SGD.

Builds a real mmdet detector from a config (default: the demo Faster
R-CNN), feeds it the built-in synthetic COCO set and runs
``model.train_step`` (exactly what MMEngine's ``IterBasedTrainLoop`` does)
with each optimizer in the same process, one after the other.

A preconditioned optimizer does different work on different iterations, so
it is timed by kind and amortised over its intervals::

    per-iter = t_plain                          (precondition + base step)
             + (t_stat - t_plain) / T_stat      (hooks, im2col, folding)
             + t_newton / T_inv                 (warm-started refreshes)
             + (t_exact - t_newton) / (C T_inv) (periodic exact refresh)

with the optimizer's own ``T_stat``, ``T_inv`` and ``C`` (thesis defaults
100 / 1000 / 500 unless overridden on the command line).

Run::

    python benchmarks/bench_train_step.py [--config CFG] [--iters 10]
"""
import argparse
import copy
import os.path as osp
import statistics
import time
from typing import Callable, Dict, List

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO = osp.join(REPO, 'configs/demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py')

OPTIMIZERS = {
    'SGD': dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4),
    'AdamW': dict(type='AdamW', lr=1e-4, weight_decay=0.05),
    'NKFAC': dict(type='NKFAC', lr=0.02, weight_decay=1e-4),
    'AdaNKFAC': dict(type='AdaNKFAC', lr=1e-4, weight_decay=0.2),
    'KFAC': dict(type='KFAC', lr=0.02, weight_decay=1e-4),
}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer state, preconditioner state included."""
    total = 0
    for st in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in st.values()
                     if torch.is_tensor(v))
    for st in getattr(optimizer, 'layer_state', {}).values():
        total += sum(v.numel() * v.element_size() for v in st.values())
    return total


def precondition_flops(optimizer: torch.optim.Optimizer) -> float:
    """FLOPs of one step's ``L^-1 G R^-1`` products over all layers."""
    from mmprecond.curvature.capture import factor_dims
    flops = 0.0
    for name, module in getattr(optimizer, 'layers', {}).items():
        st = optimizer.layer_state.get(name, {})
        d_out, d_in = factor_dims(module)
        if 'L_inv' in st:
            flops += 2.0 * d_out * d_out * d_in
        if 'R_inv' in st:
            flops += 2.0 * d_out * d_in * d_in
    return flops


def gemm_rate(n: int = 1024, reps: int = 5) -> float:
    """Measured fp32 GEMM rate (FLOP/s) of ``n x n`` products on this CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2.0 * n**3 / mean_time(lambda: a @ b, reps)


def mean_time(fn: Callable[[], None], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_optimizer(model: torch.nn.Module, opt_cfg: dict, batches: List[dict],
                      iters: int) -> dict:
    """Timings (s) and state bytes of one optimizer on ``model``."""
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

    model.train()
    wrapper = OPTIM_WRAPPER_CONSTRUCTORS.build(
        dict(type='PrecondOptimWrapperConstructor',
             optim_wrapper_cfg=dict(type='OptimWrapper', optimizer=opt_cfg)))(model)
    opt = wrapper.optimizer
    counter = iter(range(10**9))

    def train_iter() -> None:
        model.train_step(batches[next(counter) % len(batches)], wrapper)

    train_iter()  # step 0: first statistics and exact inverses
    t_plain = mean_time(train_iter, iters)
    row = dict(plain=t_plain, iter=t_plain, mem=state_bytes(opt))
    if not hasattr(opt, 'refresh_interval'):
        return row
    s_int, i_int, c = opt.stat_interval, opt.refresh_interval, opt.exact_inv_period
    opt.stat_interval, opt.refresh_interval = 1, 10**9
    opt.capture.active = True
    t_stat = mean_time(train_iter, max(3, iters // 2))
    opt.stat_interval, opt.refresh_interval = s_int, i_int
    newton_step = 3 * i_int  # neither early nor a multiple of C*T
    t_newton = mean_time(lambda: opt.update_preconditioners(newton_step), 2)
    t_exact = mean_time(lambda: opt.update_preconditioners(0), 2)
    row.update(
        stat=t_stat, newton=t_newton, exact=t_exact,
        flops=precondition_flops(opt), defaults=opt.defaults,
        iter=t_plain + (t_stat - t_plain) / s_int + t_newton / i_int +
        (t_exact - t_newton) / (c * i_int),
        mem=state_bytes(opt), layers=len(opt.layers))
    return row


def cell(row: dict, key: str) -> str:
    return f'{row[key]:.3f}' if key in row else '-'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default=DEMO)
    parser.add_argument('--data-root', default=osp.join(REPO, 'data/bench_coco'))
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--optimizers', nargs='+', default=list(OPTIMIZERS))
    parser.add_argument('--max-factor-dim', type=int, default=None)
    args = parser.parse_args()

    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.registry import MODELS
    from mmengine.runner import Runner

    from mmprecond.datasets import ensure_synthetic_coco

    register_all_modules()
    torch.manual_seed(0)
    ensure_synthetic_coco(args.data_root, num_train=64, num_val=8, seed=0)
    cfg = Config.fromfile(args.config)
    loader_cfg = copy.deepcopy(cfg.train_dataloader)
    loader_cfg.dataset.data_root = args.data_root + '/'
    loader_cfg.num_workers = 0
    loader_cfg.persistent_workers = False
    loader = Runner.build_dataloader(loader_cfg, seed=0)
    batches: List[dict] = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 4:
            break
    model0 = MODELS.build(cfg.model)
    model0.init_weights()
    params = sum(p.numel() for p in model0.parameters())

    results: Dict[str, dict] = {}
    for name in args.optimizers:
        opt_cfg = dict(OPTIMIZERS[name])
        if args.max_factor_dim and name not in ('SGD', 'AdamW'):
            opt_cfg['max_factor_dim'] = args.max_factor_dim
        results[name] = measure_optimizer(copy.deepcopy(model0), opt_cfg,
                                          batches, args.iters)
    rate = gemm_rate()
    print(f'config={osp.basename(args.config)}  params={params / 1e6:.2f}M  '
          f'torch={torch.__version__}  threads={torch.get_num_threads()}  '
          f'device=cpu  GEMM rate={rate / 1e9:.1f} GFLOP/s (1024^2 fp32)')
    print('floor vs base: (torch base s/it + GEMM floor) / torch base s/it, '
          'the ratio if preconditioning cost only its GEMMs')
    print(f"{'optimizer':<10} {'plain s':>8} {'stat s':>8} {'newton s':>9} "
          f"{'exact s':>8} {'amort. s/it':>11} {'vs AdamW':>9} {'vs SGD':>7} "
          f"{'state MB':>9} {'vs AdamW':>9} {'GEMM floor s':>12} "
          f"{'floor vs base':>13}")
    base_t = results.get('AdamW', {}).get('iter')
    sgd_t = results.get('SGD', {}).get('iter')
    base_m = results.get('AdamW', {}).get('mem')
    for name, r in results.items():
        ratio = f"{r['iter'] / base_t:.2f}" if base_t else '-'
        ratio_sgd = f"{r['iter'] / sgd_t:.2f}" if sgd_t else '-'
        mem_ratio = f"{r['mem'] / base_m:.2f}" if base_m else '-'
        # the least a plain step can cost over its base: the preconditioning
        # GEMMs at the measured GEMM rate (ratio vs the same-base torch step)
        floor, floor_ratio = '-', '-'
        if 'flops' in r:
            base = results.get('AdamW' if 'betas' in r['defaults'] else 'SGD')
            floor_s = r['flops'] / rate
            floor = f'{floor_s:.3f}'
            if base:
                floor_ratio = f"{(base['iter'] + floor_s) / base['iter']:.2f}"
        print(f"{name:<10} {cell(r, 'plain'):>8} {cell(r, 'stat'):>8} "
              f"{cell(r, 'newton'):>9} {cell(r, 'exact'):>8} "
              f"{r['iter']:>11.3f} {ratio:>9} {ratio_sgd:>7} "
              f"{r['mem'] / 2**20:>9.1f} {mem_ratio:>9} {floor:>12} "
              f"{floor_ratio:>13}")


if __name__ == '__main__':
    main()

# Copyright (c) mmprecond contributors. All rights reserved.
"""An optim wrapper that lets the optimizer differentiate the gradient again."""
import warnings

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class HessianOptimWrapper(OptimWrapper):
    """``OptimWrapper`` for optimizers that need Hessian-vector products.

    MMEngine's ``OptimWrapper`` (gradient accumulation, ``clip_grad``,
    ``update_params``) with one change in :meth:`backward`:

    * if the optimizer has ``prepare_hessian(loss)`` (``SGD_PH``), that is
      called first (it forms this step's Hessian-vector product with its own
      ``create_graph`` pass), then the ordinary ``loss.backward()`` runs.
      This also works under DDP, whose reducer rejects
      ``backward(create_graph=True)``;
    * otherwise ``loss.backward(create_graph=True)`` runs, leaving the graph
      in the gradients until ``zero_grad`` (``set_to_none``) drops them,
      which ``update_params`` does every step (torch's warning about that
      reference cycle is silenced here).

    Mixed precision (``AmpOptimWrapper``) is not combined with it: the
    second derivative of the scaled loss would need its own unscaling.

    Example:
        >>> optim_wrapper = dict(
        ...     type='HessianOptimWrapper',
        ...     constructor='PrecondOptimWrapperConstructor',
        ...     optimizer=dict(type='SGD_PH', lr=0.01, weight_decay=5e-3))
    """

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """Hessian preparation, then ``loss.backward(**kwargs)``."""
        prepare = getattr(self.optimizer, 'prepare_hessian', None)
        if prepare is not None:
            prepare(loss)
            super().backward(loss, **kwargs)
            return
        kwargs.setdefault('create_graph', True)
        with warnings.catch_warnings():
            warnings.filterwarnings(
                'ignore', message='Using backward.. with create_graph=True')
            super().backward(loss, **kwargs)

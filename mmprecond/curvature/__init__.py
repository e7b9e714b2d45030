# Copyright (c) mmprecond contributors. All rights reserved.
"""Layer statistics: capture (hooks) and running Kronecker factors."""
from .attention import ATTENTION_ADAPTERS, AttentionTap, register_attention_adapter
from .capture import LayerCapture, supported_reason
from .factors import BatchStatistics, batch_statistics

__all__ = ['LayerCapture', 'supported_reason', 'BatchStatistics', 'batch_statistics',
           'ATTENTION_ADAPTERS', 'AttentionTap', 'register_attention_adapter']

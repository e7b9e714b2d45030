# Copyright (c) mmprecond contributors. All rights reserved.
import uuid

import torch
from mmengine.logging import MMLogger

from mmprecond.logging import FallbackLog


def test_device_flags_are_counted_when_read_and_logged_once_by_name(tmp_path):
    log_file = tmp_path / 'fallbacks.log'
    MMLogger.get_instance(f'fallbacks-{uuid.uuid4().hex}', log_file=str(log_file))
    log = FallbackLog('Opt')
    labels = ('conv', 'fc')
    log.record_flags('nonfinite_direction', torch.tensor([False, True]), labels,
                     'raw gradient used')
    log.record_flags('nonfinite_direction', torch.tensor([True, True]), labels,
                     'raw gradient used')
    log.record_flags('nonfinite_statistics', torch.tensor([False]), ('fc', ),
                     'not folded')
    assert not log_file.read_text()  # nothing read or logged yet
    assert log.counts['nonfinite_direction'] == 3
    assert 'nonfinite_statistics' not in log.counts  # all flags clear
    log.record_flags('nonfinite_direction', torch.tensor([True, False]), labels,
                     'raw gradient used')
    log.record('excluded_layers', 'layer left out', n=2)
    assert dict(log.counts) == dict(nonfinite_direction=4, excluded_layers=2)
    lines = [ln for ln in log_file.read_text().splitlines() if 'Opt' in ln]
    # one warning per kind, the first naming the layers concerned
    assert len(lines) == 2
    assert 'raw gradient used (3 time(s), in conv, fc)' in lines[0]

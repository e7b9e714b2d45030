# Copyright (c) mmprecond contributors. All rights reserved.
"""Chunked im2col of the conv input statistic: exact sums, bounded memory."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from test_capture import naive_patches, with_ones

from mmprecond.curvature.capture import input_rows_gram

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONVS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=(1, 0)),
    dict(kernel_size=3, stride=(3, 2), padding=2),
    dict(kernel_size=(3, 2), dilation=2, padding=2, bias=False),
    dict(kernel_size=3, padding='same', dilation=(2, 1)),
    dict(kernel_size=(2, 4), padding='same'),
    dict(kernel_size=1, stride=2, padding='valid'),
    dict(kernel_size=5, stride=2, padding=0, dilation=(1, 2)),
]


@pytest.mark.parametrize('kwargs', CONVS)
@pytest.mark.parametrize('chunk', [1, 50, 200, 5000, None])
def test_chunked_conv_gram_equals_the_whole_patch_matrix(kwargs, chunk):
    """Every split (one output row, bands of rows, several samples, all)
    gives the float64 Gram matrix of the explicit patch rows."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **kwargs)
    x = torch.randn(3, 3, 11, 10)
    rows = with_ones(naive_patches(x, conv), conv.bias is not None).double()
    gram, n = input_rows_gram(conv, x, chunk_elements=chunk)
    whole, _ = input_rows_gram(conv, x, chunk_elements=1 << 40)
    assert n == len(rows) and gram.dtype == torch.float32
    torch.testing.assert_close(gram.double(), rows.T @ rows, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gram, whole, rtol=1e-5, atol=1e-4)


def test_chunked_conv_gram_unbatched_and_half_input():
    """A 3-D input is one sample; an fp16 input is unfolded in fp32."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    x = torch.randn(2, 9, 7).half()
    rows = with_ones(naive_patches(x[None].double(), conv), True)
    gram, n = input_rows_gram(conv, x, chunk_elements=20)
    assert n == len(rows) == 20
    torch.testing.assert_close(gram.double(), rows.T @ rows, rtol=1e-5, atol=1e-4)


def test_conv_gram_without_output_positions():
    """An input smaller than the kernel has no patch: zero Gram, zero rows."""
    conv = nn.Conv2d(2, 3, 5)
    gram, n = input_rows_gram(conv, torch.randn(1, 2, 3, 3), chunk_elements=7)
    assert n == 0 and torch.equal(gram, torch.zeros(51, 51))


PEAK_SCRIPT = textwrap.dedent('''
    import sys
    import torch, torch.nn as nn
    from mmprecond.curvature import capture

    def status(key):  # kB of the process's resident set (now / peak so far)
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f
                        if line.startswith(key + ':'))

    torch.set_num_threads(1)
    n, c, h, w, chunk = (int(v) for v in sys.argv[1:6])
    conv = nn.Conv2d(c, c, 3, padding=1)
    if chunk:
        capture.IM2COL_CHUNK_ELEMENTS = chunk
    capture.input_rows_gram(conv, torch.randn(1, c, 8, 8))  # kernels loaded
    x = torch.randn(n, c, h, w)
    # the peak so far is the present size, so a higher peak is this call's
    assert status('VmHWM') - status('VmRSS') < 16 * 1024
    base = status('VmHWM')
    gram, rows = capture.input_rows_gram(conv, x)
    assert rows == n * h * w and bool(torch.isfinite(gram).all())
    print((status('VmHWM') - base) / 1024)
''')


def peak_extra_mib(*args: int) -> float:
    """MiB the process's peak RSS rises by while one input Gram is formed."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    out = subprocess.run([sys.executable, '-c', PEAK_SCRIPT, *map(str, args)],
                         env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def test_conv_gram_memory_is_bounded_by_the_chunk():
    """1 x 64 x 120 x 200 input, 3x3 conv: its patch matrix is 53 MiB, all
    of which the capture unfolded when it chunked over samples only (54 MiB
    measured); with 8 MiB chunks the statistic costs about the chunk, one
    input band and the Gram matrix (13 MiB measured)."""
    extra = peak_extra_mib(1, 64, 120, 200, 1 << 21)
    assert extra < 24, f'{extra:.0f} MiB above the input'


@pytest.mark.slow
def test_conv_gram_memory_at_detection_resolution():
    """2 x 256 x 200 x 336 fp32 (a 1333 x 800 image's stride-4 level), 3x3
    256 -> 256 conv, default chunk: at most 300 MiB above the input (194 MiB
    measured; 1224 MiB when whole samples were unfolded, two of them alive at
    once).  About 25 s on one core."""
    extra = peak_extra_mib(2, 256, 200, 336, 0)
    assert extra <= 300, f'{extra:.0f} MiB above the input'

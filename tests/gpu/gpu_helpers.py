"""What the GPU tests share: the skip without CUDA, and GPU timing with CUDA events."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

# Every module of tests/gpu starts with `pytestmark = NEEDS_GPU`.
NEEDS_GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA GPU: tests/gpu runs on a GPU machine (python -m pytest -m gpu tests/gpu)"),
]


def gpu_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of GPU time from before to after the work ``fn`` queues on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def sleep_cycles(ms: float) -> int:
    """The argument of ``torch.cuda._sleep`` (a spin kernel on one SM) that lasts about ``ms``."""
    probe = 10_000_000
    gpu_ms(lambda: torch.cuda._sleep(probe))  # first launch loads the kernel
    return int(probe * ms / gpu_ms(lambda: torch.cuda._sleep(probe)))

"""Exact tensor-memory bookkeeping from the profiler, shared by the tests (test_losses.py) and the
benchmarks (tests/bench/)."""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ side writes start/stop lines there."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def tensor_allocations(fn: Callable[[], None]) -> tuple[int, int]:
    """Run fn() once: (largest single tensor allocation, peak of live tensor bytes), in bytes.

    Exact and independent of the C allocator's caching and fragmentation: the profiler reports every
    CPU tensor allocation and free (with its size), and the running sum is taken in time order.
    """
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = largest = 0
    for _, nbytes in events:
        live += nbytes
        peak, largest = max(peak, live), max(largest, nbytes)
    return largest, peak

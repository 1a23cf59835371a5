"""Memory budgets of the scans (house rule 10: one formula, one place).

Every chunked scan — exact learning images, sketch projections, per-sample gradients — asks
:func:`scan_budget` how many bytes one chunk may hold and sizes its chunks from that, so a large
model degrades to smaller chunks (down to one sample, then a loop without vmap) instead of
being killed by the kernel:

* on a GPU: at most ``GPU_CHUNK_BYTES`` and a quarter of the device's free memory;
* on the CPU: at most ``CPU_CHUNK_BYTES`` and ``CPU_SHARE`` of the RAM the kernel reports
  available (``MemAvailable`` in ``/proc/meminfo``; ``os.sysconf`` elsewhere).

:func:`limit_scan_memory` caps every budget inside a ``with`` block (tests, or a user who shares
the machine): ``with limit_scan_memory(256 * 2**20): monitor scan ...``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["available_memory", "scan_budget", "limit_scan_memory", "CPU_CHUNK_BYTES", "GPU_CHUNK_BYTES", "CPU_SHARE"]

#: At most this per chunk on the CPU (bytes), whatever RAM is free.
CPU_CHUNK_BYTES = 512 * 2**20
#: On a GPU: at most this, and at most a quarter of the free device memory.
GPU_CHUNK_BYTES = 4 * 2**30
#: Share of the available RAM one chunk may use on the CPU.
CPU_SHARE = 0.125
#: Share of the free device memory one chunk may use on a GPU.
GPU_SHARE = 0.25

_LIMIT = threading.local()


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes the process can still allocate on ``device``: free device memory on CUDA, the kernel's
    ``MemAvailable`` on the CPU (page cache it can drop included), or physical free pages."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30  # unknown platform: assume a small workstation


def scan_budget(device: torch.device | str = "cpu") -> int:
    """Bytes one chunk of a scan may hold on ``device`` (see the module docstring), at least 1 byte."""
    device = torch.device(device)
    if device.type == "cuda":
        budget = min(GPU_CHUNK_BYTES, int(available_memory(device) * GPU_SHARE))
    else:
        budget = min(CPU_CHUNK_BYTES, int(available_memory(device) * CPU_SHARE))
    limit = getattr(_LIMIT, "bytes", None)
    if limit is not None:
        budget = min(budget, limit)
    return max(budget, 1)


@contextmanager
def limit_scan_memory(max_bytes: int) -> Iterator[None]:
    """Cap :func:`scan_budget` at ``max_bytes`` inside the block (this thread; nests, innermost wins)."""
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"Expected `max_bytes` to be a positive int but got {max_bytes!r}.")
    previous = getattr(_LIMIT, "bytes", None)
    _LIMIT.bytes = max_bytes
    try:
        yield
    finally:
        _LIMIT.bytes = previous

"""Large CPU buffers without page faults (glibc).

glibc's malloc serves every request above 32 MB from a fresh ``mmap`` and unmaps it on ``free``. A 3D
U-Net's feature maps are that large (32 channels × 112×112×128 voxels are 205 MB), so on the CPU every
layer of every tile writes into memory the kernel must first map and zero page by page, a large share of
a forward pass on few cores (benchmarks/results/speed_cpu_2cores.md). `reuse_freed_memory` asks glibc to
serve such requests from its heap and to keep what is freed there for the next tile: the same bytes, used
again. The price is memory: freed blocks stay with the process (until it exits) and the heap fragments, so
the peak resident size is higher, though it does not grow from case to case. One-off work whose buffers
differ in size from a forward pass's (calibration) runs with large buffers returned (`large_buffers_returned`).
A process that will compress asks PyTorch for 2 MB pages at start-up (`huge_pages_for_torch`).
``TUCKER_MALLOC=default`` leaves glibc's behaviour and PyTorch's pages alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_KEEP = -1  # the free top of the heap is returned above this size: glibc stores it as a size_t, so -1 is never
# (a C int's largest, 2 GiB, is less than a 3 mm forward pass frees at once: its next tile would fault the rest in)
_TOP_PAD = 256 << 20  # grow the heap in steps of at least this much (address space only until touched)
_MMAP_MAX_DEFAULT = 65536  # glibc's own
_applied = False
_mallopt = None


def huge_pages_for_torch() -> None:
    """Ask PyTorch to put its large CPU buffers on 2 MB pages (its ``THP_MEM_ALLOC_ENABLE``), for a process that
    will compress: a calibration maps several GB of fresh buffers per model, and 2 MB pages fault 512 times less
    often than 4 KiB ones (the probed pass of a 1.5 mm TotalSegmentator model: 55 s → 38 s on 2 cores). PyTorch
    reads the variable at its first CPU allocation, so this must run before one: at start-up. A value the user set
    stays, and ``TUCKER_MALLOC=default`` leaves it unset; where the kernel's transparent huge pages are off, it does
    nothing."""
    if os.environ.get("TUCKER_MALLOC", "").strip().lower() != "default" and sys.platform.startswith("linux"):
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def reuse_freed_memory() -> bool:
    """Serve large allocations from glibc's heap and keep freed memory for reuse, once per process.
    Returns whether the setting is in effect (False off glibc, or with ``TUCKER_MALLOC=default``)."""
    global _applied, _mallopt
    if _applied:
        return True
    if os.environ.get("TUCKER_MALLOC", "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _KEEP) and mallopt(_M_TOP_PAD, _TOP_PAD))
    _mallopt = mallopt if _applied else None
    if _applied:
        logger.debug("glibc malloc: large buffers from the heap, freed memory kept for reuse (TUCKER_MALLOC=default "
                     "to leave it alone)")
    return _applied


def release_freed_memory() -> None:
    """Give the pages of the memory kept for reuse back to the system (glibc's ``malloc_trim``; what is still in use
    stays), where `reuse_freed_memory` is in effect. Between one prediction's sliding window and its export: the
    export's buffers (probabilities of every class, at full size) differ from the tiles', and a process that forks
    workers (TotalSegmentator's writers of one mask per class) would have them copy kept pages they write into."""
    if _applied:
        ctypes.CDLL(None).malloc_trim(0)


def freed_memory_reused() -> bool:
    """Whether `reuse_freed_memory` is in effect in this process."""
    return _applied


_returned_depth = 0


@contextmanager
def large_buffers_returned() -> Iterator[None]:
    """Within: large buffers mapped afresh and returned to the system when freed, as glibc does by default,
    where `reuse_freed_memory` is in effect (else nothing changes); on entry and on leaving, the memory kept for
    reuse is given back (`release_freed_memory`). For one-off work such as calibration: its many buffers of other
    sizes than a forward pass's would stay with the process for good, fragmenting the kept heap (a 1.5 mm
    TotalSegmentator model's first run held ~7 GB after calibrating, not ~4), and what the previous model's
    prediction and export left kept would lie under its peak. Nested uses act as the outermost alone."""
    global _returned_depth
    if _mallopt is None:
        yield
        return
    if _returned_depth == 0:
        release_freed_memory()
        _mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
    _returned_depth += 1
    try:
        yield
    finally:
        _returned_depth -= 1
        if _returned_depth == 0:
            _mallopt(_M_MMAP_MAX, 0)
            release_freed_memory()

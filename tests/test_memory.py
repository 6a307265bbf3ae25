"""Large buffers from glibc's heap, kept for reuse (`reuse_freed_memory`); checked in a fresh interpreter
each, since the setting is process-wide."""

import json
import os
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")

_PROBE = r"""
import contextlib, ctypes, json, sys
from nnunet_tucker.memory import large_buffers_returned, reuse_freed_memory

libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo"):  # not glibc (musl)
    print(json.dumps(None))
    sys.exit()
# mallinfo2 (glibc >= 2.33) has size_t fields, the older mallinfo int ones: either holds 64 MB
mallinfo, field = (libc.mallinfo2, ctypes.c_size_t) if hasattr(libc, "mallinfo2") else (libc.mallinfo, ctypes.c_int)
names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

class MallInfo(ctypes.Structure):
    _fields_ = [(n, field) for n in names.split()]

mallinfo.restype = MallInfo
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
applied = reuse_freed_memory()
within = large_buffers_returned() if sys.argv[2:] == ["returned"] else contextlib.nullcontext()
with within:
    before = mallinfo()
    buffer = libc.malloc(int(sys.argv[1]))  # address space only: never touched
    during = mallinfo()
    libc.free(buffer)
    after = mallinfo()
again = libc.malloc(int(sys.argv[1]))  # after the context: as set before it
print(json.dumps({"applied": applied, "allocated": bool(buffer), "mapped": during.hblkhd - before.hblkhd,
                  "kept": after.fordblks - during.fordblks, "mapped_after": mallinfo().hblkhd - after.hblkhd}))
"""


def _probe(env_extra: dict, size: int = 64 << 20, *mode: str) -> dict:
    """The probe's numbers for a buffer of `size` bytes, in a fresh interpreter (`mode` "returned": within
    `large_buffers_returned`); skips where the C library is not glibc."""
    env = {**os.environ, "TUCKER_HOOK": "0", **env_extra}
    result = subprocess.run([sys.executable, "-c", _PROBE, str(size), *mode], env=env, capture_output=True,
                            text=True, check=True)
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    if probe is None:
        pytest.skip("not glibc")
    return probe


@glibc_only
def test_large_buffers_come_from_the_heap_and_stay_for_reuse():
    probe = _probe({"TUCKER_MALLOC": ""})  # whatever the environment says
    assert probe["applied"] is True
    assert probe["mapped"] < 1 << 20  # not a fresh mmap
    assert probe["kept"] >= 64 << 20  # freed, and kept in the heap for the next buffer


@glibc_only
def test_buffers_beyond_2_gib_stay_too():
    """A 3 mm TotalSegmentator forward pass peaks at 4 GiB: a free top of the heap larger than what a C int
    holds must stay mapped too, or the next tile maps it again page by page."""
    size = 9 << 28  # 2.25 GiB of address space
    probe = _probe({"TUCKER_MALLOC": ""}, size)
    if not probe["allocated"]:
        pytest.skip("the system does not lend this much address space")
    assert probe["mapped"] < 1 << 20 and probe["kept"] >= size


@glibc_only
def test_one_off_work_returns_its_large_buffers_and_the_heap_is_kept_again_after():
    probe = _probe({"TUCKER_MALLOC": ""}, 64 << 20, "returned")
    assert probe["applied"] is True
    assert probe["mapped"] >= 64 << 20 and probe["kept"] < 64 << 20  # mapped afresh, returned on free
    assert probe["mapped_after"] < 1 << 20  # from the heap again


@glibc_only
def test_default_leaves_glibc_alone():
    probe = _probe({"TUCKER_MALLOC": "default"})
    assert probe["applied"] is False
    assert probe["mapped"] >= 64 << 20  # glibc's own way: a fresh mapping per large buffer


_RELEASE_PROBE = r"""
import ctypes, json, os, sys
from nnunet_tucker.memory import large_buffers_returned, release_freed_memory, reuse_freed_memory

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
applied = reuse_freed_memory()
size = 256 << 20
buffer = libc.malloc(size)
ctypes.memset(buffer, 1, size)  # touched: resident
libc.free(buffer)
kept = resident()
if sys.argv[1:] == ["one-off work"]:  # entering it gives back what the heap kept
    with large_buffers_returned():
        released = resident()
else:
    release_freed_memory()
    released = resident()
print(json.dumps({"applied": applied, "kept": kept, "released": released, "size": size}))
"""


@glibc_only
@pytest.mark.parametrize("by", ["release", "one-off work"])
def test_kept_memory_is_given_back_when_released(by):
    env = {**os.environ, "TUCKER_HOOK": "0", "TUCKER_MALLOC": ""}
    result = subprocess.run([sys.executable, "-c", _RELEASE_PROBE, by], env=env, capture_output=True, text=True,
                            check=True)
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["applied"] is True
    assert probe["kept"] - probe["released"] > probe["size"] // 2  # freed and kept, then given back

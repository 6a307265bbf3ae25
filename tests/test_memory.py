"""Large buffers from glibc's heap, kept for reuse (`reuse_freed_memory`); checked in a fresh interpreter
each, since the setting is process-wide."""

import json
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")

_PROBE = r"""
import ctypes, json, sys
from nnunet_tucker.memory import reuse_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
applied = reuse_freed_memory()
before = libc.mallinfo2()
buffer = libc.malloc(64 << 20)
during = libc.mallinfo2()
libc.free(buffer)
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "mapped": during.hblkhd - before.hblkhd, "kept": after.fordblks}))
"""


def _probe(env_extra: dict) -> dict:
    import os

    env = {**os.environ, "TUCKER_HOOK": "0", **env_extra}
    result = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@glibc_only
def test_large_buffers_come_from_the_heap_and_stay_for_reuse():
    probe = _probe({})
    if not probe["applied"]:
        pytest.skip("not glibc")
    assert probe["mapped"] < 1 << 20  # not a fresh mmap
    assert probe["kept"] >= 64 << 20  # freed, and kept in the heap for the next buffer


@glibc_only
def test_default_leaves_glibc_alone():
    probe = _probe({"TUCKER_MALLOC": "default"})
    assert probe["applied"] is False
    assert probe["mapped"] >= 64 << 20  # glibc's own way: a fresh mapping per large buffer

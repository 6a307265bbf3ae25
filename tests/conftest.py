import os

import pytest
import torch
from networks import ARCHITECTURES


def pytest_configure(config):
    """Each pytest-xdist worker, and every command it starts, uses its share of the CPUs rather than all of them:
    two workers of two threads each on two cores took the suite 807 s, of one thread each 575 s. A thread count
    the user set stays. (Every worker collects this file before any test runs, integration tests included.)"""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cpus // workers)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(ARCHITECTURES))
def architecture(request):
    return request.param


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Decomposed weights, statistics and device profiles go to a per-session folder, not the user's cache; and
    compressed networks run on the PyTorch forms unless a test asks for a backend (OpenVINO's conversion, timing and
    first inference would add seconds to every compressing load: tests/test_backend.py covers the backends)."""
    monkeypatch.setenv("TUCKER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tucker_cache"))
    monkeypatch.setenv("TUCKER_BACKEND", "torch")

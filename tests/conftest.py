import pytest
from networks import ARCHITECTURES


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

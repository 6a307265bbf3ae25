import pytest
from networks import ARCHITECTURES


@pytest.fixture(params=sorted(ARCHITECTURES))
def architecture(request):
    return request.param

"""nnunet-tucker: post-training Tucker compression of trained nnU-Net v2 networks.

The public API is imported lazily so that the start-up hook, which imports this package in every
Python process, costs nothing until compression is used.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (tens of ms at every start)
__version__ = "0.3.0"

_EXPORTS = {
    "TuckerConfig": "nnunet_tucker.config",
    "TuckerConfigError": "nnunet_tucker.errors",
    "TuckerError": "nnunet_tucker.errors",
    "compress_network": "nnunet_tucker.compress",
    "CompressionReport": "nnunet_tucker.report",
    "TuckerPredictor": "nnunet_tucker.nnunet.predictor",
}

__all__ = [
    "CompressionReport",
    "TuckerConfig",
    "TuckerConfigError",
    "TuckerError",
    "TuckerPredictor",
    "compress_network",
    "__version__",
]

if TYPE_CHECKING:
    from typing import Any

    from .compress import compress_network
    from .config import TuckerConfig
    from .errors import TuckerConfigError, TuckerError
    from .nnunet.predictor import TuckerPredictor
    from .report import CompressionReport


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nnunet_tucker' has no attribute {name!r}")

"""The start-up hook: every `nnUNetPredictor` in the process compresses the model it loads when asked.

`nnunet_tucker.pth` (installed at the top of site-packages) calls `install()` at every interpreter
start. It imports nothing but the standard library and only registers a one-shot import finder;
when nnU-Net's predictor module is imported, its two initialisation methods are wrapped so that
they end with `compress_predictor`, which returns at once unless ``TUCKER_*`` variables or the
model's plans.json ask for compression. TotalSegmentator's own patches of the predictor (the
``predict_*`` methods) are left alone. ``TUCKER_HOOK=0`` turns the hook off.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys

TARGET = "nnunetv2.inference.predict_from_raw_data"
_MARK = "__nnunet_tucker_wrapped__"


def patch_predictor_class(cls: type) -> None:
    """Wrap `cls.initialize_from_trained_model_folder` and `cls.manual_initialization` (idempotent)."""
    for name in ("initialize_from_trained_model_folder", "manual_initialization"):
        original = getattr(cls, name)
        if getattr(original, _MARK, False):
            continue

        @functools.wraps(original)
        def wrapper(self, *args, __original=original, __name=name, **kwargs):
            result = __original(self, *args, **kwargs)
            from .predictor import compress_predictor

            source = None
            if __name == "initialize_from_trained_model_folder":
                source = str(args[0] if args else kwargs.get("model_training_output_dir"))
            compress_predictor(self, source=source)
            return result

        setattr(wrapper, _MARK, True)
        setattr(cls, name, wrapper)


def _patch_module(module) -> None:
    patch_predictor_class(module.nnUNetPredictor)


class _PredictorFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when nnU-Net's predictor module is about to load, makes its loader
    patch the module right after executing it, then steps aside."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch_module(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Activate the hook in this process (what the .pth file runs); a no-op with ``TUCKER_HOOK=0``."""
    if os.environ.get("TUCKER_HOOK", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if TARGET in sys.modules:
        _patch_module(sys.modules[TARGET])
    elif not any(isinstance(f, _PredictorFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PredictorFinder())

"""The start-up hook: every `nnUNetPredictor` in the process compresses the model it loads when asked.

`nnunet_tucker.pth` (installed at the top of site-packages) calls `install()` at every interpreter
start unless ``TUCKER_HOOK=0`` (then it imports nothing). `install()` imports nothing itself and
only registers a one-shot import finder; when nnU-Net's predictor module is imported, its two
initialisation methods are wrapped so that they end with `compress_predictor`, which returns at
once unless ``TUCKER_*`` variables or the model's plans.json ask for compression, and the method
that predicts one preprocessed case so that a compression waiting to calibrate on the first case
(`finish_compression`) finishes there.
TotalSegmentator's own patches of the predictor (the ``predict_*`` methods) are left alone.

A bad request (a wrong ``TUCKER_*`` value, say) raised inside nnU-Net's own command ends that
command with one line, ``nnunet-tucker: error: ...``, instead of a traceback through nnU-Net.
"""

import sys

TARGET = "nnunetv2.inference.predict_from_raw_data"
_MARK = "__nnunet_tucker_wrapped__"


def patch_predictor_class(cls: type) -> None:
    """Wrap `cls.initialize_from_trained_model_folder` and `cls.manual_initialization` so that they end
    with `compress_predictor`, and `cls.predict_logits_from_preprocessed_data` (which every way of
    predicting passes, nnU-Net's and TotalSegmentator's) so that it starts with `finish_compression`,
    which calibrates on the first case when the compression waits for one (idempotent)."""
    import functools

    for name in ("initialize_from_trained_model_folder", "manual_initialization",
                 "predict_logits_from_preprocessed_data"):
        original = getattr(cls, name)
        if getattr(original, _MARK, False):
            continue

        @functools.wraps(original)
        def wrapper(self, *args, __original=original, __name=name, **kwargs):
            from . import predictor

            if __name == "predict_logits_from_preprocessed_data":
                if getattr(self, "_tucker_pending", None):
                    _one_line_errors(predictor.finish_compression, self, args[0] if args else kwargs["data"])
                return __original(self, *args, **kwargs)
            result = __original(self, *args, **kwargs)
            source = None
            if __name == "initialize_from_trained_model_folder":
                source = str(args[0] if args else kwargs.get("model_training_output_dir"))
            _one_line_errors(predictor.compress_predictor, self, source=source)
            return result

        setattr(wrapper, _MARK, True)
        setattr(cls, name, wrapper)


def _one_line_errors(call, *args, **kwargs):
    """`call(*args, **kwargs)`; a ValueError it raises (TuckerConfigError, ModelFolderError: the user's
    input, not a bug) goes on without its traceback and, if uncaught, ends the program in one line."""
    try:
        return call(*args, **kwargs)
    except ValueError as e:
        _print_if_uncaught(e)
        raise e.with_traceback(None) from None


def _print_if_uncaught(error: BaseException) -> None:
    """Should `error` end the program uncaught, print one line for it rather than a traceback (code that
    catches it, a library user's, is unaffected)."""
    previous = sys.excepthook

    def excepthook(kind, value, traceback):
        if value is error:
            print(f"nnunet-tucker: error: {error}", file=sys.stderr)
        else:
            previous(kind, value, traceback)

    sys.excepthook = excepthook


class _PredictorFinder:
    """A meta path finder that finds nothing itself; when nnU-Net's predictor module is about to load,
    makes its loader patch the module right after executing it, then steps aside."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch_predictor_class(module.nnUNetPredictor)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Activate the hook in this process (what the .pth file runs unless ``TUCKER_HOOK=0``)."""
    if TARGET in sys.modules:
        patch_predictor_class(sys.modules[TARGET].nnUNetPredictor)
    elif not any(isinstance(f, _PredictorFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PredictorFinder())

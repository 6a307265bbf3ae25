"""The start-up hook: every `nnUNetPredictor` in the process compresses the model it loads when asked.

`nnunet_tucker.pth` (installed at the top of site-packages) calls `install()` at every interpreter
start unless ``TUCKER_HOOK=0`` (then it imports nothing). `install()` imports nothing itself and
only registers a one-shot import finder; when nnU-Net's predictor module is imported, four methods of
its `nnUNetPredictor` class are wrapped (`patch_predictor_class`): its two initialisation methods end
with `compress_predictor`, which returns at once unless ``TUCKER_*`` variables or the model's
plans.json ask for compression; the method that lists a run's output files notes them, so that a
compression calibrated on the first case can name that case; and the method that predicts one
preprocessed case starts with `finish_compression`, which finishes a compression waiting to
calibrate on the first case. TotalSegmentator's own patches of the predictor (the ``predict_*``
methods) are left alone.

This is the one place where nnU-Net's predictor class is patched. Every way this package changes
nnU-Net's behaviour (these wrappers, the per-predictor pipeline methods, the label and plans manager
classes, the network's blocks), why, and what happens when nnU-Net changes what they rely on:
docs/nnunet-integration.md.

One of the package's errors (`errors.TuckerError`: a wrong ``TUCKER_*`` value, say) raised inside
nnU-Net's own command ends that command with one line, ``nnunet-tucker: error: ...``, and exit code 2,
instead of a traceback through nnU-Net; code that catches it, a library user's, gets it as usual.
"""

import sys

TARGET = "nnunetv2.inference.predict_from_raw_data"
_MARK = "__nnunet_tucker_wrapped__"
EXIT_CODE = 2  # of a command ended by one of the package's errors, as the package's own commands exit


def patch_predictor_class(cls: type) -> None:
    """Wrap, on `cls` (idempotent; the original stays as ``__wrapped__``):

    - `initialize_from_trained_model_folder` and `manual_initialization`, so that they end with
      `compress_predictor`;
    - `_manage_input_and_output_lists`, which every prediction from files calls (nnU-Net's and
      TotalSegmentator's `predict_from_files` and `predict_from_files_sequential`), so that the output
      files it returns, in the order the cases are predicted, are noted while a compression waits for
      the first case (`note_output_files`); skipped if this nnU-Net has no such method;
    - `predict_logits_from_preprocessed_data` (which every way of predicting passes, nnU-Net's and
      TotalSegmentator's), so that it starts with `finish_compression`, which calibrates on the first
      case when the compression waits for one.
    """
    import functools

    wrappers = {"initialize_from_trained_model_folder": _compressing_after,
                "manual_initialization": _compressing_after,
                "_manage_input_and_output_lists": _noting_output_files,
                "predict_logits_from_preprocessed_data": _finishing_before}
    missing = [name for name in wrappers if name != "_manage_input_and_output_lists" and not hasattr(cls, name)]
    if missing:  # never break nnU-Net itself: it runs as it is, uncompressed, and says so
        print(f"nnunet-tucker: warning: this nnU-Net's {cls.__name__} has no {', '.join(missing)}; its models are "
              "not compressed (TUCKER_HOOK=0 silences this)", file=sys.stderr)
        return
    for name, wrap in wrappers.items():
        original = getattr(cls, name, None)
        if original is None:
            continue  # `_manage_input_and_output_lists`: cases are then named by their shape (`predictor._case_name`)
        if getattr(original, _MARK, False):
            continue
        wrapper = functools.wraps(original)(wrap(original, name))
        setattr(wrapper, _MARK, True)
        setattr(cls, name, wrapper)


def _compressing_after(original, name: str):
    def initialize_and_compress(self, *args, **kwargs):
        from . import predictor

        result = original(self, *args, **kwargs)
        source = None
        if name == "initialize_from_trained_model_folder":
            source = str(args[0] if args else kwargs.get("model_training_output_dir"))
        _one_line_errors(predictor.compress_predictor, self, source=source)
        return result

    return initialize_and_compress


def _noting_output_files(original, name: str):
    def list_and_note(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if getattr(self, "_tucker_pending", None):
            from . import predictor

            predictor.note_output_files(self, result)
        return result

    return list_and_note


def _finishing_before(original, name: str):
    def finish_and_predict(self, *args, **kwargs):
        if getattr(self, "_tucker_pending", None):
            from . import predictor

            _one_line_errors(predictor.finish_compression, self, args[0] if args else kwargs["data"])
        return original(self, *args, **kwargs)

    return finish_and_predict


def _one_line_errors(call, *args, **kwargs):
    """`call(*args, **kwargs)`; one of the package's errors it raises (a `TuckerError`: the user's input,
    not a bug) goes on without its traceback and, if uncaught, ends the program in one line with exit
    code 2. Any other exception passes untouched, traceback and all."""
    from ..errors import TuckerError

    try:
        return call(*args, **kwargs)
    except TuckerError as e:
        _print_if_uncaught(e)
        raise e.with_traceback(None) from None


def _print_if_uncaught(error: BaseException) -> None:
    """Should `error` end the program uncaught, print one line for it rather than a traceback and exit
    with code 2 (code that catches it, a library user's, is unaffected). A SystemExit raised by
    ``sys.excepthook`` sets the exit code (CPython 3.10 to 3.13 alike); atexit handlers still run."""
    previous = sys.excepthook

    def excepthook(kind, value, traceback):
        if value is not error:
            previous(kind, value, traceback)
            return
        print(f"nnunet-tucker: error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_CODE)

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


# The variables that ask every predictor of the process to compress (config.TuckerConfig.from_env needs one)
COMPRESSING_VARIABLES = ("TUCKER_RANK_RATIO", "TUCKER_MAC_BUDGET")


def huge_pages_if_compressing() -> None:
    """`memory.huge_pages_for_torch` where a variable asks this process to compress (before torch's first
    allocation, which reads it)."""
    import os

    if any(os.environ.get(name, "").strip() for name in COMPRESSING_VARIABLES):
        from ..memory import huge_pages_for_torch

        huge_pages_for_torch()


def install() -> None:
    """Activate the hook in this process (what the .pth file runs unless ``TUCKER_HOOK=0``), asking PyTorch for
    2 MB pages where a variable asks for compression (`huge_pages_if_compressing`)."""
    huge_pages_if_compressing()
    if TARGET in sys.modules:
        patch_predictor_class(sys.modules[TARGET].nnUNetPredictor)
    elif not any(isinstance(f, _PredictorFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PredictorFinder())

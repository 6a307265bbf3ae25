"""nnU-Net's CPU work around the network, done in less time with the same results, for the predictors
this package compresses (`speed_up_pipeline`).

Once the network is compressed, nnU-Net's own work around it is a large share of a prediction on the
CPU, most of all for models with many outputs (TotalSegmentator's 118). Each step here does that work
in fewer passes over memory or with fewer processes:

- the sliding window adds each tile's Gaussian-weighted logits into an fp16 buffer
  (``predicted_logits[sl] += prediction``: fp32 into a strided fp16 slice, all channels at once). The
  same operations one channel at a time keep their operands in cache.
- the segmentation is numpy's ``argmax`` over the fp16 channels; a running maximum over the channels
  (`first_argmax`) reads each channel once, in torch.
- `predict_from_files` starts worker processes, each a fresh interpreter that imports torch and nnU-Net
  before it does any work (seconds on a small machine): one to preprocess even a single case, and as many
  exporters as asked for (TotalSegmentator asks for 6) even for one case. Here a single case is preprocessed
  and exported in this process (by nnU-Net's own functions; the export on a thread of nnU-Net's pool), and
  several cases get no more export workers than cases.
- every feature map and logits buffer above 32 MB would be a fresh ``mmap`` that the kernel zeroes page
  by page (`memory.reuse_freed_memory` keeps freed memory for reuse instead; process-wide, on the CPU), and
  the pages kept so are given back when a case's sliding window ends (`memory.release_freed_memory`).

All of it computes exactly what nnU-Net computes (the same fp32 products and sums, rounded to fp16 at
the same points; ties go to the first channel, NaN falls back to numpy), so segmentations are identical
voxel for voxel. nnU-Net's (or TotalSegmentator's) methods are called, not copied, wherever these steps
are not involved (results on a GPU, region-based labels, several cases), and no file of theirs is modified.

How, and why not as the start-up hook wraps nnU-Net's predictor class (docs/nnunet-integration.md):

- the three predictor methods are set on the one predictor as bound methods (instance attributes), not
  on its class: only a compressed predictor takes them (an uncompressed one in the same process, as in
  side-by-side timings, keeps nnU-Net's), `nnunet_pipeline` takes them off again, and each looks up
  nnU-Net's method on the class when called rather than holding the one it replaced, so that
  TotalSegmentator's replacements of the class's ``predict_*`` methods, made after the hook ran, stay
  in effect.
- the label and plans managers change class (`FastArgmaxLabelManager`, `FastArgmaxPlansManager`,
  subclasses that override one method each) instead: the managers travel pickled to the export worker
  processes, and pickle cannot carry a method set on an instance (it stores a bound method as a name
  to look up on the object again), while an object of a module-level class unpickles as that class in
  a fresh interpreter; and there nnU-Net builds new label managers from the plans manager
  (`PlansManager.get_label_manager`), which only the plans manager's class can change.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import threading
import types
from collections.abc import Iterator
from multiprocessing.pool import ThreadPool
from typing import Any

import nnunetv2.inference.predict_from_raw_data as nnunet_prediction
import numpy as np
import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.data_iterators import preprocess_fromfiles_save_to_queue
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from tqdm import tqdm

from ..memory import release_freed_memory, reuse_freed_memory

_SLIDING_WINDOW = "_internal_predict_sliding_window_return_logits"
_ITERATOR_FROM_FILES = "_internal_get_data_iterator_from_lists_of_filenames"
_PREDICT_FROM_ITERATOR = "predict_from_data_iterator"


def speed_up_pipeline(predictor: nnUNetPredictor) -> None:
    """Give `predictor` the faster sliding-window accumulation and argmax, and no more export workers
    than cases (idempotent). The label and plans managers become the subclasses below, so export
    workers, which receive them pickled or rebuild the label manager from the plans manager, take the
    faster argmax too."""
    for name, method in _METHODS.items():
        if name not in vars(predictor):
            setattr(predictor, name, types.MethodType(method, predictor))
    if type(predictor.label_manager) is LabelManager:
        predictor.label_manager.__class__ = FastArgmaxLabelManager
    if type(predictor.plans_manager) is PlansManager:
        predictor.plans_manager.__class__ = FastArgmaxPlansManager
    if predictor.device.type == "cpu":
        reuse_freed_memory()


def nnunet_pipeline(predictor: nnUNetPredictor) -> None:
    """Undo `speed_up_pipeline`: nnU-Net's own pipeline (for side-by-side comparisons)."""
    for name in _METHODS:
        vars(predictor).pop(name, None)
    if type(predictor.label_manager) is FastArgmaxLabelManager:
        predictor.label_manager.__class__ = LabelManager
    if type(predictor.plans_manager) is FastArgmaxPlansManager:
        predictor.plans_manager.__class__ = PlansManager


@torch.inference_mode()
def _sliding_window_logits(self: nnUNetPredictor, data: torch.Tensor, slicers: list, do_on_device: bool = True):
    """nnU-Net's `_internal_predict_sliding_window_return_logits` with the Gaussian-weighted sum done one
    channel at a time where the results live on the CPU (nnU-Net's own method elsewhere)."""
    results_device = self.device if do_on_device else torch.device("cpu")
    if self.device.type != "cpu" or results_device.type != "cpu":
        return getattr(type(self), _SLIDING_WINDOW)(self, data, slicers, do_on_device)
    channels, spatial = self.label_manager.num_segmentation_heads, data.shape[1:]
    logits = torch.zeros((channels, *spatial), dtype=torch.half)
    weights = torch.zeros(spatial, dtype=torch.half)
    patch = tuple(self.configuration_manager.patch_size)
    gaussian = (compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=results_device)
                if self.use_gaussian else None)
    product = torch.empty(patch, dtype=torch.float32)
    for sl in tqdm(slicers, disable=not self.allow_tqdm):
        tile = torch.clone(data[sl][None], memory_format=torch.contiguous_format)
        prediction = self._internal_maybe_mirror_and_predict(tile)[0]
        target = logits[sl]
        for channel in range(channels):  # nnU-Net: prediction *= gaussian; predicted_logits[sl] += prediction
            if gaussian is None:
                product.copy_(prediction[channel])
            else:
                torch.mul(prediction[channel], gaussian, out=product)
            product.add_(target[channel])
            target[channel].copy_(product)
        weights[sl[1:]] += 1 if gaussian is None else gaussian
    for channel in range(channels):
        torch.div(logits[channel], weights, out=logits[channel])
        if torch.isinf(logits[channel]).any():
            raise RuntimeError("Encountered inf in predicted array. Aborting... If this problem persists, reduce "
                               "value_scaling_factor in compute_gaussian or increase the dtype of predicted_logits "
                               "to fp32")
    release_freed_memory()  # the tiles' kept buffers: the export's are of other sizes
    return logits


def _data_iterator_from_files(self: nnUNetPredictor, input_list_of_lists: list, seg_from_prev_stage_files: Any,
                              output_filenames_truncated: Any, num_processes: int):
    """nnU-Net's (or TotalSegmentator's) method, except that a single case is preprocessed in this process,
    by nnU-Net's own worker function, when the prediction reaches it: a worker process would first spend
    seconds importing torch and nnU-Net, and there is no next case to overlap with. Notes how many cases
    the export will have."""
    self._tucker_cases = len(input_list_of_lists)
    if len(input_list_of_lists) != 1:
        return getattr(type(self), _ITERATOR_FROM_FILES)(
            self, input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated, num_processes)
    return _preprocessed_here(self, input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated)


def _preprocessed_here(self: nnUNetPredictor, *lists: Any) -> Iterator[dict]:
    items: queue.Queue = queue.Queue()
    preprocess_fromfiles_save_to_queue(*lists, self.plans_manager, self.dataset_json, self.configuration_manager,
                                       items, threading.Event(), threading.Event(), self.verbose_preprocessing)
    while not items.empty():
        yield items.get()


def _predict_from_data_iterator(self: nnUNetPredictor, data_iterator: Any, *args: Any, **kwargs: Any):
    """nnU-Net's (or TotalSegmentator's) method with no more export workers than cases, when the cases are
    known (`predict_from_files`): each worker is a fresh interpreter that imports torch and nnU-Net, which
    on a small machine costs the prediction more than an idle worker could ever give back (nnU-Net caps
    its preprocessing workers so). A single case is exported in this process (`_exports_on_threads`)."""
    cases = vars(self).pop("_tucker_cases", None)
    if cases is not None:
        args = list(args)
        if len(args) >= 2:
            args[1] = max(1, min(args[1], cases))
        else:
            requested = kwargs.get("num_processes_segmentation_export", default_num_processes)
            kwargs["num_processes_segmentation_export"] = max(1, min(requested, cases))
    with _exports_on_threads() if cases == 1 else contextlib.nullcontext():
        return getattr(type(self), _PREDICT_FROM_ITERATOR)(self, data_iterator, *args, **kwargs)


class _ThreadPoolContext:
    """A multiprocessing context whose ``Pool`` is a thread pool of this process (what it needs of a pool
    nnU-Net's prediction methods use: ``apply_async``, results, ``_pool`` of workers that say
    ``is_alive``); anything else is the real context's."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    @staticmethod
    def Pool(processes: int | None = None, initializer: Any = None, initargs: tuple = (), **_: Any) -> ThreadPool:  # noqa: N802
        return ThreadPool(processes, initializer, initargs)


class _ThreadPoolMultiprocessing:
    """The `multiprocessing` module with `_ThreadPoolContext` contexts."""

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)

    @staticmethod
    def get_context(method: str | None = None) -> _ThreadPoolContext:
        return _ThreadPoolContext(multiprocessing.get_context(method))


_SWAP_LOCK = threading.RLock()


@contextlib.contextmanager
def _exports_on_threads() -> Iterator[None]:
    """Within: the export pool that nnU-Net's prediction methods (and TotalSegmentator's copy of them) start
    as ``multiprocessing.get_context("spawn").Pool(n)`` of nnU-Net's module is a thread pool of this process:
    the same export functions, called the same way, without starting an interpreter (which imports torch and
    nnU-Net first: ~5 s per model on 2 cores) or pickling the logits to it. nnU-Net's module is given this
    view of `multiprocessing` for the call only (docs/nnunet-integration.md)."""
    with _SWAP_LOCK:
        seen = nnunet_prediction.multiprocessing
        nnunet_prediction.multiprocessing = _ThreadPoolMultiprocessing()
        try:
            yield
        finally:
            nnunet_prediction.multiprocessing = seen


_METHODS = {_SLIDING_WINDOW: _sliding_window_logits, _ITERATOR_FROM_FILES: _data_iterator_from_files,
            _PREDICT_FROM_ITERATOR: _predict_from_data_iterator}


def first_argmax(values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """``values.argmax(0)`` as numpy computes it (the first channel among equal maxima; NaN is the
    maximum), by a running maximum over the channels; the type of `values` is kept (int64 indices)."""
    is_numpy = isinstance(values, np.ndarray)
    x = torch.from_numpy(values) if is_numpy else values
    best = x[0].clone()
    index = torch.zeros(x.shape[1:], dtype=torch.uint8 if x.shape[0] <= 256 else torch.int16)
    for channel in range(1, x.shape[0]):
        greater = x[channel] > best
        index.masked_fill_(greater, channel)
        torch.maximum(best, x[channel], out=best)
    if torch.isnan(best).any():  # NaN wins in numpy's argmax, not in the comparisons above
        index = torch.from_numpy(np.asarray(x.numpy().argmax(0)))
    index = index.long()
    return index.numpy() if is_numpy else index


def _on_cpu_as_torch(values: Any) -> bool:
    """Whether `values` is a CPU tensor or a numpy array torch can view (no negative strides)."""
    if isinstance(values, torch.Tensor):
        return values.device.type == "cpu"
    return isinstance(values, np.ndarray) and all(stride >= 0 for stride in values.strides) and \
        values.dtype in (np.float16, np.float32, np.float64)


class FastArgmaxLabelManager(LabelManager):
    """nnU-Net's `LabelManager` whose label-map segmentation is `first_argmax` (regions: nnU-Net's own)."""

    def convert_probabilities_to_segmentation(self, predicted_probabilities: Any) -> Any:
        if self.has_regions or not _on_cpu_as_torch(predicted_probabilities):
            return super().convert_probabilities_to_segmentation(predicted_probabilities)
        assert predicted_probabilities.shape[0] == self.num_segmentation_heads, (
            f"unexpected number of channels in predicted_probabilities. Expected {self.num_segmentation_heads}, "
            f"got {predicted_probabilities.shape[0]}")
        return first_argmax(predicted_probabilities)


class FastArgmaxPlansManager(PlansManager):
    """nnU-Net's `PlansManager` whose label managers are `FastArgmaxLabelManager`s (export workers build
    theirs from the plans manager they receive)."""

    def get_label_manager(self, dataset_json: dict, **kwargs: Any) -> LabelManager:
        manager = super().get_label_manager(dataset_json, **kwargs)
        if type(manager) is LabelManager:
            manager.__class__ = FastArgmaxLabelManager
        return manager

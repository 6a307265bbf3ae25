"""The faster CPU pipeline around a compressed network computes what nnU-Net's computes, value for value."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from multiprocessing.pool import ThreadPool

import nibabel as nib
import numpy as np
import pytest
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_tucker.config import TuckerConfig
from nnunet_tucker.nnunet.pipeline import (
    FastArgmaxLabelManager,
    FastArgmaxPlansManager,
    _exports_on_threads,
    first_argmax,
    nnunet_pipeline,
    speed_up_pipeline,
)
from nnunet_tucker.nnunet.predictor import TuckerPredictor
from nnunet_tucker.tools.demo_model import demo_model_folder
from nnunet_tucker.tools.synthetic import DEFAULT_SPACING, make_phantom

SHAPE = (40, 80, 72)  # 2 x 2 x 2 overlapping tiles of the demo model's 32 x 64 x 64 patch


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUCKER_CACHE_DIR", str(tmp_path / "cache"))


def _compressed(use_gaussian: bool = True) -> TuckerPredictor:
    predictor = TuckerPredictor(device=torch.device("cpu"), use_mirroring=False, use_gaussian=use_gaussian,
                                allow_tqdm=False, tucker_config=TuckerConfig(0.5, policy="auto", calibration="none"))
    predictor.initialize_from_trained_model_folder(str(demo_model_folder()), (0,), "checkpoint_final.pth")
    return predictor


@pytest.mark.parametrize("use_gaussian", [True, False])
def test_sliding_window_sums_the_same_fp16_logits_as_nnunet(use_gaussian):
    predictor = _compressed(use_gaussian)
    assert "_internal_predict_sliding_window_return_logits" in vars(predictor)  # compression brought it
    data = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(0)) * 3
    fast = predictor.predict_logits_from_preprocessed_data(data)
    nnunet_pipeline(predictor)
    reference = predictor.predict_logits_from_preprocessed_data(data)
    # the same element-wise fp32 products and sums, rounded to fp16 at the same points: equal, not close
    assert fast.dtype == reference.dtype == torch.half and torch.equal(fast, reference)


def test_segmentation_is_identical_voxel_for_voxel():
    predictor = _compressed()
    image = make_phantom(5, shape=SHAPE)[0][None].astype(np.float32)
    properties = {"spacing": list(DEFAULT_SPACING)}
    fast = predictor.predict_single_npy_array(image, properties)
    nnunet_pipeline(predictor)
    reference = predictor.predict_single_npy_array(image, properties)
    assert fast.shape == reference.shape and np.array_equal(fast, reference)
    assert len(np.unique(reference)) > 2  # a segmentation, not an empty image


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_first_argmax_is_numpys_argmax_with_ties_and_nan(dtype):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((40, 6, 7, 8)) * 2).round().astype(dtype)  # rounded: many ties
    values[:, 0, 0, 0] = 1  # all equal
    values[:, 0, 0, 1] = -np.inf
    expected = values.argmax(0)
    result = first_argmax(values)
    assert isinstance(result, np.ndarray) and result.dtype == expected.dtype and np.array_equal(result, expected)
    assert torch.equal(first_argmax(torch.from_numpy(values)), torch.from_numpy(expected))
    values[7, 1, 2, 3] = values[30, 1, 2, 4] = np.nan  # numpy: the first NaN wins
    assert np.array_equal(first_argmax(values), values.argmax(0))


def test_export_workers_get_the_fast_argmax_and_it_can_be_undone():
    predictor = _compressed()
    speed_up_pipeline(predictor)  # idempotent
    assert type(predictor.label_manager) is FastArgmaxLabelManager
    plans_manager = pickle.loads(pickle.dumps(predictor.plans_manager))  # as an export worker receives it
    assert type(plans_manager) is FastArgmaxPlansManager
    assert type(plans_manager.get_label_manager(predictor.dataset_json)) is FastArgmaxLabelManager
    assert type(pickle.loads(pickle.dumps(predictor.label_manager))) is FastArgmaxLabelManager
    nnunet_pipeline(predictor)
    assert type(predictor.label_manager) is LabelManager
    assert "_internal_predict_sliding_window_return_logits" not in vars(predictor)


def test_exports_on_threads_give_nnunet_a_pool_of_this_process_for_the_call_only():
    import nnunetv2.inference.predict_from_raw_data as nnunet_prediction

    with _exports_on_threads():
        seen = nnunet_prediction.multiprocessing
        with seen.get_context("spawn").Pool(2) as pool:
            result = pool.apply_async(os.getpid)
            assert result.get(timeout=10) == os.getpid() and all(w.is_alive() for w in pool._pool)
        assert seen.TimeoutError is multiprocessing.TimeoutError  # the rest is the real module's
    assert nnunet_prediction.multiprocessing is multiprocessing and isinstance(pool, ThreadPool)


def test_an_uncompressed_predictor_keeps_nnunets_pipeline():
    predictor = TuckerPredictor(device=torch.device("cpu"), tucker_config=False)
    predictor.initialize_from_trained_model_folder(str(demo_model_folder()), (0,), "checkpoint_final.pth")
    assert type(predictor.label_manager) is LabelManager
    assert "_internal_predict_sliding_window_return_logits" not in vars(predictor)


def test_one_case_from_files_is_preprocessed_and_exported_in_this_process(tmp_path, monkeypatch):
    import nnunetv2.inference.predict_from_raw_data as nnunet_prediction
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_tucker.tools.synthetic import write_nifti

    image, _, spacing = make_phantom(6, shape=SHAPE)
    (tmp_path / "in").mkdir()
    write_nifti(tmp_path / "in" / "case_0000.nii.gz", image, spacing)
    calls = []
    original = nnUNetPredictor.predict_from_data_iterator

    def spy(self, data_iterator, *args, **kwargs):
        spawns = nnunet_prediction.multiprocessing.get_context("spawn").Pool  # what nnU-Net exports with
        calls.append((data_iterator.__name__, args, getattr(spawns, "__self__", None)))
        return original(self, data_iterator, *args, **kwargs)

    monkeypatch.setattr(nnUNetPredictor, "predict_from_data_iterator", spy)
    predictor = _compressed()
    predictor.predict_from_files(str(tmp_path / "in"), str(tmp_path / "fast"), num_processes_preprocessing=2,
                                 num_processes_segmentation_export=3)
    nnunet_pipeline(predictor)
    predictor.predict_from_files(str(tmp_path / "in"), str(tmp_path / "nnunet"), num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1)
    (fast_iterator, fast_args, fast_pool), (nnunet_iterator, nnunet_args, nnunet_pool) = calls
    assert (fast_iterator, fast_args, nnunet_iterator, nnunet_args) == (
        "_preprocessed_here", (False, 1), "preprocessing_iterator_fromfiles", (False, 1))
    assert fast_pool is None and isinstance(nnunet_pool, multiprocessing.context.SpawnContext)  # threads, processes
    assert "_tucker_cases" not in vars(predictor) and nnunet_prediction.multiprocessing is multiprocessing
    fast, reference = (np.asarray(nib.load(tmp_path / d / "case.nii.gz").dataobj) for d in ("fast", "nnunet"))
    assert np.array_equal(fast, reference) and len(np.unique(reference)) > 2

"""Self-calibration: without a calibration folder, a predictor calibrates on the first case it segments,
once per model and config (cached), and a case that cannot calibrate is a clear error before anything
is written."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch

from nnunet_tucker.config import TuckerConfig, TuckerConfigError
from nnunet_tucker.counting import count_macs
from nnunet_tucker.nnunet import pipeline
from nnunet_tucker.nnunet import predictor as predictor_module
from nnunet_tucker.nnunet.calibration_images import (
    CalibrationError,
    cut_patches,
    first_case_patches,
    held_out_tiles,
)
from nnunet_tucker.nnunet.model_folder import compress_model_folder
from nnunet_tucker.nnunet.pipeline import FastArgmaxLabelManager
from nnunet_tucker.nnunet.predictor import TuckerPredictor
from nnunet_tucker.tools.demo_model import demo_model_folder
from nnunet_tucker.tools.synthetic import DEFAULT_SPACING, make_phantom, write_nifti

# PyTorch's forms: OpenVINO's conversion and timing would add seconds to every compression (tests/test_backend.py)
CONFIG = TuckerConfig(0.5, policy="auto", backend="torch", calibration_patches=2)
SHAPE = (40, 80, 64)  # 2 x 2 x 1 sliding-window tiles of the demo model's 32 x 64 x 64 patch
LARGE = (64, 160, 128)  # 3 x 4 x 3 tiles: held-out ones through the organs


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUCKER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _predictor(config=CONFIG) -> TuckerPredictor:
    predictor = TuckerPredictor(device=torch.device("cpu"), tucker_config=config, use_mirroring=False)
    predictor.initialize_from_trained_model_folder(str(demo_model_folder()), (0,), "checkpoint_final.pth")
    return predictor


def _image(seed: int = 3, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    image, _, _ = make_phantom(seed, shape=shape)
    return image[None].astype(np.float32)


def _predict(predictor: TuckerPredictor, image: np.ndarray) -> np.ndarray:
    properties = {"spacing": list(DEFAULT_SPACING)}
    return predictor.predict_single_npy_array(image, properties, None, None, False)


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("nnunet_tucker")]


def test_first_run_calibrates_on_its_first_case_and_the_next_reuses_it(caplog, cache):
    with caplog.at_level(logging.INFO, logger="nnunet_tucker"):
        first = _predictor()
        original = [dict(state) for state in first.list_of_parameters]
        assert first.tucker_report is None and first._tucker_pending  # waits for the first case
        assert all(torch.equal(a[k], b[k]) for a, b in zip(original, first.list_of_parameters, strict=True) for k in a)
        # the faster pipeline from the start: nnU-Net's worker processes would start for the first case too
        assert set(pipeline._METHODS) <= set(vars(first)) and type(first.label_manager) is FastArgmaxLabelManager
        segmentation = _predict(first, _image())
    report = first.tucker_report.to_dict()
    info = report["extra"]["calibration"]
    # 2 x 2 x 1 tiles: two whole ones leave no tile centre to measure on, so a slab across them is left out of the
    # fit and measured on
    assert info["on"] == "first case" and info["patches"] == 2 and not info.get("from_cache")
    assert info["fitted_share"] == pytest.approx(0.75)  # 16 of the 64 voxels of each tile along the second axis
    assert info["case"].startswith("the first image (1×")  # predict_single_npy_array names no case
    assert set(report["extra"]["seconds"]) == {"statistics", "planning", "fitting"}
    assert any(m.startswith("rank_ratio=0.5 policy=auto: calibrating on the first case") for m in _lines(caplog))
    assert any("self-calibrated on the first image" in m for m in _lines(caplog))
    progress = [m for m in _lines(caplog) if m.startswith("self-calibrating ")]  # which model, as it begins
    assert len(progress) == 1 and re.fullmatch(r"self-calibrating Dataset990_Phantom \(model \d+ in this process\) on "
                                               r"the first image \(1×40×80×64\): 2 patch\(es\) of 32×64×64 \(a "
                                               r"slab across them left out of the fit, to measure on\), once per "
                                               r"model", progress[0]), progress
    assert segmentation.shape == SHAPE and set(np.unique(segmentation)) <= {0, 1, 2, 3, 4}
    assert len(list(cache.glob("self-calibration-*.json"))) == 1
    agreement = info["agreement"]
    assert agreement["tiles"] == 2 and 0 < agreement["worst"][1] <= 1
    measured = [m for m in _lines(caplog) if m.startswith("agreement with the original ")]
    assert len(measured) == 1 and measured[0].startswith(f"agreement with the original on 2 held-out tile(s) of "
                                                         f"{info['case']}: worst class ")

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nnunet_tucker"):
        second = _predictor()  # another run of the same model and config: compressed at load, from the cache
    assert not getattr(second, "_tucker_pending", None) and second.tucker_report is not None
    extra = second.tucker_report.extra
    assert extra["cache_misses"] == 0 and extra["calibration"]["from_cache"]
    assert extra["calibration"]["key"] == info["key"]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first.list_of_parameters, second.list_of_parameters, strict=True)
               for k in a)
    assert any(", from the cache; cache hit" in m for m in _lines(caplog))
    assert extra["calibration"]["agreement"] == agreement  # and what it measured then
    again = [m for m in _lines(caplog) if m.startswith("agreement with the original ")]
    assert again == [measured[0] + " (measured when it was calibrated)"]

    third = _predictor(TuckerConfig(0.3, policy="auto", backend="torch", calibration_patches=2))  # its own
    assert third._tucker_pending


def test_the_first_case_predicted_from_files_is_named_by_its_output_file(tmp_path):
    from nnunet_tucker.tools.synthetic import write_nifti

    images = tmp_path / "images"
    images.mkdir()
    for seed, case in ((3, "liver_012"), (4, "liver_013")):
        write_nifti(images / f"{case}_0000.nii.gz", _image(seed)[0], DEFAULT_SPACING)
    (tmp_path / "out").mkdir()  # (nnU-Net's sequential path assumes it exists)
    predictor = _predictor()
    predictor.predict_from_files_sequential(str(images), str(tmp_path / "out"))
    assert predictor.tucker_report.extra["calibration"]["case"] == "liver_012"  # (sorted: the first predicted)


def test_weights_only_is_asked_for_and_warned_about(caplog, cache):
    with caplog.at_level(logging.INFO, logger="nnunet_tucker"):
        predictor = _predictor(TuckerConfig(0.5, policy="auto", backend="torch", calibration="none"))
    assert predictor.tucker_report is not None and "calibration" not in predictor.tucker_report.extra
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("TUCKER_CALIBRATION=none: the factors are fitted to")
    assert not list(cache.glob("self-calibration-*"))


@pytest.mark.parametrize("problem", ["constant", "not finite"])
def test_a_first_case_that_cannot_calibrate_is_named_before_anything_is_written(problem, cache):
    predictor = _predictor()
    image = np.full((1, *SHAPE), 7.0, dtype=np.float32)
    if problem == "not finite":
        image = _image()
        image[0, 3, 4, 5] = np.nan
        with pytest.raises(CalibrationError, match="1 NaN or infinite voxel"):
            first_case_patches(torch.from_numpy(image), predictor, 2, "case_x")
        return
    with pytest.raises(CalibrationError, match="every input channel is constant.*TUCKER_CALIBRATION"):
        _predict(predictor, image)
    assert not list(cache.glob("self-calibration-*.json"))


def test_a_crash_during_calibration_leaves_no_record_and_the_next_run_calibrates(cache, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(predictor_module, "calibrate", crash)
        with pytest.raises(KeyboardInterrupt):
            _predict(_predictor(), _image())
    assert not list(cache.glob("self-calibration-*.json"))
    predictor = _predictor()
    assert predictor._tucker_pending
    _predict(predictor, _image())
    assert predictor.tucker_report.extra["calibration"]["on"] == "first case"


def test_patches_are_the_first_case_s_sliding_window_tiles():
    predictor = _predictor()
    image = torch.arange(np.prod(SHAPE), dtype=torch.float32).reshape(1, *SHAPE)
    patches = cut_patches([image], predictor.configuration_manager.patch_size, 4)
    assert patches.shape == (4, 1, 32, 64, 64)
    # the tiles start at 0 and 8 along the first axis, 0 and 16 along the second: every corner once
    corners = sorted(patches[:, 0, 0, 0, 0].tolist())
    starts = sorted(float(image[0, z, y, 0]) for z in (0, 8) for y in (0, 16))
    assert corners == starts
    small, _ = first_case_patches(image[:, :10, :20, :30], predictor, 4, "case_x")  # padded as the window pads
    assert small.shape == (4, 1, 32, 64, 64) and float(small[0, 0, 31, 63, 63]) == 0.0
    assert torch.equal(small[1], small[0].flip(-1)) and torch.equal(small[3], small[0].flip(-3))  # one tile, mirrored


def test_held_out_tiles_share_no_voxel_with_the_fitting_tiles():
    predictor = _predictor()
    image = torch.arange(1, np.prod(LARGE) + 1, dtype=torch.float32).reshape(1, *LARGE)  # every voxel its own value
    fitting, fitted = first_case_patches(image, predictor, 2, "case_x")
    assert fitted is None  # the fit uses all of them
    tiles, masks = held_out_tiles(image, predictor.configuration_manager, 2)
    assert tiles.shape == (2, 1, 32, 64, 64) and masks.shape == (2, 32, 64, 64) and masks.any(dim=(1, 2, 3)).all()
    held_out = set(tiles[:, 0][masks].tolist())
    assert held_out.isdisjoint(fitting.flatten().tolist()) and 0.0 not in held_out  # nor padding
    assert not masks[:, :8].any() and not masks[:, :, :, 48:].any()  # only the tiles' central halves
    # one tile: nothing held out
    tiles, masks = held_out_tiles(image[:, :32, :64, :64], predictor.configuration_manager, 2)
    assert tiles.shape == (0, 1, 32, 64, 64) and masks.shape == (0, 32, 64, 64)


def _along(values, shape, axis) -> np.ndarray:
    """The coordinates along `axis` of voxels given by their values in an image numbered 1, 2, ... (C order)."""
    return np.unravel_index(np.asarray(sorted(values), dtype=np.int64) - 1, shape)[axis]


@pytest.mark.parametrize("shape, axis, slab, measured", [
    ((40, 80, 64), 1, range(32, 48), 2),  # 2 x 2 x 1 tiles: across the axis with the most room
    ((40, 80, 80), 1, range(32, 48), 2),  # 2 x 2 x 2: of equal room, the first axis
    ((48, 72, 72), 0, range(20, 28), 2),  # 2 x 2 x 2 with the room along the first axis (a 3 mm CT's tiling)
    ((32, 64, 128), 2, range(56, 72), 1),  # 1 x 1 x 3: in the centre of the middle tile only
])
def test_where_whole_tiles_leave_nothing_to_measure_a_slab_across_them_is_left_out_of_the_fit_and_measured_on(
        shape, axis, slab, measured):
    predictor = _predictor()
    image = torch.arange(1, np.prod(shape) + 1, dtype=torch.float32).reshape(1, *shape)  # every voxel its own value
    fitting, fitted = first_case_patches(image, predictor, 2, "case_x")
    assert fitting.shape == (2, 1, 32, 64, 64) and fitted.shape == (2, 32, 64, 64)  # the network sees whole tiles
    used, left_out = set(fitting[:, 0][fitted].tolist()), set(fitting[:, 0][~fitted].tolist())
    assert used and left_out and used.isdisjoint(left_out)
    assert not set(_along(used, shape, axis)) & set(slab) and set(_along(left_out, shape, axis)) <= set(slab)
    tiles, masks = held_out_tiles(image, predictor.configuration_manager, 2)
    assert len(tiles) == measured and masks.any(dim=(1, 2, 3)).all()
    held_out = set(tiles[:, 0][masks].tolist())
    assert held_out.isdisjoint(used) and 0.0 not in held_out and set(_along(held_out, shape, axis)) <= set(slab)


def test_an_uncompressed_network_agrees_with_the_original_everywhere(caplog):
    with caplog.at_level(logging.INFO, logger="nnunet_tucker"):
        predictor = _predictor(TuckerConfig(1.0, policy="auto", backend="torch", calibration_patches=2))
        _predict(predictor, _image(shape=LARGE))
    agreement = predictor.tucker_report.extra["calibration"]["agreement"]
    assert agreement["tiles"] == 2 and set(agreement["classes"]) == {"liver", "spleen", "kidney", "bone"}
    assert agreement["voxel_agreement"] == pytest.approx(1.0, abs=1e-3)  # float rounding at near-ties only
    assert all(c["dice"] == pytest.approx(1.0, abs=1e-2) for c in agreement["classes"].values()), agreement
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_class_far_from_the_original_is_warned_about_with_the_setting_to_raise(caplog, monkeypatch):
    def diverging(predictor, network, states, tiles):  # the compressed maps (second call) lose every organ
        maps = label_maps(predictor, network, states, tiles)
        calls.append(len(calls))
        return maps if len(calls) == 1 else [torch.zeros_like(m) for m in maps]

    calls: list[int] = []
    label_maps = predictor_module.label_maps
    monkeypatch.setattr(predictor_module, "label_maps", diverging)
    with caplog.at_level(logging.INFO, logger="nnunet_tucker"):
        _predict(_predictor(), _image(shape=LARGE))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and re.match(r"class (liver|spleen|kidney|bone) keeps only 0\.000 Dice of the "
                                           r"original's segmentation on held-out tiles \(below 0\.95\): raise "
                                           r"TUCKER_RANK_RATIO \(now 0\.5\), or calibrate", warnings[0]), warnings


def test_compress_asks_for_a_calibration_folder_or_none(tmp_path):
    with pytest.raises(TuckerConfigError, match="--calibration DIR .* or --calibration none"):
        compress_model_folder(demo_model_folder(), tmp_path / "out", TuckerConfig(0.5))
    assert not (tmp_path / "out").exists()
    report = compress_model_folder(demo_model_folder(), tmp_path / "out", TuckerConfig(0.5, calibration="none"),
                                   folds=["0"])
    manifest = json.loads((tmp_path / "out" / "tucker_manifest.json").read_text())
    assert "calibration" not in manifest and report.decomposed_layers > 0


def test_models_are_named_by_their_dataset_folder_in_progress_lines():
    predictor = _predictor()
    name = predictor_module.model_name
    dataset = "Dataset292_TotalSegmentator_part2_vertebrae_1532subj"
    assert name(predictor, f"/r/{dataset}/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres") == dataset
    assert name(predictor, "/models/my_model/") == "my_model"  # not nnU-Net's layout: the folder itself
    assert name(predictor, None) == "Dataset990_Phantom"  # loaded otherwise: the plans' dataset name


def test_a_floor_missed_by_the_first_plan_gives_rank_back_and_later_runs_take_what_it_chose(caplog):
    config = TuckerConfig(0.4, policy="auto", backend="torch", calibration_patches=2, min_agreement=0.85)
    with caplog.at_level(logging.INFO, logger="nnunet_tucker"):
        at_floor = _predictor(config)
        _predict(at_floor, _image(shape=LARGE))
    # ratio 0.4 keeps too little of this narrow network: the liver in the held-out tiles falls below 0.85 (to 0.78);
    # the next target, 0.5, is tried first (0.91)
    missed = [m for m in _lines(caplog) if m.startswith("rank_ratio=0.4 policy=auto min_agreement=0.85: worst class ")]
    assert len(missed) == 1 and missed[0].endswith("below min_agreement=0.85; trying rank_ratio=0.5 policy=auto "
                                                   "min_agreement=0.85"), _lines(caplog)
    tried = {float(m.split()[0].removeprefix("rank_ratio=")): " reaches min_agreement" in m for m in _lines(caplog)
             if m.startswith("rank_ratio=") and " on held-out tiles of the first image" in m}
    report = at_floor.tucker_report
    assert report is not None, "no ratio up to 1.0 reached 0.85"  # this network reaches it at 0.5 (0.91)
    assert report.extra["calibration"]["agreement"]["worst"][1] >= 0.85
    reached = [ratio for ratio, passed in tried.items() if passed] + [report.config["rank_ratio"]]
    assert 0.4 in tried and report.config["rank_ratio"] == min(reached) > 0.4 and len(tried) <= 5, tried
    without = _predictor(TuckerConfig(0.4, policy="auto", backend="torch", calibration="none"))
    assert report.macs_after > without.tucker_report.macs_after  # rank given back
    again = _predictor(config)  # a later run: what the floor chose, from the cache
    assert again.tucker_report.config == report.config and again.tucker_report.extra["cache_misses"] == 0


def test_a_floor_searches_the_looser_targets_and_runs_the_least_that_reached_it(monkeypatch):
    # agreement planted to reach the floor from ratio 0.6 up: from 0.3 the search tries 0.4 (misses), 0.6 (reaches),
    # 0.5 (misses), and must then run 0.6's network, not the last one it fitted
    tried = []
    compress_folds = predictor_module.compress_folds

    def recorded(predictor, config, *args):
        tried.append(config.rank_ratio)
        return compress_folds(predictor, config, *args)

    def planted(*args):
        worst = 0.99 if tried[-1] >= 0.6 else 0.5
        return {"tiles": 2, "voxels": 10, "voxel_agreement": worst, "classes": {}, "worst": ["liver", worst]}

    monkeypatch.setattr(predictor_module, "compress_folds", recorded)
    monkeypatch.setattr(predictor_module, "measure_agreement", planted)
    predictor = _predictor(TuckerConfig(0.3, policy="auto", backend="torch", calibration_patches=2, min_agreement=0.9))
    _predict(predictor, _image())
    assert tried == [0.3, 0.4, 0.6, 0.5]
    report = predictor.tucker_report
    assert report.config["rank_ratio"] == 0.6 and report.extra["calibration"]["agreement"]["worst"] == ["liver", 0.99]
    running = predictor_module.unwrap(predictor.network)
    assert count_macs(running, (1, 1, *predictor.configuration_manager.patch_size))[0] == report.macs_after


@pytest.mark.parametrize(("least", "order", "kept"), [
    (1, [1], 1),  # a near miss: one fit
    (2, [1, 3, 2], 2),
    (3, [1, 3, 2], 3),
    (5, [1, 3, 7, 5], 5),  # 7 (the last, every rank kept) is not counted among the three fits
    (4, [1, 3, 7, 5], 5),  # the three fits spent: 4 is not tried
    (None, [1, 3, 7], None),  # not even the last reached it
])
def test_the_floor_gallops_then_bisects_with_three_fits_besides_the_last(least, order, kept):
    tried = {0: False}  # targets 0 (asked for, missed) ... 7 (every rank kept)
    while (index := predictor_module.next_target(tried, 7)) is not None:
        assert index not in tried
        tried[index] = least is not None and index >= least
    assert list(tried)[1:] == order and min((i for i, ok in tried.items() if ok), default=None) == kept
    assert predictor_module.next_target({0: False}, 0) is None  # nothing looser than the target asked for


def test_a_floor_no_plan_reaches_leaves_the_model_uncompressed_now_and_later(caplog, monkeypatch):
    monkeypatch.setattr(predictor_module, "measure_agreement",
                        lambda *args: {"tiles": 2, "voxels": 10, "voxel_agreement": 0.5, "classes": {},
                                       "worst": ["liver", 0.5]})
    config = TuckerConfig(0.7, policy="auto", backend="torch", calibration_patches=2, min_agreement=0.9)
    with caplog.at_level(logging.INFO, logger="nnunet_tucker"):
        predictor = _predictor(config)
        original = [dict(state) for state in predictor.list_of_parameters]
        segmentation = _predict(predictor, _image())
    tried = [m for m in _lines(caplog) if " on held-out tiles of the first image" in m and "below min_agreement" in m]
    assert [m.split(":")[0] for m in tried] == [f"rank_ratio={r} policy=auto min_agreement=0.9"
                                                for r in (0.7, 0.8, 1.0)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("no rank ratio or MAC budget up to 1.0 keeps every class at "
                                                         "min_agreement=0.9"), warnings
    assert predictor.tucker_report is None and segmentation.shape == SHAPE
    assert all(torch.equal(a[k], b[k]) for a, b in zip(original, predictor.list_of_parameters, strict=True) for k in a)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nnunet_tucker"):
        later = _predictor(config)
    assert later.tucker_report is None and not getattr(later, "_tucker_pending", None)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][0].startswith(
        "rank_ratio=0.7 policy=auto min_agreement=0.9: no rank ratio or MAC budget kept every class")


def test_a_floor_needs_calibration():
    with pytest.raises(TuckerConfigError, match="min_agreement=0.98 is measured on images the fit did not see, so "
                                                "it needs calibration: .* not 'none'"):
        TuckerConfig(0.3, calibration="none", min_agreement=0.98)
    assert TuckerConfig(0.3, calibration="calib/", min_agreement=0.98).min_agreement == 0.98


def test_a_case_the_fitting_tiles_cover_has_nothing_held_out_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="nnunet_tucker"):
        predictor = _predictor()
        _predict(predictor, _image()[:, :32, :64, :64])  # one tile: the two fitting patches are it and its mirror
    agreement = predictor.tucker_report.extra["calibration"]["agreement"]
    assert agreement["tiles"] == 0 and agreement["worst"] is None
    assert [m for m in _lines(caplog) if m.startswith("agreement with the original")] == [
        "agreement with the original not measured: the fitting tiles cover all of the first image (1×32×64×64); "
        "check with nnunet-tucker evaluate on cases of your own"]


def test_a_calibration_folder_is_measured_once_and_the_original_s_segmentation_of_its_tiles_is_kept(
        caplog, cache, tmp_path, monkeypatch):
    """With TUCKER_CALIBRATION=folder the agreement on its held-out case is measured when it first compresses; later
    loads of the same model, config and folder content read it from the cache (no held-out case preprocessed, no
    network run on it); another setting on the same folder measures again, against the original's segmentation of
    the held-out tiles from the cache: only the compressed network runs on them."""
    folder = tmp_path / "calibration"
    folder.mkdir()
    for index, seed in enumerate((3, 4)):
        image, _, spacing = make_phantom(seed, shape=LARGE)
        write_nifti(folder / f"case_{index:03d}_0000.nii.gz", np.round(image).astype(np.int16), spacing)
    runs = []
    measured = predictor_module.label_maps

    def counted(predictor, network, states, tiles):
        runs.append(states)
        return measured(predictor, network, states, tiles)

    monkeypatch.setattr(predictor_module, "label_maps", counted)
    config = TuckerConfig(0.5, policy="auto", calibration=str(folder), calibration_patches=2, backend="torch")
    with caplog.at_level(logging.INFO, logger="nnunet_tucker"):
        first = _predictor(config)
    agreement = first.tucker_report.extra["calibration"]["agreement"]
    assert agreement["case"] == "case_001" and agreement["tiles"] > 0 and agreement["worst"] is not None
    assert len(list(cache.glob("calibration-*.json"))) == 1 and len(list(cache.glob("label-maps-*.pt"))) == 1
    assert len(runs) == 2  # the original, then the compressed network
    lines = [m for m in _lines(caplog) if m.startswith("agreement with the original on ")]
    assert len(lines) == 1 and not lines[0].endswith("(measured when it was calibrated)")

    caplog.clear()
    with monkeypatch.context() as planted, caplog.at_level(logging.INFO, logger="nnunet_tucker"):
        planted.setattr(predictor_module, "load_held_out_tiles", lambda *args: pytest.fail("measured again"))
        later = _predictor(config)
    assert len(runs) == 2
    extra = later.tucker_report.extra
    assert extra["cache_misses"] == 0 and extra["calibration"]["from_cache"]
    assert extra["calibration"]["agreement"] == agreement
    assert [m for m in _lines(caplog) if m.startswith("agreement with the original on ")] == [
        lines[0] + " (measured when it was calibrated)"]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first.list_of_parameters, later.list_of_parameters, strict=True)
               for k in a)

    other = _predictor(TuckerConfig(0.3, policy="auto", calibration=str(folder), calibration_patches=2,
                                    backend="torch"))
    assert len(runs) == 3  # the compressed network only: the original's segmentation came from the cache
    assert other.tucker_report.extra["calibration"]["agreement"]["worst"] is not None
    assert len(list(cache.glob("calibration-*.json"))) == 2

import copy
import logging
import math
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_tucker.config import TuckerConfigError
from nnunet_tucker.nnunet.calibration_images import (
    MAX_CALIBRATION_VOXELS,
    CalibrationError,
    calibration_cases,
    calibration_crop,
    calibration_digest,
    load_calibration_patches,
    load_held_out_tiles,
)
from nnunet_tucker.tools.demo_model import demo_model_folder
from nnunet_tucker.tools.synthetic import DEFAULT_SPACING, make_phantom, make_test_cases, write_nifti

PATCH = (32, 64, 64)  # the demo model's patch size; make_test_cases images are exactly one patch
BIG = (40, 80, 64)  # 2 x 2 x 1 sliding-window tiles at step 0.5


@pytest.fixture(scope="module")
def predictor():
    predictor = nnUNetPredictor(device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(str(demo_model_folder()), (0,), "checkpoint_final.pth")
    return predictor


@pytest.fixture
def images(tmp_path):
    """A one-patch case 'case_000', a four-tile case 'big' (sorted first) and 'zz_kept' (sorted last: held out)."""
    folder = tmp_path / "images"
    make_test_cases(folder, 1, seed=0)
    image, _, spacing = make_phantom(7, shape=BIG)
    write_nifti(folder / "big_0000.nii.gz", np.round(image).astype(np.int16), spacing)
    image, _, spacing = make_phantom(8, shape=BIG)
    write_nifti(folder / "zz_kept_0000.nii.gz", np.round(image).astype(np.int16), spacing)
    return folder


def _preprocessed(predictor, path):
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, _ = preprocessor.run_case([str(path)], None, predictor.plans_manager,
                                       predictor.configuration_manager, predictor.dataset_json)
    return torch.from_numpy(data)


def test_cases_are_grouped_by_case_in_channel_order(tmp_path):
    for name in ("b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz", "notes.txt", ".a_0000.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    two_channels = {"modality": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz"}
    assert calibration_cases(tmp_path, two_channels) == {
        case: [tmp_path / f"{case}_0000.nii.gz", tmp_path / f"{case}_0001.nii.gz"] for case in ("a", "b")
    }


def test_patches_are_preprocessed_tiles_spread_over_cases(predictor, images, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="nnunet_tucker"):
        patches = load_calibration_patches(images, predictor, max_patches=3)
    assert capsys.readouterr().out == ""  # nnU-Net's prints go to stderr
    assert patches.shape == (3, 1, *PATCH) and patches.dtype == torch.float32 and patches.device.type == "cpu"
    assert torch.isfinite(patches).all()
    # Round-robin: big, case_000, big; big's tiles 1 and 3 of 4 (evenly spaced); case_000 is one whole patch.
    big = _preprocessed(predictor, images / "big_0000.nii.gz")
    assert torch.equal(patches[0], big[:, 0:32, 16:80, 0:64])
    assert torch.equal(patches[1], _preprocessed(predictor, images / "case_000_0000.nii.gz"))
    assert torch.equal(patches[2], big[:, 8:40, 16:80, 0:64])
    assert torch.equal(patches, load_calibration_patches(images, predictor, max_patches=3))
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Calibration: ")] == [
        f"Calibration: 3 patch(es) of 32x64x64 from 2 of 3 case(s) in {images} (zz_kept held out to measure the "
        "agreement on)"]


def test_the_last_case_is_held_out_whole_where_a_folder_has_two_or_more(predictor, images, tmp_path):
    tiles, masks, case = load_held_out_tiles(images, predictor)
    kept = _preprocessed(predictor, images / "zz_kept_0000.nii.gz")
    assert case == "zz_kept" and tiles.shape == (2, 1, *PATCH)  # none of it was fitted on: the tiles' centres
    assert bool(masks[:, 8:24, 16:48, 16:48].all()) and int(masks.sum()) == 2 * 16 * 32 * 32
    assert all(any(torch.equal(tile, kept[:, z:z + 32, y:y + 64, 0:64]) for z in (0, 8) for y in (0, 16))
               for tile in tiles)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(images / "big_0000.nii.gz", alone)
    assert load_held_out_tiles(alone, predictor) is None  # one case: all of it for the fit
    assert load_calibration_patches(alone, predictor, max_patches=1).shape[0] == 1


def test_max_patches_is_honoured(predictor, images):
    assert load_calibration_patches(images, predictor, max_patches=1).shape[0] == 1
    assert load_calibration_patches(images, predictor).shape[0] == 4
    many = load_calibration_patches(images, predictor, max_patches=50)
    assert many.shape[0] == 40  # 5 tiles, each also mirrored along every non-empty set of its 3 axes
    assert torch.equal(many[5], many[0].flip(-1)) and torch.equal(many[39], many[4].flip(-1, -2, -3))
    assert len({p.numpy().tobytes() for p in many}) == 40


@pytest.mark.parametrize("max_patches", [0, -2, 1.5, True, "4"])
def test_bad_max_patches(predictor, images, max_patches):
    with pytest.raises(TuckerConfigError, match="max_patches=.* must be an integer >= 1"):  # a setting
        load_calibration_patches(images, predictor, max_patches=max_patches)
    with pytest.raises(TuckerConfigError):
        calibration_digest(images, predictor.dataset_json, max_patches)


def test_calibration_errors_are_input_errors_and_value_errors():
    from nnunet_tucker.errors import InputError, TuckerError

    assert issubclass(CalibrationError, InputError) and issubclass(CalibrationError, TuckerError)
    assert issubclass(CalibrationError, ValueError) and not issubclass(CalibrationError, TuckerConfigError)


def test_missing_folder_or_not_a_folder(predictor, tmp_path):
    with pytest.raises(CalibrationError, match=r"calibration folder .*nowhere does not exist"):
        load_calibration_patches(tmp_path / "nowhere", predictor)
    (tmp_path / "file.nii.gz").write_bytes(b"")
    with pytest.raises(CalibrationError, match="is not a directory"):
        load_calibration_patches(tmp_path / "file.nii.gz", predictor)


def test_folder_without_images(predictor, tmp_path):
    with pytest.raises(CalibrationError, match=r"no image with the model's file ending '\.nii\.gz' \(it is empty\)"
                                               r".*CASE_0000\.nii\.gz"):
        load_calibration_patches(tmp_path, predictor)
    (tmp_path / "scan.nrrd").write_bytes(b"")
    with pytest.raises(CalibrationError, match=r"\(it holds scan\.nrrd\)"):
        load_calibration_patches(tmp_path, predictor)


def test_misnamed_image(predictor, images):
    (images / "case_000_0000.nii.gz").rename(images / "case_000.nii.gz")
    with pytest.raises(CalibrationError, match=r"case_000\.nii\.gz do\(es\) not follow nnU-Net's naming "
                                               r"CASE_XXXX\.nii\.gz"):
        load_calibration_patches(images, predictor)


def test_wrong_channel_files(predictor, images):
    shutil.copy(images / "case_000_0000.nii.gz", images / "case_000_0001.nii.gz")
    expected = (f"calibration case 'case_000' in {images} has channel files _0000, _0001 but the model takes "
                "1 channel (0: CT): expected case_000_0000.nii.gz")
    with pytest.raises(CalibrationError) as error:
        load_calibration_patches(images, predictor)
    assert str(error.value) == expected
    (images / "case_000_0000.nii.gz").unlink()
    with pytest.raises(CalibrationError, match="has channel file _0001 but the model takes 1 channel"):
        load_calibration_patches(images, predictor)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_image_is_named(predictor, images, bad_value):
    image, _, _ = make_phantom(3)
    image[5, 10:12, 20] = bad_value  # niftilib (SimpleITK) would read these as 0
    path = images / "broken_0000.nii.gz"
    write_nifti(path, image, DEFAULT_SPACING)
    name = re.escape(str(path))  # a temporary folder's path may hold characters special in patterns
    with pytest.raises(CalibrationError, match=rf"case 'broken': {name} has 2 NaN/infinite voxel\(s\)"):
        load_calibration_patches(images, predictor)


def test_unreadable_image_is_named(predictor, images):
    path = images / "corrupt_0000.nii.gz"
    path.write_bytes(b"not an image")
    name = re.escape(str(path))  # a temporary folder's path may hold characters special in patterns
    with pytest.raises(CalibrationError, match=rf"case 'corrupt' \({name}\) could not be read and preprocessed"):
        load_calibration_patches(images, predictor)


def test_digest_follows_content_and_max_patches(predictor, images):
    dataset_json = predictor.dataset_json
    digest = calibration_digest(images, dataset_json, 4)
    assert digest == calibration_digest(images, dataset_json, 4)
    assert digest != calibration_digest(images, dataset_json, 5)
    path = images / "case_000_0000.nii.gz"
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    changed = calibration_digest(images, dataset_json, 4)
    path.write_bytes(original)
    path.rename(images / "case_001_0000.nii.gz")
    renamed = calibration_digest(images, dataset_json, 4)
    assert len({digest, changed, renamed}) == 3


def test_non_finite_values_kept_by_the_reader_are_named(predictor, tmp_path):
    """Other formats keep NaN through SimpleITK; the check after preprocessing names the file."""
    mha_predictor = copy.copy(predictor)
    mha_predictor.dataset_json = {**predictor.dataset_json, "file_ending": ".mha"}
    image, _, _ = make_phantom(3)
    image[5, 10, 20] = np.nan
    path = tmp_path / "broken_0000.mha"
    write_nifti(path, image, DEFAULT_SPACING)  # SimpleITK writes by extension
    name = re.escape(str(path))  # a temporary folder's path may hold characters special in patterns
    with pytest.raises(CalibrationError, match=rf"case 'broken': {name} has 1 NaN/infinite voxel\(s\)"):
        load_calibration_patches(tmp_path, mha_predictor)


@pytest.mark.parametrize("patch, strides, crop", [
    ((192, 192, 192), [[1, 1, 1]] + [[2, 2, 2]] * 5, [128, 128, 128]),  # nnU-Net ResEnc L at 1.5 mm
    ((128, 128, 128), [[1, 1, 1]] + [[2, 2, 2]] * 5, [128, 128, 128]),  # TotalSegmentator's 1.5 mm parts: as is
    ((160, 192, 224), [1, [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], [128, 128, 128]),
    ((40, 512, 512), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], [40, 224, 224]),
])
def test_large_patches_are_calibrated_on_their_middle_in_whole_strides(patch, strides, crop):
    configuration = SimpleNamespace(patch_size=list(patch), network_arch_init_kwargs={"strides": strides})
    assert calibration_crop(configuration) == crop
    assert math.prod(crop) <= MAX_CALIBRATION_VOXELS or crop == list(patch)
    total = [math.prod(s if isinstance(s, int) else s[axis] for s in strides) for axis in range(3)]
    assert all(c % t == 0 or c == p for c, t, p in zip(crop, total, patch, strict=True))

"""Calibration patches for data-aware compression: cut from a folder of the user's own images, or from
the first case a prediction run segments, as nnU-Net preprocessed it (`first_case_patches`).

The folder holds a few unlabelled cases in the model's nnU-Net input format (``CASE_0000<ending>``,
``CASE_0001<ending>``, ... one file per input channel, ``<ending>`` being dataset.json's
``file_ending``). Each case goes through the configuration's preprocessor exactly as in nnU-Net's
prediction (``preprocessor.run_case(files, None, plans_manager, configuration_manager,
dataset_json)``), is padded to at least the patch size like the sliding window pads it
(``pad_nd_image``, constant 0) and is cut at the sliding window's tile positions
(``compute_steps_for_sliding_window`` with step 0.5).

Patches are chosen deterministically: round-robin over the cases in sorted order (so at most
``max_patches`` cases are used), and within a case the tiles at the middles of equal stretches of
the sliding window's tile order, i.e. evenly spaced tiles, the central one when a case gives one.
What the fit did not use is measured on (`held_out_tiles`): a folder's last case, or other tiles of the first
case; where a first case has too few tiles for that, a slab across its fitting tiles is left out of the fit
(`fitting_windows`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

from ..errors import CalibrationError, TuckerConfigError

logger = logging.getLogger(__name__)

TILE_STEP_SIZE = 0.5
# Bump when the choice of patches changes, so that statistics cached under the digest are recomputed.
_DIGEST_VERSION = "nnunet_tucker calibration v3"  # v2: mirrored tiles fill up; v3: large patches cropped
_NIFTI_ENDINGS = (".nii", ".nii.gz")
HELD_OUT_TILES = 2  # tiles a calibrated compression is measured on (of the first case, or a kept case)
# A larger patch is calibrated on its middle (`calibration_crop`): the probed pass keeps every activation for its
# backward, which for nnU-Net ResEnc L's 192³ patch took 22 GB.
MAX_CALIBRATION_VOXELS = 128**3


def _listing(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _model_channels(dataset_json: Mapping[str, Any]) -> dict[int, str]:
    """The model's input channels, index -> name, from ``channel_names`` (or legacy ``modality``)."""
    names = dataset_json.get("channel_names") or dataset_json.get("modality")
    if not names:
        raise CalibrationError("the model's dataset.json has neither 'channel_names' nor 'modality': "
                               "cannot tell which channel files a calibration case needs")
    return {int(index): str(name) for index, name in names.items()}


def calibration_cases(folder: Path | str, dataset_json: Mapping[str, Any]) -> dict[str, list[Path]]:
    """Case id -> the case's channel files in channel order, for the images in ``folder``.

    Follows nnU-Net's naming of prediction inputs (``CASE_XXXX<file_ending>``, as matched by
    ``nnunetv2.utilities.utils.create_paths_fn``), but checks it: every file with the ending must
    follow it and every case must have exactly the model's channels. Hidden files, subfolders and
    files with other endings are ignored.
    """
    folder = Path(folder)
    if not folder.exists():
        raise CalibrationError(f"calibration folder {folder} does not exist: expected a folder of images "
                               "in the model's nnU-Net input format (CASE_0000<file_ending>, ...)")
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder {folder} is not a directory: expected a folder of images "
                               "in the model's nnU-Net input format (CASE_0000<file_ending>, ...)")
    ending = dataset_json.get("file_ending")
    if not ending:
        raise CalibrationError("the model's dataset.json has no 'file_ending': cannot tell which files in "
                               f"{folder} are calibration images")
    channels = _model_channels(dataset_json)

    visible = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in visible if p.name.endswith(ending)]
    if not images:
        found = f"it holds {_listing([p.name for p in visible])}" if visible else "it is empty"
        raise CalibrationError(f"calibration folder {folder} has no image with the model's file ending "
                               f"{ending!r} ({found}): expected files named CASE_0000{ending}, one per "
                               "case and input channel")

    pattern = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending))
    by_case: dict[str, dict[int, Path]] = {}
    misnamed = []
    for path in images:
        match = pattern.fullmatch(path.name)
        if match is None:
            misnamed.append(path.name)
        else:
            by_case.setdefault(match["case"], {})[int(match["channel"])] = path
    if misnamed:
        raise CalibrationError(f"calibration folder {folder}: {_listing(misnamed)} do(es) not follow nnU-Net's "
                               f"naming CASE_XXXX{ending} (case id, '_', 4-digit channel index, e.g. "
                               f"CASE_0000{ending})")

    described = ", ".join(f"{index}: {name}" for index, name in sorted(channels.items()))
    plural = "s" if len(channels) != 1 else ""
    mismatched = []
    for case, files in sorted(by_case.items()):
        if sorted(files) != sorted(channels):
            have = ", ".join(f"_{index:04d}" for index in sorted(files))
            expected = ", ".join(f"{case}_{index:04d}{ending}" for index in sorted(channels))
            mismatched.append(f"calibration case {case!r} in {folder} has channel file{'s' if len(files) > 1 else ''} "
                              f"{have} but the model takes {len(channels)} channel{plural} ({described}): "
                              f"expected {expected}")
    if mismatched:
        more = f" (and {len(mismatched) - 1} more case(s) like it)" if len(mismatched) > 1 else ""
        raise CalibrationError(mismatched[0] + more)
    return {case: [files[index] for index in sorted(files)] for case, files in sorted(by_case.items())}


def _nonfinite_in_nifti(path: Path) -> int:
    """Non-finite voxels stored in a NIfTI file (0 for other formats and integer data).

    Read with nibabel because nnU-Net's SimpleITK reader (niftilib) silently turns NaN and inf into 0.
    """
    if not path.name.endswith(_NIFTI_ENDINGS):
        return 0
    try:
        import nibabel
    except ImportError:  # pragma: no cover - nibabel is an nnU-Net dependency
        return 0
    image = nibabel.load(str(path))
    if not np.issubdtype(image.get_data_dtype(), np.inexact):
        return 0  # integers cannot hold NaN or inf
    return int((~np.isfinite(np.asanyarray(image.dataobj))).sum())


def _nonfinite_as_read(path: Path, reader: Any) -> int:
    """Non-finite voxels in one file as the model's reader class reads it."""
    data, _ = reader.read_images([str(path)])
    return int((~np.isfinite(data)).sum())


def _nonfinite_error(case: str, files: list[Path], count: Callable[[Path], int]) -> CalibrationError | None:
    """An error naming the files of a case where ``count`` finds NaN/inf voxels, or None if there are none."""
    bad = {}
    for path in files:
        with contextlib.suppress(Exception):  # unreadable files are reported when preprocessing
            if n_bad := count(path):
                bad[path] = n_bad
    if not bad:
        return None
    details = "; ".join(f"{path} has {n_bad} NaN/infinite voxel(s)" for path, n_bad in bad.items())
    return CalibrationError(f"calibration case {case!r}: {details}. Expected finite intensities (nnU-Net would "
                            "silently read them as 0 or pass them on): fix or remove the file(s)")


def _preprocess(case: str, files: list[Path], preprocessor: Any, predictor: Any) -> np.ndarray:
    """One case preprocessed as in nnU-Net's prediction: (C, *spatial) float32, checked finite."""
    if error := _nonfinite_error(case, files, _nonfinite_in_nifti):
        raise error
    try:
        with contextlib.redirect_stdout(sys.stderr):
            data, _, _ = preprocessor.run_case([str(p) for p in files], None, predictor.plans_manager,
                                               predictor.configuration_manager, predictor.dataset_json)
    except Exception as exc:
        raise CalibrationError(f"calibration case {case!r} ({', '.join(map(str, files))}) could not be read and "
                               f"preprocessed by nnU-Net: {type(exc).__name__}: {exc}. Expected readable images "
                               "of one size and geometry per case") from exc
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        reader = predictor.plans_manager.image_reader_writer_class()
        if error := _nonfinite_error(case, files, lambda path: _nonfinite_as_read(path, reader)):
            raise error
        raise CalibrationError(f"calibration case {case!r} ({', '.join(map(str, files))}) has NaN or infinite "
                               f"values after nnU-Net's preprocessing ({int((~np.isfinite(data)).sum())} "
                               "voxel(s)): expected images whose preprocessing gives finite intensities")
    return data


def _tiles(spatial: Sequence[int], patch_size: Sequence[int]) -> list[tuple[slice | int, ...]]:
    """Slicers of the sliding window's tiles over an image (C, *spatial), in nnU-Net's order (3D patches, or 2D
    patches per slice)."""
    steps = compute_steps_for_sliding_window(spatial[-len(patch_size):], patch_size, TILE_STEP_SIZE)
    windows = [[slice(s, s + p) for s in axis_steps] for axis_steps, p in zip(steps, patch_size, strict=True)]
    if len(patch_size) == len(spatial):
        return [(slice(None), *w) for w in itertools.product(*windows)]
    if len(patch_size) == len(spatial) - 1:
        return [(slice(None), d, *w) for d in range(spatial[0]) for w in itertools.product(*windows)]
    raise CalibrationError(f"patch size {tuple(patch_size)} does not fit preprocessed images of shape "
                           f"{tuple(spatial)}: expected a patch with as many axes as the image, or one fewer")


def _evenly_spaced(n_items: int, k: int) -> list[int]:
    """Indices of the middles of k equal stretches of range(n_items); the middle one for k = 1."""
    return [(2 * j + 1) * n_items // (2 * k) for j in range(k)]


def _round_robin(counts: Sequence[int], budget: int) -> list[int]:
    """How many items each source gives when they take turns, in order, until the budget is spent."""
    taken = [0] * len(counts)
    while budget > 0 and any(t < c for t, c in zip(taken, counts, strict=True)):
        for i, count in enumerate(counts):
            if budget > 0 and taken[i] < count:
                taken[i] += 1
                budget -= 1
    return taken


def _check_max_patches(max_patches: Any) -> None:
    if not isinstance(max_patches, int) or isinstance(max_patches, bool) or max_patches < 1:
        raise TuckerConfigError(f"max_patches={max_patches!r} is not allowed: it must be an integer >= 1")


def _total_strides(configuration: Any) -> list[int] | None:
    """The network's total stride along each axis of the patch (None where the plans do not say)."""
    strides = (getattr(configuration, "network_arch_init_kwargs", None) or {}).get("strides")
    if not strides:
        return None
    return [math.prod(int(s) if isinstance(s, int) else int(s[axis]) for s in strides)
            for axis in range(len(configuration.patch_size))]


def calibration_crop(configuration: Any) -> list[int]:
    """The patch size calibration runs on: the configuration's, or where that holds more than
    `MAX_CALIBRATION_VOXELS`, shrunk on its longest axis, one step of the network's total stride along that axis
    at a time (so that every stage still sees whole voxels), until it fits."""
    size = [int(p) for p in configuration.patch_size]
    step = _total_strides(configuration)
    if not step or math.prod(size) <= MAX_CALIBRATION_VOXELS:
        return size
    while math.prod(size) > MAX_CALIBRATION_VOXELS:
        shrinkable = [axis for axis in range(len(size)) if size[axis] > step[axis]]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: size[a])
        size[axis] -= step[axis]
    return size


def _centre_crop(patches: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The middle `size` of every patch (N, C, *spatial)."""
    starts = [(n - s) // 2 for n, s in zip(patches.shape[2:], size, strict=True)]
    window = tuple(slice(a, a + s) for a, s in zip(starts, size, strict=True))
    return patches[(slice(None), slice(None), *window)].contiguous()


def load_calibration_patches(folder: Path | str, predictor: Any, max_patches: int = 4) -> torch.Tensor:
    """Up to ``max_patches`` preprocessed network-input patches from the images in ``folder``.

    ``predictor`` is an initialised ``nnUNetPredictor``. Returns a float32 CPU tensor
    (N, C, *patch_size), 1 <= N <= max_patches, N smaller only when the cases have fewer tiles.
    """
    _check_max_patches(max_patches)
    configuration = _single_stage(folder, predictor)
    cases = calibration_cases(folder, predictor.dataset_json)
    kept_apart = held_out_case(cases)
    # round-robin gives every case >= 1 tile, so later ones get none
    used = [(case, files) for case, files in cases.items() if case != kept_apart][:max_patches]
    preprocessor = configuration.preprocessor_class(verbose=predictor.verbose_preprocessing)
    images = [_preprocess(case, files, preprocessor, predictor) for case, files in used]
    batch = _centre_crop(cut_patches(images, configuration.patch_size, max_patches), calibration_crop(configuration))
    logger.info("Calibration: %d patch(es) of %s from %d of %d case(s) in %s%s", len(batch),
                "x".join(map(str, batch.shape[2:])), len(used), len(cases), folder,
                f" ({kept_apart} held out to measure the agreement on)" if kept_apart else "")
    return batch


def _single_stage(folder: Path | str, predictor: Any) -> Any:
    """The configuration of an initialised predictor, checked to take images alone (no cascade stage)."""
    if getattr(predictor, "configuration_manager", None) is None:
        raise ValueError("the predictor is not initialised: call initialize_from_trained_model_folder first")
    configuration = predictor.configuration_manager
    if configuration.previous_stage_name is not None:
        raise CalibrationError(f"calibration for {folder} needs a single-stage model: this configuration is a "
                               f"cascade stage after {configuration.previous_stage_name!r}, whose input includes "
                               "the previous stage's segmentation")
    return configuration


def held_out_case(cases: Mapping[str, Any]) -> str | None:
    """The case of a calibration folder kept apart to measure the compression on: the last in sorted order, where
    the folder has two or more (None: one case, all of it for the fit)."""
    return sorted(cases)[-1] if len(cases) >= 2 else None


def load_held_out_tiles(folder: Path | str, predictor: Any, k: int = HELD_OUT_TILES
                        ) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """Up to `k` tiles of the case `held_out_case` keeps apart (`held_out_tiles` with nothing fitted on it: the
    ones nearest its middle, their central halves masked in) and its name; None for a one-case folder."""
    configuration = _single_stage(folder, predictor)
    cases = calibration_cases(folder, predictor.dataset_json)
    case = held_out_case(cases)
    if case is None:
        return None
    preprocessor = configuration.preprocessor_class(verbose=predictor.verbose_preprocessing)
    tiles, masks = held_out_tiles(_preprocess(case, cases[case], preprocessor, predictor), configuration,
                                  fitting=0, k=k)
    return tiles, masks, case


def _padded(image: np.ndarray | torch.Tensor, patch_size: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """A preprocessed image padded to at least the patch size as the sliding window pads it, and where the image
    lies in it."""
    image = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return pad_nd_image(image.astype(np.float32, copy=False), [int(p) for p in patch_size], "constant",
                        {"constant_values": 0}, return_slicer=True)


def _filled_up(patches: list[np.ndarray], n: int) -> torch.Tensor:
    """`patches` (each (C, *spatial)), then mirrored copies of them until there are `n` (last spatial axis first, as
    test-time mirroring shows them to a network), stacked."""
    spatial = range(-1, -patches[0].ndim, -1)
    mirrorings = itertools.chain.from_iterable(itertools.combinations(spatial, m) for m in range(1, len(spatial) + 1))
    patches = list(patches)
    for axes, patch in itertools.product(mirrorings, patches[:]):
        if len(patches) >= n:
            break
        patches.append(np.flip(patch, axes))
    return torch.from_numpy(np.stack([np.ascontiguousarray(p) for p in patches]))


def cut_patches(
    images: Sequence[np.ndarray | torch.Tensor], patch_size: Sequence[int], max_patches: int
) -> torch.Tensor:
    """Up to ``max_patches`` network-input patches (N, C, *patch_size), float32 on the CPU, from preprocessed
    images (C, *spatial): each padded to at least the patch size as the sliding window pads it, the tiles
    taken round-robin over the images, evenly spaced within each. Where the images have fewer tiles, the
    rest are those tiles mirrored (last spatial axis first, as test-time mirroring shows them to a network):
    a case smaller than two patches still gives the calibration a second view of it."""
    _check_max_patches(max_patches)
    padded = [_padded(image, patch_size)[0] for image in images]
    tiles = [_tiles(image.shape[1:], patch_size) for image in padded]
    taken = _round_robin([len(t) for t in tiles], max_patches)
    chosen = [[tiles[i][j] for j in _evenly_spaced(len(tiles[i]), k)] for i, k in enumerate(taken)]
    patches = [padded[i][chosen[i][r]] for r in range(max(taken)) for i in range(len(images)) if r < taken[i]]
    return _filled_up(patches, max_patches)


def _centre_half(patch_size: Sequence[int]) -> np.ndarray:
    """The central half of a tile along every axis, as a mask."""
    centre = np.zeros([int(p) for p in patch_size], dtype=bool)
    centre[tuple(slice(p // 4, p - p // 4) for p in centre.shape)] = True
    return centre


def _slab(spatial: Sequence[int], patch_size: Sequence[int], strides: Sequence[int] | None
          ) -> tuple[slice, ...] | None:
    """The slab `fitting_windows` leaves out of the fit, as slicers of the padded case: across the middle of one
    axis, one stride of the network thick (or an eighth of the patch where that is more), on the axis with the most
    room between half a patch (rounded up to whole strides) at either end, the first on ties; None where no axis has
    room for one stride. (Left out as thick as that room, the fit lost more and the estimate came out lower:
    benchmarks/results/honesty_cpu.md.)"""
    ends = {axis: math.ceil(p / 2 / s) * s
            for axis, (p, s) in enumerate(zip(patch_size, strides or (), strict=False))}
    room = {axis: spatial[axis] - 2 * end for axis, end in ends.items()
            if end < patch_size[axis] and spatial[axis] - 2 * end >= strides[axis]}
    if not room:
        return None
    axis = max(room, key=lambda a: (room[a], -a))
    thickness = min(room[axis], strides[axis] * max(1, round(patch_size[axis] / 8 / strides[axis])))
    start = (spatial[axis] - thickness) // 2
    return tuple(slice(start, start + thickness) if a == axis else slice(None) for a in range(len(spatial)))


def fitting_windows(spatial: Sequence[int], inside: Sequence[slice], configuration: Any, fitting: int
                    ) -> tuple[list[tuple[slice | int, ...]], tuple[slice, ...] | None]:
    """Where self-calibration fits in a first case padded to `spatial` (the case at `inside`, as `_padded` says):
    the `fitting` evenly spaced tiles of the sliding window (as `cut_patches` takes them; fewer where it has fewer),
    and the slab of them the fit's statistics leave out (None: nothing left out). A slab (`_slab`) is left out where
    whole tiles would leave no tile's central half free to measure the agreement on (a case of few tiles: a 3 mm CT
    is 2×2×2): the network still runs on the whole tiles, so every voxel the fit uses has its context as in the
    sliding window (fitted on crops instead, the worst class of 8 other cases fell 0.003-0.03), but the slab's own
    positions, at every layer's resolution, count for nothing in the fit and are measured on (`held_out_tiles`)."""
    patch_size = [int(p) for p in configuration.patch_size]
    tiles = _tiles(spatial, patch_size)
    windows = [tiles[j] for j in _evenly_spaced(len(tiles), min(len(tiles), fitting))]
    if len(patch_size) != len(spatial):
        return windows, None
    free, centre = _free(spatial, inside, windows, None), _centre_half(patch_size)
    if any((free[t[1:]] & centre).any() for t in tiles):
        return windows, None
    return windows, _slab(spatial, patch_size, _total_strides(configuration))


def _fitted(spatial: Sequence[int], windows: Sequence[tuple], slab: tuple[slice, ...] | None) -> np.ndarray:
    """The voxels of a padded case (spatial shape) the fit's statistics use: in a window, not in the slab."""
    fitted = np.zeros(spatial, dtype=bool)
    for window in windows:
        fitted[window[1:]] = True
    if slab is not None:
        fitted[slab] = False
    return fitted


def _free(spatial: Sequence[int], inside: Sequence[slice], windows: Sequence[tuple], slab: tuple[slice, ...] | None
          ) -> np.ndarray:
    """The voxels of a padded case (spatial shape) inside the case (`inside`) that the fit does not use."""
    free = np.zeros(spatial, dtype=bool)
    free[tuple(inside)] = True
    return free & ~_fitted(spatial, windows, slab)


def first_case_patches(data: np.ndarray | torch.Tensor, predictor: Any, max_patches: int, case: str
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Calibration patches from the first case of a prediction run, as nnU-Net preprocessed it (`data`,
    (C, *spatial)), cut at `fitting_windows` (mirrored copies where the case has fewer tiles), and where the fit
    leaves a slab of them out, the voxels of each it uses ((N, *patch) bool; else None); a clear error where it
    cannot calibrate anything."""
    _check_max_patches(max_patches)
    configuration = predictor.configuration_manager
    if configuration.previous_stage_name is not None:
        raise CalibrationError(f"calibration on {case} needs a single-stage model: this configuration is a cascade "
                               f"stage after {configuration.previous_stage_name!r}; set TUCKER_CALIBRATION to "
                               "'none' (weights only)")
    data = torch.as_tensor(data)
    if not torch.isfinite(data).all():
        raise CalibrationError(f"cannot calibrate on {case}: it has {int((~torch.isfinite(data)).sum())} NaN or "
                               "infinite voxel(s) after nnU-Net's preprocessing. Set TUCKER_CALIBRATION to a folder "
                               "of images of your own, or to 'none' (weights only)")
    flat = data.flatten(1)
    if bool((flat.amax(dim=1) == flat.amin(dim=1)).all()):
        raise CalibrationError(f"cannot calibrate on {case}: every input channel is constant, which says nothing "
                               "of the data the model sees. Set TUCKER_CALIBRATION to a folder of images of your "
                               "own, or to 'none' (weights only)")
    padded, inside = _padded(data, configuration.patch_size)
    windows, slab = fitting_windows(padded.shape[1:], inside[1:], configuration, max_patches)
    crop = calibration_crop(configuration)
    patches = _centre_crop(_filled_up([padded[w] for w in windows], max_patches), crop)
    if slab is None:
        return patches, None
    fitted = _fitted(padded.shape[1:], windows, slab)[None]
    masks = _centre_crop(_filled_up([fitted[w] for w in windows], max_patches), crop)
    return patches, masks[:, 0]


def held_out_tiles(data: np.ndarray | torch.Tensor, configuration: Any, fitting: int,
                   k: int = HELD_OUT_TILES) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `k` tiles of one preprocessed case (C, *spatial) to measure a compression fitted on it with `fitting`
    patches (`first_case_patches`): tiles of the sliding window (padded as it pads), each with the mask of the voxels
    it is measured on: those in the central half of the tile along every axis (where the sliding window's Gaussian
    weighting gives a tile most say in nnU-Net's prediction; at its borders both networks are least sure, and
    measured there the agreement came out 0.01-0.08 below the held-out cases') that lie inside the case and outside
    what the fit used (`fitting_windows`: its windows less the slab it leaves out). Of the tiles with at least half
    as many such voxels as the one with most, those nearest the middle of the case (where the anatomy is, not the
    air at its corners), the window's order on ties. Returns (patches (N, C, *patch), masks (N, *patch)), N = 0
    where no tile has such a voxel (a case of a single tile, or too thin to leave a slab out)."""
    patch_size = [int(p) for p in configuration.patch_size]
    padded, inside = _padded(data, patch_size)
    tiles = _tiles(padded.shape[1:], patch_size)
    free = _free(padded.shape[1:], inside[1:], *fitting_windows(padded.shape[1:], inside[1:], configuration, fitting))
    centre = _centre_half(patch_size)
    counts = [int((free[tile[1:]] & centre).sum()) for tile in tiles]
    most = max(counts, default=0)
    middle = [(s.start + s.stop) / 2 for s in inside[1:]]

    def distance(j: int) -> float:
        return sum((((t.start + t.stop) / 2 if isinstance(t, slice) else t) - m) ** 2
                   for t, m in zip(tiles[j][1:], middle, strict=True))

    candidates = [j for j, count in enumerate(counts) if most and 2 * count >= most]
    chosen = sorted(sorted(candidates, key=lambda j: (distance(j), j))[:k])
    patches = np.zeros((len(chosen), padded.shape[0], *patch_size), dtype=np.float32)
    masks = np.zeros((len(chosen), *patch_size), dtype=bool)
    for i, j in enumerate(chosen):
        patches[i], masks[i] = padded[tiles[j]], free[tiles[j][1:]] & centre
    return torch.from_numpy(patches), torch.from_numpy(masks)


def patches_digest(patches: torch.Tensor, masks: torch.Tensor | None = None) -> str:
    """Content hash of calibration patches and the masks of what the fit uses of them (for cache keys)."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{_DIGEST_VERSION}|{tuple(patches.shape)}|".encode())
    digest.update(patches.contiguous().numpy())  # the buffer itself, not a copy
    if masks is not None:
        digest.update(b"masks|")
        digest.update(masks.contiguous().numpy())
    return digest.hexdigest()


def calibration_digest(folder: Path | str, dataset_json: Mapping[str, Any], max_patches: int) -> str:
    """Content hash (blake2b) of the calibration cases (file names and bytes) and ``max_patches``.

    It does not cover the model: key derived statistics by the model as well.
    """
    _check_max_patches(max_patches)
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{_DIGEST_VERSION}|max_patches={max_patches}|".encode())
    for case, files in calibration_cases(folder, dataset_json).items():
        digest.update(f"case={case}|".encode())
        for path in files:
            digest.update(f"file={path.name}|size={path.stat().st_size}|".encode())
            with path.open("rb") as stream:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()

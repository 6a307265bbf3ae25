"""Nothing lost: what `compress` refuses to touch, leftovers of killed runs, folds, exclude patterns,
report and cache paths that cannot be written."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from networks import build

from nnunet_tucker.config import TuckerConfig, TuckerConfigError, report_path
from nnunet_tucker.errors import InputError, OutputFolderError
from nnunet_tucker.nnunet.model_folder import (
    MANIFEST_NAME,
    ModelFolderError,
    compress_model_folder,
    load_trained_model,
)
from nnunet_tucker.plan import plan_compression
from nnunet_tucker.plan.timing import LayerTimer
from nnunet_tucker.tools.demo_model import demo_model_folder
from nnunet_tucker.tools.evaluate import _check_source, evaluate
from nnunet_tucker.tools.presets import build_preset
from nnunet_tucker.tools.synthetic import DEFAULT_SPACING, make_test_cases, write_nifti

CONFIG = TuckerConfig(0.5, policy="auto", calibration="none")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def results(tmp_path) -> Path:
    """nnUNet_results/Dataset990_Phantom/<trainer folder> holding a copy of the demo model."""
    source = demo_model_folder()
    target = tmp_path / "results" / source.parent.name / source.name
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("where", ["parent", "grandparent", "itself", "inside", "symlink to parent"])
def test_compress_refuses_an_output_that_holds_or_is_the_source(results, tmp_path, where):
    before = _digest(tmp_path / "results")
    target = {"parent": results.parent, "grandparent": results.parent.parent, "itself": results,
              "inside": results / "compressed", "symlink to parent": tmp_path / "link"}[where]
    if where == "symlink to parent":
        target.symlink_to(results.parent, target_is_directory=True)
    with pytest.raises(ModelFolderError, match="source model folder"):
        compress_model_folder(results, target, CONFIG, overwrite=True)
    assert _digest(tmp_path / "results") == before


def test_compress_refuses_an_output_that_holds_a_data_folder_in_use(results, tmp_path, monkeypatch):
    raw = tmp_path / "data" / "nnUNet_raw"
    raw.mkdir(parents=True)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    with pytest.raises(ModelFolderError, match=f"holds {raw}, a data or model folder in use"):
        compress_model_folder(results, tmp_path / "data", CONFIG, overwrite=True)
    assert raw.is_dir()


def test_overwrite_replaces_only_a_folder_this_package_wrote(results, tmp_path):
    user = tmp_path / "user_files"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ModelFolderError, match=f"has no {MANIFEST_NAME}"):
        compress_model_folder(results, user, CONFIG, overwrite=True)
    assert (user / "notes.txt").read_text() == "mine"

    out = tmp_path / "compressed"
    compress_model_folder(results, out, CONFIG, folds=["0"])
    with pytest.raises(ModelFolderError, match="exists; pass --overwrite"):
        compress_model_folder(results, out, CONFIG, folds=["0"])
    compress_model_folder(results, out, TuckerConfig(0.3, policy="auto", calibration="none"), folds=["0"],
                          overwrite=True)
    assert '"rank_ratio": 0.3' in (out / MANIFEST_NAME).read_text()


def test_evaluate_accepts_only_the_model_a_compressed_folder_came_from(results, tmp_path):
    out = tmp_path / "compressed"
    compress_model_folder(results, out, CONFIG, folds=["0"])
    _check_source(out, results)  # the same checkpoints (by content), wherever they lie
    copy = tmp_path / "copy"
    shutil.copytree(results, copy)
    _check_source(out, copy)
    (copy / "fold_0" / "checkpoint_final.pth").write_bytes(b"other weights")
    with pytest.raises(ModelFolderError, match=f"was compressed from {re.escape(str(results))}, whose "
                                               "fold_0/checkpoint_final.pth is not the one in"):
        _check_source(out, copy)
    with pytest.raises(ModelFolderError, match=f"has no {MANIFEST_NAME}"):
        _check_source(results, results)


@pytest.mark.parametrize("problem", ["other cases", "wrong shape", "no folder"])
def test_evaluate_reference_labels_must_match_the_cases(results, tmp_path, problem):
    images, labels = tmp_path / "images", tmp_path / "labels"
    make_test_cases(images, 2, seed=0)
    names = sorted(p.name for p in labels.iterdir())
    if problem == "other cases":
        for name in names:
            (labels / name).rename(labels / ("other_" + name))
        expected = re.escape(f"has no reference label map for {len(names)} of {len(names)} case(s)")
    elif problem == "wrong shape":
        write_nifti(labels / names[0], np.zeros((4, 5, 6), dtype=np.uint8), DEFAULT_SPACING)
        expected = re.escape("has size (6, 5, 4) but its image")
    else:
        labels = tmp_path / "missing"
        expected = "does not exist"
    with pytest.raises(InputError, match=expected):  # the user's labels, not a model folder
        evaluate(results, images, tmp_path / "ev", config=CONFIG, labels=labels)
    assert not (tmp_path / "ev").exists()


def test_evaluate_names_each_refusal_by_its_kind(results, tmp_path):
    images, output = tmp_path / "images", tmp_path / "ev"
    images.mkdir()
    with pytest.raises(InputError, match="holds no nnU-Net input images"):
        evaluate(results, images, output, config=CONFIG)
    make_test_cases(images, 1, seed=0)
    output.mkdir()
    (output / "mine.txt").write_text("x")
    with pytest.raises(OutputFolderError, match="is not empty; pass --overwrite"):
        evaluate(results, images, output, config=CONFIG)
    with pytest.raises(OutputFolderError, match="is a file; give a folder"):
        evaluate(results, images, output / "mine.txt", config=CONFIG)
    with pytest.raises(TuckerConfigError, match="not both or neither"):
        evaluate(results, images, output, compressed=results, config=CONFIG)
    assert (output / "mine.txt").read_text() == "x" and [p.name for p in output.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("blocker", ["file as parent", "file as output"])
def test_an_output_that_cannot_be_created_is_refused_before_any_work(results, tmp_path, blocker):
    (tmp_path / "a_file").write_text("x")
    target = tmp_path / "a_file" / "out" if blocker == "file as parent" else tmp_path / "a_file"
    with pytest.raises(ModelFolderError, match="is a file"):
        compress_model_folder(results, target, CONFIG, overwrite=True)
    assert (tmp_path / "a_file").read_text() == "x"


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_killed_runs_are_removed_and_a_swapped_out_output_restored(results, tmp_path, caplog):
    dead, alive = _dead_pid(), os.getpid()
    staging = tmp_path / f".out.tmp-{dead}-abc"
    (staging / "fold_0").mkdir(parents=True)
    previous = tmp_path / f".prev.old-{dead}-xyz" / "previous"
    previous.mkdir(parents=True)
    (previous / MANIFEST_NAME).write_text("{}")
    running = tmp_path / f".out.tmp-{alive}-def"  # a run still in progress
    running.mkdir()
    with caplog.at_level(logging.INFO, logger="nnunet_tucker"):
        compress_model_folder(results, tmp_path / "out", CONFIG, folds=["0"])
        compress_model_folder(results, tmp_path / "prev", CONFIG, folds=["0"], overwrite=True)
    assert not staging.exists() and not previous.parent.exists() and running.is_dir()
    assert any(r.getMessage().startswith(f"restored {tmp_path / 'prev'}") for r in caplog.records)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [running.name]


def test_a_stray_fold_folder_is_not_a_fold(results):
    shutil.copytree(results / "fold_0", results / "fold_0_backup")
    assert load_trained_model(results).folds == ["0", "1"]
    with pytest.raises(ModelFolderError, match=r"\['0_backup'\] are not folds"):
        load_trained_model(results, folds=["0_backup"])


def test_exclude_matches_a_layer_by_its_own_names_not_through_shared_references():
    network, _ = build_preset("totalseg-3mm")
    decoder = plan_compression(network, TuckerConfig(0.5, policy="paper", exclude=("decoder.*",)))
    excluded = {layer.name for layer in decoder if layer.reason == "excluded by pattern"}
    assert excluded and all(name.startswith("decoder.") for name in excluded)
    assert all(layer.ranks for layer in decoder if layer.name.startswith("encoder."))
    encoder = plan_compression(network, TuckerConfig(0.5, policy="paper", exclude=("encoder.*",)))
    excluded_encoder = {layer.name for layer in encoder if layer.reason == "excluded by pattern"}
    assert excluded_encoder | excluded == {layer.name for layer in encoder} and not excluded_encoder & excluded


def test_an_exclude_pattern_that_matches_nothing_is_named():
    network, _ = build_preset("totalseg-3mm")
    with pytest.raises(TuckerConfigError, match=r"exclude pattern\(s\) \['decoder.seg_layer.\*'\] match no"):
        plan_compression(network, TuckerConfig(0.5, policy="paper", exclude=("decoder.seg_layers.*",
                                                                            "decoder.seg_layer.*")))


@pytest.mark.parametrize("kind", ["folder", "under a file", "missing folders are fine"])
def test_report_path_is_checked(tmp_path, kind):
    (tmp_path / "a_file").write_text("x")
    value = {"folder": tmp_path, "under a file": tmp_path / "a_file" / "r.json",
             "missing folders are fine": tmp_path / "new" / "r.json"}[kind]
    if kind == "missing folders are fine":
        assert report_path({"TUCKER_REPORT": str(value)}) == value
    else:
        with pytest.raises(TuckerConfigError, match=r"^TUCKER_REPORT='.*' is not allowed: "):
            report_path({"TUCKER_REPORT": str(value)})
    assert report_path({}) is None


def test_profile_that_cannot_be_cached_does_not_say_cached(tmp_path, caplog):
    (tmp_path / "a_file").write_text("x")
    network, input_shape = build("plain3d")
    timer = LayerTimer("cpu", cache_dir=tmp_path / "a_file" / "cache")
    with caplog.at_level(logging.INFO, logger="nnunet_tucker"):
        plan_compression(network, TuckerConfig(0.5), input_shape, timer)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("profiled ")]
    assert len(lines) == 1 and lines[0].endswith("could not be written)") and "cached in" not in lines[0]

"""Fixtures of the integration tests: the shipped trained demo models (plain and residual-encoder) in a
temporary nnU-Net results tree (checked byte for byte afterwards) and synthetic test cases."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MEASURED, folder_digest

from nnunet_tucker.tools.demo_model import (
    DATASET_NAME,
    MODEL_FOLDER_NAME,
    RESENC_MODEL_FOLDER_NAME,
    demo_model_folder,
    resenc_demo_model_folder,
)
from nnunet_tucker.tools.synthetic import make_test_cases


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: hand the lines to the controller
        session.config.workeroutput["measured"] = MEASURED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):  # pytest-xdist's controller: a worker has finished
    MEASURED.extend(node.workeroutput.get("measured", []))


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured by the integration tests")
        for line in MEASURED:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nnunet")


def _installed(workspace: Path, source: Path | str, name: str) -> Iterator[Path]:
    """A copy of model folder `source` as it sits in a user's nnUNet_results (as `name`), checked byte for
    byte when the fixture ends."""
    target = workspace / "results" / DATASET_NAME / name
    shutil.copytree(source, target)
    before = folder_digest(target)
    yield target
    assert folder_digest(target) == before, "a test modified the user's model folder"


@pytest.fixture(scope="session")
def model_folder(workspace) -> Iterator[Path]:
    """The shipped demo model (or the folder in $NNUNET_TUCKER_TEST_MODEL), installed (`_installed`)."""
    yield from _installed(workspace, os.environ.get("NNUNET_TUCKER_TEST_MODEL") or demo_model_folder(),
                          MODEL_FOLDER_NAME)


@pytest.fixture(scope="session")
def resenc_model_folder(workspace) -> Iterator[Path]:
    """The shipped residual-encoder demo model (nnUNetResEncUNetMPlans), installed beside the plain one."""
    yield from _installed(workspace, resenc_demo_model_folder(), RESENC_MODEL_FOLDER_NAME)


@pytest.fixture(scope="session")
def nnunet_env(workspace, model_folder) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUCKER_")}
    for name in ("raw", "preprocessed"):
        (workspace / name).mkdir(exist_ok=True)
    env.update(
        nnUNet_raw=str(workspace / "raw"),
        nnUNet_preprocessed=str(workspace / "preprocessed"),
        nnUNet_results=str(workspace / "results"),
        TUCKER_CACHE_DIR=str(workspace / "cache"),
        # the PyTorch forms unless a test asks for a backend: OpenVINO's conversion, timing and first inference
        # would add seconds to every compressing run (test_predict_cli.py's backend tests run the others)
        TUCKER_BACKEND="torch",
        nnUNet_def_n_proc="2",
    )
    return env


@pytest.fixture(scope="session")
def cases(workspace) -> Path:
    """A folder of two synthetic CT inputs; reference labels lie in its sibling 'labels'."""
    images = workspace / "cases" / "images"
    make_test_cases(images, n=2, seed=7)
    return images

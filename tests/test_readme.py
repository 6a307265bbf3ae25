"""README.md and docs/: a short front page, benchmark numbers rendered from the results files (so they cannot
drift from them), every results file valid JSON, the reference complete, every relative link alive."""

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"


def _render_module():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "benchmarks" / "render_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()


def test_readme_results_table_is_rendered_from_the_results_files():
    assert render.block(README.read_text(), "results") == render.rendered("README.md", "results"), (
        "README's results table differs from the results files: run python benchmarks/render_readme.py")


@pytest.mark.parametrize("path, name", [(p, n) for p, blocks in render.BLOCKS.items() for n in blocks
                                        if p != "README.md"])
def test_docs_numbers_are_rendered_from_the_results_files(path, name):
    assert render.block((ROOT / path).read_text(), name) == render.rendered(path, name), (
        f"{path}, block {name!r}, differs from the results files: run python benchmarks/render_readme.py")


def test_an_edited_number_is_caught():
    text = README.read_text()
    start = text.index("<!-- results:start -->")
    number = re.compile(r"\d+\.\d+").search(text, start)  # the first number of the table
    edited = f"{text[:number.start()]}{float(number.group()) + 1:.{len(number.group().split('.')[1])}f}" \
             f"{text[number.end():]}"
    assert render.block(edited, "results") != render.rendered("README.md", "results")
    assert render.render_file(edited, "README.md") == render.render_file(text, "README.md")  # rendering mends it


def test_readme_is_short_and_keeps_the_setup_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    assert 'pip install ".[test,openvino]" && nnunet-tucker demo' in text
    assert 'pip install --quiet ".[test,openvino]"' in (ROOT / ".ci" / "run").read_text()  # CI installs the same
    assert "\npython -m pytest" in text  # the test command CI runs
    first_screen = "\n".join(text.splitlines()[:50])
    for shown in ("pip install", "TUCKER_RANK_RATIO=0.3 nnUNetv2_predict", "nnUNetv2_predict_tucker",
                  "nnunet-tucker compress", "nnunet-tucker evaluate", "<!-- results:end -->"):
        assert shown in first_screen, shown


def test_every_results_json_loads():
    files = sorted(RESULTS.rglob("*.json"))
    assert files
    for path in files:
        with open(path) as f:
            json.load(f)  # raises on anything but one JSON document


def _documents() -> list[Path]:
    return [README, ROOT / "benchmarks" / "README.md", *sorted(DOCS.glob("*.md"))]


def test_relative_links_point_to_existing_files():
    broken = []
    for document in _documents():
        for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (document.parent / target.split("#")[0]).exists():
                broken.append(f"{document.relative_to(ROOT)}: {target}")
    assert broken == []


def test_reference_names_every_variable_flag_and_plans_key():
    from nnunet_tucker.cli import add_config_arguments, build_parser
    from nnunet_tucker.config import env_variables

    reference = (DOCS / "reference.md").read_text()
    missing = [f"`{name}`" for name in [*env_variables().values(), *env_variables(), "TUCKER_CACHE_DIR",
                                        "TUCKER_REPORT", "TUCKER_HOOK", "TUCKER_MALLOC"]
               if f"`{name}`" not in reference]
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in commands.choices.items():
        assert f"### `{name}`" in reference, name
        missing += [f"{name} {flag}" for action in sub._actions for flag in action.option_strings
                    if flag not in ("-h", "--help") and f"`{flag}`" not in reference and f"`{flag} " not in reference]
    nnunet_style = argparse.ArgumentParser(add_help=False)
    add_config_arguments(nnunet_style, nnunet_style=True)
    missing += [flag for action in nnunet_style._actions for flag in action.option_strings
                if f"`{flag}`" not in reference]
    assert missing == []

"""The start-up .pth line never breaks the interpreter: a hook that fails to import or install is one line on stderr."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PTH = Path(__file__).parents[1] / "nnunet_tucker" / "nnunet_tucker.pth"

BROKEN = {
    "import": "raise ImportError('broken on purpose')\n",
    "install": "def install():\n    raise RuntimeError('broken on purpose')\n",
}


def _package_with_hook(root: Path, hook_source: str) -> Path:
    """A folder holding an `nnunet_tucker` package whose `nnunet.hook` module is `hook_source`."""
    (root / "nnunet_tucker" / "nnunet").mkdir(parents=True)
    (root / "nnunet_tucker" / "__init__.py").write_text("")
    (root / "nnunet_tucker" / "nnunet" / "__init__.py").write_text("")
    (root / "nnunet_tucker" / "nnunet" / "hook.py").write_text(hook_source)
    return root


def _run(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in an interpreter started bare (`-S`: no site-packages, no installed .pth runs)."""
    return subprocess.run([sys.executable, "-S", "-B", "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "TUCKER_HOOK": "1", **env}, timeout=60)


def test_the_pth_file_is_one_line_that_site_runs():
    lines = PTH.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("import ")


@pytest.mark.parametrize("fails_at", sorted(BROKEN))
def test_a_broken_hook_leaves_one_line_on_stderr_and_the_interpreter_goes_on(tmp_path, fails_at):
    root = _package_with_hook(tmp_path, BROKEN[fails_at])
    code = "import sys; sys.path.insert(0, sys.argv[1]); exec(open(sys.argv[2]).read()); print('went on')"
    result = _run(code, str(root), str(PTH))
    assert result.returncode == 0 and result.stdout == "went on\n", result
    (line,) = result.stderr.splitlines()
    assert line.startswith("nnunet-tucker: start-up hook not installed: ") and "broken on purpose" in line, line


def test_a_broken_hook_does_not_stop_site_processing_at_start_up(tmp_path):
    """As at start-up: `site` runs the line from a .pth file in a site folder (inside one of its functions)."""
    root = _package_with_hook(tmp_path / "packages", BROKEN["import"])
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / PTH.name).write_text(PTH.read_text())
    (site_dir / "zz_after.pth").write_text("import sys; sys.stdout.write('later .pth ran\\n')\n")
    code = "import sys, site; sys.path.insert(0, sys.argv[1]); site.addsitedir(sys.argv[2]); print('went on')"
    result = _run(code, str(root), str(site_dir))
    assert result.returncode == 0 and result.stdout == "later .pth ran\nwent on\n", result
    (line,) = result.stderr.splitlines()
    assert line.startswith("nnunet-tucker: "), line


def test_switched_off_it_imports_nothing_of_the_package_and_says_nothing(tmp_path):
    root = _package_with_hook(tmp_path, BROKEN["import"])
    code = ("import sys; sys.path.insert(0, sys.argv[1]); exec(open(sys.argv[2]).read()); "
            "print([m for m in sys.modules if m.startswith('nnunet_tucker')])")
    result = _run(code, str(root), str(PTH), TUCKER_HOOK="0")
    assert result.returncode == 0 and result.stdout == "[]\n" and result.stderr == "", result

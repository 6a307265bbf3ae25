"""The package's layout: three layers (steps, nnU-Net runtime, tools) under the commands, imports pointing inward
only, no import circles, the pure math free of modules and nnU-Net, torch-free start-up."""

import ast
import subprocess
import sys
from pathlib import Path

import nnunet_tucker

PACKAGE = Path(nnunet_tucker.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The package's modules that `path` imports anywhere in it (functions and TYPE_CHECKING blocks too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            for alias in node.names:  # `from . import x` and `from .plan import ranks` name modules
                candidate = f"{module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("nnunet_tucker.") and m != name}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_module_imports_one_that_imports_it_back():
    graph = _graph()
    visiting, done = [], set()

    def visit(module: str) -> None:
        if module in visiting:
            raise AssertionError("import circle: " + " -> ".join([*visiting[visiting.index(module):], module]))
        if module in done:
            return
        visiting.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


LAYERS = (  # from the inside out: each layer imports only from itself and the layers before it
    ("steps", lambda m: not m.startswith(("nnunet_tucker.nnunet", "nnunet_tucker.tools", "nnunet_tucker.cli"))
     and m != "nnunet_tucker"),
    ("runtime", lambda m: m.startswith("nnunet_tucker.nnunet")),
    ("tools", lambda m: m.startswith("nnunet_tucker.tools")),
    ("commands", lambda m: m in ("nnunet_tucker", "nnunet_tucker.cli")),
)


def _layer(module: str) -> int:
    (index,) = [i for i, (_, contains) in enumerate(LAYERS) if contains(module)]
    return index


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {i}" for m, imports in graph.items() for i in imports if _layer(i) > _layer(m))


def test_imports_point_inward_from_commands_to_tools_to_runtime_to_steps():
    graph = _graph()
    assert {name for name, _ in LAYERS} == {LAYERS[_layer(m)][0] for m in graph}  # every layer has modules
    assert _upward_imports(graph) == []
    assert _upward_imports({**graph, "nnunet_tucker.fit": {"nnunet_tucker.nnunet.cache"}}) == [
        "nnunet_tucker.fit -> nnunet_tucker.nnunet.cache"]  # the check can fail


def test_each_step_has_its_module_and_the_math_knows_no_modules_or_nnunet():
    graph = _graph()
    for step in ("plan", "calibrate", "fit", "swap", "report"):
        assert f"nnunet_tucker.{step}" in graph, step
    assert graph["nnunet_tucker.fit"] == set()  # tensors in, tensors out
    source = (PACKAGE / "fit.py").read_text()
    assert "nn.Module" not in source and "nnunetv2" not in source and "from torch import nn" not in source
    layers = graph["nnunet_tucker.layers"]
    assert layers == set(), layers  # the layer modules and their forward paths only
    assert "nnunet_tucker.swap" not in graph["nnunet_tucker.nnunet.cache"]  # it stores and loads only


def test_importing_the_package_does_not_import_torch():
    code = "import sys, nnunet_tucker, nnunet_tucker.config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"TUCKER_HOOK": "0", "PATH": ""})
    assert result.stdout.strip() == "False", result.stderr

"""The house: one sub-package per stage, every import pointing down, no private cross-imports."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import csm

ROOT = Path(csm.__file__).resolve().parent

# Floors, top to bottom; a module imports only from its own stage or a lower floor.
FLOORS: dict[str, int] = {
    "workflows": 6,
    "annotation": 5,
    "evaluation": 5,
    "training": 4,
    "generation": 4,
    "cli": 4,
    "synthetic": 3,
    "config": 3,
    "calibration": 2,
    "data": 2,
    "utils": 2,
    "errors": 1,
}
STAGES = {"data", "calibration", "generation", "synthetic", "annotation", "training"}
STAGES |= {"evaluation", "workflows"}


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "csm"


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every ``csm`` import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("csm"):
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("csm")]
    return found


def _modules() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        out.append((path, ".".join(rel.parts).removesuffix(".__init__")))
    return out


def test_every_stage_is_one_folder_and_nothing_else_is_loose():
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"}
    loose = {p.stem for p in ROOT.glob("*.py")}
    assert folders == STAGES
    assert loose == {"__init__", "__main__", "cli", "config", "errors", "utils"}


def test_imports_point_down_and_never_at_private_names():
    wrong = []
    for path, module in _modules():
        me = _stage(module)
        if me in ("csm", "__main__"):
            continue  # the package root and the entry point sit above every floor
        for line, target, names in _imports(path):
            other = _stage(target)
            where = f"{path.relative_to(ROOT.parent)}:{line}"
            if other == "csm" and names != ["__version__"]:
                wrong.append(f"{where} imports the package root ({names})")
            elif other not in ("csm", me) and FLOORS[other] >= FLOORS[me]:
                wrong.append(f"{where}: {me} (floor {FLOORS[me]}) imports {target}")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            wrong += [f"{where}: private {target}.{n}" for n in private]
    assert not wrong, "\n".join(wrong)


def test_no_function_over_100_lines():
    long = []
    for path, _ in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 100:
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} {n}")
    assert not long, "\n".join(long)


def test_public_api_is_lazy_and_resolves():
    code = "import csm, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # `import csm` stays cheap
    for name in csm.__all__:
        value = getattr(csm, name)
        if name != "__version__":
            assert value is getattr(importlib.import_module(csm._API[name]), name)

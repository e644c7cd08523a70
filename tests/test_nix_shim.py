"""The nixpkgs shim hides nothing that real nixpkgs would not have: its python.withPackages, like nixpkgs' (a
buildEnv of the listed packages and their dependencies), imports the listed packages and what their metadata
declares they need, and fails on any other package, even one installed in the Python running the tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "nix"))
import nixtest  # noqa: E402

pytestmark = [
    pytest.mark.nix,
    pytest.mark.skipif(shutil.which("nix") is None, reason="needs Nix: apt-get install nix-bin busybox-static"),
]


@pytest.fixture(scope="module")
def gguf_environment(tmp_path_factory) -> Path:
    """bin/python of the shim's `python.withPackages (ps: [ ps.gguf ])`."""
    tmp_path = tmp_path_factory.mktemp("shim")
    env = nixtest.nix_env(tmp_path)
    shim = nixtest.make_shim(tmp_path / "nixpkgs-shim")
    expr = (
        f'(builtins.getFlake "path:{shim}").legacyPackages.{nixtest.nix_system()}'
        ".python3Packages.python.withPackages (ps: [ ps.gguf ])"
    )
    result = nixtest.nix(["build", "--impure", "--expr", expr, "--out-link", str(tmp_path / "env")], env)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "env" / "bin" / "python"


def imports(python: Path, module: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True)


def test_the_test_python_has_the_packages_this_test_expects_to_be_hidden():
    for module in ("gguf", "yaml", "torch", "pytest"):
        __import__(module)  # installed here: hiding them below is the shim's doing


def test_with_packages_imports_a_listed_package_and_the_dependencies_it_declares(gguf_environment):
    for module in ("gguf", "numpy", "yaml", "tqdm"):  # gguf, and numpy, pyyaml, tqdm from its Requires-Dist
        result = imports(gguf_environment, module)
        assert result.returncode == 0, f"{module}: {result.stderr}"


@pytest.mark.parametrize("module", ["torch", "pytest", "reprolora"])
def test_with_packages_fails_to_import_an_unlisted_package(gguf_environment, module):
    result = imports(gguf_environment, module)
    assert result.returncode == 1
    assert f"ModuleNotFoundError: No module named '{module}'" in result.stderr, result.stderr


def test_with_packages_python_ignores_the_host_site_packages(gguf_environment):
    paths = subprocess.run(
        [str(gguf_environment), "-c", "import sys; print('\\n'.join(sys.path))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    site = [path for path in paths if path.endswith("site-packages")]
    assert site == [
        str(
            gguf_environment.parents[1] / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
        )
    ], paths

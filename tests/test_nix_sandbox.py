"""The adapter's build step, run the way a Nix build runs it, gives the bytes of a normal `reprolora train`.

pkgs/adapter.nix runs `sh pkgs/build-step.sh adapter`; this runs that same file with an empty environment
plus what Nix sets (`env -i`), HOME=/homeless-shelter, NIX_BUILD_CORES=7, no network (`unshare -n`) and a
fresh TMPDIR, on the tiny model of tests/tiny.py. No Nix is needed: it checks the build step, not Nix.
"""

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

# A store path's look: 32 characters of hash, a dash, the name. The build step must strip the hash.
FAKE_STORE_HASH = "0" * 32


def no_network_prefix() -> list[str]:
    """`unshare -n` as root; a user namespace too when not root."""
    for prefix in (["unshare", "-n"], ["unshare", "-r", "-n"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    pytest.fail("unshare can't make a network namespace here (util-linux's unshare, root or user namespaces)")


def run_like_nix(folder: Path, step: str, inputs: dict[str, str]) -> tuple[Path, subprocess.CompletedProcess]:
    build_top = folder / "build"  # Nix's /build: the builder's cwd and TMPDIR, fresh for each build
    build_top.mkdir()
    out = folder / "store" / f"{FAKE_STORE_HASH}-reprolora-adapter"
    env = {
        # What Nix 2.8 sets for every builder (src/libstore/build/local-derivation-goal.cc, initEnv).
        "HOME": "/homeless-shelter",
        "NIX_STORE": "/nix/store",
        "NIX_BUILD_CORES": "7",
        "NIX_BUILD_TOP": str(build_top),
        "TMPDIR": str(build_top),
        "TEMPDIR": str(build_top),
        "TMP": str(build_top),
        "TEMP": str(build_top),
        "PWD": str(build_top),
        "NIX_LOG_FD": "2",
        "TERM": "xterm-256color",
        # What stdenv adds: PATH with the inputs' bin/ (here the test Python's scripts) and the basic tools.
        "PATH": f"{nixtest.venv_bin()}:/usr/bin:/bin",
        "out": str(out),
        **inputs,
    }
    command = [*no_network_prefix(), "env", "-i", *(f"{k}={v}" for k, v in env.items()),
               "/bin/sh", str(nixtest.BUILD_STEP), step]
    return out, subprocess.run(command, cwd=build_top, capture_output=True, text=True)


def test_adapter_build_step_in_a_nix_like_sandbox_matches_a_normal_run(
    tiny_base_model, tiny_dataset, tiny_config, tiny_adapter, tmp_path
):
    (tmp_path / "store").mkdir()
    # Inputs reach a build as store paths: "<hash>-<name>".
    store_dataset = tmp_path / "store" / f"{FAKE_STORE_HASH}-{tiny_dataset.name}"
    shutil.copyfile(tiny_dataset, store_dataset)
    assert not os.path.exists("/homeless-shelter")

    out, result = run_like_nix(
        tmp_path,
        "adapter",
        {"baseModel": str(tiny_base_model), "dataset": str(store_dataset), "trainConfig": str(tiny_config)},
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert not os.path.exists("/homeless-shelter"), "the build step wrote to HOME"
    assert {p.name for p in out.iterdir()} == nixtest.ADAPTER_FILES
    assert nixtest.folder_bytes(out) == nixtest.folder_bytes(tiny_adapter), (
        "the sandboxed build step gave other bytes than a normal run:\n"
        f"sandbox:\n{nixtest.sha256_lines(out)}normal:\n{nixtest.sha256_lines(tiny_adapter)}"
    )


def test_build_step_refuses_an_unknown_step(tmp_path):
    out, result = run_like_nix(tmp_path, "nonsense", {})
    assert result.returncode == 64
    assert "usage" in result.stderr
    assert not out.exists()

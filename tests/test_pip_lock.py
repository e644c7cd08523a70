"""The pip route pinned: python/requirements.lock pins every requirement with hashes, and the default job with the
`portable` profile, trained under that lock, gives the bytes of expected/pip-x86_64-linux-portable.sha256 on
whatever x86-64 machine runs it (the slow test): a cross-machine check on every CI run.

Regenerate the expected file (after a change that moves the bytes, on any x86-64 machine, under the lock):
    .venv/bin/reprolora train -c pkgs/adapter.toml --set profile=portable -o out/portable \\
      && (cd out/portable && LC_ALL=C sha256sum -- adapter_config.json adapter_model.safetensors) \\
      > expected/pip-x86_64-linux-portable.sha256
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import tomllib
from pathlib import Path

import pytest

from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "python" / "requirements.lock"
EXPECTED = REPO / "expected" / "pip-x86_64-linux-portable.sha256"
# PyTorch's CPU wheel for CPython 3.11 on x86_64 Linux, as https://download.pytorch.org/whl/cpu serves it.
TORCH_CPU_SHA256 = "6746dbcbeb526eb61330b76b41ff1b4eb848951103a892eeb080dfa2b264667b"


def locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) for every package the lock pins."""
    pins: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text()):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = (
                match.group(2),
                re.findall(r"--hash=sha256:([0-9a-f]{64})", block),
            )
    return pins


def test_lock_pins_every_requirement_with_its_hashes():
    project = tomllib.loads((REPO / "python" / "pyproject.toml").read_text())["project"]
    requirements = (
        project["dependencies"] + project["optional-dependencies"]["gguf"] + project["optional-dependencies"]["test"]
    )
    pins = locked()
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        assert name in pins, f"{name} is not in {LOCK.name}"
    assert all(hashes for _, hashes in pins.values()), [n for n, (_, h) in pins.items() if not h]
    assert pins["torch"] == ("2.13.0+cpu", [TORCH_CPU_SHA256])
    assert not any(name.startswith("nvidia-") for name in pins), "the lock pulls in CUDA"


def lock_differences() -> list[str]:
    """Where the running environment differs from the lock."""
    differences = []
    for name, (version, _) in sorted(locked().items()):
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != version:
            differences.append(f"{name} {installed} (lock: {version})")
    return differences


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the expected bytes are x86-64's")
def test_default_portable_job_under_the_lock_gives_the_committed_bytes(tmp_path):
    differences = lock_differences()
    if differences:
        message = f"the environment is not the lock's: {', '.join(differences)}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI installs python/requirements.lock)")
        pytest.skip(message)
    out = tmp_path / "portable"
    run_cli("train", "-q", "-c", str(REPO / "pkgs" / "adapter.toml"), "--set", "profile=portable", "-o", str(out))
    built = "".join(
        f"{hashlib.sha256((out / name).read_bytes()).hexdigest()}  {name}\n"
        for name in ("adapter_config.json", "adapter_model.safetensors")
    )
    if not EXPECTED.exists():
        pytest.fail(
            f"{EXPECTED.name} is not committed yet. This machine's build gave the lines below; review "
            f"them and commit them as expected/{EXPECTED.name}:\n{built}"
        )
    assert built == EXPECTED.read_text(), (
        f"the default portable job gave other bytes than {EXPECTED.name} on this machine "
        f"({platform.processor() or platform.machine()}):\n{built}"
    )


NIX_EXPECTED = [REPO / "expected" / f"adapter-{system}.sha256" for system in ("x86_64-linux", "aarch64-linux")]


@pytest.mark.slow
@pytest.mark.long
def test_default_reference_job_gives_the_weights_both_nix_systems_expect(tmp_path):
    """The Nix route's job (pkgs/adapter.toml, profile `reference`) on this pip route, whatever its versions and
    CPU: the weights line expected/ predicts for both Nix systems."""
    out = tmp_path / "reference"
    run_cli("train", "-q", "-c", str(REPO / "pkgs" / "adapter.toml"), "-o", str(out))
    built = (
        f"{hashlib.sha256((out / 'adapter_model.safetensors').read_bytes()).hexdigest()}  adapter_model.safetensors\n"
    )
    for path in NIX_EXPECTED:
        assert path.read_text() == built, f"{path.name}: the default reference job gave {built}"

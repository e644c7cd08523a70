"""aarch64 for real, on this x86_64 machine: the tiny job under qemu in the arm64 Debian root of
tests/arm64/setup.sh (torch 2.10.0 aarch64, OpenBLAS), with this working tree's library.

The emulated tests are marked `arm64` (and `slow`: minutes); each emulated step prints its time. Without the
root or qemu they skip with the reason; under CI=true that is a failure instead, since CI builds the root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import run_cli

HERE = Path(__file__).parent
SETUP = HERE / "arm64" / "setup.sh"
RUN = HERE / "arm64" / "run.sh"
PROFILES = ("native", "portable")


def _missing(root: Path) -> str | None:
    """Why the arm64 tests can't run here, or None."""
    if os.geteuid() != 0:
        return "the arm64 tests need root (chroot, mounts)"
    if not (root / ".reprolora-arm64-complete").is_file():
        return f"no arm64 environment at {root}: build it with `bash tests/arm64/setup.sh` (root, apt, network)"
    binfmt = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not binfmt.is_file() or not binfmt.read_text().startswith("enabled"):
        return "qemu-aarch64 is not registered with binfmt_misc (tests/arm64/setup.sh registers it)"
    return None


@pytest.fixture(scope="session")
def arm64_root() -> Path:
    root = subprocess.run(["bash", str(SETUP), "--path"], capture_output=True, text=True, check=True).stdout.strip()
    problem = _missing(Path(root))
    if problem and os.environ.get("CI") == "true":
        pytest.fail(f"{problem}; CI must run the arm64 tests")
    if problem:
        pytest.skip(problem)
    return Path(root)


@pytest.fixture(scope="session")
def arm64_work(arm64_root: Path, tiny_base_model: Path, tiny_dataset: Path, tiny_config: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder mounted at /work in the root, with the tiny job's inputs (made on x86_64, as a user would bring
    them): model/, data.jsonl and one config per profile."""
    work = tmp_path_factory.mktemp("arm64")
    shutil.copytree(tiny_base_model, work / "model")
    shutil.copy(tiny_dataset, work / "data.jsonl")
    for profile in PROFILES:
        (work / f"{profile}.toml").write_text(f'profile = "{profile}"\n' + tiny_config.read_text())
    return work


def emulated(root: Path, work: Path, step: str, *command: str) -> subprocess.CompletedProcess:
    """Run `command` in the arm64 root (paths under /work are `work`), printing how long it took."""
    started = time.perf_counter()
    result = subprocess.run(["bash", str(RUN), str(root), str(work), *command], capture_output=True, text=True,
                            timeout=900)
    # Straight to the terminal, past pytest's capture: CI's log shows what emulation costs, step by step.
    sys.__stderr__.write(f"\narm64: {step}: {time.perf_counter() - started:.1f} s\n")
    return result


def reprolora(root: Path, work: Path, step: str, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = emulated(root, work, step, "python", "-m", "reprolora", *args)
    assert result.returncode == expect, f"{step}: exit {result.returncode}, expected {expect}:\n{result.stderr[-3000:]}"
    return result


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="session")
def arm64_adapters(arm64_root: Path, arm64_work: Path) -> dict[str, list[Path]]:
    """The tiny job trained twice under emulation with each profile, each run a fresh process."""
    adapters: dict[str, list[Path]] = {}
    for profile in PROFILES:
        for run in ("a", "b"):
            reprolora(arm64_root, arm64_work, f"train {profile} {run}", "train", "-q", "-c", f"/work/{profile}.toml",
                      "--base-model", "/work/model", "--dataset", "/work/data.jsonl", "-o", f"/work/{profile}-{run}")
            adapters.setdefault(profile, []).append(arm64_work / f"{profile}-{run}")
    return adapters


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.arm64
@pytest.mark.slow
def test_trains_twice_to_the_same_bytes(arm64_adapters: dict[str, list[Path]], tiny_adapter: Path, profile: str) -> None:
    first, second = arm64_adapters[profile]
    assert file_bytes(first) == file_bytes(second)
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["pins"]["machine"] == "aarch64" and manifest["pins"]["profile"] == profile
    assert manifest["toolchain"]["torch"].startswith("2.10.0")
    # The BLAS field says what the aarch64 wheel is built with (not "mkl" from a LAPACK sentence), with its version.
    assert manifest["pins"]["blas"]["name"] == "openblas"
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.\w+)?", manifest["pins"]["blas"]["version"] or "")
    if profile == "portable":
        assert manifest["pins"]["environment"]["OPENBLAS_CORETYPE"] == "ARMV8"
        assert manifest["pins"]["cpu_capability"] == "DEFAULT"
    if profile == "native":  # the same job on x86_64 (native too): other bytes, the README says; shown, not promised
        same = file_bytes(first)["adapter_model.safetensors"] == (tiny_adapter / "adapter_model.safetensors").read_bytes()
        sys.__stderr__.write(f"\narm64: native weights {'equal' if same else 'differ from'} x86_64's\n")


PEFT_LOAD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from reprolora import pins
    adapter_dir, base_dir = Path(sys.argv[1]), Path(sys.argv[2])
    manifest = json.loads((adapter_dir / "manifest.json").read_text())
    pins.apply(manifest["pins"]["profile"], manifest["pins"]["threads"])
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    loaded = {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}
    assert len(saved) == len(loaded) > 0, (len(saved), len(loaded))
    for name, tensor in saved.items():
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(loaded[key], tensor), name
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ids = tokenizer("Why pin seeds?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    print(f"peft loaded {len(saved)} LoRA tensors bit for bit; logits {tuple(logits.shape)}")
""")


@pytest.mark.arm64
@pytest.mark.slow
def test_peft_loads_it_there(arm64_root: Path, arm64_work: Path, arm64_adapters: dict[str, list[Path]]) -> None:
    (arm64_work / "peft_load.py").write_text(PEFT_LOAD)
    result = emulated(arm64_root, arm64_work, "peft load", "python", "/work/peft_load.py", "/work/native-a", "/work/model")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bit for bit" in result.stdout


@pytest.mark.arm64
@pytest.mark.slow
def test_infer_check_replays_its_probes_there(arm64_root: Path, arm64_work: Path,
                                              arm64_adapters: dict[str, list[Path]]) -> None:
    result = reprolora(arm64_root, arm64_work, "infer --check", "infer", "/work/portable-a", "--base-model", "/work/model",
                       "--check")
    assert "check passed: 1 golden probes replayed bit for bit" in result.stderr


@pytest.mark.arm64
@pytest.mark.slow
def test_x86_64_adapter_refuses_to_check_there(arm64_root: Path, arm64_work: Path, tiny_adapter: Path) -> None:
    shutil.copytree(tiny_adapter, arm64_work / "x86_64-for-check")
    result = reprolora(arm64_root, arm64_work, "infer --check (x86_64 adapter)", "infer", "/work/x86_64-for-check",
                       "--base-model", "/work/model", "--check", expect=2)
    assert "the architecture differs: trained on x86_64, this machine is aarch64" in result.stderr
    assert "probe" not in result.stderr.split("architecture differs")[0]  # refused before any probe was replayed


@pytest.mark.arm64
@pytest.mark.slow
def test_verify_works_across_architectures(arm64_root: Path, arm64_work: Path, tiny_adapter: Path,
                                           arm64_adapters: dict[str, list[Path]]) -> None:
    shutil.copytree(tiny_adapter, arm64_work / "x86_64")
    reprolora(arm64_root, arm64_work, "verify (x86_64 adapter)", "verify", "/work/x86_64")
    assert "every hash in the manifest holds" in run_cli("verify", str(arm64_adapters["native"][0])).stdout
    tampered = arm64_work / "x86_64-tampered"
    shutil.copytree(tiny_adapter, tampered)
    (tampered / "adapter_config.json").write_text((tampered / "adapter_config.json").read_text() + " ")
    result = reprolora(arm64_root, arm64_work, "verify (tampered)", "verify", "/work/x86_64-tampered", expect=1)
    assert "adapter_config.json" in result.stderr


def test_check_refuses_another_architecture(tiny_adapter: Path, tiny_base_model: Path, tmp_path: Path) -> None:
    """The same refusal on this machine, for an adapter whose manifest says it was trained elsewhere."""
    import platform

    other = "aarch64" if platform.machine() == "x86_64" else "x86_64"
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    manifest = json.loads((adapter / "manifest.json").read_text())
    manifest["pins"]["machine"] = other
    (adapter / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("infer", str(adapter), "--base-model", str(tiny_base_model), "--check", check=False)
    assert result.returncode == 2, result.stderr
    assert f"the architecture differs: trained on {other}, this machine is {platform.machine()}" in result.stderr
    # Answering a prompt is still allowed: only the bit-for-bit replay is architecture-bound.
    assert run_cli("infer", str(adapter), "--base-model", str(tiny_base_model), "-n", "2", "hi").stdout.strip()

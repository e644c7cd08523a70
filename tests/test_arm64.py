"""aarch64 for real, on this x86_64 machine: the tiny job under qemu in the arm64 Debian root of
tests/arm64/setup.sh (torch 2.10.0 aarch64, OpenBLAS), with this working tree's library.

The emulated tests are marked `arm64` (and `slow`: minutes); each emulated step prints its time. Without the
root or qemu they skip with the reason; under CI=true that is a failure instead, since CI builds the root.
"""

from __future__ import annotations

import json
import os
import re
import resource
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


class Arm64:
    """The arm64 root and the folder mounted at /work in it; runs commands there under qemu, timing each step."""

    def __init__(self, root: Path, work: Path, pytestconfig: pytest.Config) -> None:
        self.root, self.work = root, work
        self._capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def say(self, line: str) -> None:
        """Past pytest's capture: CI's log shows what emulation costs, step by step."""
        with self._capture.global_and_fixture_disabled():
            sys.stderr.write(f"\narm64: {line}\n")

    def start(self, *command: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["bash", str(RUN), str(self.root), str(self.work), *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, step: str, *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
        """Run `commands` side by side (separate processes, so no effect on their bytes) and time them. CPU seconds
        too: on a shared machine they say more than the wall clock."""
        started, cpu = time.perf_counter(), _children_cpu_seconds()
        processes = [self.start(*command) for command in commands]
        results = []
        for command, process in zip(commands, processes, strict=True):
            stdout, stderr = process.communicate(timeout=1800)
            results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
        self.say(f"{step}: {time.perf_counter() - started:.1f} s wall, {_children_cpu_seconds() - cpu:.1f} s CPU")
        return results

    def reprolora(self, step: str, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        result = self.run(step, ("python", "-m", "reprolora", *args))[0]
        assert result.returncode == expect, (
            f"{step}: exit {result.returncode}, expected {expect}:\n{result.stderr[-3000:]}"
        )
        return result


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="session")
def arm64(
    tiny_base_model: Path,
    tiny_dataset: Path,
    tiny_config: Path,
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> Arm64:
    """The arm64 root, and a /work with the tiny job's inputs (made on x86_64, as a user would bring them):
    model/, data.jsonl and one config per profile."""
    root = Path(
        subprocess.run(["bash", str(SETUP), "--path"], capture_output=True, text=True, check=True).stdout.strip()
    )
    problem = _missing(root)
    if problem and os.environ.get("CI") == "true":
        pytest.fail(f"{problem}; CI must run the arm64 tests")
    if problem:
        pytest.skip(problem)
    work = tmp_path_factory.mktemp("arm64")
    shutil.copytree(tiny_base_model, work / "model")
    shutil.copy(tiny_dataset, work / "data.jsonl")
    for profile in PROFILES:
        (work / f"{profile}.toml").write_text(f'profile = "{profile}"\n' + tiny_config.read_text())
    return Arm64(root, work, pytestconfig)


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="session")
def arm64_adapters(arm64: Arm64) -> dict[str, list[Path]]:
    """The tiny job trained twice under emulation with each profile, each run a fresh process; the two profiles
    side by side."""
    adapters: dict[str, list[Path]] = {profile: [] for profile in PROFILES}
    for run in ("a", "b"):
        commands = [
            (
                "python",
                "-m",
                "reprolora",
                "train",
                "-q",
                "-c",
                f"/work/{profile}.toml",
                "--base-model",
                "/work/model",
                "--dataset",
                "/work/data.jsonl",
                "-o",
                f"/work/{profile}-{run}",
            )
            for profile in PROFILES
        ]
        for profile, result in zip(PROFILES, arm64.run(f"train native and portable ({run})", *commands), strict=True):
            assert result.returncode == 0, (
                f"train {profile} ({run}): exit {result.returncode}:\n{result.stderr[-3000:]}"
            )
            adapters[profile].append(arm64.work / f"{profile}-{run}")
    return adapters


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.arm64
@pytest.mark.slow
def test_trains_twice_to_the_same_bytes(
    arm64: Arm64, arm64_adapters: dict[str, list[Path]], tiny_adapter: Path, profile: str
) -> None:
    first, second = arm64_adapters[profile]
    assert file_bytes(first) == file_bytes(second)
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["pins"]["machine"] == "aarch64" and manifest["pins"]["profile"] == profile
    assert manifest["toolchain"]["torch"].startswith("2.10.0")
    # The BLAS field says what the aarch64 wheel is built with (not "mkl" from a LAPACK sentence), with its version.
    assert manifest["pins"]["blas"] == "openblas"
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.\w+)?", manifest["pins"]["blas_version"] or "")
    if profile == "portable":
        assert manifest["pins"]["environment"]["OPENBLAS_CORETYPE"] == "ARMV8"
        assert manifest["pins"]["cpu_capability"] == "DEFAULT"
    if profile == "native":  # the same job on x86_64 (native too): other bytes, the README says; shown, not promised
        same = (
            file_bytes(first)["adapter_model.safetensors"] == (tiny_adapter / "adapter_model.safetensors").read_bytes()
        )
        arm64.say(f"native weights {'equal' if same else 'differ from'} x86_64's")


PEFT_LOAD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from reprolora.core import pins
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


@pytest.fixture(scope="session")
def arm64_checks(
    arm64: Arm64, arm64_adapters: dict[str, list[Path]], tiny_adapter: Path
) -> dict[str, subprocess.CompletedProcess]:
    """PEFT, `infer --check` and `verify` under emulation, side by side, on the adapters trained there and on an
    x86_64 one (the tiny job trained on this machine)."""
    (arm64.work / "peft_load.py").write_text(PEFT_LOAD)
    shutil.copytree(tiny_adapter, arm64.work / "x86_64")
    tampered = arm64.work / "x86_64-tampered"
    shutil.copytree(tiny_adapter, tampered)
    (tampered / "adapter_config.json").write_text((tampered / "adapter_config.json").read_text() + " ")
    reprolora = ("python", "-m", "reprolora")
    commands = {
        "peft load": ("python", "/work/peft_load.py", "/work/native-a", "/work/model"),
        **{
            f"infer --check {profile}": (
                *reprolora,
                "infer",
                f"/work/{profile}-a",
                "--base-model",
                "/work/model",
                "--check",
            )
            for profile in PROFILES
        },
        "infer --check x86_64": (*reprolora, "infer", "/work/x86_64", "--base-model", "/work/model", "--check"),
        "verify x86_64": (*reprolora, "verify", "/work/x86_64"),
        "verify tampered": (*reprolora, "verify", "/work/x86_64-tampered"),
    }
    return dict(zip(commands, arm64.run(f"{', '.join(commands)} (side by side)", *commands.values()), strict=True))


def ok(result: subprocess.CompletedProcess, expect: int = 0) -> subprocess.CompletedProcess:
    assert result.returncode == expect, f"{' '.join(result.args)}: exit {result.returncode}:\n{result.stderr[-3000:]}"
    return result


@pytest.mark.arm64
@pytest.mark.slow
def test_peft_loads_it_there(arm64_checks: dict[str, subprocess.CompletedProcess]) -> None:
    assert "LoRA tensors bit for bit" in ok(arm64_checks["peft load"]).stdout


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.arm64
@pytest.mark.slow
def test_infer_check_replays_its_probes_there(
    arm64_checks: dict[str, subprocess.CompletedProcess], profile: str
) -> None:
    assert "check passed: 1 golden probes replayed bit for bit" in ok(arm64_checks[f"infer --check {profile}"]).stderr


@pytest.mark.arm64
@pytest.mark.slow
def test_x86_64_adapter_refuses_to_check_there(arm64_checks: dict[str, subprocess.CompletedProcess]) -> None:
    stderr = ok(arm64_checks["infer --check x86_64"], expect=2).stderr
    assert "the architecture differs: trained on x86_64, this machine is aarch64" in stderr
    assert "probe 1" not in stderr  # refused: no probe was replayed, none reported as a mismatch


@pytest.mark.arm64
@pytest.mark.slow
def test_verify_works_across_architectures(
    arm64_checks: dict[str, subprocess.CompletedProcess], arm64_adapters: dict[str, list[Path]]
) -> None:
    assert "every hash in the manifest holds" in ok(arm64_checks["verify x86_64"]).stdout
    assert "every hash in the manifest holds" in run_cli("verify", str(arm64_adapters["portable"][0])).stdout
    assert "adapter_config.json: differs" in ok(arm64_checks["verify tampered"], expect=1).stderr


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
    answer = json.loads(
        run_cli("infer", str(adapter), "--base-model", str(tiny_base_model), "--json", "-n", "2", "hi").stdout
    )
    assert answer["completion_tokens"] > 0


@pytest.fixture(scope="session")
def reference_adapters(arm64: Arm64, tiny_base_model: Path, tiny_dataset: Path, tmp_path_factory) -> dict[str, Path]:
    """The tiny job under profile `reference` (test_reference's job), trained on x86_64 here and under emulation
    there at the same time: its bytes depend on the job alone, so both must be the same."""
    from test_reference import REFERENCE_JOB, reference_run

    (arm64.work / "reference.toml").write_text(REFERENCE_JOB.format(threads=2, micro_batch=1))
    train = ("python", "-m", "reprolora", "train", "-q", "-c", "/work/reference.toml", "--base-model", "/work/model")
    emulated = arm64.start(*train, "--dataset", "/work/data.jsonl", "-o", "/work/reference")
    started = time.perf_counter()
    here = tmp_path_factory.mktemp("reference-x86_64")
    reference_run(here, "x86_64", tiny_base_model, tiny_dataset)
    stdout, stderr = emulated.communicate(timeout=3600)
    arm64.say(f"train reference (beside the same job on x86_64): {time.perf_counter() - started:.1f} s wall")
    assert emulated.returncode == 0, f"train reference: exit {emulated.returncode}:\n{stderr[-3000:]}"
    shutil.copytree(here / "x86_64", arm64.work / "reference-x86_64")
    return {"aarch64": arm64.work / "reference", "x86_64": here / "x86_64"}


@pytest.mark.arm64
@pytest.mark.slow
def test_reference_gives_x86_64s_bytes_there(reference_adapters: dict[str, Path]) -> None:
    """aarch64 (torch 2.10, OpenBLAS) against x86_64 (this venv's torch, MKL): the same weights, config, losses,
    metrics and probes; the manifests differ only in what they record of the machine and toolchain."""
    there, here = reference_adapters["aarch64"], reference_adapters["x86_64"]
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (there / name).read_bytes() == (here / name).read_bytes(), name
    recorded = [json.loads((folder / "manifest.json").read_text()) for folder in (there, here)]
    assert recorded[0]["pins"]["machine"] == "aarch64" and recorded[1]["pins"]["machine"] == "x86_64"
    for key in ("loss_trace", "metrics", "probes"):
        assert recorded[0][key] == recorded[1][key], key


@pytest.mark.arm64
@pytest.mark.slow
def test_reference_adapter_from_x86_64_replays_its_probes_there(
    arm64: Arm64, reference_adapters: dict[str, Path]
) -> None:
    """Profile `reference` is not bound to an architecture: an x86_64 adapter's golden probes replay under
    emulation bit for bit (the other profiles refuse, test_x86_64_adapter_refuses_to_check_there)."""
    result = arm64.reprolora(
        "infer --check reference (x86_64's adapter)",
        "infer",
        "/work/reference-x86_64",
        "--base-model",
        "/work/model",
        "--check",
    )
    assert "golden probes replayed bit for bit" in result.stderr

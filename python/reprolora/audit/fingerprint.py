"""`reprolora fingerprint`: what in this environment decides the bits, and what threatens them.

Run after the pins are applied (reprolora.core.pins.apply): it reports the process as training would see it. With an
adapter's manifest (`--against A/`), it compares this environment with the one that built A and says whether a
rebuild here should give A's bytes. What is compared is what the manifest records as deciding the bits: the
toolchain, the CPU architecture, the capability torch runs at, the BLAS and the pinned variables.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

from reprolora.core import manifest, pins

# The instruction-set flags that decide which kernels torch, MKL and oneDNN pick.
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512dq",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "asimd",
    "sve",
    "sve2",
)
PORTABLE_NEEDS = ("avx2", "fma")  # the x86-64 portable profile runs AVX2 kernels with FMA


def cpu() -> dict[str, Any]:
    """Model, vendor and the ISA flags of this CPU (from /proc/cpuinfo where there is one)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set((info.get("flags") or info.get("Features") or "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "model": info.get("model name") or platform.processor() or "unknown",
        "vendor": info.get("vendor_id") or info.get("CPU implementer") or "unknown",
        "machine": pins.machine(),
        "flags": [flag for flag in ISA_FLAGS if flag in flags],
        "cpus": os.cpu_count() or 1,
        "usable_cpus": usable,
    }


def torch_own_capability() -> str:
    """The capability torch picks when nothing pins it: asked of a fresh interpreter without ATEN_CPU_CAPABILITY."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    result = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.stdout.strip() or "unknown"


def libraries() -> dict[str, str]:
    """BLAS, its version line and oneDNN's, as torch's build reports them."""
    import torch

    found = {"blas": pins.blas(), "blas_version": "unknown", "onednn": "not built in"}
    for line in torch.__config__.show().splitlines():
        line = line.strip(" -")
        if "Math Kernel Library Version" in line or line.startswith("OpenBLAS"):
            found["blas_version"] = line.split(" for ")[0]
        elif "MKL-DNN" in line or "oneDNN" in line:
            found["onednn"] = line.split(" (")[0]
    return found


def threads() -> dict[str, Any]:
    import torch

    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_DYNAMIC", "MKL_DYNAMIC")
    return {
        "intra_op": torch.get_num_threads(),
        "inter_op": torch.get_num_interop_threads(),
        "environment": {name: os.environ.get(name) for name in names},
    }


def out_of_range(toolchain: dict[str, str]) -> list[str]:
    """Libraries whose version is outside what reprolora's own package metadata requires (and CI tests)."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    problems = []
    try:
        required = metadata.requires("reprolora") or []
    except metadata.PackageNotFoundError:  # run from a source tree: no metadata to check against
        required = []
    for text in required:
        requirement = Requirement(text)
        if requirement.marker is not None or requirement.name not in toolchain:
            continue
        try:
            version = Version(toolchain[requirement.name].split("+")[0])
        except InvalidVersion:
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(
                f"{requirement.name} {toolchain[requirement.name]} is outside the tested range "
                f"{requirement.specifier}: its kernels may give other bits"
            )
    return problems


def collect() -> dict[str, Any]:
    """Everything `fingerprint` reports, with its warnings. The pins must be applied."""
    from reprolora.models.loading import toolchain

    described = pins.describe()
    chip = cpu()
    profile = described["profile"]
    pinned_capability = described["cpu_capability"]
    own = pinned_capability if os.environ.get("ATEN_CPU_CAPABILITY") is None else torch_own_capability()
    libs = libraries()
    tools = toolchain()
    warnings = []
    if profile == "native":
        warnings.append(
            f"profile native: these bytes hold only on CPUs where torch runs at {pinned_capability} with "
            f'the same BLAS path; profile = "reference" gives bytes that depend on the job alone'
        )
    if profile == "portable-fast":
        warnings.append(
            "profile portable-fast: its matrix products were measured the same on an AMD and an Intel "
            'CPU, a whole job not yet; profile = "portable" is the one whose bytes are shared across '
            "x86-64 CPUs of both vendors"
        )
    if profile in ("portable", "portable-fast") and chip["machine"] == "x86_64":
        missing = [flag for flag in PORTABLE_NEEDS if flag not in chip["flags"]]
        if missing:
            warnings.append(
                f"this CPU lacks {', '.join(missing)}, which the {profile} profile's kernels need: "
                f"its bytes can't be reproduced here"
            )
    if chip["machine"] == "x86_64" and libs["blas"] != "mkl" and profile != "reference":
        warnings.append(
            f"BLAS is {libs['blas']}, not MKL: the x86-64 pins were measured with MKL; bytes built "
            f"with MKL (the PyPI torch) will differ from this torch's"
        )
    warnings += out_of_range(tools)
    if chip["usable_cpus"] < described["threads"]:
        warnings.append(
            f"threads = {described['threads']} but this process may use {chip['usable_cpus']} CPU(s): "
            f"the bits hold, the speed does not"
        )
    return {
        "cpu": chip,
        "isa": {"pinned": pinned_capability, "torch_own": own, "profile": profile},
        "libraries": libs,
        "threads": threads(),
        "toolchain": tools,
        "pins": described,
        "overridden_by_pins": pins.overridden(),
        "warnings": warnings,
    }


def against(report: dict[str, Any], recorded: manifest.Manifest) -> dict[str, Any]:
    """Whether a rebuild here should give the bytes of the adapter whose manifest is `recorded`, and if not, why."""
    if recorded.pins.profile == "reference":
        return against_reference(report, recorded)
    reasons = []
    here, there = manifest.pins_from_dict(report["pins"]), recorded.pins
    for key, mine, theirs in (
        ("machine", here.machine, there.machine),
        ("cpu_capability", here.cpu_capability, there.cpu_capability),
        ("blas", here.blas, there.blas),
        ("profile", here.profile, there.profile),
        ("threads", here.threads, there.threads),
    ):
        if mine != theirs:
            reasons.append(f"pins: {key} is {mine!r} here, {theirs!r} in the adapter")
    env_here, env_there = here.environment, there.environment
    for name in sorted(set(env_here) | set(env_there)):
        if env_here.get(name) != env_there.get(name):
            reasons.append(f"pins: {name} is {env_here.get(name)!r} here, {env_there.get(name)!r} in the adapter")
    for name in sorted(set(report["toolchain"]) | set(recorded.toolchain)):
        here, there = report["toolchain"].get(name), recorded.toolchain.get(name)
        if here != there:
            reasons.append(f"toolchain: {name} is {here or 'absent'} here, {there or 'absent'} in the adapter")
    same = not reasons
    if same:
        verdict = "a rebuild here should give the adapter's bytes: same toolchain, CPU capability, BLAS and pins"
        if recorded.pins.profile == "native":
            verdict += " (profile native: the CPU model is not recorded; another vendor's MKL path may still differ)"
    else:
        verdict = f"a rebuild here will likely give other bytes: {reasons[0]}" + (
            f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        )
    return {"same": same, "verdict": verdict, "reasons": reasons}


def against_reference(report: dict[str, Any], recorded: manifest.Manifest) -> dict[str, Any]:
    """Profile `reference` defines every number by mathematics: the CPU, BLAS, threads and torch version do not
    count (fingerprint applies the adapter's own pins, so the profile is the same). The tokenizer's output does:
    transformers and tokenizers turn the dataset's text into ids, which only a rebuild shows, so their versions are
    named in the verdict rather than counted as reasons."""
    verdict = (
        "a rebuild here should give the adapter's bytes: profile reference depends on the job alone, not on "
        "this CPU, BLAS, thread count or torch version"
    )
    tokenizing = [
        f"{name} {report['toolchain'].get(name) or 'absent'} here, {recorded.toolchain.get(name) or 'absent'} there"
        for name in ("transformers", "tokenizers")
        if report["toolchain"].get(name) != recorded.toolchain.get(name)
    ]
    if tokenizing:
        verdict += f" (if {'; '.join(tokenizing)} tokenize the dataset alike)"
    return {"same": True, "verdict": verdict, "reasons": []}


def render(report: dict[str, Any]) -> str:
    chip, isa, libs, th = report["cpu"], report["isa"], report["libraries"], report["threads"]
    described = report["pins"]
    lines = [
        f"cpu:       {chip['model']} ({chip['vendor']}, {chip['machine']}), "
        f"{chip['usable_cpus']} of {chip['cpus']} CPUs usable",
        f"isa flags: {' '.join(chip['flags']) or 'none found'}",
        f"isa:       torch runs at {isa['pinned']} (profile {isa['profile']}); "
        f"unpinned it would pick {isa['torch_own']}",
        f"blas:      {libs['blas']} ({libs['blas_version']}); {libs['onednn']}",
        f"threads:   {th['intra_op']} intra-op, {th['inter_op']} inter-op; "
        + " ".join(f"{k}={v}" for k, v in th["environment"].items() if v is not None),
        "toolchain: " + ", ".join(f"{k} {v}" for k, v in sorted(report["toolchain"].items())),
        f"pins:      profile {described['profile']}, threads {described['threads']}: "
        + ", ".join(f"{k}={v}" if v is not None else f"{k} unset" for k, v in described["environment"].items()),
    ]
    lines += [
        f"replaced:  {name}={value!r} from the environment (the pins set {described['environment'].get(name)!r})"
        for name, value in sorted(report["overridden_by_pins"].items())
    ]
    lines += [f"warning:   {w}" for w in report["warnings"]]
    if "against" in report:
        lines += [f"against:   {reason}" for reason in report["against"]["reasons"]]
        lines.append(f"verdict:   {report['against']['verdict']}")
    return "\n".join(lines)

"""Determinism pins: the environment that fixes CPU numerics, applied before torch is imported.

torch, MKL, OpenBLAS and oneDNN read these variables once, when they load. Four profiles:
- native:   this CPU's best instruction set (torch's own choice), and MKL in its strict conditional-numerical-
            reproducibility mode: same bytes on the same kind of CPU, at any thread count.
- portable: AVX2, the baseline of every x86-64 CPU since 2013 (Haswell), fixed threads, and MKL in its
            vendor-neutral COMPATIBLE code path. Same bytes across such CPUs, Intel and AMD alike.
- portable-fast: portable's AVX2 pins with MKL's AVX2 branch in strict mode (MKL_CBWR=AVX2,STRICT) instead of
            COMPATIBLE: faster, and the same bytes at any thread count. Measured (torch 2.13, MKL 2024.2, the default
            model's 72 training products at 1 and 2 threads): the same bits on this project's AMD EPYC (Zen 5) and
            Intel Xeon (python/benchmarks/blas_vendor_hashes.py). A whole training job was not yet compared across
            the two vendors, so this profile does not promise cross-vendor bytes: portable does.
- reference: every operation of training and inference defined by mathematics (reprolora.numerics): the same
            bytes on any CPU, architecture, BLAS, thread count, world size and micro-batch size. Pins nothing that
            changes its bits: there is none.

Measured (torch 2.11, same inputs, AMD Zen 5 here against an Intel Xeon with AVX-512): with MKL_CBWR=AVX2,
MKL's matrix products and its vector math (exp, log, sqrt) differ between the two vendors; MKL_CBWR=COMPATIBLE
makes every matrix product and exp/log identical, but MKL's sqrt still differs, so reprolora.training.optim.AdamW
avoids it.
Measured (torch 2.13, MKL 2024.2, Intel Xeon, the default model's shapes): MKL splits some matrix products
between threads in a way that changes their bits (a [100x576]x[576x1536] product and its backward, the LoRA
weight gradients); MKL_CBWR=AUTO,STRICT makes them, and the default model's micro-batch gradients, the same at 1
and 2 threads (and equal to AUTO's at 1 thread). STRICT has no effect on the COMPATIBLE path: `portable` still
depends on the thread count.
A user's own settings never win over the pins: `overridden()` says which were replaced.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

from reprolora.core.errors import ReproloraError

PROFILES = ("native", "portable", "portable-fast", "reference")

# Set to a fixed value whatever the profile. PYTHONHASHSEED can't be changed inside a running process, so the
# code never depends on set or dict-of-hash order instead.
_COMMON = {
    "OMP_DYNAMIC": "FALSE",
    "MKL_DYNAMIC": "FALSE",
    "TOKENIZERS_PARALLELISM": "false",
    "CUDA_VISIBLE_DEVICES": "",  # CPU only, even on a machine with a GPU
    "HF_HUB_OFFLINE": "1",  # never reach for a model hub
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Per profile and machine: a value, or None to remove the variable so the library picks the CPU's best.
_ISA_VARS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "OPENBLAS_CORETYPE")
_PROFILE_ISA: dict[tuple[str, str], dict[str, str | None]] = {
    ("native", "x86_64"): {
        "ATEN_CPU_CAPABILITY": None,
        "MKL_CBWR": "AUTO,STRICT",  # STRICT: matrix products whose bits do not depend on the thread count
        "MKL_ENABLE_INSTRUCTIONS": None,
        "ONEDNN_MAX_CPU_ISA": "ALL",
        "OPENBLAS_CORETYPE": None,
    },
    ("portable", "x86_64"): {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "COMPATIBLE",  # AVX2 is not enough: MKL picks other kernels on Intel and on AMD
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "OPENBLAS_CORETYPE": "Haswell",
    },
    ("portable-fast", "x86_64"): {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "AVX2,STRICT",  # STRICT: thread-invariant products; AVX2 alone differed between Intel and AMD
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "OPENBLAS_CORETYPE": "Haswell",
    },
    ("native", "aarch64"): {name: None for name in _ISA_VARS},
    # reference: every operation has one answer (reprolora.numerics), whatever the ISA, BLAS or thread count, so
    # none of these is touched: a user's ATEN_CPU_CAPABILITY or MKL_CBWR stays as it is and changes no bit.
    ("reference", "x86_64"): {},
    ("reference", "aarch64"): {},
    ("portable", "aarch64"): {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_CBWR": None,
        "MKL_ENABLE_INSTRUCTIONS": None,
        "ONEDNN_MAX_CPU_ISA": None,
        "OPENBLAS_CORETYPE": "ARMV8",
    },
}

_applied: dict[str, Any] | None = None
_overridden: dict[str, str] = {}


def machine() -> str:
    arch = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def pinned_environment(profile: str, threads: int) -> dict[str, str | None]:
    """The variables a profile sets (None: removed). Pure: changes nothing."""
    if profile not in PROFILES:
        raise ReproloraError(f"profile {profile!r} is not one of {', '.join(PROFILES)}")
    if threads < 1:
        raise ReproloraError(f"threads must be at least 1, got {threads}")
    isa = _PROFILE_ISA.get((profile, machine()))
    if isa is None:
        raise ReproloraError(f"profile {profile!r} has no pins for CPU architecture {machine()!r}")
    env: dict[str, str | None] = dict(_COMMON)
    env.update({name: str(threads) for name in _THREAD_VARS})
    env.update(isa)
    return env


def apply(profile: str, threads: int) -> None:
    """Pin the environment for `profile` with `threads` threads. Must run before torch is imported."""
    global _applied
    wanted = {"profile": profile, "threads": threads}
    if _applied is not None:
        if _applied != wanted:
            raise ReproloraError(f"pins already applied as {_applied}; can't change them to {wanted} in one process")
        return
    if "torch" in sys.modules:
        raise ReproloraError("torch was imported before the determinism pins were applied; apply them first")
    for name, value in pinned_environment(profile, threads).items():
        previous = os.environ.get(name)
        if previous is not None and previous != value:
            _overridden[name] = previous
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _applied = wanted
    import torch  # the pins above are read here

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    # With deterministic algorithms on, torch fills every new empty tensor with NaN, in case an op reads memory it
    # never wrote. None of ours does: off, the default job measured about 2.6% faster with the same bytes, and a
    # decoding step no longer fills its logits and every temporary.
    torch.utils.deterministic.fill_uninitialized_memory = False


def is_applied() -> bool:
    return _applied is not None


def applied() -> dict[str, Any]:
    if _applied is None:
        raise ReproloraError("determinism pins were not applied")
    return dict(_applied)


def overridden() -> dict[str, str]:
    """The user's own values that the pins replaced (or removed), by variable name."""
    return dict(_overridden)


def describe() -> dict[str, Any]:
    """What fixes the numerics of this process: profile, threads, the pinned variables as this process has them,
    effective CPU capability and BLAS. Goes into the manifest, so it holds nothing machine-specific beyond what
    changes the bits."""
    import torch

    settings = applied()
    names = sorted(pinned_environment(settings["profile"], settings["threads"]))
    return {
        "profile": settings["profile"],
        "threads": settings["threads"],
        "machine": machine(),
        # Read back from the process, not from the table: a pin that did not reach os.environ shows here.
        "environment": {name: os.environ.get(name) for name in names},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas(),
        "blas_version": blas_version(),
    }


def build_settings(config: str) -> dict[str, str]:
    """The KEY=VALUE list on the "- Build settings:" line of `torch.__config__.show()`. Values may hold ", "
    (compiler flags): a part that does not start a new KEY= belongs to the value before it."""
    line = next((line for line in config.splitlines() if line.strip().startswith("- Build settings:")), "")
    settings: dict[str, str] = {}
    key = None
    for part in line.split(":", 1)[-1].split(", "):
        match = re.fullmatch(r"\s*([A-Z][A-Z0-9_]*)=(.*)", part, re.DOTALL)
        if match:
            key = match[1]
            settings[key] = match[2].strip()
        elif key is not None and part.strip():
            settings[key] += ", " + part
    return settings


def blas_from_config(config: str) -> dict[str, str | None]:
    """The BLAS a torch build says it was built with (its BLAS_INFO), and MKL's version where the text gives it.
    Never guessed from other lines: "LAPACK is enabled (usually provided by MKL)" is printed by every build."""
    name = build_settings(config).get("BLAS_INFO") or "unknown"
    name = {"open": "openblas"}.get(name, name)  # torch's CMake calls OpenBLAS "open"
    version = None
    if name == "mkl":
        found = re.search(r"Math Kernel Library Version (.+?)(?: for |$)", config, re.MULTILINE)
        version = found[1].strip() if found else None
    return {"name": name, "version": version}


def _openblas_version() -> str | None:
    """The version of the OpenBLAS loaded in this process (as threadpoolctl reads it): the library, whatever it
    is called (libopenblas*, nixpkgs' libblas.so.3, or linked into torch), answers openblas_get_config()."""
    import ctypes

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = dict.fromkeys(line.split(None, 5)[-1] for line in maps.splitlines() if ".so" in line.rsplit("/", 1)[-1])
    for path in sorted(paths, key=lambda p: "blas" not in p.rsplit("/", 1)[-1]):  # likely ones first
        try:
            get_config = ctypes.CDLL(path).openblas_get_config
        except (OSError, AttributeError):
            continue
        get_config.restype = ctypes.c_char_p
        words = (get_config() or b"").decode(errors="replace").split()
        return words[1] if len(words) > 1 and words[0] == "OpenBLAS" else None
    return None


# MKL's code-path branches (mkl_cbwr.h), as mkl_cbwr_get(MKL_CBWR_BRANCH) returns them.
_MKL_CBWR_BRANCHES = {
    1: "OFF",
    2: "AUTO",
    3: "COMPATIBLE",
    4: "SSE2",
    6: "SSSE3",
    7: "SSE4_1",
    8: "SSE4_2",
    9: "AVX",
    10: "AVX2",
    11: "AVX512_MIC",
    12: "AVX512",
    13: "AVX512_MIC_E1",
    14: "AVX512_E1",
}


def process_state() -> dict[str, Any]:
    """The numerics settings this process actually runs with, as torch and its libraries report them (not as the
    pins intend them): `reprolora fingerprint` prints it, and the tests compare it with the profile."""
    import torch

    settings = applied()
    parallel = torch.__config__.parallel_info()

    def reported(key: str) -> int | None:
        for line in parallel.splitlines():
            if line.strip().startswith(key):
                return int(line.split(":")[-1])
        return None

    return {
        "environment": {name: os.environ.get(name) for name in sorted(pinned_environment(**settings))},
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "omp_max_threads": reported("omp_get_max_threads()"),
        "mkl_max_threads": reported("mkl_get_max_threads()"),
        "mkl_cbwr_branch": _mkl_cbwr_branch(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def _mkl_cbwr_branch() -> str | None:
    """The code path MKL took from MKL_CBWR, read from the MKL linked into torch (None: torch has no MKL)."""
    import ctypes

    import torch

    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        get = ctypes.CDLL(str(library)).mkl_serv_cbwr_get  # mkl_cbwr_get's own symbol in the static MKL
    except (OSError, AttributeError):
        return None
    branch = get(1)  # MKL_CBWR_BRANCH
    strict = get(-1) & 0x10000  # MKL_CBWR_ALL, MKL_CBWR_STRICT
    return _MKL_CBWR_BRANCHES.get(branch, str(branch)) + (",STRICT" if strict else "")


def blas() -> str:
    """The BLAS torch was built with: "mkl", "openblas", ... or "unknown" (its BLAS_INFO build setting)."""
    import torch

    return str(blas_from_config(torch.__config__.show())["name"])


def blas_version() -> str | None:
    """That BLAS's version: from torch's own config (MKL, linked in) or from the library loaded in this process
    (OpenBLAS); None where neither tells."""
    import torch

    found = blas_from_config(torch.__config__.show())
    return _openblas_version() if found["name"] == "openblas" else found["version"]

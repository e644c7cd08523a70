"""Helpers for tests/test_nix_*.py: run the flake's build step and Debian's Nix 2.8 on this machine.

Real nixpkgs can't be fetched here, so the Nix builds use tests/nix/nixpkgs-shim in its place: the same
flake and build step, with this machine's Python (the one running the tests) as the toolchain.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_STEP = REPO / "pkgs" / "build-step.sh"
SHIM = Path(__file__).resolve().parent / "nixpkgs-shim"

# The files an adapter folder holds, as the library's contract states.
ADAPTER_FILES = {"README.md", "adapter_model.safetensors", "adapter_config.json", "manifest.json"}

def venv_bin() -> Path:
    """The folder of the Python running the tests: its `reprolora` script is the one the builds run."""
    return Path(sys.executable).parent


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def sha256_lines(folder: Path) -> str:
    """`sha256sum`'s format, file names sorted: the format of expected/adapter-<system>.sha256."""
    return "".join(
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n" for path in sorted(folder.iterdir())
    )


def tracked_files(*patterns: str) -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z", "--", *patterns], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    return [REPO / name for name in names if name]


# ---- Nix 2.8 (Debian's nix-bin), sandboxed, offline ----

def host_paths() -> list[str]:
    """What the sandbox must see of this machine for its Python to run: the interpreter's prefixes."""
    paths = {sys.prefix, sys.base_prefix, str(Path(os.path.realpath(sys.executable)).parents[1])}
    return sorted(paths)


def host_bash() -> str:
    return os.path.realpath(shutil.which("bash"))


def nix_env(folder: Path) -> dict[str, str]:
    """The environment for `nix` commands: a nix.conf of our own (sandbox on, no substituters, no registry)."""
    conf_dir = folder / "nix-conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    registry = conf_dir / "registry.json"
    registry.write_text('{"flakes": [], "version": 2}\n')
    # bash: the builder `nix develop` needs (the shim's mkShell).
    sandbox_paths = ["/bin/sh=/bin/busybox", "/bin/busybox", "/lib", "/lib64", "/usr/lib", host_bash(), *host_paths()]
    (conf_dir / "nix.conf").write_text(
        "experimental-features = nix-command flakes\n"
        "sandbox = true\n"
        "sandbox-fallback = false\n"
        f"sandbox-paths = {' '.join(p for p in sandbox_paths if os.path.exists(p.split('=')[-1]))}\n"
        "substituters =\n"
        f"flake-registry = {registry}\n"
    )
    env = dict(os.environ)
    env["NIX_CONF_DIR"] = str(conf_dir)
    return env


def toolchain_fingerprint() -> str:
    """Names the host toolchain in the shim's derivations: the Python and every installed distribution."""
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], check=True, capture_output=True,
                            text=True).stdout
    return hashlib.sha256((sys.version + "\n" + freeze).encode()).hexdigest()


def nix_system() -> str:
    return f"{platform.machine()}-linux"


def normalized(name: str) -> str:
    """A distribution's name as PEP 503 normalizes it (and nixpkgs names its Python packages, mostly)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def host_distributions() -> dict[str, dict]:
    """What the shim's Python environments are made of: each distribution installed in the Python running the
    tests (but the library itself, which the shim builds from source), with the absolute paths of its
    top-level files in site-packages and the distributions it requires (extras left out, markers evaluated),
    all read from its metadata."""
    from packaging.requirements import Requirement

    found = {}
    for dist in importlib.metadata.distributions():
        name = normalized(dist.metadata["Name"])
        if name == "reprolora" or name in found:
            continue
        tops = sorted({f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")})
        requires = [Requirement(line) for line in dist.requires or []]
        found[name] = {
            "version": dist.version,
            "files": [str(dist.locate_file(top)) for top in tops],
            "dependencies": sorted({normalized(r.name) for r in requires
                                    if r.marker is None or r.marker.evaluate({"extra": ""})}),
        }
    for entry in found.values():  # a requirement the host lacks would fail its imports, as in nixpkgs
        entry["dependencies"] = [d for d in entry["dependencies"] if d in found]
    return found


def nix_string_list(items: list[str]) -> str:
    return "[ " + " ".join(json.dumps(item) for item in items) + " ]"


def make_shim(folder: Path, files: dict[str, Path] | None = None) -> Path:
    """A copy of the nixpkgs shim with host.nix written for this machine. `files` maps an SRI hash to a local
    file that the shim's fetchurl returns for that hash (copied into the shim: a flake reads only its own
    files)."""
    shutil.copytree(SHIM, folder)
    entries = []
    for sri, path in (files or {}).items():
        shutil.copyfile(path, folder / path.name)
        entries.append(f'    "{sri}" = ./{path.name};')
    (folder / "host.nix").write_text(
        "{\n"
        f'  system = "{nix_system()}";\n'
        f'  python = "{sys.executable}";\n'
        f'  bash = "{host_bash()}";\n'
        f'  sitePackages = "{sysconfig.get_path("purelib", vars={"base": "", "platbase": ""}).lstrip("/")}";\n'
        f'  fingerprint = "{toolchain_fingerprint()}";\n'
        f'  basePython = "{os.path.realpath(sys._base_executable)}";\n'
        f'  pythonVersion = "{platform.python_version()}";\n'
        "  distributions = {\n" + "".join(
            f'    "{name}" = {{ version = "{d["version"]}"; files = {nix_string_list(d["files"])}; '
            f'dependencies = {nix_string_list(d["dependencies"])}; }};\n'
            for name, d in sorted(host_distributions().items())) + "  };\n"
        "  files = {\n" + "\n".join(entries) + "\n  };\n"
        "}\n"
    )
    return folder


def nix(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["nix", *args], env=env, cwd=cwd, capture_output=True, text=True)

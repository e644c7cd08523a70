"""`reprolora reprotest`: the same job trained in fresh processes under varied environments, bytes compared.

The first run ("plain") is the reference; every other variation changes one thing a user's machine, shell or
build sandbox may change, and must give the same adapter bytes. A variation that can't run here (a locale that
is not installed, `unshare` without the right) is reported as skipped with the reason, never as passed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reprolora.core import manifest
from reprolora.core.canonical import sha256_file
from reprolora.core.errors import ReproloraError

# A working directory a careless path join or shell quoting would break: spaces, accents, Turkish dotless i.
ODD_DIRECTORY = "a dir with spaces, ünïcödé and ığüşöç"
TURKISH = "tr_TR.UTF-8"


@dataclass
class Setup:
    """How one variation runs: extra environment, removed variables, a replacement environment, cwd, a prefix."""

    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()
    whole_env: dict[str, str] | None = None  # replaces the environment entirely (the Nix-like empty one)
    cwd: Path | None = None
    prefix: list[str] = field(default_factory=list)  # e.g. ["unshare", "-n"]
    umask: int | None = None
    skip: str = ""  # why this variation can't run here


def _locale_installed(name: str) -> bool:
    """Whether glibc knows `name` (asked of a child: setlocale in this process would change it)."""
    code = f"import locale; locale.setlocale(locale.LC_ALL, {name!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _unshare_works() -> list[str] | None:
    for command in (["unshare", "-n"], ["unshare", "-r", "-n"]):
        if shutil.which(command[0]) is None:
            return None
        if subprocess.run([*command, "true"], capture_output=True).returncode == 0:
            return command
    return None


def _odd_cwd(work: Path) -> Setup:
    folder = work / ODD_DIRECTORY
    folder.mkdir(exist_ok=True)
    return Setup(cwd=folder)


def _turkish(work: Path) -> Setup:
    if not _locale_installed(TURKISH):
        return Setup(skip=f"locale {TURKISH} is not installed (Debian: apt-get install locales, then locale-gen it)")
    return Setup(env={"LC_ALL": TURKISH, "LANG": TURKISH})


def _no_network(work: Path) -> Setup:
    command = _unshare_works()
    if command is None:
        return Setup(skip="`unshare -n` does not work here (needs root or user namespaces)")
    return Setup(prefix=command)


def _unwritable_home(work: Path) -> Setup:
    # /dev/null is not a folder: nothing can be created under it, even by root.
    return Setup(env={"HOME": "/dev/null", "XDG_CACHE_HOME": "/dev/null/cache"})


def _nix_like(work: Path) -> Setup:
    # What a Nix build's builder starts with (no user variables at all); the interpreter is named by full path.
    sandbox = work / "nix-build-top"
    sandbox.mkdir(exist_ok=True)
    return Setup(
        whole_env={
            "HOME": "/homeless-shelter",
            "PATH": "/path-not-set",
            "TMPDIR": str(sandbox),
            "NIX_BUILD_TOP": str(sandbox),
            "NIX_BUILD_CORES": "1",
            "TERM": "xterm-256color",
        },
        cwd=sandbox,
    )


# name -> (what it varies, how it is set up). "plain" comes first and is the reference.
VARIATIONS: dict[str, tuple[str, Callable[[Path], Setup]]] = {
    "plain": ("this environment as it is", lambda work: Setup()),
    "cwd": (f"working directory '{ODD_DIRECTORY}'", _odd_cwd),
    "tz": ("TZ=Pacific/Kiritimati (UTC+14)", lambda work: Setup(env={"TZ": "Pacific/Kiritimati"})),
    "locale-c": ("LC_ALL=C LANG=C", lambda work: Setup(env={"LC_ALL": "C", "LANG": "C"})),
    "locale-tr": (f"LC_ALL={TURKISH} (dotless i)", _turkish),
    "hashseed": ("PYTHONHASHSEED=12345", lambda work: Setup(env={"PYTHONHASHSEED": "12345"})),
    "umask": ("umask 077", lambda work: Setup(umask=0o077)),
    "home-unset": ("HOME unset", lambda work: Setup(unset=("HOME", "XDG_CACHE_HOME"))),
    "home-unwritable": ("HOME=/dev/null (nothing can be written there)", _unwritable_home),
    "omp-threads": (
        "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1",
        lambda work: Setup(env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
    ),
    "aten-capability": ("ATEN_CPU_CAPABILITY=default", lambda work: Setup(env={"ATEN_CPU_CAPABILITY": "default"})),
    "mkl-cbwr": ("MKL_CBWR=COMPATIBLE", lambda work: Setup(env={"MKL_CBWR": "COMPATIBLE"})),
    "no-network": ("no network (unshare -n)", _no_network),
    "nix-env": ("an empty environment as a Nix build has", _nix_like),
}


@dataclass(frozen=True)
class Row:
    variation: str
    description: str
    sha256: str | None  # of manifest.json, which hashes every other file of the adapter
    result: str  # "reference", "same", "different", "failed", "skipped"
    detail: str = ""


def parse_variations(text: str | None) -> list[str]:
    if not text:
        return list(VARIATIONS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIATIONS]
    if unknown:
        raise ReproloraError(f"--variations: unknown {', '.join(unknown)}; known: {', '.join(VARIATIONS)}")
    return ["plain"] + [name for name in names if name != "plain"]


def _folder_bytes(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (sha256_file(p), p.stat().st_mode & 0o777) for p in sorted(folder.iterdir())}


def run(
    train_args: list[str], variations: list[str], work: Path, report: Callable[[Row], None] = lambda row: None
) -> list[Row]:
    """Train with `train_args` (absolute paths; -o is added) once per variation, each in a fresh process."""
    from reprolora.audit import diff

    rows: list[Row] = []
    reference: Path | None = None
    for name in variations:
        description, make = VARIATIONS[name]
        setup = make(work)
        if setup.skip:
            rows.append(Row(name, description, None, "skipped", setup.skip))
            report(rows[-1])
            continue
        out = (setup.cwd or work) / f"adapter-{name}"
        if setup.whole_env is not None:
            env = dict(setup.whole_env)
        else:
            env = {k: v for k, v in os.environ.items() if k not in setup.unset}
            env.update(setup.env)
        command = [*setup.prefix, sys.executable, "-m", "reprolora", "train", "-q", *train_args, "-o", str(out)]
        umask = setup.umask
        result = subprocess.run(
            command,
            env=env,
            cwd=setup.cwd or work,
            capture_output=True,
            text=True,
            preexec_fn=(lambda umask=umask: os.umask(umask)) if umask is not None else None,
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append(Row(name, description, None, "failed", f"exit {result.returncode}: {last}"))
        elif reference is None:
            reference = out
            rows.append(Row(name, description, sha256_file(out / manifest.FILENAME), "reference"))
        else:
            same = _folder_bytes(out) == _folder_bytes(reference)
            detail = "" if same else diff.diff(reference, out).verdict
            if same is False and not detail.startswith("different"):
                detail = "same bytes, other file modes"
            rows.append(
                Row(name, description, sha256_file(out / manifest.FILENAME), "same" if same else "different", detail)
            )
        report(rows[-1])
        if name == "plain" and reference is None:
            break  # without a reference there is nothing to compare with
    return rows


def quick_job(work: Path) -> list[str]:
    """The tiny model, dataset and job (reprolora.models.tiny) written into `work`; returns the train arguments."""
    import transformers

    from reprolora.models import tiny

    transformers.utils.logging.disable_progress_bar()  # the table is the output
    model = tiny.make_model(work / "tiny-model")
    data = tiny.write_dataset(work / "tiny.jsonl")
    (work / "tiny.toml").write_text(tiny.CONFIG)
    return ["-c", str(work / "tiny.toml"), "--base-model", str(model), "--dataset", str(data)]


def job(config: str | None, base_model_dir: str | None, dataset: str | None, overrides: list[str]) -> list[str]:
    """Train arguments for a user's job (`overrides`: its `--set` items), paths made absolute; the default base
    model is prepared here once."""
    from reprolora.core import config as config_module
    from reprolora.models import base_model

    args = []
    if config:
        args += ["-c", str(Path(config).resolve())]
    loaded = config_module.with_overrides(config_module.load(config), overrides)
    args += [f"--set={item}" for item in overrides]
    if base_model_dir:
        args += ["--base-model", str(Path(base_model_dir).resolve())]
    elif not loaded.base_model.path:
        args += ["--base-model", str(base_model.prepare_default().resolve())]  # HOME may be gone in a variation
    if dataset:
        args += ["--dataset", str(Path(dataset).resolve())]
    return args


def format_row(row: Row) -> str:
    detail = f"  {row.detail}" if row.detail else ""
    return f"{row.variation:<16} {row.sha256 or '-':<64}  {row.result}{detail}"


def header() -> str:
    return f"{'variation':<16} {'adapter sha256 (manifest.json)':<64}  result"


def rows_to_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    return [row.__dict__.copy() for row in rows]


def make_workdir(keep: str | None) -> tuple[Path, Callable[[], None]]:
    if keep:
        path = Path(keep)
        if path.exists():
            raise ReproloraError(f"{path}: already exists; reprotest writes a fresh folder")
        path.mkdir(parents=True)
        return path.resolve(), lambda: None
    path = Path(tempfile.mkdtemp(prefix="reprolora-reprotest-"))
    return path, lambda: shutil.rmtree(path, ignore_errors=True)

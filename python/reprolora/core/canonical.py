"""Canonical bytes: sorted JSON, file hashes and atomic publication of an output folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reprolora.core.errors import ReproloraError

FILE_MODE = 0o644


def canonical_json(obj: Any) -> bytes:
    """JSON with sorted keys, fixed separators, UTF-8 and a final newline: one value, one byte string."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def write_file(path: Path, data: bytes) -> None:
    """Write, set mode 0644 (archives and NAR hashes see modes) and fsync."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, FILE_MODE)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_target(target: Path) -> None:
    """Fail before any work is done if `target` can't be published."""
    if target.exists():
        raise ReproloraError(f"{target}: output folder already exists; choose another path or remove it")
    ancestor = target.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ReproloraError(f"{ancestor}: is not a folder; can't write {target} under it")
    if not os.access(ancestor, os.W_OK):
        raise ReproloraError(f"{ancestor}: not writable; can't write {target} under it")


@contextlib.contextmanager
def publish_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success fsync it and rename it to `target`.

    Any exception (Ctrl-C included) removes the temporary folder, so a failed run leaves nothing behind.
    """
    check_output_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        for child in staging.iterdir():
            os.chmod(child, FILE_MODE)
        os.chmod(staging, 0o755)
        _fsync_dir(staging)
        os.rename(staging, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

"""The nixpkgs shim's stand-in for dockerTools.buildLayeredImage: write a docker-archive (the `docker save`
format, which `docker load` and `podman load` take) with one layer holding a closure of store paths and a root
folder of extra files, and an image config. Every file time is `created`, every owner root, entries sorted: the
same inputs give the same bytes."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
from datetime import datetime
from pathlib import Path

ARCHITECTURES = {"x86_64-linux": "amd64", "aarch64-linux": "arm64"}


def closure(graph: Path) -> list[str]:
    """Store paths in an exportReferencesGraph file: path, deriver, count of references, the references; repeated."""
    lines = graph.read_text().splitlines()
    paths, i = [], 0
    while i < len(lines):
        paths.append(lines[i])
        i += 3 + int(lines[i + 2])
    return sorted(paths)


def add_tree(tar: tarfile.TarFile, source: Path, name: str, mtime: int) -> None:
    """`source` as `name`, recursively, in sorted order, with fixed times and owners."""
    info = tar.gettarinfo(str(source), arcname=name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
    if info.isfile():
        with source.open("rb") as f:
            tar.addfile(info, f)
    else:
        tar.addfile(info)
    if info.isdir():
        for child in sorted(os.listdir(source)):
            add_tree(tar, source / child, f"{name}/{child}", mtime)


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o444
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar: tarfile.TarFile, name: str, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mtime, info.mode = tarfile.DIRTYPE, mtime, 0o755
    tar.addfile(info)


def main() -> None:
    parser = argparse.ArgumentParser()
    for option in ("name", "tag", "created", "system", "config", "closure", "root", "out"):
        parser.add_argument(f"--{option}", required=True)
    args = parser.parse_args()
    created = args.created
    mtime = int(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp())

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add_dir(tar, "nix", mtime)
        add_dir(tar, "nix/store", mtime)
        for path in closure(Path(args.closure)):
            add_tree(tar, Path(path), path.lstrip("/"), mtime)
        root = Path(args.root)
        for child in sorted(os.listdir(root)):
            add_tree(tar, root / child, child, mtime)
    layer_bytes = layer.getvalue()
    layer_sha = hashlib.sha256(layer_bytes).hexdigest()

    config = {
        "architecture": ARCHITECTURES[args.system],
        "os": "linux",
        "created": created,
        "config": json.loads(Path(args.config).read_text()),
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_sha}"]},
        "history": [{"created": created, "comment": "nixpkgs-shim stand-in for dockerTools.buildLayeredImage"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [f"{args.name}:{args.tag}"], "Layers": [f"{layer_sha}/layer.tar"]}]
    repositories = {args.name: {args.tag: layer_sha}}

    with tarfile.open(args.out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        add_dir(archive, layer_sha, mtime)
        add_bytes(archive, f"{layer_sha}/layer.tar", layer_bytes, mtime)
        add_bytes(archive, config_name, config_bytes, mtime)
        add_bytes(archive, "manifest.json", json.dumps(manifest, separators=(",", ":")).encode(), mtime)
        add_bytes(archive, "repositories", json.dumps(repositories, separators=(",", ":")).encode(), mtime)


if __name__ == "__main__":
    main()

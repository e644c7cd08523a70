"""manifest.json, the one record of an adapter folder and of a merged folder: the only module that spells its keys.

Training builds a `Manifest` and `write`s it; verify, infer, serve, diff, report, the card, the attestation and the
benchmarks `read` it once and use its fields. `reprolora merge` writes a `MergedManifest` beside the merged model;
export-gguf reads it back with `read_merged`. The JSON keeps the shape it has always had (formats
"reprolora-manifest/1" and "reprolora-merged/1"), so folders written before this module read the same and rebuilds
keep their bytes. Keys this version doesn't know are kept in `extra` and written back unchanged, so a newer
writer's fields survive a round trip.

Each record's fields are its keys: `to_dict` writes them in field order and `_read` checks each against its type
hint, so a key is spelled once, as a field name.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from reprolora.core.canonical import canonical_json, file_entry, write_file
from reprolora.core.errors import ReproloraError

FILENAME = "manifest.json"
FORMAT = "reprolora-manifest/1"
MERGED_FORMAT = "reprolora-merged/1"
MERGED_KIND = "merged"


class _Invalid(Exception):
    """A field is missing or of the wrong type; a reader turns it into one line naming the file and the key."""


class _Record:
    """A record of the manifest: its fields are its JSON keys, in order; `extra`, where it has one, holds the keys
    this version does not know."""

    def to_dict(self) -> dict[str, Any]:
        return {**getattr(self, "extra", {}), **_fields(self)}


def _fields(record: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(record, f.name)) for f in fields(record) if f.name != "extra"}


def _plain(value: Any) -> Any:
    """A copy made of dicts, lists and JSON values only."""
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


@dataclass(frozen=True)
class FileEntry(_Record):
    sha256: str
    size: int


@dataclass(frozen=True)
class BaseModel(_Record):
    name: str
    files: dict[str, str]  # file name -> sha256


@dataclass(frozen=True)
class Dataset(_Record):
    name: str
    sha256: str
    examples: int
    train_indices: list[int]
    eval_indices: list[int]


@dataclass(frozen=True)
class Inputs(_Record):
    base_model: BaseModel
    dataset: Dataset
    config: dict[str, Any]  # the resolved job config (reprolora.core.config.Config.to_dict), inputs named by content


@dataclass(frozen=True)
class Pins(_Record):
    """What fixed the numerics (reprolora.core.pins.describe())."""

    profile: str
    threads: int
    machine: str
    environment: dict[str, str | None]
    cpu_capability: str
    blas: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Identity(_Record):
    """What fixes the bytes of a job: inputs by content, config, toolchain, pins. A checkpoint must match it."""

    inputs: Inputs
    toolchain: dict[str, str]
    pins: Pins


@dataclass(frozen=True)
class Metrics(_Record):
    """What training measured: the eval loss before and after, and how much it trained."""

    eval_loss_before: float
    eval_loss_after: float
    eval_perplexity_before: float
    eval_perplexity_after: float
    eval_tokens: int
    train_examples: int
    eval_examples: int
    steps: int
    epochs: int
    train_tokens: int
    trainable_parameters: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Probe(_Record):
    prompt: str
    token_ids: list[int]
    text: str
    finish_reason: str
    logits_sha256: str


@dataclass(frozen=True)
class Probes(_Record):
    max_new_tokens: int
    results: list[Probe]


@dataclass(frozen=True)
class Manifest(_Record):
    files: dict[str, FileEntry]  # every other file of the folder; filled in by `write`
    inputs: Inputs
    toolchain: dict[str, str]  # library -> version
    pins: Pins
    metrics: Metrics
    loss_trace: list[float]  # training loss per optimizer step
    loss_trace_sha256: str
    probes: Probes
    extra: dict[str, Any] = field(default_factory=dict)  # top-level keys this version does not know

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "format": FORMAT, **_fields(self)}


@dataclass(frozen=True)
class MergedAdapter(_Record):
    """The adapter a merged folder was folded from."""

    manifest_sha256: str
    files: dict[str, FileEntry]


@dataclass(frozen=True)
class Merge(_Record):
    """How the deltas were folded, and what that changed on the golden probes."""

    method: str
    dtype: str
    probes: int
    probe_tokens_equal: bool
    max_abs_logit_difference: float
    compared_with: str


@dataclass(frozen=True)
class MergedManifest(_Record):
    """The manifest.json of a folder written by `reprolora merge`."""

    files: dict[str, FileEntry]  # every other file of the folder; filled in by `write`
    adapter: MergedAdapter
    base_model: BaseModel
    merge: Merge
    pins: Pins  # the pins the merge ran under
    toolchain: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "format": MERGED_FORMAT, "kind": MERGED_KIND, **_fields(self)}


def _get(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise _Invalid(f"{where}.{key} is missing")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Invalid(f"{where}.{key} must be {names}, got {type(value).__name__}")
    return value


_hints = functools.cache(get_type_hints)


def _read(record: type, raw: Any, where: str, reserved: tuple[str, ...] = ()) -> Any:
    """`record` from the dict `raw`, every field checked against its type hint; `where` names `raw` in errors.
    Keys that are neither fields nor `reserved` go into `extra`, where the record has one."""
    hints = _hints(record)
    values = {f.name: _field(hints[f.name], raw, f.name, where) for f in fields(record) if f.name != "extra"}
    if "extra" in hints:
        values["extra"] = {key: value for key, value in raw.items() if key not in values and key not in reserved}
    return record(**values)


def _field(hint: Any, obj: Any, key: str, where: str) -> Any:
    """obj[key], checked to be a `hint`; a record, or a dict or list of records, read as one."""
    inner = key if where == "manifest" else f"{where}.{key}"
    if is_dataclass(hint):
        return _read(hint, _get(obj, key, dict, where), inner)
    origin = get_origin(hint)
    if origin not in (dict, list):
        return _get(obj, key, hint, where)
    value = _get(obj, key, origin, where)
    item = get_args(hint)[-1]
    if not is_dataclass(item):
        return value
    if origin is dict:
        return {name: _read(item, entry, f"{inner}[{name!r}]") for name, entry in value.items()}
    return [_read(item, entry, f"{inner}[{number}]") for number, entry in enumerate(value)]


def pins_from_dict(raw: dict[str, Any]) -> Pins:
    """Pins from reprolora.core.pins.describe()'s dict."""
    try:
        return _read(Pins, raw, "pins")
    except _Invalid as e:
        raise ReproloraError(f"pins: {e}") from None


def _load(path: Path, missing: str) -> Any:
    """The JSON in the manifest `path`; a manifest that is not there or not JSON is one line naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReproloraError(f"{path}: no manifest; {missing}") from None
    except ValueError as e:  # UnicodeDecodeError included
        raise ReproloraError(f"{path}: manifest is not valid JSON: {e}") from None
    except OSError as e:
        raise ReproloraError(f"{path}: can't read manifest: {e}") from None


def read(folder: Path) -> Manifest:
    """FOLDER/manifest.json, checked for shape (not for hashes: that is reprolora.core.adapter.verify)."""
    folder = Path(folder)
    path = folder / FILENAME
    if not folder.is_dir():
        raise ReproloraError(f"{folder}: adapter folder not found")
    raw = _load(path, "not a reprolora adapter folder")
    try:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise _Invalid(f"format is {found!r}")
        return _read(Manifest, raw, "manifest", reserved=("format",))
    except _Invalid as e:
        raise ReproloraError(f"{path}: not a valid {FORMAT} manifest: {e}") from None


def read_merged(folder: Path) -> MergedManifest:
    """A merged folder's manifest.json, checked for shape (its hashes: reprolora.export.merge.read_manifest)."""
    path = Path(folder) / FILENAME
    raw = _load(path, "not a folder written by `reprolora merge`")
    if not isinstance(raw, dict) or raw.get("format") != MERGED_FORMAT:
        raise ReproloraError(
            f"{folder}: not a merged model folder (manifest format is not {MERGED_FORMAT}); "
            "run `reprolora merge ADAPTER -o DIR` first"
        )
    try:
        return _read(MergedManifest, raw, "manifest", reserved=("format", "kind"))
    except _Invalid as e:
        raise ReproloraError(f"{path}: not a valid {MERGED_FORMAT} manifest: {e}") from None


def folder_files(folder: Path, leave_out: tuple[str, ...] = ()) -> dict[str, FileEntry]:
    """The sha256 and size of every file in FOLDER but its manifest and `leave_out`, by name in sorted order."""
    return {
        child.name: FileEntry(**file_entry(child))
        for child in sorted(folder.iterdir())
        if child.name != FILENAME and child.name not in leave_out
    }


def encode(record: Manifest | MergedManifest) -> bytes:
    """The bytes of manifest.json for `record`."""
    return canonical_json(record.to_dict())


AnyManifest = TypeVar("AnyManifest", Manifest, MergedManifest)


def write(folder: Path, record: AnyManifest) -> AnyManifest:
    """Write FOLDER/manifest.json with `files` set to the sha256 and size of every other file in FOLDER."""
    complete = replace(record, files=folder_files(folder))
    write_file(folder / FILENAME, encode(complete))
    return complete

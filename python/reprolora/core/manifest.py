"""manifest.json, the one record of an adapter folder: the only module that spells its keys.

Training builds a `Manifest` and `write`s it; verify, infer, serve, diff, report and the benchmarks `read` it
once and use its fields. The JSON keeps the shape it has always had (format "reprolora-manifest/1"), so
adapters written before this module read the same and rebuilds keep their bytes. Keys this version doesn't know
are kept in `extra` and written back unchanged, so a newer writer's fields survive a round trip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reprolora.core.canonical import canonical_json, file_entry, write_file
from reprolora.core.errors import ReproloraError

FILENAME = "manifest.json"
FORMAT = "reprolora-manifest/1"


class _Invalid(Exception):
    """A field is missing or of the wrong type; `read` turns it into one line naming the file and the key."""


def _get(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise _Invalid(f"{where}.{key} is missing")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Invalid(f"{where}.{key} must be {names}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class BaseModel:
    name: str
    files: dict[str, str]  # file name -> sha256

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "files": dict(self.files)}


@dataclass(frozen=True)
class Dataset:
    name: str
    sha256: str
    examples: int
    train_indices: list[int]
    eval_indices: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "examples": self.examples,
            "train_indices": list(self.train_indices),
            "eval_indices": list(self.eval_indices),
        }


@dataclass(frozen=True)
class Inputs:
    base_model: BaseModel
    dataset: Dataset
    config: dict[str, Any]  # the resolved job config (reprolora.core.config.Config.to_dict), inputs named by content

    def to_dict(self) -> dict[str, Any]:
        return {"base_model": self.base_model.to_dict(), "dataset": self.dataset.to_dict(), "config": self.config}


@dataclass(frozen=True)
class Pins:
    """What fixed the numerics (reprolora.core.pins.describe())."""

    profile: str
    threads: int
    machine: str
    environment: dict[str, str | None]
    cpu_capability: str
    blas: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "profile": self.profile,
            "threads": self.threads,
            "machine": self.machine,
            "environment": dict(self.environment),
            "cpu_capability": self.cpu_capability,
            "blas": self.blas,
        }


@dataclass(frozen=True)
class Identity:
    """What fixes the bytes of a job: inputs by content, config, toolchain, pins. A checkpoint must match it."""

    inputs: Inputs
    toolchain: dict[str, str]
    pins: Pins

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs.to_dict(), "toolchain": dict(self.toolchain), "pins": self.pins.to_dict()}


@dataclass(frozen=True)
class Probe:
    prompt: str
    token_ids: list[int]
    text: str
    finish_reason: str
    logits_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "token_ids": list(self.token_ids),
            "text": self.text,
            "finish_reason": self.finish_reason,
            "logits_sha256": self.logits_sha256,
        }


@dataclass(frozen=True)
class Probes:
    max_new_tokens: int
    results: list[Probe]

    def to_dict(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "results": [p.to_dict() for p in self.results]}


@dataclass(frozen=True)
class Manifest:
    files: dict[str, FileEntry]  # every other file of the folder; filled in by `write`
    inputs: Inputs
    toolchain: dict[str, str]  # library -> version
    pins: Pins
    metrics: dict[str, Any]  # eval_loss_before/after, steps, train_tokens, ...
    loss_trace: list[float]  # training loss per optimizer step
    loss_trace_sha256: str
    probes: Probes
    extra: dict[str, Any] = field(default_factory=dict)  # top-level keys this version does not know

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "format": FORMAT,
            "files": {name: e.to_dict() for name, e in self.files.items()},
            "inputs": self.inputs.to_dict(),
            "toolchain": dict(self.toolchain),
            "pins": self.pins.to_dict(),
            "metrics": dict(self.metrics),
            "loss_trace": list(self.loss_trace),
            "loss_trace_sha256": self.loss_trace_sha256,
            "probes": self.probes.to_dict(),
        }


_TOP_KEYS = ("format", "files", "inputs", "toolchain", "pins", "metrics", "loss_trace", "loss_trace_sha256", "probes")
_PIN_KEYS = ("profile", "threads", "machine", "environment", "cpu_capability", "blas")


def pins_from_dict(raw: dict[str, Any]) -> Pins:
    """Pins from reprolora.core.pins.describe()'s dict."""
    try:
        return _pins(raw)
    except _Invalid as e:
        raise ReproloraError(f"pins: {e}") from None


def _pins(pins: Any) -> Pins:
    return Pins(
        _get(pins, "profile", str, "pins"),
        _get(pins, "threads", int, "pins"),
        _get(pins, "machine", str, "pins"),
        _get(pins, "environment", dict, "pins"),
        _get(pins, "cpu_capability", str, "pins"),
        _get(pins, "blas", str, "pins"),
        {k: v for k, v in pins.items() if k not in _PIN_KEYS},
    )


def _from_dict(raw: Any) -> Manifest:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise _Invalid(f"format is {found!r}")
    files = {}
    for name, entry in _get(raw, "files", dict, "manifest").items():
        where = f"files[{name!r}]"
        files[name] = FileEntry(_get(entry, "sha256", str, where), _get(entry, "size", int, where))
    inputs = _get(raw, "inputs", dict, "manifest")
    base = _get(inputs, "base_model", dict, "inputs")
    data = _get(inputs, "dataset", dict, "inputs")
    pins = _get(raw, "pins", dict, "manifest")
    probes = _get(raw, "probes", dict, "manifest")
    results = []
    for number, probe in enumerate(_get(probes, "results", list, "probes")):
        where = f"probes.results[{number}]"
        results.append(
            Probe(
                _get(probe, "prompt", str, where),
                _get(probe, "token_ids", list, where),
                _get(probe, "text", str, where),
                _get(probe, "finish_reason", str, where),
                _get(probe, "logits_sha256", str, where),
            )
        )
    return Manifest(
        files=files,
        inputs=Inputs(
            base_model=BaseModel(
                _get(base, "name", str, "inputs.base_model"), _get(base, "files", dict, "inputs.base_model")
            ),
            dataset=Dataset(
                _get(data, "name", str, "inputs.dataset"),
                _get(data, "sha256", str, "inputs.dataset"),
                _get(data, "examples", int, "inputs.dataset"),
                _get(data, "train_indices", list, "inputs.dataset"),
                _get(data, "eval_indices", list, "inputs.dataset"),
            ),
            config=_get(inputs, "config", dict, "inputs"),
        ),
        toolchain=_get(raw, "toolchain", dict, "manifest"),
        pins=_pins(pins),
        metrics=_get(raw, "metrics", dict, "manifest"),
        loss_trace=_get(raw, "loss_trace", list, "manifest"),
        loss_trace_sha256=_get(raw, "loss_trace_sha256", str, "manifest"),
        probes=Probes(_get(probes, "max_new_tokens", int, "probes"), results),
        extra={k: v for k, v in raw.items() if k not in _TOP_KEYS},
    )


def read(folder: Path) -> Manifest:
    """FOLDER/manifest.json, checked for shape (not for hashes: that is reprolora.core.adapter.verify)."""
    folder = Path(folder)
    path = folder / FILENAME
    if not folder.is_dir():
        raise ReproloraError(f"{folder}: adapter folder not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReproloraError(f"{path}: no manifest; not a reprolora adapter folder") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ReproloraError(f"{path}: manifest is not valid JSON: {e}") from None
    try:
        return _from_dict(raw)
    except _Invalid as e:
        raise ReproloraError(f"{path}: not a valid {FORMAT} manifest: {e}") from None


def write(folder: Path, manifest: Manifest) -> Manifest:
    """Write FOLDER/manifest.json with `files` set to the sha256 and size of every other file in FOLDER."""
    files = {child.name: FileEntry(**file_entry(child)) for child in sorted(folder.iterdir()) if child.name != FILENAME}
    complete = Manifest(
        files,
        manifest.inputs,
        manifest.toolchain,
        manifest.pins,
        manifest.metrics,
        manifest.loss_trace,
        manifest.loss_trace_sha256,
        manifest.probes,
        manifest.extra,
    )
    write_file(folder / FILENAME, canonical_json(complete.to_dict()))
    return complete

"""`reprolora diff A B`: where two adapter folders differ, by how much, and the most likely cause.

Reads both manifests (reprolora.core.manifest) and compares the tensors of every safetensors file both folders hold
(reprolora.audit.tensor_diff), so a diff needs no torch and no pins.
The verdict ranks the manifest's differences: a different base model or dataset first, then the job's config,
then the pins the job chose (profile, threads), then the toolchain, then the machine (CPU capability, BLAS):
the earlier a difference sits in that order, the more surely it alone changes every bit after it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reprolora.audit import card
from reprolora.audit.tensor_diff import TensorDiff, compare_tensors
from reprolora.core import manifest
from reprolora.core.canonical import sha256_file

# Config keys that are the job's pins rather than its recipe; they are reported under "pins".
_PIN_CONFIG_KEYS = ("profile", "threads")
# Friendlier names for the config keys a verdict most often names.
_CAUSE_NAMES = {
    "seed": "another seed",
    "train.learning_rate": "another learning rate",
    "train.epochs": "another epoch count",
    "train.max_steps": "another step count",
    "train.batch_size": "another batch size",
    "lora.r": "another LoRA rank",
    "lora.target_modules": "other LoRA target modules",
}
GROUPS = ("inputs", "config", "toolchain", "pins", "metrics")


@dataclass(frozen=True)
class FileDiff:
    name: str
    status: str  # "identical", "differs", "only in A", "only in B"


@dataclass(frozen=True)
class Change:
    group: str  # one of GROUPS
    key: str  # dotted path inside the group, e.g. "train.learning_rate"
    a: Any
    b: Any


@dataclass
class Diff:
    a: str
    b: str
    identical: bool
    verdict: str
    files: list[FileDiff] = field(default_factory=list)
    tensors: list[TensorDiff] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    loss_divergence: dict[str, Any] | None = None  # first step where the loss traces differ
    probes: list[dict[str, Any]] = field(default_factory=list)  # the probes whose answers differ

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- manifests --------------------------------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b.c": leaf}; lists stay whole (a list is one value: an order, a trace, a set of names)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key in value:
            out.update(flatten(value[key], f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _changes(group: str, a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    fa, fb = flatten(a), flatten(b)
    missing = object()
    return [
        Change(group, key, fa.get(key), fb.get(key))
        for key in sorted(set(fa) | set(fb))
        if fa.get(key, missing) != fb.get(key, missing)
    ]


def manifest_changes(ma: manifest.Manifest, mb: manifest.Manifest) -> list[Change]:
    """The manifests' differences grouped as inputs / config / toolchain / pins / metrics."""
    config_a = {k: v for k, v in ma.inputs.config.items() if k not in _PIN_CONFIG_KEYS}
    config_b = {k: v for k, v in mb.inputs.config.items() if k not in _PIN_CONFIG_KEYS}
    inputs_a = {"base_model": ma.inputs.base_model.to_dict(), "dataset": ma.inputs.dataset.to_dict()}
    inputs_b = {"base_model": mb.inputs.base_model.to_dict(), "dataset": mb.inputs.dataset.to_dict()}
    metrics_a = {**ma.metrics.to_dict(), "loss_trace_sha256": ma.loss_trace_sha256}
    metrics_b = {**mb.metrics.to_dict(), "loss_trace_sha256": mb.loss_trace_sha256}
    return (
        _changes("inputs", inputs_a, inputs_b)
        + _changes("config", config_a, config_b)
        + _changes("toolchain", ma.toolchain, mb.toolchain)
        + _changes("pins", ma.pins.to_dict(), mb.pins.to_dict())
        + _changes("metrics", metrics_a, metrics_b)
    )


def loss_divergence(a: list[float], b: list[float]) -> dict[str, Any] | None:
    """The first optimizer step whose training loss differs (bit for bit), or None when the traces are equal."""
    for step, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return {"step": step, "a": x, "b": y}
    if len(a) != len(b):
        step = min(len(a), len(b))
        return {"step": step, "a": a[step] if step < len(a) else None, "b": b[step] if step < len(b) else None}
    return None


def probe_differences(ma: manifest.Manifest, mb: manifest.Manifest) -> list[dict[str, Any]]:
    """For each probe whose answer differs: the first token index where the two answers part."""
    out = []
    by_prompt = {p.prompt: p for p in mb.probes.results}
    for number, pa in enumerate(ma.probes.results, start=1):
        pb = by_prompt.get(pa.prompt)
        if pb is None:
            out.append({"probe": number, "prompt": pa.prompt, "index": None, "detail": "prompt only in A"})
            continue
        if pa.token_ids != pb.token_ids:
            index = next(
                (i for i, (x, y) in enumerate(zip(pa.token_ids, pb.token_ids, strict=False)) if x != y),
                min(len(pa.token_ids), len(pb.token_ids)),
            )
            out.append(
                {
                    "probe": number,
                    "prompt": pa.prompt,
                    "index": index,
                    "a": pa.token_ids[index] if index < len(pa.token_ids) else None,
                    "b": pb.token_ids[index] if index < len(pb.token_ids) else None,
                    "detail": f"first differing token at index {index}",
                }
            )
        elif pa.logits_sha256 != pb.logits_sha256:
            out.append(
                {
                    "probe": number,
                    "prompt": pa.prompt,
                    "index": None,
                    "detail": f"same {len(pa.token_ids)} tokens, other logits",
                }
            )
    known = {p.prompt for p in ma.probes.results}
    out += [
        {"probe": None, "prompt": p.prompt, "index": None, "detail": "prompt only in B"}
        for p in mb.probes.results
        if p.prompt not in known
    ]
    return out


def shorten(value: Any, width: int = 48) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def verdict(changes: list[Change], identical: bool) -> str:
    """One line naming the most likely cause, from the ranked manifest differences."""
    if identical:
        return "identical: every file has the same bytes"
    by_group: dict[str, list[Change]] = {}
    for change in changes:
        by_group.setdefault(change.group, []).append(change)
    keys = {group: [c.key for c in items] for group, items in by_group.items()}

    identity = [
        k for k in keys.get("inputs", []) if k.startswith("base_model.") or k in ("dataset.sha256", "dataset.name")
    ]
    if any(k.startswith("base_model.") for k in identity):
        inputs = ", ".join(k for k in identity if k.startswith("base_model."))
        return f"different: another base model (inputs: {inputs[:80]})"
    if "dataset.sha256" in identity:
        return "different: another dataset (inputs: dataset.sha256)"
    if keys.get("config"):
        named = [_CAUSE_NAMES[k] for k in keys["config"] if k in _CAUSE_NAMES]
        cause = named[0] if named else "another config"
        return f"different: {cause} (config: {', '.join(keys['config'])})"
    job_pins = [k for k in keys.get("pins", []) if k in _PIN_CONFIG_KEYS]
    if job_pins:
        what = {"threads": "other thread count", "profile": "other determinism profile"}[job_pins[0]]
        change = next(c for c in by_group["pins"] if c.key == job_pins[0])
        # A profile is a set of machine pins: name the ISA it moved torch to, the likeliest source of other bits.
        isa = (
            next((c for c in by_group["pins"] if c.key == "cpu_capability"), None) if job_pins[0] == "profile" else None
        )
        with_isa = f", ISA pin cpu_capability {isa.a} -> {isa.b}" if isa else ""
        return f"different: same inputs and config, {what} (pins: {job_pins[0]} {change.a} -> {change.b}{with_isa})"
    if keys.get("toolchain"):
        names = keys["toolchain"]
        lead = "torch" if "torch" in names else names[0]
        change = next(c for c in by_group["toolchain"] if c.key == lead)
        return f"different: another {lead} (toolchain: {lead} {change.a} -> {change.b}; same inputs and config)"
    machine = [
        k for k in keys.get("pins", []) if k in ("cpu_capability", "blas", "machine") or k.startswith("environment.")
    ]
    if machine:
        key = "cpu_capability" if "cpu_capability" in machine else machine[0]
        change = next(c for c in by_group["pins"] if c.key == key)
        what = {"cpu_capability": "other ISA pin", "blas": "other BLAS", "machine": "other CPU architecture"}.get(
            key, "other pinned environment"
        )
        return f"different: same inputs, config and toolchain, {what} (pins: {key} {change.a} -> {change.b})"
    if keys.get("inputs"):
        return f"different: other inputs (inputs: {', '.join(keys['inputs'])})"
    return (
        "different: same inputs, config, toolchain and pins, yet other bytes: a source of nondeterminism the "
        "pins do not cover (please report it)"
    )


def diff(a: Path, b: Path) -> Diff:
    """Compare adapter folders `a` and `b` (ReproloraError when either is not one)."""
    a, b = Path(a), Path(b)
    ma, mb = manifest.read(a), manifest.read(b)
    names_a = {p.name for p in a.iterdir() if p.is_file()}
    names_b = {p.name for p in b.iterdir() if p.is_file()}
    files, tensors = [], []
    for name in sorted(names_a | names_b):
        if name not in names_b:
            files.append(FileDiff(name, "only in A"))
        elif name not in names_a:
            files.append(FileDiff(name, "only in B"))
        else:
            same = sha256_file(a / name) == sha256_file(b / name)
            files.append(FileDiff(name, "identical" if same else "differs"))
            if name.endswith(".safetensors"):
                tensors += compare_tensors(name, a / name, b / name)
    identical = all(f.status == "identical" for f in files)
    changes = manifest_changes(ma, mb)
    line = verdict(changes, identical)
    # The model card is written from the manifest: it differs whenever the manifest does.
    if not identical and all(f.status == "identical" for f in files if f.name not in (manifest.FILENAME, card.CARD)):
        if changes:
            line = line.replace(
                "different: ", "different (the adapter files are identical, the manifest and card are not): ", 1
            )
        else:  # nothing the manifest records differs but the card's own hash: its text came from other code
            line = (
                f"different: only the model card ({card.CARD}) and its hash in the manifest; same weights, inputs, "
                "config, toolchain and pins: another revision of reprolora wrote the card "
                "(the version may read the same)"
            )
    return Diff(
        str(a),
        str(b),
        identical,
        line,
        files,
        tensors,
        changes,
        loss_divergence(ma.loss_trace, mb.loss_trace),
        probe_differences(ma, mb),
    )


def render(d: Diff) -> str:
    """The diff as text for a terminal."""
    lines = [f"A: {d.a}", f"B: {d.b}", "files:"]
    lines += [f"  {f.name:<32} {f.status}" for f in d.files]
    changed = [t for t in d.tensors if t.status != "identical"]
    if d.tensors:
        largest = max((t for t in changed if t.max_abs is not None), key=lambda t: t.max_abs, default=None)
        lines.append(
            f"tensors: {len(changed)} of {len(d.tensors)} differ"
            + (f"; the largest |a-b| is {largest.max_abs:.3g}, in {largest.name}" if largest else "")
        )
    if changed:
        width = max(len(t.name) for t in changed)
        lines.append(f"  {'name':<{width}} {'differing':>12} {'max |a-b|':>10} {'max rel':>10} {'max ULP':>10}")
        for t in changed:
            if t.status == "differs":
                fmt = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
                lines.append(
                    f"  {t.name:<{width}} {f'{t.differing}/{t.elements}':>12} {fmt(t.max_abs):>10} "
                    f"{fmt(t.max_rel):>10} {'-' if t.max_ulp is None else t.max_ulp:>10}"
                    + (f"  {t.detail}" if t.detail else "")
                )
            else:
                lines.append(f"  {t.name:<{width}} {t.status}" + (f": {t.detail}" if t.detail else ""))
    for group in GROUPS:
        items = [c for c in d.changes if c.group == group]
        if items:
            lines.append(f"{group}:")
            lines += [f"  {c.key}: {shorten(c.a)} -> {shorten(c.b)}" for c in items]
    if d.loss_divergence:
        ld = d.loss_divergence
        lines.append(f"loss: the traces first differ at step {ld['step']}: {ld['a']!r} vs {ld['b']!r}")
    elif not d.identical:
        lines.append("loss: the traces are identical")
    for p in d.probes:
        where = f"probe {p['probe']}" if p["probe"] else "probe"
        tokens = f" ({p['a']} vs {p['b']})" if p.get("index") is not None else ""
        lines.append(f"{where} {p['prompt']!r}: {p['detail']}{tokens}")
    lines.append(f"verdict: {d.verdict}")
    return "\n".join(lines)

"""The adapter folder: canonical adapter files that PEFT loads, and a manifest that hashes everything.

adapter_model.safetensors: tensor names sorted (safetensors does it), one metadata key.
adapter_config.json:       PEFT's config as canonical JSON, lists sorted, base model as a stable identifier.
manifest.json:             sha256 and size of every other file, the inputs, the toolchain, the pins, metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reprolora.core import manifest
from reprolora.core.canonical import canonical_json, sha256_bytes, sha256_file, write_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _sorted_lists(value: Any) -> Any:
    """Sort every list of plain values (PEFT writes sets, such as target_modules, in hash order)."""
    if isinstance(value, dict):
        return {key: _sorted_lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = [_sorted_lists(item) for item in value]
        if all(isinstance(item, str) for item in items) or all(isinstance(item, (int, float)) for item in items):
            return sorted(items)
        return items
    return value


def write_adapter(peft_model: Any, folder: Path, base_model_name: str) -> None:
    """The two files `PeftModel.from_pretrained(base, folder)` reads, in canonical bytes."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(peft_model)
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state.items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    config = peft_model.peft_config["default"].to_dict()
    config["base_model_name_or_path"] = base_model_name
    write_file(
        folder / ADAPTER_CONFIG, canonical_json(_sorted_lists(json.loads(json.dumps(config, default=_jsonable))))
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):  # enums such as TaskType
        return value.value
    raise TypeError(f"can't write {type(value).__name__} to adapter_config.json")


def verify(folder: Path) -> list[str]:
    """Every problem with `folder` against its manifest (empty when every hash holds)."""
    return check_files(folder, manifest.read(folder))


def check_files(folder: Path, recorded: manifest.Manifest) -> list[str]:
    """Every file of `folder` that is missing, differs from `recorded` or is not in it."""
    expected = recorded.files
    present = {child.name for child in folder.iterdir()} - {manifest.FILENAME}
    problems = []
    for name in sorted(expected):
        path = folder / name
        if name not in present:
            problems.append(f"{name}: missing")
        elif not path.is_file():
            problems.append(f"{name}: not a regular file")
        else:
            actual = sha256_file(path)
            if path.stat().st_size != expected[name].size or actual != expected[name].sha256:
                problems.append(f"{name}: differs (sha256 {actual}, expected {expected[name].sha256})")
    problems += [f"{name}: extra file not in the manifest" for name in sorted(present - set(expected))]
    return problems + _derived_hash_problems(recorded)


def _derived_hash_problems(recorded: manifest.Manifest) -> list[str]:
    """Hashes the manifest states over its own content, recomputed: the loss trace's, and the name of an unnamed
    local base model (a hash of its files' hashes). The base model's files are checked where the folder is at
    hand (`infer`); the probes' logits by replaying them (`infer --check`)."""
    from reprolora.models import base_model

    problems = []
    actual = sha256_bytes(canonical_json(recorded.loss_trace))
    if actual != recorded.loss_trace_sha256:
        problems.append(
            f"{manifest.FILENAME}: loss_trace_sha256 differs from the loss trace it states (sha256 {actual})"
        )
    name, files = recorded.inputs.base_model.name, recorded.inputs.base_model.files
    if name.startswith(base_model.LOCAL_NAME_PREFIX) and name != base_model.local_name(files):
        problems.append(
            f"{manifest.FILENAME}: base model name {name!r} is not the hash of its files' hashes "
            f"({base_model.local_name(files)!r})"
        )
    return problems

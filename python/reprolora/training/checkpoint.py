"""Checkpoints: the whole training state in safetensors and canonical JSON (no pickle), published atomically.

`reprolora train -o out/adapter --checkpoint-every N` writes, after every N-th step, beside the output:

    out/adapter.checkpoints/step-000010/
        state.safetensors   the adapter's weights (param/NAME), AdamW's moments (exp_avg/NAME, exp_avg_sq/NAME)
                            and torch's default generator (rng/torch)
        state.json          the step, AdamW's step count, the loss trace, the eval loss before training, the
                            job's identity (inputs by hash, config, toolchain, pins) and the sha256 of
                            state.safetensors

Each folder is written under a temporary name, fsynced and renamed, so a folder named step-* is complete.
`--resume` loads the newest one after checking that it belongs to this very job. Dropout's generator and the data
order are functions of (seed, step), so the step is all of their state (see train.TrainState); torch's default
generator is saved anyway, so that any other draw from it resumes exactly too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from reprolora.core.canonical import canonical_json, publish_dir, sha256_bytes, sha256_file, write_file
from reprolora.core.errors import ReproloraError

FORMAT = "reprolora-checkpoint/1"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def folder_for(out: Path) -> Path:
    """Where the checkpoints of the job publishing `out` go: beside it, `<out>.checkpoints/`."""
    return out.parent / f"{out.name}.checkpoints"


def save(folder: Path, identity: dict[str, Any], state: Any) -> Path:
    """Publish `state` as `folder/step-NNNNNN/`."""
    from safetensors.torch import save

    tensors = {"rng/torch": torch.get_rng_state()}
    for (name, param), exp_avg, exp_avg_sq in zip(
        state.params.items(), state.optimizer.exp_avg, state.optimizer.exp_avg_sq, strict=True
    ):
        tensors[f"param/{name}"] = param.detach().clone()
        tensors[f"exp_avg/{name}"] = exp_avg.clone()
        tensors[f"exp_avg_sq/{name}"] = exp_avg_sq.clone()
    data = save(tensors, metadata={"format": "pt"})
    body = {
        "format": FORMAT,
        "step": state.step,
        "optimizer_steps": state.optimizer.steps,
        "loss_trace": state.loss_trace,
        "eval_before": state.eval_before,
        "job": identity,
        "files": {STATE_TENSORS: {"sha256": sha256_bytes(data), "size": len(data)}},
    }
    target = folder / f"step-{state.step:06d}"
    with publish_dir(target) as staging:
        write_file(staging / STATE_TENSORS, data)
        write_file(staging / STATE_JSON, canonical_json(body))
    return target


def newest(folder: Path) -> Path | None:
    """The checkpoint of the latest step in `folder`, or None. Leftovers of a write that was killed are removed."""
    if not folder.is_dir():
        return None
    for leftover in folder.glob(".step-*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    steps = [(int(p.name.removeprefix("step-")), p) for p in folder.glob("step-*") if p.name[5:].isdigit()]
    return max(steps)[1] if steps else None


def differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """The dotted paths where two JSON values differ, each with both values when they are short."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        found = []
        for key in sorted(set(ours) | set(theirs)):
            found += differences(ours.get(key), theirs.get(key), f"{path}.{key}" if path else key)
        return found
    if ours == theirs:
        return []
    shown = (json.dumps(ours), json.dumps(theirs))
    if max(len(s) for s in shown) <= 80:
        return [f"{path} ({shown[0]} here, {shown[1]} in the checkpoint)"]
    return [path]


def load(checkpoint: Path, identity: dict[str, Any], state: Any) -> None:
    """Restore `state` from `checkpoint`, refusing a checkpoint that is damaged or belongs to another job."""
    from safetensors.torch import load_file

    try:
        body = json.loads((checkpoint / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReproloraError(f"{checkpoint}: can't read {STATE_JSON}: {e}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ReproloraError(f"{checkpoint}: not a {FORMAT} checkpoint")
    differ = differences(identity, body.get("job"))
    if differ:
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise ReproloraError(
            f"{checkpoint}: checkpoint of another job, refusing to resume: {'; '.join(differ[:3])}{more} differ"
        )
    tensors_path = checkpoint / STATE_TENSORS
    expected = body["files"][STATE_TENSORS]["sha256"]
    if not tensors_path.is_file() or sha256_file(tensors_path) != expected:
        raise ReproloraError(f"{tensors_path}: missing or damaged (sha256 is not {expected})")
    tensors = load_file(str(tensors_path))
    wanted = {"rng/torch"} | {f"{kind}/{name}" for name in state.params for kind in ("param", "exp_avg", "exp_avg_sq")}
    if set(tensors) != wanted:
        raise ReproloraError(f"{tensors_path}: holds other tensors than this job's adapter and optimizer")
    with torch.no_grad():
        for (name, param), exp_avg, exp_avg_sq in zip(
            state.params.items(), state.optimizer.exp_avg, state.optimizer.exp_avg_sq, strict=True
        ):
            param.copy_(tensors[f"param/{name}"])
            exp_avg.copy_(tensors[f"exp_avg/{name}"])
            exp_avg_sq.copy_(tensors[f"exp_avg_sq/{name}"])
    torch.set_rng_state(tensors["rng/torch"])
    state.step = body["step"]
    state.optimizer.steps = body["optimizer_steps"]
    state.loss_trace = body["loss_trace"]
    state.eval_before = body["eval_before"]

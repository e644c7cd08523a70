"""Inference from a published adapter folder: hash-checked, pinned as at training, greedy, provable by its probes.

`load` refuses any file whose sha256 differs from the adapter's manifest (adapter and base model), applies the
determinism pins the manifest records, and only then imports torch. The model is loaded through
`peft.PeftModel.from_pretrained`, the way any PEFT user would load the folder, and decoded with the same loop that
wrote the golden probes at training (reprolora.decoding.generate.greedy), so `check_probes` can demand identical bits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprolora.core import adapter, manifest, pins
from reprolora.core.canonical import sha256_file
from reprolora.core.errors import ReproloraError
from reprolora.models import base_model


@dataclass(frozen=True)
class Model:
    """A loaded adapter on its base model, ready for greedy decoding. Not thread-safe: serialise calls."""

    folder: Path
    manifest: manifest.Manifest
    manifest_sha256: str
    base_folder: Path
    causal_lm: Any  # the base model with the LoRA layers injected, as it was at training
    tokenizer: Any
    load_seconds: float

    @property
    def id(self) -> str:
        """A name that follows the content, not the path: the same adapter has the same id everywhere."""
        return f"reprolora-{self.manifest_sha256[:12]}"

    @property
    def context_length(self) -> int:
        return int(getattr(self.causal_lm.config, "max_position_embeddings", 2048))

    @functools.cached_property
    def engine(self) -> Any:
        """The decoding engine over causal_lm that gives every answer (reprolora.decoding.generate.engine_for),
        made at the first and kept: it holds the rotary table and packed weights it builds."""
        from reprolora.decoding.generate import engine_for

        return engine_for(self.causal_lm, self.tokenizer)


@dataclass(frozen=True)
class ProbeCheck:
    prompt: str
    ok: bool
    message: str


def base_model_folder(recorded: manifest.Manifest, base_dir: Path | None, where: str) -> Path:
    """The base model folder, checked file by file against the hashes the manifest recorded at training."""
    expected = recorded.inputs.base_model.files
    name = recorded.inputs.base_model.name
    if not expected:
        raise ReproloraError(f"{where}: manifest records no base model files")
    if base_dir is None:
        # The default model can be found (or rebuilt) without the user naming it; any other one can't.
        if name != base_model.DEFAULT_NAME and expected != base_model.CONVERTED_SHA256:
            raise ReproloraError(f"{where}: the adapter was trained on base model {name!r}; pass --base-model DIR")
        base_dir = base_model.prepare_default()
        if expected == base_model.CONVERTED_SHA256:
            return base_dir  # prepare_default has just checked these very hashes: don't read 0.5 GB twice
    elif not base_dir.is_dir():
        raise ReproloraError(f"{base_dir}: base model folder not found")
    base_model.check_folder(base_dir, expected, label=f"{base_dir} (base model {name!r} of {where})")
    return base_dir


def check_inputs(folder: Path, base_dir: Path | None = None) -> tuple[manifest.Manifest, Path]:
    """Every hash of the adapter folder and of its base model holds; returns the manifest and the base folder."""
    recorded = manifest.read(folder)
    problems = adapter.check_files(folder, recorded)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ReproloraError(
            f"{folder}/{problems[0]}{more}; refusing to load an adapter that is not what its manifest says"
        )
    return recorded, base_model_folder(recorded, base_dir, str(folder))


def load(folder: Path, base_dir: Path | None = None) -> Model:
    """Check every hash, apply the adapter's own pins, then load base model + adapter in eval mode."""
    started = time.perf_counter()
    folder = Path(folder)
    recorded, base_folder = check_inputs(folder, base_dir)
    pins.apply(recorded.pins.profile, recorded.pins.threads)  # before torch is imported: the pins act when it loads

    import warnings

    import transformers
    from peft import PeftModel

    from reprolora.models.loading import load_model_and_tokenizer

    transformers.utils.logging.disable_progress_bar()  # stderr is for what the user must read
    # peft 0.21 calls a transformers 5 method that transformers deprecates: noise, not news, for a user.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    base, tokenizer = load_model_and_tokenizer(base_folder)
    peft_model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    peft_model.eval()
    # Keep the model inside the PeftModel (LoRA layers injected): training decoded its probes with that very object.
    return Model(
        folder,
        recorded,
        sha256_file(folder / manifest.FILENAME),
        base_folder,
        peft_model.get_base_model(),
        tokenizer,
        time.perf_counter() - started,
    )


def complete(
    model: Model,
    prompt: str | list[dict[str, str]],
    max_new_tokens: int,
    stop: list[str] | None = None,
    on_token: Any = None,
) -> Any:
    """Greedy completion of `prompt` (one user message, or a conversation; the chat template when the tokenizer has
    one). `on_token(ids)` is called after each generated token, for streaming."""
    from reprolora.decoding.generate import greedy

    return greedy(model.engine, prompt, max_new_tokens, stop, on_token)


def token_ids_sha256(token_ids: list[int]) -> str:
    """sha256 of the ids as compact JSON, e.g. `[1,2,3]`: `jq -cj .token_ids | sha256sum` gives the same."""
    return hashlib.sha256(json.dumps(token_ids, separators=(",", ":")).encode()).hexdigest()


def _describe_token(tokenizer: Any, token_id: int | None) -> str:
    if token_id is None:
        return "end of output"
    return f"{token_id} {tokenizer.decode([token_id])!r}"


def check_architecture(recorded: manifest.Manifest, where: str) -> None:
    """Golden probes replay bit for bit only on the CPU architecture that recorded them: x86_64 and aarch64 run
    other kernels and give other bytes. Say so, rather than let every probe fail as a mismatch. Profile
    `reference` computes every number by its definition (reprolora.numerics): its probes replay anywhere."""
    trained_on = recorded.pins.machine
    if trained_on != pins.machine() and recorded.pins.profile != "reference":
        raise ReproloraError(
            f"{where}: the architecture differs: trained on {trained_on}, this machine is "
            f"{pins.machine()}; golden probes replay only on {trained_on} (`reprolora verify` "
            "checks the files on any machine)"
        )


def check_probes(model: Model) -> list[ProbeCheck]:
    """Replay the golden probes of the manifest; each must give the same token ids and the same logits hash."""
    probes = model.manifest.probes
    if not probes.results:
        raise ReproloraError(f"{model.folder}: manifest has no golden probes to replay")
    check_architecture(model.manifest, str(model.folder))
    results = []
    for number, probe in enumerate(probes.results, start=1):
        prompt = probe.prompt
        got = complete(model, prompt, probes.max_new_tokens)
        expected_ids = probe.token_ids
        label = f"probe {number} {prompt!r}"
        if got.token_ids != expected_ids:
            index = next(
                (i for i, (a, b) in enumerate(zip(expected_ids, got.token_ids, strict=False)) if a != b),
                min(len(expected_ids), len(got.token_ids)),
            )
            want = expected_ids[index] if index < len(expected_ids) else None
            have = got.token_ids[index] if index < len(got.token_ids) else None
            message = (
                f"{label}: first differing token at index {index}: expected {_describe_token(model.tokenizer, want)}, "
                f"got {_describe_token(model.tokenizer, have)}"
            )
            results.append(ProbeCheck(prompt, False, message))
        elif got.logits_sha256 != probe.logits_sha256:
            results.append(
                ProbeCheck(
                    prompt,
                    False,
                    f"{label}: same {len(got.token_ids)} tokens but the logits differ "
                    f"(sha256 {got.logits_sha256}, expected {probe.logits_sha256})",
                )
            )
        else:
            results.append(ProbeCheck(prompt, True, f"{label}: {len(got.token_ids)} tokens and logits identical"))
    return results


def environment_differences(model: Model) -> list[str]:
    """What about this machine differs from the training run's record: the usual reasons probes stop matching."""
    from reprolora.models.loading import toolchain

    notes = []
    recorded = model.manifest.pins.to_dict()
    current = pins.describe()
    for key in ("machine", "cpu_capability", "blas", "blas_version"):
        if recorded.get(key) != current.get(key):
            notes.append(f"{key} is {current.get(key)!r} here, {recorded.get(key)!r} at training")
    trained_with = model.manifest.toolchain
    for name, version in sorted(toolchain().items()):
        if name in trained_with and trained_with[name] != version:
            notes.append(f"{name} is {version} here, {trained_with[name]} at training")
    return notes

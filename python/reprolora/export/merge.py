"""`reprolora merge`: base model + adapter as one Hugging Face model folder that transformers loads with no PEFT.

The LoRA deltas are folded into the base weights by PEFT's own `merge_and_unload` (W + scale * B @ A in float32),
under the adapter's determinism pins, so two merges give the same bytes. Under profile `reference` the fold is
reprolora.models.reference.merge_lora (B @ A correctly rounded, then one float32 multiply and one add) and the
probes' logits come from the reference decoder, so a merged folder has one set of bytes on every machine. The
weights are written as canonical safetensors (sorted names, one metadata key, no tied duplicate), the base model's
other files (config, tokenizer) are copied byte for byte, and a manifest names every file's sha256 and the
adapter's manifest sha256.

A merged model does not compute what the adapter applied on the fly computes: x @ (W + s B A) rounds differently
from x @ W + s (x @ A) @ B. `merge` measures by how much, on the golden probes, and records it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from reprolora.core import manifest as manifest_file
from reprolora.core import pins
from reprolora.core.canonical import file_entry, publish_dir, sha256_file
from reprolora.core.errors import ReproloraError

WEIGHTS = "model.safetensors"


def read_manifest(folder: Path) -> manifest_file.MergedManifest:
    """A merged folder's manifest, after checking every file's sha256 and size against it."""
    recorded = manifest_file.read_merged(folder)
    present = {child.name for child in folder.iterdir()} - {manifest_file.FILENAME}
    for name in sorted(set(recorded.files) | present):
        if (
            name not in recorded.files
            or name not in present
            or manifest_file.FileEntry(**file_entry(folder / name)) != recorded.files[name]
        ):
            raise ReproloraError(f"{folder}/{name}: differs from the merged folder's manifest")
    return recorded


def probe_logits(causal_lm: Any, tokenizer: Any, probes: list[manifest_file.Probe], reference: bool) -> list[Any]:
    """The logits of each probe's prompt followed by its recorded answer, in one forward pass each (by the reference
    decoder when `reference`)."""
    import torch

    from reprolora.data.dataset import prompt_ids
    from reprolora.models.reference import Decoder

    decoder = Decoder(causal_lm) if reference else None
    result = []
    with torch.inference_mode():
        for probe in probes:
            ids = prompt_ids(tokenizer, [{"role": "user", "content": probe.prompt}]) + probe.token_ids
            if decoder is not None:
                result.append(decoder.logits(decoder.hidden(torch.tensor(ids), [len(ids)])))
            else:
                result.append(causal_lm(input_ids=torch.tensor([ids])).logits[0].float())
    return result


def merge(adapter_dir: Path, out: Path, base_dir: Path | None = None) -> manifest_file.Merge:
    """Write the merged model folder `out`; returns how it was merged and what was measured (also recorded in its
    manifest)."""
    from reprolora.decoding import infer

    adapter_dir = Path(adapter_dir)
    recorded, base_folder = infer.check_inputs(adapter_dir, base_dir)
    if out.exists():
        raise ReproloraError(f"{out}: output folder already exists; choose another path or remove it")
    pins.apply(recorded.pins.profile, recorded.pins.threads)  # before torch is imported

    from safetensors.torch import save_file

    from reprolora.models.loading import toolchain

    merged, measured = fold_adapter(adapter_dir, base_folder, recorded)
    state = merged.state_dict()
    if getattr(merged.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as the embedding: safetensors refuses to store it twice
    tensors = {name: tensor.detach().to("cpu").float().contiguous().clone() for name, tensor in state.items()}
    with publish_dir(out) as staging:
        save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
        for child in sorted(base_folder.iterdir()):
            # Everything but the weights (and a shard index, which names the base's weight files) comes as it was.
            if (
                child.is_file()
                and not child.name.startswith(".")
                and not child.name.endswith((".safetensors", ".index.json"))
                and child.name in recorded.inputs.base_model.files
            ):
                shutil.copyfile(child, staging / child.name)
        adapter = manifest_file.MergedAdapter(sha256_file(adapter_dir / manifest_file.FILENAME), recorded.files)
        pinned = manifest_file.pins_from_dict(pins.describe())
        merged_manifest = manifest_file.MergedManifest(
            {}, adapter, recorded.inputs.base_model, measured, pinned, toolchain()
        )
        manifest_file.write(staging, merged_manifest)
    return measured


def fold_adapter(
    adapter_dir: Path, base_folder: Path, recorded: manifest_file.Manifest
) -> tuple[Any, manifest_file.Merge]:
    """The base model with the adapter's deltas folded in, and how far that moves the golden probes' logits from
    the adapter applied on the fly (and whether their greedy tokens stay the same)."""
    from peft import PeftModel

    from reprolora.decoding.generate import engine_for, greedy
    from reprolora.models.loading import load_model_and_tokenizer
    from reprolora.models.reference import merge_lora

    base, tokenizer = load_model_and_tokenizer(base_folder)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    peft_model.eval()
    probes = recorded.probes.results
    reference = recorded.pins.profile == "reference"
    on_the_fly = probe_logits(peft_model.get_base_model(), tokenizer, probes, reference)
    merged = merge_lora(peft_model) if reference else peft_model.merge_and_unload()
    merged.eval()
    folded = probe_logits(merged, tokenizer, probes, reference)
    max_difference = max((float((a - b).abs().max()) for a, b in zip(on_the_fly, folded, strict=True)), default=0.0)
    engine = engine_for(merged, tokenizer)
    same_tokens = all(greedy(engine, p.prompt, recorded.probes.max_new_tokens).token_ids == p.token_ids for p in probes)
    measured = manifest_file.Merge(
        method="reference merge_lora" if reference else "peft merge_and_unload",
        dtype="float32",
        probes=len(probes),
        probe_tokens_equal=same_tokens,
        max_abs_logit_difference=max_difference,
        compared_with="the adapter applied on the fly (PeftModel), prompt + recorded answer of each golden probe",
    )
    return merged, measured

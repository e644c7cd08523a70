"""The model card: README.md in Hugging Face's format, written from the manifest, so its bytes are as reproducible
as the adapter's.

`train` writes it into the folder it publishes (before the manifest, which then records it like every file);
`reprolora card FOLDER` writes it again, for a folder trained before cards existed or after this template changed.
It holds nothing the manifest does not: no dates, paths or host names.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from reprolora.core import adapter
from reprolora.core import manifest as manifest_file
from reprolora.core.canonical import sha256_bytes, write_file
from reprolora.core.errors import ReproloraError
from reprolora.models import base_model

CARD = "README.md"
# The default model's Hugging Face id; its license is the one the card states for adapters trained on it.
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def config_toml(config: dict[str, Any]) -> str:
    """The resolved config of a manifest as TOML that `reprolora train -c` reads back to the same job."""
    lines: list[str] = []
    tables = [(key, value) for key, value in sorted(config.items()) if isinstance(value, dict)]
    for key, value in sorted(config.items()):
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for table, values in tables:
        lines.append(f"\n[{table}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in sorted(values.items())]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string with ASCII escapes is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise ReproloraError(f"can't write {type(value).__name__} into a config file")


def _front_matter(name: str) -> str:
    is_default = name == base_model.DEFAULT_NAME
    hub_id = DEFAULT_HUB_ID if is_default else name if HUB_ID.match(name) else None
    lines = ["---"]
    if hub_id:
        lines.append(f"base_model: {hub_id}")
    else:  # a local model with no hub id: the front matter names it by content, as the manifest does
        lines.append(f"base_model: {json.dumps(name)}")
    lines += [
        "library_name: peft",
        # SmolLM2 is Apache-2.0, as is the built-in dataset; any other base model brings its own terms.
        f"license: {'apache-2.0' if is_default else 'other'}",
        "pipeline_tag: text-generation",
        "tags:",
        *[f"- {tag}" for tag in ["lora", "peft", "reprolora", "reproducible", "text-generation"]],
        "---",
    ]
    return "\n".join(lines)


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def _code(text: str, language: str = "") -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{language}\n{text.rstrip(chr(10))}\n{fence}"


def render(recorded: manifest_file.Manifest, files: dict[str, manifest_file.FileEntry]) -> bytes:
    """The card for the manifest `recorded` (its inputs, metrics, probes, ...) and the adapter `files` it describes."""
    parts = _intro(recorded) + _inputs(recorded) + _results(recorded) + _files(files, recorded.toolchain)
    return ("\n".join(parts + _rebuild(recorded)) + "\n").encode()


def _is_default_base(recorded: manifest_file.Manifest) -> bool:
    return recorded.inputs.base_model.name == base_model.DEFAULT_NAME


def _intro(recorded: manifest_file.Manifest) -> list[str]:
    lora = recorded.inputs.config["lora"]
    modules = lora["target_modules"]  # the resolved module names; a preset name if it was recorded unresolved
    modules_text = modules if isinstance(modules, str) else ", ".join(modules)
    return [
        _front_matter(recorded.inputs.base_model.name),
        "",
        f"# LoRA adapter for {recorded.inputs.base_model.name}",
        "",
        f"A LoRA adapter (r={lora['r']}, alpha={lora['alpha']}, on {modules_text}) trained by "
        f"reprolora {recorded.toolchain['reprolora']} on CPU. Every file of this folder "
        "has its sha256 in `manifest.json`, and retraining from the same inputs with the same toolchain gives the same "
        "bytes: the sections below say what those inputs were and how to check.",
        "",
        "## Use",
        "",
        _code(
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            "base = AutoModelForCausalLM.from_pretrained("
            f'"{DEFAULT_HUB_ID if _is_default_base(recorded) else "BASE_MODEL_DIR"}")\n'
            'model = PeftModel.from_pretrained(base, "ADAPTER_DIR")',
            "python",
        ),
        "",
        "Bit-for-bit answers need the very base-model bytes below (`reprolora infer ADAPTER_DIR --check` replays the "
        "golden probes to prove it).",
        "",
    ]


def _inputs(recorded: manifest_file.Manifest) -> list[str]:
    base, data, pins = recorded.inputs.base_model, recorded.inputs.dataset, recorded.pins
    return [
        "## Training inputs",
        "",
        f"- **Base model**: {base.name}",
        f"- **Dataset**: `{data.name}`, {data.examples} examples ({len(data.train_indices)} train, "
        f"{len(data.eval_indices)} held out for eval), sha256 `{data.sha256}`",
        f"- **Profile**: `{pins.profile}`, {pins.threads} threads, {pins.machine}, CPU capability "
        f"{pins.cpu_capability}, BLAS {pins.blas}",
        "",
        _table([(f"`{n}`", f"`{h}`") for n, h in sorted(base.files.items())], ("base-model file", "sha256")),
        "",
        "Config (`reprolora train -c` reads it back; `path` fields name inputs by file name only):",
        "",
        _code(config_toml(recorded.inputs.config), "toml"),
        "",
    ]


def _results(recorded: manifest_file.Manifest) -> list[str]:
    metrics = recorded.metrics
    parts = [
        "## Results",
        "",
        _table(
            [
                ("eval loss", f"{metrics.eval_loss_before:.4f} → {metrics.eval_loss_after:.4f}"),
                ("eval perplexity", f"{metrics.eval_perplexity_before:.2f} → {metrics.eval_perplexity_after:.2f}"),
                ("eval tokens", str(metrics.eval_tokens)),
                ("steps (epochs)", f"{metrics.steps} ({metrics.epochs})"),
                ("train tokens", str(metrics.train_tokens)),
                ("trainable parameters", f"{metrics.trainable_parameters:,}"),
                ("loss trace sha256", f"`{recorded.loss_trace_sha256}`"),
            ],
            ("measure", "value"),
        ),
        "",
        f"Golden probes (greedy, at most {recorded.probes.max_new_tokens} new tokens):",
        "",
    ]
    for number, probe in enumerate(recorded.probes.results, start=1):
        parts += [
            f"{number}. Prompt: {json.dumps(probe.prompt, ensure_ascii=False)}; {len(probe.token_ids)} tokens, "
            f"finish `{probe.finish_reason}`, logits sha256 `{probe.logits_sha256}`",
            "",
            _code(json.dumps(probe.text, ensure_ascii=True), "json"),
            "",
        ]
    return parts


def _files(files: dict[str, manifest_file.FileEntry], toolchain: dict[str, str]) -> list[str]:
    return [
        "## Files",
        "",
        _table([(f"`{n}`", f"`{e.sha256}` ({e.size} bytes)") for n, e in sorted(files.items())], ("file", "sha256")),
        "",
        "`manifest.json` records these and this card's sha256; an attestation (`reprolora attest`) records every "
        "file's.",
        "",
        "## Toolchain",
        "",
        _table([(name, f"`{version}`") for name, version in sorted(toolchain.items())], ("package", "version")),
        "",
    ]


def _rebuild(recorded: manifest_file.Manifest) -> list[str]:
    dataset_name = recorded.inputs.dataset.name
    default_dataset, default_base = dataset_name == "default.jsonl", _is_default_base(recorded)
    dataset_arg = "" if default_dataset else f" --dataset {dataset_name}"
    base_arg = "" if default_base else " --base-model BASE_MODEL_DIR"
    return [
        "## Verify and rebuild",
        "",
        "Check every hash, then retrain from the recorded inputs and compare every byte (same toolchain and CPU "
        "kind as above; `reprolora attest` writes the attestation, signed with `--key`):",
        "",
        _code(
            "reprolora verify ADAPTER_DIR\n"
            "reprolora attest ADAPTER_DIR -o adapter.intoto.json\n"
            f"reprolora verify ADAPTER_DIR --attestation adapter.intoto.json --rebuild{dataset_arg}{base_arg}\n"
            "reprolora infer ADAPTER_DIR --check" + base_arg,
            "sh",
        ),
        "",
        "Pip route, from a checkout of reprolora " + recorded.toolchain["reprolora"] + " (its "
        "`python/requirements.lock` pins every package by version and sha256, torch's CPU build from "
        "`--extra-index-url https://download.pytorch.org/whl/cpu`; compare `.venv/bin/pip freeze` with the toolchain "
        "above):",
        "",
        _code(
            "python3 -m venv .venv && .venv/bin/pip install --require-hashes -r python/requirements.lock "
            "&& .venv/bin/pip install --no-deps -e python\n"
            f".venv/bin/reprolora train -c config.toml{dataset_arg}{base_arg} -o rebuilt\n"
            "cmp rebuilt/adapter_model.safetensors ADAPTER_DIR/adapter_model.safetensors",
            "sh",
        ),
        "",
        "Nix route (the toolchain pinned by the flake's `flake.lock`; the same command with `--rebuild` builds it "
        "again and fails on any differing byte):",
        "",
        _code(
            "nix build --impure --expr '(builtins.getFlake (toString ./.)).packages.${builtins.currentSystem}.adapter"
            ".override { trainConfig = ./config.toml;"
            + ("" if default_dataset else f" dataset = ./{dataset_name};")
            + ("" if default_base else " baseModel = ./BASE_MODEL_DIR;")
            + " }'",
            "sh",
        ),
        "",
        "`config.toml` is the config above. The pip route and the Nix route give different bytes (different torch "
        "builds); each is reproducible in itself.",
    ]


def write_card(folder: Path, recorded: manifest_file.Manifest) -> None:
    """Write README.md into a folder being published, from its manifest `recorded` and the files already there."""
    write_file(folder / CARD, render(recorded, manifest_file.folder_files(folder, leave_out=(CARD,))))


def rewrite(folder: Path) -> None:
    """Write the card of a published folder again and record it in the manifest.

    Every other file must still match the manifest: a card must never vouch for files that changed.
    """
    recorded = manifest_file.read(folder)
    problems = [p for p in adapter.verify(folder) if not p.startswith(f"{CARD}:")]
    if problems:
        raise ReproloraError(f"{folder}/{problems[0]}; not writing a card for a folder that differs from its manifest")
    files = {name: entry for name, entry in recorded.files.items() if name != CARD}
    card = render(recorded, files)
    recorded = replace(recorded, files={**files, CARD: manifest_file.FileEntry(sha256_bytes(card), len(card))})
    # Each file replaced by a rename: a reader sees the old or the new file, never half of one.
    for name, data in ((CARD, card), (manifest_file.FILENAME, manifest_file.encode(recorded))):
        staging = folder / f".{name}.tmp-{os.getpid()}"
        write_file(staging, data)
        os.replace(staging, folder / name)

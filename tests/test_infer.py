"""`reprolora infer`: hash checks before loading, answers, prompt sources, and the golden probe check."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from reprolora.core.canonical import canonical_json, file_entry

from conftest import cli_command, run_cli

PROMPT = "Why pin seeds?"


def infer(adapter: Path, base: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli("infer", str(adapter), "--base-model", str(base), *args, check=check)


def copy_adapter(adapter: Path, tmp_path: Path) -> Path:
    target = tmp_path / "adapter"
    shutil.copytree(adapter, target)
    return target


def test_answer_json_and_check(tiny_adapter: Path, tiny_base_model: Path) -> None:
    result = infer(tiny_adapter, tiny_base_model, "--check", "--json", PROMPT, "-n", "8")
    report = json.loads(result.stdout)
    assert report["check"]["passed"] is True
    assert all(probe["ok"] for probe in report["check"]["probes"])
    assert report["prompt"] == PROMPT
    assert 0 < report["completion_tokens"] == len(report["token_ids"]) <= 8
    compact = json.dumps(report["token_ids"], separators=(",", ":")).encode()
    assert report["token_ids_sha256"] == hashlib.sha256(compact).hexdigest()
    assert set(report["timings"]) == {"load_s", "generate_s", "tokens_per_s"}
    # The probe of the tiny config is this prompt with 8 tokens: the answer is the one recorded at training.
    manifest = json.loads((tiny_adapter / "manifest.json").read_text())
    probe = manifest["probes"]["results"][0]
    assert probe["prompt"] == PROMPT and manifest["probes"]["max_new_tokens"] == 8
    assert report["token_ids"] == probe["token_ids"]
    assert report["logits_sha256"] == probe["logits_sha256"]
    assert report["text"] == probe["text"]


def test_prompt_from_argument_file_and_stdin_agree(tiny_adapter: Path, tiny_base_model: Path, tmp_path: Path) -> None:
    from_argument = infer(tiny_adapter, tiny_base_model, PROMPT, "-n", "6").stdout
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT + "\n")  # the newline an editor adds is not part of the prompt
    from_file = infer(tiny_adapter, tiny_base_model, "--file", str(prompt_file), "-n", "6").stdout
    from_stdin = subprocess.run(
        cli_command("infer", str(tiny_adapter), "--base-model", str(tiny_base_model), "-n", "6"),
        input=PROMPT + "\n",
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ,
    )
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_argument == from_file == from_stdin.stdout
    assert from_argument.strip()


def test_check_alone_reads_no_stdin(tiny_adapter: Path, tiny_base_model: Path) -> None:
    result = subprocess.run(
        cli_command("infer", str(tiny_adapter), "--base-model", str(tiny_base_model), "--check"),
        stdin=subprocess.PIPE,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ,
    )  # stdin left open: reading it would hang until the timeout
    assert result.returncode == 0, result.stderr
    assert "check passed: 1 golden probes" in result.stderr


def test_changed_byte_in_weights_is_refused(tiny_adapter: Path, tiny_base_model: Path, tmp_path: Path) -> None:
    adapter = copy_adapter(tiny_adapter, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight's last byte
    weights.write_bytes(bytes(data))
    result = infer(adapter, tiny_base_model, "--check", check=False)
    assert result.returncode == 2
    assert "adapter_model.safetensors: differs" in result.stderr
    assert "refusing to load" in result.stderr


def rehashed_copy_with_a_weight_nudged(adapter: Path, tmp_path: Path, nudge: float) -> Path:
    """A copy of `adapter` with one value of the last layer's v_proj update moved by `nudge`, and the manifest
    re-hashed to match: every hash holds."""
    from safetensors.torch import load_file, save_file

    copy = copy_adapter(adapter, tmp_path)
    weights = copy / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(n for n in tensors if "lora_B" in n and "v_proj" in n)[-1]
    tensors[name][0, 0] += nudge
    save_file(tensors, str(weights), metadata={"format": "pt"})
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["adapter_model.safetensors"] = file_entry(weights)
    (copy / "manifest.json").write_bytes(canonical_json(manifest))
    return copy


def test_changed_weight_with_rewritten_manifest_fails_the_probes(
    tiny_adapter: Path, tiny_base_model: Path, tmp_path: Path
) -> None:
    """Someone edits a weight and re-hashes the manifest: every hash holds, the golden probes must not."""
    adapter = rehashed_copy_with_a_weight_nudged(tiny_adapter, tmp_path, 20.0)  # enough to change a token
    assert run_cli("verify", str(adapter)).returncode == 0

    result = infer(adapter, tiny_base_model, "--check", "--json", check=False)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["check"]["passed"] is False
    message = report["check"]["probes"][0]["message"]
    assert "first differing token at index" in message and "expected" in message and "got" in message, message
    assert "check failed: 1 of 1 golden probes differ" in result.stderr

    # With a prompt as well, a failing check answers nothing.
    with_prompt = infer(adapter, tiny_base_model, "--check", PROMPT, check=False)
    assert with_prompt.returncode == 1 and with_prompt.stdout == ""


def test_logits_that_change_under_the_same_tokens_fail_the_check(
    tiny_adapter: Path, tiny_base_model: Path, tmp_path: Path
) -> None:
    """A weight nudged too little to flip any argmax, the manifest re-hashed: only the logits hash can tell."""
    adapter = rehashed_copy_with_a_weight_nudged(tiny_adapter, tmp_path, 1e-4)
    manifest = json.loads((adapter / "manifest.json").read_text())

    result = infer(adapter, tiny_base_model, "--check", "--json", PROMPT, "-n", "8", check=False)
    assert result.returncode == 1, result.stderr
    message = json.loads(result.stdout)["check"]["probes"][0]["message"]
    tokens = len(manifest["probes"]["results"][0]["token_ids"])
    assert f"same {tokens} tokens but the logits differ" in message, message


def base_copy(tiny_base_model: Path, tmp_path: Path, change: str) -> Path:
    base = tmp_path / "base"
    shutil.copytree(tiny_base_model, base)
    if change == "differs":
        config = json.loads((base / "config.json").read_text())
        config["rms_norm_eps"] = 1e-5
        (base / "config.json").write_text(json.dumps(config))
    elif change == "unexpected":  # transformers 5 reads a chat template from this file: it changes the prompt
        (base / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    elif change == "missing":  # without it the tokenizer has no chat template, no eos token
        (base / "tokenizer_config.json").unlink()
    return base


@pytest.mark.parametrize(
    "change, message",
    [
        ("differs", "config.json differs"),
        ("unexpected", "chat_template.jinja is unexpected"),
        ("missing", "tokenizer_config.json is missing"),
    ],
    ids=["differs", "unexpected", "missing"],
)
def test_changed_base_model_is_refused(
    tiny_adapter: Path, tiny_base_model: Path, tmp_path: Path, change: str, message: str
) -> None:
    result = infer(tiny_adapter, base_copy(tiny_base_model, tmp_path, change), PROMPT, check=False)
    assert result.returncode == 2, result.stderr
    assert f"base model does not match its pinned hashes: {message}" in result.stderr


def test_other_base_model_must_be_named(tiny_adapter: Path) -> None:
    result = run_cli("infer", str(tiny_adapter), PROMPT, check=False)
    assert result.returncode == 2
    assert "pass --base-model DIR" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["PROMPT", "--file", "x.txt"], "not both"),
        ([" \n"], "the prompt is empty"),
        (["--file", "/nonexistent/prompt.txt"], "prompt file not found"),
        (["PROMPT", "-n", "0"], "--max-new-tokens must be at least 1"),
    ],
)
def test_bad_arguments_fail_before_loading(
    tiny_adapter: Path, tiny_base_model: Path, args: list[str], message: str
) -> None:
    result = infer(tiny_adapter, tiny_base_model, *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_adapter_folder(tmp_path: Path) -> None:
    result = run_cli("infer", str(tmp_path / "nope"), "--check", check=False)
    assert result.returncode == 2
    assert "adapter folder not found" in result.stderr

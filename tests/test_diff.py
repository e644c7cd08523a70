"""`reprolora diff`: identical folders, and adapters that differ by one thing each, trained on the tiny job."""

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reprolora.audit import diff, tensor_diff

import tiny
from conftest import run_cli, train_args


@pytest.fixture(scope="module")
def train_variant(tiny_base_model, tiny_dataset, tmp_path_factory):
    """Train the tiny job with one line of its config replaced; returns the adapter folder."""

    def train(old: str, new: str) -> Path:
        assert old in tiny.CONFIG
        folder = tmp_path_factory.mktemp("variant")
        (folder / "job.toml").write_text(tiny.CONFIG.replace(old, new))
        run_cli(*train_args(folder / "job.toml", tiny_base_model, tiny_dataset, folder / "adapter"))
        return folder / "adapter"

    return train


def diff_json(a: Path, b: Path, expect_rc: int) -> dict:
    result = run_cli("diff", "--json", str(a), str(b), check=False)
    assert result.returncode == expect_rc, result.stderr
    return json.loads(result.stdout)


def test_a_folder_with_itself_is_identical(tiny_adapter, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_adapter, copy)
    result = run_cli("diff", str(tiny_adapter), str(copy))
    assert result.stdout.strip().splitlines()[-1] == "verdict: identical: every file has the same bytes"
    report = diff_json(tiny_adapter, copy, 0)
    assert report["identical"] and not report["changes"] and report["loss_divergence"] is None
    assert report["tensors"] and all(t["status"] == "identical" for t in report["tensors"])


def test_another_seed(tiny_adapter, train_variant):
    other = train_variant("seed = 42", "seed = 7")
    report = diff_json(tiny_adapter, other, 1)
    assert report["verdict"] == "different: another seed (config: seed)"
    differing = [t for t in report["tensors"] if t["status"] == "differs"]
    assert differing and all(t["name"].endswith(("lora_A.weight", "lora_B.weight")) for t in differing)
    assert all(t["differing"] > 0 and t["max_abs"] > 0 and t["max_ulp"] > 0 for t in differing)
    # The first step's loss differs too: the seed also picks the split, the order and the dropout masks.
    assert report["loss_divergence"]["step"] == 0
    assert report["loss_divergence"]["a"] != report["loss_divergence"]["b"]
    assert {"group": "config", "key": "seed", "a": 42, "b": 7} in report["changes"]
    text = run_cli("diff", str(tiny_adapter), str(other), check=False).stdout
    assert "loss: the traces first differ at step 0" in text and "seed: 42 -> 7" in text
    largest = max(differing, key=lambda t: t["max_abs"])
    assert (
        f"tensors: {len(differing)} of {len(report['tensors'])} differ; "
        f"the largest |a-b| is {largest['max_abs']:.3g}, in {largest['name']}"
    ) in text


def test_another_learning_rate(tiny_adapter, train_variant):
    other = train_variant("learning_rate = 0.02", "learning_rate = 0.01")
    report = diff_json(tiny_adapter, other, 1)
    assert report["verdict"] == "different: another learning rate (config: train.learning_rate)"
    # Same seed, same init, same first batch: the first loss is equal, the second is not (lr acts after step 0).
    assert report["loss_divergence"]["step"] == 1
    assert not [c for c in report["changes"] if c["group"] in ("inputs", "toolchain", "pins")]


def test_another_thread_count(tiny_adapter, train_variant):
    other = train_variant("threads = 2", "threads = 1")
    report = diff_json(tiny_adapter, other, 1)
    assert "pins: threads 2 -> 1" in report["verdict"], report["verdict"]
    assert {"group": "pins", "key": "threads", "a": 2, "b": 1} in report["changes"]
    # Where the tiny tensors don't split by thread (so far every machine), only the manifest and the card it
    # wrote differ, and the verdict says so.
    files = {f["name"]: f["status"] for f in report["files"]}
    if files["adapter_model.safetensors"] == "identical":
        assert report["verdict"].startswith(
            "different (the adapter files are identical, the manifest and card are not): "
        )


def test_only_the_manifest_differs(tiny_adapter, tmp_path):
    """Same adapter files, a manifest that records another torch: different (exit 1), and the verdict says both."""
    other = tmp_path / "other"
    shutil.copytree(tiny_adapter, other)
    recorded = json.loads((other / "manifest.json").read_text())
    torch_version = recorded["toolchain"]["torch"]
    recorded["toolchain"]["torch"] = "0.0.1"
    (other / "manifest.json").write_text(json.dumps(recorded))
    report = diff_json(tiny_adapter, other, 1)
    assert not report["identical"]
    assert report["verdict"] == (
        "different (the adapter files are identical, the manifest and card are not): "
        f"another torch (toolchain: torch {torch_version} -> 0.0.1; same inputs and config)"
    )
    assert [f["name"] for f in report["files"] if f["status"] != "identical"] == ["manifest.json"]


def test_only_the_model_card_differs(tiny_adapter, tmp_path):
    """A card written by other code (the default job trained before and after a card change): named as such."""
    other = tmp_path / "other"
    shutil.copytree(tiny_adapter, other)
    card = other / "README.md"
    card.write_text(card.read_text() + "\nOne more line from another revision of the card's text.\n")
    recorded = json.loads((other / "manifest.json").read_text())
    recorded["files"]["README.md"] = {
        "sha256": hashlib.sha256(card.read_bytes()).hexdigest(),
        "size": card.stat().st_size,
    }
    (other / "manifest.json").write_text(json.dumps(recorded))
    report = diff_json(tiny_adapter, other, 1)
    assert not report["changes"]
    assert report["verdict"].startswith("different: only the model card (README.md) and its hash in the manifest; ")


def test_a_reader_that_goes_away_gets_no_traceback(tiny_adapter):
    """`reprolora diff A B | head`: when the pipe's reader is gone, stop quietly with 141 (128 + SIGPIPE)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "reprolora", "diff", str(tiny_adapter), str(tiny_adapter)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.close()  # gone before the command, which takes a second to start, writes anything
    stderr = process.stderr.read()
    assert (process.wait(timeout=300), stderr) == (141, "")


def test_bad_input_is_one_line_and_exit_2(tiny_adapter, tmp_path):
    result = run_cli("diff", str(tiny_adapter), str(tmp_path / "nowhere"), check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"reprolora: error: {tmp_path / 'nowhere'}: adapter folder not found"
    broken = tmp_path / "broken"
    shutil.copytree(tiny_adapter, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["pins"]["threads"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("diff", str(tiny_adapter), str(broken), check=False)
    assert result.returncode == 2 and "pins.threads is missing" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _f32(values: list[float]) -> tuple[str, list[int], bytes]:
    return ("F32", [len(values)], np.array(values, dtype="<f4").tobytes())


def test_tensor_statistics_count_ulps():
    one_ulp = float(np.nextafter(np.float32(1.0), np.float32(2.0)))
    same = tensor_diff.compare_tensor("f", "t", _f32([1.0, 2.0]), _f32([1.0, 2.0]))
    assert same.status == "identical" and same.elements == 2
    t = tensor_diff.compare_tensor("f", "t", _f32([1.0, 2.0, -0.0, 3.0]), _f32([one_ulp, 2.0, 0.0, -3.0]))
    assert t.status == "differs" and t.differing == 3 and t.elements == 4
    assert t.max_abs == 6.0 and t.max_rel == 2.0
    # 1.0 -> next float is 1 ULP, -0 -> +0 is 0 ULPs (different bits, same value), 3 -> -3 spans both signs.
    assert t.max_ulp == 2 * struct.unpack("<i", struct.pack("<f", 3.0))[0]
    assert tensor_diff.compare_tensor("f", "t", _f32([1.0]), _f32([1.0, 2.0])).status == "shape"


def test_another_profile_names_the_isa_pin_it_moved():
    """native vs portable on one machine (the default job's pair in README): the verdict names both pins."""
    changes = [
        diff.Change("pins", "cpu_capability", "AVX512", "AVX2"),
        diff.Change("pins", "environment.MKL_CBWR", "AUTO", "COMPATIBLE"),
        diff.Change("pins", "profile", "native", "portable"),
        diff.Change("metrics", "eval_loss_after", 2.5, 2.6),
    ]
    assert diff.verdict(changes, identical=False) == (
        "different: same inputs and config, other determinism profile "
        "(pins: profile native -> portable, ISA pin cpu_capability AVX512 -> AVX2)"
    )
    # On a CPU whose native capability is the portable one, only the profile is named.
    assert diff.verdict(changes[1:], identical=False) == (
        "different: same inputs and config, other determinism profile (pins: profile native -> portable)"
    )


def test_tensors_are_listed_in_layer_order():
    names = ["layers.10.q", "layers.2.v", "layers.2.q", "layers.1.q", "embed"]
    in_order = ["embed", "layers.1.q", "layers.2.q", "layers.2.v", "layers.10.q"]
    assert sorted(names, key=tensor_diff.natural_order) == in_order

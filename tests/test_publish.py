"""The model card and the signed provenance: deterministic bytes, and a verifier that names what was changed."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli

cryptography = pytest.importorskip("cryptography")
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: E402


def write_keypair(folder: Path, name: str) -> tuple[Path, Path]:
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    private, public = write_keypair(folder, "signer")
    _, other = write_keypair(folder, "other")
    return {"private": private, "public": public, "other_public": other}


@pytest.fixture(scope="module")
def signed(tiny_adapter: Path, keys, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("attestation") / "adapter.intoto.json"
    run_cli("attest", str(tiny_adapter), "--key", str(keys["private"]), "-o", str(out))
    return out


def front_matter(card: str) -> dict[str, object]:
    """The YAML front matter of a card, for the flat keys and `- item` lists it uses."""
    assert card.startswith("---\n")
    block = card[4 : card.index("\n---\n")]
    result: dict[str, object] = {}
    key = ""
    for line in block.splitlines():
        if line.startswith("- "):
            assert isinstance(result[key], list)
            result[key].append(line[2:])  # type: ignore[union-attr]
        else:
            key, _, value = line.partition(": ")
            key = key.rstrip(":")
            result[key] = json.loads(value) if value.startswith('"') else value or []
    return result


def test_card_is_written_by_train_and_recorded(tiny_adapter: Path):
    card = (tiny_adapter / "README.md").read_text()
    manifest = json.loads((tiny_adapter / "manifest.json").read_text())
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == manifest["inputs"]["base_model"]["name"]
    assert meta["license"] == "other"  # a local base model brings its own terms
    assert "lora" in meta["tags"] and "reprolora" in meta["tags"]
    metrics = manifest["metrics"]
    assert f"{metrics['eval_loss_before']:.4f} → {metrics['eval_loss_after']:.4f}" in card
    assert f"{metrics['eval_perplexity_before']:.2f} → {metrics['eval_perplexity_after']:.2f}" in card
    for probe in manifest["probes"]["results"]:
        assert probe["logits_sha256"] in card and json.dumps(probe["text"]) in card
    hashes = [
        *manifest["inputs"]["base_model"]["files"].values(),
        manifest["inputs"]["dataset"]["sha256"],
        *(entry["sha256"] for name, entry in manifest["files"].items() if name != "README.md"),
    ]
    assert all(h in card for h in hashes)
    assert "reprolora verify ADAPTER_DIR --attestation" in card and "nix build" in card
    assert "pip install --require-hashes -r python/requirements.lock" in card  # the toolchain above, not a range
    assert manifest["files"]["README.md"]["size"] == len(card.encode())


def test_card_config_block_reads_back_as_the_same_job(tiny_adapter: Path, tmp_path: Path):
    from reprolora.audit import card as card_module
    from reprolora.core import config

    manifest = json.loads((tiny_adapter / "manifest.json").read_text())
    text = card_module.config_toml(manifest["inputs"]["config"])
    assert text in (tiny_adapter / "README.md").read_text()
    parsed = config.parse(text, "card", tmp_path).to_dict()
    assert parsed["base_model"].pop("path") == "" and parsed["dataset"].pop("path") == str(tmp_path / "tiny.jsonl")
    recorded = json.loads(json.dumps(manifest["inputs"]["config"]))
    assert recorded["dataset"].pop("path") == "tiny.jsonl"
    assert parsed == recorded


def test_card_command_rewrites_the_same_bytes_and_refuses_a_changed_folder(tiny_adapter: Path, tmp_path: Path):
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, folder)
    (folder / "README.md").write_text("an old card\n")
    assert run_cli("verify", str(folder), check=False).returncode == 1
    run_cli("card", str(folder))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {
        p.name: p.read_bytes() for p in tiny_adapter.iterdir()
    }

    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    refused = run_cli("card", str(folder), check=False)
    assert refused.returncode == 2 and "adapter_model.safetensors" in refused.stderr


def test_card_and_attestation_bytes_are_identical_across_two_trainings(
    train_tiny, tiny_adapter: Path, keys, signed: Path, tmp_path: Path
):
    second = tmp_path / "second"
    train_tiny(second)
    assert (second / "README.md").read_bytes() == (tiny_adapter / "README.md").read_bytes()
    again = tmp_path / "second.intoto.json"
    run_cli("attest", str(second), "--key", str(keys["private"]), "-o", str(again))
    assert again.read_bytes() == signed.read_bytes()


def test_statement_is_slsa_provenance_of_every_file(tiny_adapter: Path, signed: Path, tiny_dataset: Path):
    envelope = json.loads(signed.read_text())
    assert envelope["payloadType"] == "application/vnd.in-toto+json" and len(envelope["signatures"]) == 1
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    import hashlib

    assert {s["name"]: s["digest"]["sha256"] for s in statement["subject"]} == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tiny_adapter.iterdir()
    }
    build = statement["predicate"]["buildDefinition"]
    manifest = json.loads((tiny_adapter / "manifest.json").read_text())
    assert build["externalParameters"]["config"] == manifest["inputs"]["config"]
    assert build["internalParameters"] == {"pins": manifest["pins"], "toolchain": manifest["toolchain"]}
    deps = {d["name"]: d for d in build["resolvedDependencies"]}
    for name, digest in manifest["inputs"]["base_model"]["files"].items():
        assert deps[f"base_model/{name}"]["digest"] == {"sha256": digest}
    assert deps["dataset/tiny.jsonl"]["digest"]["sha256"] == hashlib.sha256(tiny_dataset.read_bytes()).hexdigest()
    assert deps["reprolora"]["annotations"]["version"] == manifest["toolchain"]["reprolora"]
    assert statement["predicate"]["runDetails"]["builder"]["id"]
    assert "metadata" not in statement["predicate"]["runDetails"]  # no timestamps: the bytes are deterministic


def test_verify_attestation_passes_and_fails_with_a_wrong_key(tiny_adapter: Path, signed: Path, keys):
    ok = run_cli("verify", str(tiny_adapter), "--attestation", str(signed), "--key", str(keys["public"]))
    assert "signature verifies" in ok.stdout
    wrong = run_cli(
        "verify", str(tiny_adapter), "--attestation", str(signed), "--key", str(keys["other_public"]), check=False
    )
    assert (
        wrong.returncode == 1 and "no signature verifies" in wrong.stderr and str(keys["other_public"]) in wrong.stderr
    )


def test_verify_attestation_fails_when_the_statement_is_edited(tiny_adapter: Path, signed: Path, keys, tmp_path: Path):
    envelope = json.loads(signed.read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["subject"][0]["digest"]["sha256"] = "0" * 64
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(envelope))
    failed = run_cli(
        "verify", str(tiny_adapter), "--attestation", str(forged), "--key", str(keys["public"]), check=False
    )
    assert failed.returncode == 1 and "no signature verifies" in failed.stderr


@pytest.mark.parametrize("name", ["README.md", "adapter_config.json", "adapter_model.safetensors", "manifest.json"])
def test_one_changed_byte_in_any_subject_fails_naming_the_file(
    name: str, tiny_adapter: Path, signed: Path, keys, tmp_path: Path
):
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, folder)
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    failed = run_cli("verify", str(folder), "--attestation", str(signed), "--key", str(keys["public"]), check=False)
    assert failed.returncode == 1
    assert f"{folder}/{name}: differs from the attestation" in failed.stderr


def test_bare_statement_is_refused_when_a_key_is_required(tiny_adapter: Path, keys, tmp_path: Path):
    bare = tmp_path / "bare.json"
    run_cli("attest", str(tiny_adapter), "-o", str(bare))
    assert json.loads(bare.read_text())["_type"] == "https://in-toto.io/Statement/v1"
    assert run_cli("verify", str(tiny_adapter), "--attestation", str(bare)).returncode == 0
    failed = run_cli("verify", str(tiny_adapter), "--attestation", str(bare), "--key", str(keys["public"]), check=False)
    assert failed.returncode == 1 and "not signed" in failed.stderr


def test_attest_refuses_a_bad_key_and_writes_nothing(tiny_adapter: Path, keys, tmp_path: Path):
    out = tmp_path / "a.json"
    failed = run_cli("attest", str(tiny_adapter), "--key", str(keys["public"]), "-o", str(out), check=False)
    assert failed.returncode == 2 and "private key" in failed.stderr and not out.exists()


def test_rebuild_passes_on_the_tiny_job_and_fails_with_another_dataset(
    tiny_adapter: Path, signed: Path, keys, tiny_dataset: Path, tiny_base_model: Path, tmp_path: Path
):
    common = [
        "verify",
        str(tiny_adapter),
        "--attestation",
        str(signed),
        "--key",
        str(keys["public"]),
        "--rebuild",
        "--base-model",
        str(tiny_base_model),
    ]
    ok = run_cli(*common, "--dataset", str(tiny_dataset))
    assert "same bytes for every file" in ok.stdout
    swapped = tmp_path / "tiny.jsonl"
    swapped.write_bytes(tiny_dataset.read_bytes().replace(b"so the bytes match", b"so the bits match"))
    failed = run_cli(*common, "--dataset", str(swapped), check=False)
    assert failed.returncode == 1 and f"{swapped}: dataset sha256" in failed.stderr

"""Provenance for a published folder: an in-toto Statement v1 with a SLSA Provenance v1 predicate, optionally
signed as a DSSE envelope with an Ed25519 key, and the checks an independent verifier runs on it.

The statement is built from the manifest alone and holds no timestamps, host names or paths, so the same folder
always gives the same bytes (and a signature over them is deterministic too: Ed25519 signatures are).
Specs: https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md, https://slsa.dev/provenance/v1,
https://github.com/secure-systems-lab/dsse/blob/master/protocol.md. The cryptography is the `cryptography`
package's Ed25519; nothing here computes a signature by hand.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from reprolora import __version__
from reprolora.core import adapter
from reprolora.core import manifest as manifest_file
from reprolora.core.canonical import canonical_json, sha256_bytes, sha256_file
from reprolora.core.errors import ReproloraError
from reprolora.models import base_model

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
# reprolora has no web home to host these documents: URNs name the build type and the builder without one.
BUILD_TYPE = "urn:reprolora:buildtype:train:v1"
BUILDER_ID = "urn:reprolora:builder:train"


def _source_commit() -> dict[str, str]:
    """The git commit of reprolora's source and nixpkgs' rev, when known (the Nix build passes them in)."""
    known = {}
    for key, variable in (("gitCommit", "REPROLORA_GIT_COMMIT"), ("nixpkgsRev", "REPROLORA_NIXPKGS_REV")):
        if os.environ.get(variable):
            known[key] = os.environ[variable]
    if "gitCommit" not in known:
        source = Path(__file__).resolve().parent
        try:
            commit = subprocess.run(
                ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(source), "status", "--porcelain", "--", "."],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit, dirty = "", ""
        if len(commit) == 40:
            known["gitCommit"] = commit + ("-dirty" if dirty else "")
    return known


def statement(folder: Path) -> dict[str, Any]:
    """The provenance statement of a published folder whose every hash holds."""
    problems = adapter.verify(folder)
    if problems:
        raise ReproloraError(f"{folder}/{problems[0]}; not attesting a folder that differs from its manifest")
    recorded = manifest_file.read(folder)
    base, data = recorded.inputs.base_model, recorded.inputs.dataset
    subjects = [
        {"name": name, "digest": {"sha256": sha256_file(folder / name)}}
        for name in sorted([*recorded.files, manifest_file.FILENAME])
    ]
    dependencies = [
        {"name": f"base_model/{name}", "digest": {"sha256": digest}} for name, digest in sorted(base.files.items())
    ]
    if base.files == base_model.CONVERTED_SHA256:
        # The default model's folder is converted from a GGUF inside a PyPI wheel: name what it came from too.
        dependencies += [
            {"name": base_model.WHEEL_NAME, "uri": base_model.WHEEL_URL, "digest": {"sha256": base_model.WHEEL_SHA256}},
            {"name": base_model.GGUF_MEMBER, "digest": {"sha256": base_model.GGUF_SHA256}},
        ]
    dependencies.append({"name": f"dataset/{data.name}", "digest": {"sha256": data.sha256}})
    library = {"name": "reprolora", "annotations": {"version": recorded.toolchain.get("reprolora", __version__)}}
    library["annotations"].update(_source_commit())
    dependencies.append(library)
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"config": recorded.inputs.config},
                "internalParameters": {"pins": recorded.pins.to_dict(), "toolchain": recorded.toolchain},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {"builder": {"id": BUILDER_ID, "version": {"reprolora": __version__}}},
        },
    }


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is signed, so the type is authenticated with the payload."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _require_cryptography() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ReproloraError(
            "signing and checking signatures need the `cryptography` package: pip install 'reprolora[sign]'"
        ) from None


def _load_key(path: Path, private: bool) -> Any:
    _require_cryptography()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        data = path.read_bytes()
    except OSError as e:
        raise ReproloraError(f"{path}: can't read key: {e.strerror or e}") from None
    try:
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError) as e:
        kind = "private" if private else "public"
        raise ReproloraError(f"{path}: not an unencrypted PEM {kind} key: {e}") from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise ReproloraError(f"{path}: not an Ed25519 key (openssl genpkey -algorithm ed25519 makes one)")
    return key


def keyid(public_key: Any) -> str:
    """sha256 of the raw 32-byte public key: names the key in the envelope (a hint; the signature decides)."""
    from cryptography.hazmat.primitives import serialization

    return sha256_bytes(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def envelope(payload: bytes, key_path: Path) -> dict[str, Any]:
    """A DSSE envelope holding `payload`, signed with the Ed25519 private key in `key_path`."""
    key = _load_key(key_path, private=True)
    signature = key.sign(pae(PAYLOAD_TYPE, payload))
    return {
        "payload": base64.b64encode(payload).decode(),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [{"keyid": keyid(key.public_key()), "sig": base64.b64encode(signature).decode()}],
    }


def attest(folder: Path, out: Path, key_path: Path | None = None) -> None:
    """Write the folder's statement to `out`: as a DSSE envelope signed with `key_path`, or bare (canonical JSON)."""
    payload = canonical_json(statement(folder))
    data = canonical_json(envelope(payload, key_path)) if key_path else payload
    if out.resolve().parent == folder.resolve():
        raise ReproloraError(f"{out}: write the attestation beside the folder, not into it (it would be an extra file)")
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        staging.write_bytes(data)
        os.replace(staging, out)
    except OSError as e:
        staging.unlink(missing_ok=True)
        raise ReproloraError(f"{out}: can't write: {e.strerror or e}") from None


def read(path: Path, key_path: Path | None) -> tuple[dict[str, Any], list[str]]:
    """The statement in an attestation file, and what is wrong with its signature (empty: it verifies).

    With `key_path`, the file must be a DSSE envelope with a signature that the Ed25519 public key verifies.
    """
    try:
        document = json.loads(path.read_bytes())
    except OSError as e:
        raise ReproloraError(f"{path}: can't read attestation: {e.strerror or e}") from None
    except ValueError as e:
        raise ReproloraError(f"{path}: attestation is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise ReproloraError(f"{path}: attestation is not a JSON object")
    problems = []
    if "payloadType" in document:
        if document["payloadType"] != PAYLOAD_TYPE:
            raise ReproloraError(f"{path}: DSSE payloadType is {document['payloadType']!r}, expected {PAYLOAD_TYPE!r}")
        try:
            payload = base64.b64decode(document["payload"], validate=True)
            statement_ = json.loads(payload)
        except (KeyError, TypeError, ValueError) as e:
            raise ReproloraError(f"{path}: DSSE payload is not base64 of a JSON statement: {e}") from None
        if key_path is not None:
            public = _load_key(key_path, private=False)
            from cryptography.exceptions import InvalidSignature

            signed = pae(PAYLOAD_TYPE, payload)
            good = False
            for signature in document.get("signatures") or []:
                try:
                    public.verify(base64.b64decode(signature.get("sig", ""), validate=True), signed)
                    good = True
                except (InvalidSignature, ValueError, TypeError, AttributeError):
                    continue
            if not good:
                problems.append(f"{path}: no signature verifies with the key {key_path} (keyid {keyid(public)})")
    else:
        statement_ = document
        if key_path is not None:
            problems.append(f"{path}: not signed (a bare statement, not a DSSE envelope); --key needs a signed one")
    if (
        not isinstance(statement_, dict)
        or statement_.get("_type") != STATEMENT_TYPE
        or statement_.get("predicateType") != PREDICATE_TYPE
        or not isinstance(statement_.get("subject"), list)
    ):
        raise ReproloraError(f"{path}: not an in-toto {STATEMENT_TYPE} with a {PREDICATE_TYPE} predicate")
    return statement_, problems


def subject_problems(folder: Path, statement_: dict[str, Any]) -> list[str]:
    """Every subject's sha256 holds in `folder`, and the folder has no file the statement does not name."""
    expected = {}
    for subject in statement_["subject"]:
        try:
            expected[subject["name"]] = subject["digest"]["sha256"]
        except (KeyError, TypeError):
            raise ReproloraError(f"attestation subject {subject!r} has no name and sha256 digest") from None
    if not folder.is_dir():
        raise ReproloraError(f"{folder}: folder not found")
    present = {child.name for child in folder.iterdir()}
    problems = []
    for name, digest in sorted(expected.items()):
        if name not in present:
            problems.append(f"{folder}/{name}: missing")
        elif (actual := sha256_file(folder / name)) != digest:
            problems.append(f"{folder}/{name}: differs from the attestation (sha256 {actual}, attested {digest})")
    problems += [f"{folder}/{name}: extra file not in the attestation" for name in sorted(present - set(expected))]
    return problems


def _dependency(statement_: dict[str, Any], prefix: str) -> dict[str, str]:
    deps = statement_["predicate"]["buildDefinition"].get("resolvedDependencies", [])
    return {
        d["name"][len(prefix) :]: d["digest"]["sha256"]
        for d in deps
        if d.get("name", "").startswith(prefix) and "sha256" in d.get("digest", {})
    }


def rebuild_problems(
    folder: Path, statement_: dict[str, Any], dataset: Path | None, base_dir: Path | None
) -> list[str]:
    """Train again from the attested inputs, in a fresh process, and compare every subject byte for byte.

    The inputs are checked against their attested sha256 first, so a wrong one fails at once, named.
    """
    build = statement_["predicate"]["buildDefinition"]
    config = json.loads(json.dumps(build["externalParameters"]["config"]))
    datasets = _dependency(statement_, "dataset/")
    base_files = _dependency(statement_, "base_model/")
    if len(datasets) != 1 or not base_files:
        raise ReproloraError("attestation names no single dataset and no base-model files; can't rebuild")
    ((data_name, data_sha256),) = datasets.items()
    if dataset is None:
        if data_name != "default.jsonl":
            raise ReproloraError(f"the adapter was trained on dataset {data_name!r}; pass --dataset FILE to rebuild it")
        from importlib import resources

        data_bytes = resources.files("reprolora.data").joinpath("default.jsonl").read_bytes()
        config["dataset"]["path"] = ""
    else:
        try:
            data_bytes = dataset.read_bytes()
        except OSError as e:
            raise ReproloraError(f"{dataset}: can't read dataset: {e.strerror or e}") from None
        config["dataset"]["path"] = str(dataset.resolve())
    if sha256_bytes(data_bytes) != data_sha256:
        return [
            f"{dataset or 'the built-in default.jsonl'}: dataset sha256 {sha256_bytes(data_bytes)} is not the "
            f"attested {data_sha256}"
        ]
    if base_dir is None:
        if base_files != base_model.CONVERTED_SHA256:
            raise ReproloraError(
                "the adapter was trained on a base model other than the default; pass --base-model DIR"
            )
        config["base_model"]["path"] = ""
    else:
        base_model.check_folder(base_dir, base_files, label=f"{base_dir} (attested base model)")
        config["base_model"]["path"] = str(base_dir.resolve())
    return _retrain(folder, statement_, config)


def _retrain(folder: Path, statement_: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """`reprolora train` on `config` in a fresh process, and every subject of the statement compared with its output."""
    from reprolora.audit.card import config_toml

    with tempfile.TemporaryDirectory(prefix="reprolora-rebuild-") as tmp:
        config_path = Path(tmp) / "config.toml"
        config_path.write_text(config_toml(config))
        out = Path(tmp) / "rebuilt"
        print(
            f"reprolora: rebuilding {folder} from its attested inputs (a full training run)",
            file=sys.stderr,
            flush=True,
        )
        run = subprocess.run(
            [sys.executable, "-m", "reprolora", "train", "-q", "-c", str(config_path), "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if run.returncode != 0:
            raise ReproloraError(
                f"rebuild failed (exit {run.returncode}): {run.stderr.strip().splitlines()[-1:] or ''}"
            )
        return [
            problem.replace(f"{out}/", "rebuilt ").replace("differs from the attestation", "differs after rebuilding")
            for problem in subject_problems(out, statement_)
        ]


def verify(
    folder: Path,
    attestation: Path | None = None,
    key: Path | None = None,
    rebuild: bool = False,
    dataset: Path | None = None,
    base_model_dir: Path | None = None,
) -> tuple[list[str], str]:
    """`reprolora verify`: (every problem found, what was checked). The manifest's hashes always; with an
    attestation its subjects, its signature when `key` is given, and with `rebuild` a retraining from its inputs."""
    if (key or rebuild) and not attestation:
        raise ReproloraError("--key and --rebuild check an attestation: give it with --attestation FILE")
    try:
        problems = [f"{folder}/{problem}" for problem in adapter.verify(folder)]
    except ReproloraError as e:
        if not attestation:
            raise
        problems = [str(e)]  # an unreadable manifest: the attestation still names what differs
    checked = "every hash in the manifest holds"
    if attestation:
        statement_, signature_problems = read(attestation, key)
        problems += signature_problems + subject_problems(folder, statement_)
        checked += f"; every subject of {attestation} matches" + (
            f" and its signature verifies with {key}" if key else " (signature not checked: no --key)"
        )
        if rebuild and not problems:
            problems += rebuild_problems(folder, statement_, dataset, base_model_dir)
            checked += "; retraining from the attested inputs gave the same bytes for every file"
    return problems, checked

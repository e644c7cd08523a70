"""Tiny random models with a byte-level tokenizer and a small dataset, made on the spot.

For the fast tests and for `reprolora reprotest --quick`, which trains the Llama one.

The Llama model is the suite's default; FAMILIES make one of each supported family, as each FamilySpec's `tiny`
says (reprolora.models.families), each with a tokenizer set up as its real models' are: ChatML and a pad token
(Llama, Qwen2), a template that starts with the BOS token and no pad token (Mistral), no chat template and no pad
token, one <|endoftext|> for BOS and EOS (GPT-2, GPT-NeoX).
"""

from __future__ import annotations

import json
from pathlib import Path

from reprolora.models import families
from reprolora.models.base_model import bpe_model

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def write_tokenizer(
    folder: Path,
    chat_template: bool | str = True,
    bos: str | None = None,
    eos: str = "<|im_end|>",
    pad: str | None = "<|endoftext|>",
) -> int:
    """A byte-level BPE tokenizer with no merges: one token per byte, plus three special tokens.

    chat_template: True for ChatML, False for none, or the template itself."""
    vocab = {char: i for i, char in enumerate(sorted(_bytes_to_unicode().values()))}
    added = []
    for name in SPECIALS:
        vocab[name] = len(vocab)
        added.append(
            {
                "id": vocab[name],
                "content": name,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": bpe_model(vocab, []),
    }
    config = {
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": None,
        "model_max_length": 1024,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE if chat_template is True else chat_template
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def make_model(folder: Path) -> Path:
    """The suite's default tiny model: the Llama one."""
    return make_family_model(folder, "llama")


FAMILIES = tuple(families.FAMILIES)


def make_family_model(folder: Path, family: str) -> Path:
    """A tiny random model of `family` (a model type of FAMILIES) and its tokenizer, as its FamilySpec's `tiny`
    describes them."""
    import torch
    import transformers

    if family not in families.FAMILIES:
        raise ValueError(f"no tiny model for family {family!r}")
    spec = families.FAMILIES[family].tiny
    folder.mkdir(parents=True)
    vocab_size = write_tokenizer(folder, spec.chat_template, bos=spec.bos, eos=spec.eos, pad=spec.pad)
    ids = {name: vocab_size - len(SPECIALS) + i for i, name in enumerate(SPECIALS)}
    config = getattr(transformers, spec.config_class)(
        **spec.config,
        vocab_size=vocab_size,
        bos_token_id=None if spec.bos is None else ids[spec.bos],
        eos_token_id=ids[spec.eos],
        pad_token_id=None if spec.pad is None else ids[spec.pad],
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    return folder


TOPICS = [
    "seeds",
    "hashes",
    "threads",
    "lockfiles",
    "manifests",
    "toolchains",
    "adapters",
    "caches",
    "compilers",
    "datasets",
    "tokenizers",
    "containers",
]


def write_dataset(path: Path) -> Path:
    """24 short alpaca examples in one fixed answer style, so a few steps lower the eval loss."""
    lines = []
    for i, topic in enumerate(TOPICS * 2):
        verb = "pin" if i % 2 == 0 else "check"
        lines.append(
            {
                "instruction": f"Why {verb} {topic}?",
                "input": "" if i % 3 else f"case {i}",
                "output": f"In short: {verb} {topic} so the bytes match.\nCheck: hash the {topic}.",
            }
        )
    path.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    return path


CONFIG = """\
seed = 42
threads = 2

[dataset]
eval_fraction = 0.25
max_seq_len = 128

[lora]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj"]

[train]
epochs = 2
batch_size = 4
learning_rate = 0.02

[probes]
prompts = ["Why pin seeds?"]
max_new_tokens = 8
"""

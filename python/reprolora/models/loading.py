"""Loading a base model and its tokenizer, and the toolchain report: what training and inference share."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reprolora import __version__


def load_model_and_tokenizer(folder: Path) -> tuple[Any, Any]:
    """A causal LM in float32 and its tokenizer, from local safetensors only, no custom code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, trust_remote_code=False, use_safetensors=True, dtype=torch.float32
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def toolchain() -> dict[str, str]:
    """The versions that fix the numerics and the file formats, as the manifest records them."""
    import peft
    import safetensors
    import transformers

    versions = {
        "python": platform.python_version(),
        "reprolora": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }
    try:
        import tokenizers

        versions["tokenizers"] = tokenizers.__version__
    except ImportError:
        pass
    return versions

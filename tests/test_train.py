"""The tiny job end to end, each run a fresh process: bytes, PEFT compatibility, verify, bad input, Ctrl-C."""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_cli

OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "manifest.json")


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_output_is_canonical(tiny_adapter):
    assert sorted(p.name for p in tiny_adapter.iterdir()) == list(OUTPUTS)
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in tiny_adapter.iterdir())
    config = json.loads((tiny_adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"].startswith("local-model-sha256:")
    manifest = json.loads((tiny_adapter / "manifest.json").read_text())
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert manifest["inputs"]["config"]["dataset"]["path"] == "tiny.jsonl"
    text = b"".join(file_bytes(tiny_adapter).values())
    for leak in (str(Path.home()).encode(), b"/tmp", b"pytest"):
        assert leak not in text, leak
    with open(tiny_adapter / "adapter_model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header.pop("__metadata__") == {"format": "pt"}
    assert list(header) == sorted(header)


def test_eval_loss_improves_and_is_reported(tiny_adapter):
    metrics = json.loads((tiny_adapter / "manifest.json").read_text())["metrics"]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["steps"] == 10  # 18 train examples, batch 4, 2 epochs


def test_fresh_process_gives_identical_bytes(train_tiny, tiny_adapter, tmp_path):
    train_tiny(tmp_path / "again")
    assert file_bytes(tmp_path / "again") == file_bytes(tiny_adapter)


@pytest.mark.parametrize(
    "env, other_cwd",
    [
        ({"PYTHONHASHSEED": "1"}, False),
        ({"PYTHONHASHSEED": "12345"}, False),
        ({"TZ": "Pacific/Kiritimati", "LC_ALL": "C.UTF-8", "LANG": "de_DE.UTF-8"}, True),
        ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, False),
        ({"ATEN_CPU_CAPABILITY": "default"}, False),
        ({"MKL_CBWR": "COMPATIBLE"}, False),
    ],
    ids=["hashseed-1", "hashseed-12345", "tz-locale-cwd", "threads-1", "aten-default", "mkl-cbwr-compatible"],
)
def test_user_environment_does_not_change_the_bytes(train_tiny, tiny_adapter, tmp_path, env, other_cwd):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = train_tiny(tmp_path / "out", env=env, cwd=cwd if other_cwd else None)
    assert file_bytes(tmp_path / "out") == file_bytes(tiny_adapter)
    for name in env:
        if name.startswith(("OMP", "MKL", "ATEN")):
            assert f"{name}=" in result.stderr  # the pins say what they replaced


def test_portable_profile_gives_its_own_reproducible_bytes(tmp_path, tiny_base_model, tiny_dataset):
    import tiny

    config = tmp_path / "portable.toml"
    config.write_text('profile = "portable"\n' + tiny.CONFIG)
    for name in ("a", "b"):
        run_cli("train", "-q", "-c", str(config), "--base-model", str(tiny_base_model), "--dataset", str(tiny_dataset),
                "-o", str(tmp_path / name))
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    pins = json.loads((tmp_path / "a" / "manifest.json").read_text())["pins"]
    if pins["machine"] == "x86_64":
        assert pins["cpu_capability"] == "AVX2" and pins["environment"]["ATEN_CPU_CAPABILITY"] == "avx2"


PEFT_CHECK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from reprolora import pins
    adapter_dir, base_dir = Path(sys.argv[1]), Path(sys.argv[2])
    manifest = json.loads((adapter_dir / "manifest.json").read_text())
    pins.apply(manifest["pins"]["profile"], manifest["pins"]["threads"])
    from peft import PeftModel
    from reprolora.generate import greedy
    from reprolora.model import load_model_and_tokenizer
    base, tokenizer = load_model_and_tokenizer(base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    for probe in manifest["probes"]["results"]:
        got = greedy(model, tokenizer, probe["prompt"], manifest["probes"]["max_new_tokens"])
        print(json.dumps({"ids": got.token_ids == probe["token_ids"], "logits": got.logits_sha256 == probe["logits_sha256"]}))
""")


def test_peft_loads_the_adapter_and_its_logits_equal_ours(tiny_adapter, tiny_base_model):
    result = subprocess.run([sys.executable, "-c", PEFT_CHECK, str(tiny_adapter), str(tiny_base_model)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines and all(line == {"ids": True, "logits": True} for line in lines)


def test_peft_adapter_changes_the_base_model(tiny_adapter, tiny_base_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base_model, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, tiny_adapter).eval()
    assert not torch.equal(before, tuned(ids).logits)


def test_verify_passes_then_catches_every_change(tiny_adapter, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_adapter, folder)
    assert run_cli("verify", str(folder)).returncode == 0

    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (folder / "adapter_config.json").unlink()
    (folder / "notes.txt").write_text("extra")
    result = run_cli("verify", str(folder), check=False)
    assert result.returncode == 1
    assert "adapter_model.safetensors: differs" in result.stderr
    assert "adapter_config.json: missing" in result.stderr
    assert "notes.txt: extra file not in the manifest" in result.stderr


def test_verify_of_a_folder_without_manifest(tmp_path):
    result = run_cli("verify", str(tmp_path), check=False)
    assert result.returncode == 2 and "no manifest" in result.stderr


def bad_model(tmp_path: Path, kind: str, tiny_base_model: Path) -> Path:
    folder = tmp_path / kind
    shutil.copytree(tiny_base_model, folder)
    if kind == "pickled":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    elif kind == "remote-code":
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Model"}
        (folder / "config.json").write_text(json.dumps(config))
    elif kind == "no-config":
        (folder / "config.json").unlink()
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("config-missing", "config file not found"),
        ("config-unknown-key", "unknown key 'lora.rank' (did you mean 'lora.r'?)"),
        ("dataset-bad-line", "data.jsonl:2: not valid JSON"),
        ("dataset-missing", "dataset file not found"),
        ("model-missing", "base model folder not found"),
        ("model-pickled", "only pickled weights (pytorch_model.bin); reprolora loads safetensors only"),
        ("model-remote-code", "model needs custom code (auto_map)"),
        ("model-no-config", "not a Hugging Face model folder (no config.json)"),
        ("target-module", "the base model has no module named 'qkv'"),
        ("output-exists", "output folder already exists"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_nothing(case, message, tmp_path, tiny_config, tiny_base_model, tiny_dataset):
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    out = out_parent / "adapter"
    config, model, data = str(tiny_config), str(tiny_base_model), str(tiny_dataset)
    if case == "config-missing":
        config = str(tmp_path / "missing.toml")
    elif case == "config-unknown-key":
        (tmp_path / "c.toml").write_text("[lora]\nrank = 4\n")
        config = str(tmp_path / "c.toml")
    elif case == "dataset-bad-line":
        (tmp_path / "data.jsonl").write_text(Path(data).read_text().splitlines()[0] + "\n{oops\n")
        data = str(tmp_path / "data.jsonl")
    elif case == "dataset-missing":
        data = str(tmp_path / "none.jsonl")
    elif case == "model-missing":
        model = str(tmp_path / "no-model")
    elif case.startswith("model-"):
        model = str(bad_model(tmp_path, case.removeprefix("model-"), tiny_base_model))
    elif case == "target-module":
        (tmp_path / "c.toml").write_text('[lora]\ntarget_modules = ["qkv"]\n')
        config = str(tmp_path / "c.toml")
    elif case == "output-exists":
        out.mkdir()
    result = run_cli("train", "-q", "-c", config, "--base-model", model, "--dataset", data, "-o", str(out), check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("reprolora: error: ") and message in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    expected = ["adapter"] if case == "output-exists" else []
    assert sorted(p.name for p in out_parent.iterdir()) == expected


def test_ctrl_c_leaves_no_output(tmp_path, tiny_base_model, tiny_dataset):
    config = tmp_path / "long.toml"
    config.write_text("[train]\nmax_steps = 100000\n[dataset]\nmax_seq_len = 64\n")
    out = tmp_path / "outs" / "adapter"
    process = subprocess.Popen(
        [sys.executable, "-m", "reprolora", "train", "-c", str(config), "--base-model", str(tiny_base_model),
         "--dataset", str(tiny_dataset), "-o", str(out)],
        stderr=subprocess.PIPE, text=True,
    )
    seen = ""
    while "train:" not in seen and process.poll() is None:
        seen += process.stderr.read(1)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 130, seen + rest
    assert "interrupted; nothing was written" in rest
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_fingerprint_says_what_the_pins_replaced():
    result = run_cli("fingerprint", "--json", env={"OMP_NUM_THREADS": "7", "ATEN_CPU_CAPABILITY": "default"})
    report = json.loads(result.stdout)
    assert report["overridden_by_pins"]["OMP_NUM_THREADS"] == "7"
    assert report["overridden_by_pins"]["ATEN_CPU_CAPABILITY"] == "default"
    assert report["pins"]["threads"] == 2 and report["pins"]["environment"]["OMP_NUM_THREADS"] == "2"
    assert {"torch", "transformers", "peft", "safetensors", "numpy", "python"} <= set(report["toolchain"])

"""The tiny job end to end, each run a fresh process: bytes, PEFT compatibility, verify, bad input, Ctrl-C."""

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import cli_command, run_cli, train_args

OUTPUTS = ("README.md", "adapter_config.json", "adapter_model.safetensors", "manifest.json")


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_output_is_canonical(tiny_adapter):
    assert sorted(p.name for p in tiny_adapter.iterdir()) == list(OUTPUTS)
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in tiny_adapter.iterdir())
    config = json.loads((tiny_adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"].startswith("local-model-sha256:")
    manifest = json.loads((tiny_adapter / "manifest.json").read_text())
    assert set(manifest["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert manifest["inputs"]["config"]["dataset"]["path"] == "tiny.jsonl"
    text = b"".join(file_bytes(tiny_adapter).values())
    for leak in (str(Path.home()).encode(), b"/tmp", b"pytest"):
        assert leak not in text, leak
    with open(tiny_adapter / "adapter_model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header.pop("__metadata__") == {"format": "pt"}
    assert list(header) == sorted(header)
    for name in ("adapter_config.json", "manifest.json"):  # canonical JSON, spelled out here, not reprolora's own
        data = (tiny_adapter / name).read_bytes()
        value = json.loads(data)
        assert data == (json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode(), name


# The pinned variables of each profile on x86_64 as the training process must see them (None: removed), written
# out here rather than read from reprolora.core.pins, so a pin that goes missing there fails the tests.
PINNED_X86_64 = {
    "native": {
        "ATEN_CPU_CAPABILITY": None,
        "MKL_CBWR": "AUTO,STRICT",
        "MKL_ENABLE_INSTRUCTIONS": None,
        "ONEDNN_MAX_CPU_ISA": "ALL",
        "OPENBLAS_CORETYPE": None,
    },
    "portable": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "COMPATIBLE",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "OPENBLAS_CORETYPE": "Haswell",
    },
    "portable-fast": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "AVX2,STRICT",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "OPENBLAS_CORETYPE": "Haswell",
    },
}


def pinned_x86_64(profile: str, threads: int) -> dict[str, str | None]:
    common = {
        "OMP_DYNAMIC": "FALSE",
        "MKL_DYNAMIC": "FALSE",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    threads_env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return dict(sorted({**common, **threads_env, **PINNED_X86_64[profile]}.items()))


def native_cpu_capability() -> str:
    """What torch picks on this CPU when nobody sets ATEN_CPU_CAPABILITY, asked in a clean process."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


needs_x86_64 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="pins written out for x86_64")


@needs_x86_64
def test_training_process_ran_with_the_pins(tiny_adapter):
    """The manifest's pins are read back from the training process's own environment and torch."""
    recorded = json.loads((tiny_adapter / "manifest.json").read_text())["pins"]
    assert recorded["environment"] == pinned_x86_64("native", 2)
    assert recorded["cpu_capability"] == native_cpu_capability()


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
        ({"TZ": "Pacific/Kiritimati", "LC_ALL": "de_DE.UTF-8"}, True),
        ({"LANG": "tr_TR.UTF-8", "LC_ALL": ""}, False),
        ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, False),
        ({"ATEN_CPU_CAPABILITY": "default"}, False),
        ({"MKL_CBWR": "COMPATIBLE"}, False),
    ],
    ids=[
        "hashseed-1",
        "hashseed-12345",
        "tz-locale-cwd",
        "locale-tr",
        "threads-1",
        "aten-default",
        "mkl-cbwr-compatible",
    ],
)
def test_user_environment_does_not_change_the_bytes(train_tiny, tiny_adapter, tmp_path, env, other_cwd):
    if env.get("LC_ALL") or env.get("LANG"):
        require_locale(env)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = train_tiny(tmp_path / "out", env=env, cwd=cwd if other_cwd else None)
    assert file_bytes(tmp_path / "out") == file_bytes(tiny_adapter)
    for name in env:
        if name.startswith(("OMP", "MKL", "ATEN")):
            assert f"{name}=" in result.stderr  # the pins say what they replaced


def require_locale(env: dict[str, str]) -> None:
    """The locale `env` names is installed (.ci/run installs it; elsewhere the case is skipped, in CI it fails)."""
    code = "import locale; locale.setlocale(locale.LC_ALL, '')"
    if subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True).returncode != 0:
        message = f"locale {env.get('LC_ALL') or env['LANG']} is not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; .ci/run generates it")
        pytest.skip(message)


# Run the CLI with one pin dropped from every profile, the variable left to the user: the control run that shows
# a perturbation really changes the bytes, so the pinned runs' equality means something.
WITHOUT_ONE_PIN = textwrap.dedent("""
    import sys
    from reprolora.cli.main import main
    from reprolora.core import pins
    for isa in pins._PROFILE_ISA.values():
        isa.pop(sys.argv[1], None)  # reference sets none of them
    sys.exit(main(sys.argv[2:]))
""")


def test_cpu_capability_perturbation_changes_the_bytes_without_its_pin(
    tiny_adapter, tmp_path, tiny_config, tiny_base_model, tiny_dataset
):
    if native_cpu_capability() == "DEFAULT":
        pytest.skip("torch runs its DEFAULT code path here: ATEN_CPU_CAPABILITY=default changes nothing")
    out = tmp_path / "unpinned"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_ONE_PIN,
            "ATEN_CPU_CAPABILITY",
            *train_args(tiny_config, tiny_base_model, tiny_dataset, out),
        ],
        env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    unpinned = json.loads((out / "manifest.json").read_text())
    assert unpinned["pins"]["cpu_capability"] == "DEFAULT"
    assert (out / "adapter_model.safetensors").read_bytes() != (tiny_adapter / "adapter_model.safetensors").read_bytes()


# A full sum over 2^20 floats: ATen splits it by thread count, so its bits depend on the threads (measured: 1 and
# 2 threads differ). The training step itself may not depend on them, so this op stands in for the ones that do.
THREAD_SENSITIVE_SUM = textwrap.dedent("""
    import sys
    from reprolora.core import pins
    if sys.argv[1] == "pinned":
        pins.apply("native", 2)
    import torch
    values = torch.arange(1 << 20, dtype=torch.float64).mul(0.7).sin().float()
    print(float(values.sum()).hex())
""")


def test_thread_pins_beat_the_users_thread_count():
    def total(mode: str, threads: str) -> str:
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        return subprocess.run(
            [sys.executable, "-c", THREAD_SENSITIVE_SUM, mode],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout.strip()

    assert total("unpinned", "1") != total("unpinned", "2")  # the op does depend on the thread count
    assert total("pinned", "1") == total("pinned", "2") == total("unpinned", "2")


@needs_x86_64
@pytest.mark.parametrize("profile", ["native", "portable", "portable-fast"])
def test_fingerprint_reports_the_pinned_process_whatever_the_user_set(profile, tmp_path):
    threads = (os.cpu_count() or 1) + 1  # neither torch's default nor the user's
    config = tmp_path / "job.toml"
    config.write_text(f'profile = "{profile}"\nthreads = {threads}\n')
    user = {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_CBWR": "AVX",
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "OMP_DYNAMIC": "TRUE",
    }
    process = json.loads(run_cli("fingerprint", "--json", "-c", str(config), env=user).stdout)["process"]
    assert process["environment"] == pinned_x86_64(profile, threads)
    assert process["torch_threads"] == process["omp_max_threads"] == threads
    assert process["mkl_max_threads"] in (threads, None)  # None: a torch without MKL
    assert process["interop_threads"] == 1 and process["deterministic_algorithms"] is True
    assert process["cpu_capability"] == ("AVX2" if profile.startswith("portable") else native_cpu_capability())
    assert process["mkl_cbwr_branch"] in (mkl_branch(profile), None)  # None: a torch without MKL


def cpu_vendor() -> str:
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("vendor_id")
        ),
        "",
    )


def mkl_branch(profile: str) -> str:
    """The code path MKL reports for a profile's MKL_CBWR. MKL's ISA-specific branches are Intel's: on an AMD CPU
    it keeps its AUTO branch for "AVX2,STRICT" (measured on an AMD EPYC, torch 2.13's MKL 2024.2)."""
    avx2 = "AVX2,STRICT" if cpu_vendor() == "GenuineIntel" else "AUTO,STRICT"
    return {"native": "AUTO,STRICT", "portable": "COMPATIBLE", "portable-fast": avx2}[profile]


def test_portable_profile_gives_its_own_reproducible_bytes(tmp_path, tiny_adapter, tiny_base_model, tiny_dataset):
    import tiny

    config = tmp_path / "portable.toml"
    config.write_text('profile = "portable"\n' + tiny.CONFIG)
    for name in ("a", "b"):
        run_cli(*train_args(config, tiny_base_model, tiny_dataset, tmp_path / name))
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    pins = json.loads((tmp_path / "a" / "manifest.json").read_text())["pins"]
    if pins["machine"] == "x86_64":
        assert pins["cpu_capability"] == "AVX2" and pins["environment"] == pinned_x86_64("portable", 2)
    # infer applies the adapter's own profile: under native the probes' logits would differ.
    check = run_cli("infer", str(tmp_path / "a"), "--base-model", str(tiny_base_model), "--check")
    assert "check passed: 1 golden probes" in check.stderr


PEFT_CHECK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from reprolora.core import pins
    adapter_dir, base_dir = Path(sys.argv[1]), Path(sys.argv[2])
    manifest = json.loads((adapter_dir / "manifest.json").read_text())
    pins.apply(manifest["pins"]["profile"], manifest["pins"]["threads"])
    from peft import PeftModel
    from reprolora.decoding.generate import engine_for, greedy
    from reprolora.models.loading import load_model_and_tokenizer
    base, tokenizer = load_model_and_tokenizer(base_dir)
    engine = engine_for(PeftModel.from_pretrained(base, adapter_dir).eval(), tokenizer)
    for probe in manifest["probes"]["results"]:
        got = greedy(engine, probe["prompt"], manifest["probes"]["max_new_tokens"])
        same = {"ids": got.token_ids == probe["token_ids"], "logits": got.logits_sha256 == probe["logits_sha256"]}
        print(json.dumps(same))
""")


def test_peft_loads_the_adapter_and_its_logits_equal_ours(tiny_adapter, tiny_base_model):
    result = subprocess.run(
        [sys.executable, "-c", PEFT_CHECK, str(tiny_adapter), str(tiny_base_model)],
        capture_output=True,
        text=True,
        timeout=300,
    )
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


def canonical(value) -> bytes:
    return (json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def test_every_hash_in_the_manifest_is_what_it_covers(tiny_adapter, tiny_base_model, tiny_dataset):
    """Recomputed here with hashlib from the files and values they cover (the probes' logits: test_infer replays
    them)."""
    manifest = json.loads((tiny_adapter / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (tiny_adapter / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, name
    assert manifest["inputs"]["dataset"]["sha256"] == hashlib.sha256(tiny_dataset.read_bytes()).hexdigest()
    files = manifest["inputs"]["base_model"]["files"]
    assert files == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tiny_base_model.iterdir())}
    assert (
        manifest["inputs"]["base_model"]["name"]
        == "local-model-sha256:" + hashlib.sha256(canonical(files)).hexdigest()[:16]
    )
    assert manifest["loss_trace_sha256"] == hashlib.sha256(canonical(manifest["loss_trace"])).hexdigest()
    assert len(manifest["loss_trace"]) == manifest["metrics"]["steps"]


@pytest.mark.parametrize(
    "field, message",
    [
        ("loss_trace", "loss_trace_sha256 differs from the loss trace it states"),
        ("base_model_name", "is not the hash of its files' hashes"),
    ],
    ids=["loss_trace", "base_model_name"],
)
def test_verify_recomputes_the_hashes_the_manifest_states(tiny_adapter, tmp_path, field, message):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_adapter, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if field == "loss_trace":
        manifest["loss_trace"][0] += 1e-6
    else:
        manifest["inputs"]["base_model"]["files"]["config.json"] = "0" * 64
    (folder / "manifest.json").write_bytes(canonical(manifest))
    result = run_cli("verify", str(folder), check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr


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
def test_bad_input_is_one_clear_line_and_leaves_nothing(
    case, message, tmp_path, tiny_config, tiny_base_model, tiny_dataset
):
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
    result = run_cli(*train_args(config, model, data, out), check=False)
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
        cli_command(*train_args(config, tiny_base_model, tiny_dataset, out, quiet=False)),
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a shell that starts pytest in the background (no job control) leaves SIGINT
        # ignored, and an ignored signal stays ignored in the children, Python included.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
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

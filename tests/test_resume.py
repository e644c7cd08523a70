"""Checkpoints and --resume on the tiny job: a run killed with SIGKILL at a random step and resumed ends with the
bytes of a run that never stopped; a checkpoint of another job, or a damaged one, is refused."""

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_train import file_bytes

from conftest import cli_command, run_cli, train_args


def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_bytes(
    tiny_adapter, train_tiny, tiny_config, tiny_base_model, tiny_dataset, tmp_path
):
    total = json.loads((tiny_adapter / "manifest.json").read_text())["metrics"]["steps"]
    kill_after = random.randrange(1, total - 1)
    print(f"killing after checkpoint step {kill_after} of {total}")
    out = tmp_path / "adapter"
    checkpoints = tmp_path / "adapter.checkpoints"
    process = subprocess.Popen(
        cli_command(*train_args(tiny_config, tiny_base_model, tiny_dataset, out, "--checkpoint-every", "1")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 600
    while not (checkpoints / f"step-{kill_after:06d}").exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists(), "the run finished before it was killed: nothing was tested"
    saved = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step-"))
    assert saved[0] == "step-000001" and f"step-{kill_after:06d}" in saved

    result = train_tiny(out, "--checkpoint-every", "1", "--resume")
    resumed_from = int(saved[-1].removeprefix("step-"))
    assert f"resuming from {checkpoints / saved[-1]} (step {resumed_from} of {total})" in result.stderr
    assert file_bytes(out) == file_bytes(tiny_adapter)
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")], "a temporary folder was left"
    state = json.loads((checkpoints / f"step-{total - 1:06d}" / "state.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert state["loss_trace"] == manifest["loss_trace"][: total - 1]
    assert state["job"]["inputs"] == manifest["inputs"]


@pytest.fixture(scope="module")
def checkpoints(train_tiny, tmp_path_factory) -> Path:
    """The checkpoints of a finished tiny run, every 4 steps."""
    out = tmp_path_factory.mktemp("ckpt") / "adapter"
    train_tiny(out, "--checkpoint-every", "4")
    folder = out.parent / "adapter.checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000004", "step-000008"]
    assert sorted(p.name for p in (folder / "step-000008").iterdir()) == ["state.json", "state.safetensors"]
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        ("learning-rate", "inputs.config.train.learning_rate (0.01 here, 0.02 in the checkpoint)"),
        ("dataset", "inputs.dataset.sha256"),
        ("base-model", "inputs.base_model.files.model.safetensors"),
        ("toolchain", "toolchain.torch ("),
        ("damaged", "state.safetensors: missing or damaged"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_job(
    change, message, checkpoints, tiny_config, tiny_base_model, tiny_dataset, tmp_path
):
    out = tmp_path / "adapter"
    shutil.copytree(checkpoints, tmp_path / "adapter.checkpoints")
    config, model, data = tiny_config, tiny_base_model, tiny_dataset
    if change == "learning-rate":
        config = tmp_path / "lr.toml"
        config.write_text(tiny_config.read_text().replace("learning_rate = 0.02", "learning_rate = 0.01"))
    elif change == "dataset":
        data = tmp_path / "tiny.jsonl"
        data.write_text("\n".join(tiny_dataset.read_text().splitlines()[:-1]) + "\n")
    elif change == "base-model":
        model = tmp_path / "model"
        shutil.copytree(tiny_base_model, model)
        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(model / "model.safetensors"))
        name = sorted(tensors)[0]
        tensors[name] = tensors[name] + torch.finfo(torch.float32).tiny
        save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    elif change == "toolchain":
        # The checkpoint says it was written by another torch: what a resume on an upgraded machine would meet.
        state = tmp_path / "adapter.checkpoints" / "step-000008" / "state.json"
        body = json.loads(state.read_text())
        body["job"]["toolchain"]["torch"] = "9.9.9"
        state.write_text(json.dumps(body))
    elif change == "damaged":
        tensors = tmp_path / "adapter.checkpoints" / "step-000008" / "state.safetensors"
        blob = bytearray(tensors.read_bytes())
        blob[-1] ^= 1
        tensors.write_bytes(bytes(blob))
    result = run_cli(*train_args(config, model, data, out, "--resume"), check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("reprolora: error: ") and message in last, last
    if change != "damaged":
        assert "checkpoint of another job, refusing to resume" in last
    assert not out.exists()


def test_tokens_per_second_after_a_resume_counts_only_the_steps_this_process_ran(monkeypatch):
    """Resumed at step 2 of 4, the printed rate is the tokens of steps 2 and 3 over their seconds: the steps before
    the resume ran in another process, whose time this one never measured."""
    from types import SimpleNamespace

    from reprolora.training import train

    clock = iter(range(100))
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))  # 1 s a call
    tokens = {0: 100, 1: 200, 2: 300, 3: 500}
    monkeypatch.setattr(train, "step_tokens", lambda job, step: tokens[step])

    def one_step(job, state, world):
        state.step += 1
        state.loss_trace.append(1.0)

    monkeypatch.setattr(train, "train_step", one_step)
    job = SimpleNamespace(total_steps=4, epoch_of_step=[0] * 4)
    state = SimpleNamespace(step=2, loss_trace=[1.0, 1.0])
    rate = train.train(job, state, SimpleNamespace(is_main=True), False, Path("unused"), 0)
    assert state.step == 4
    assert rate == (300 + 500) / 2

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `long` (the real default job trained end to end, minutes each beyond .ci/run's time budget) run
    only with REPROLORA_LONG=1, as GitHub's locked job sets it; elsewhere they are skipped, saying so."""
    if os.environ.get("REPROLORA_LONG"):
        return
    skip = pytest.mark.skip(reason="a default job beyond .ci/run's time budget: REPROLORA_LONG=1 runs it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.write_dataset(tmp_path_factory.mktemp("data") / "tiny.jsonl")


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(tiny.CONFIG)
    return path


def cli_command(*args: str) -> list[str]:
    """The command line of `python -m reprolora ARGS`, for a process to start."""
    return [sys.executable, "-m", "reprolora", *args]


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """`python -m reprolora ARGS` in a fresh process."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(cli_command(*args), env=full_env, cwd=cwd, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"reprolora {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def train_args(
    config: Path | str, model: Path | str, data: Path | str, out: Path, *extra: str, quiet: bool = True
) -> list[str]:
    """`reprolora train`'s arguments: the job `config` of `model` on `data`, written to `out`; `-q` unless told."""
    return [
        "train",
        *(["-q"] if quiet else []),
        "-c",
        str(config),
        "--base-model",
        str(model),
        "--dataset",
        str(data),
        "-o",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="session")
def train_tiny(tiny_base_model: Path, tiny_dataset: Path, tiny_config: Path):
    """Train the tiny job into `out` in a fresh process; extra arguments and environment as given."""

    def train(
        out: Path, *extra: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        return run_cli(*train_args(tiny_config, tiny_base_model, tiny_dataset, out, *extra), env=env, cwd=cwd)

    return train


@pytest.fixture(scope="session")
def tiny_adapter(train_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny adapter, trained once per session. Tests must not modify it: copy it first."""
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    train_tiny(out)
    return out

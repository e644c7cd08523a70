"""The benchmarks still run: each in its quick form, on the tiny model, checking what it prints (not its numbers,
which belong to a quiet machine: README, "Benchmarks")."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import tiny

BENCHMARKS = Path(__file__).resolve().parent.parent / "python" / "benchmarks"


def run_benchmark(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_model(tmp_path_factory.mktemp("bench") / "model")


def test_bench_profiles_prints_each_profile_against_native(tiny_model):
    out = run_benchmark("bench_profiles.py", "--rounds", "1", "--base-model", str(tiny_model))
    ratios = dict(re.findall(r"^(\S+)\s+best\s+[\d.]+ s\s+ratio to native ([\d.]+)$", out, re.MULTILINE))
    assert set(ratios) == {"native", "portable-fast", "portable"}, out
    assert ratios["native"] == "1.00"


def test_bench_scaling_tiny_rows(tiny_model):
    # With --base-model the tiny model, the world-size rows train the whole default job on it: one process of two
    # threads against torchrun's two of one.
    out = run_benchmark("bench_scaling.py", "--rows", "tiny,ws", "--steps", "2", "--base-model", str(tiny_model))
    assert re.search(r"^tiny\s+2\s", out, re.MULTILINE), out
    assert "adapter bytes identical" in out, out


def test_bench_train_quick_prints_every_row_and_column():
    out = run_benchmark("bench_train.py", "--quick")
    header = re.search(
        r"^run\s+wall s\s+train s\s+tokens/s\s+GFLOP/s\s+% ceiling\s+peak RSS MB\s+steps\s+x Trainer\s+x native$",
        out,
        re.MULTILINE,
    )
    assert header, out
    rows = dict(re.findall(r"^(trainer|native|portable|portable-fast)\s+((?:\S+\s+){8}\S+)$", out, re.MULTILINE))
    assert set(rows) == {"trainer", "native", "portable", "portable-fast"}, out
    assert re.search(r"^model FLOPs of the job: [\d.]+ TFLOP", out, re.MULTILINE), out
    assert re.search(r"^fp32 matmul ceiling at the job's shapes .*: [\d.]+ GFLOP/s$", out, re.MULTILINE), out
    assert re.search(r"^aten::mm\s+[\d.]+\s+[\d.]+%\s+\d+$", out, re.MULTILINE), out  # the profiler's table


def test_bench_reference_step_counts_the_fallbacks_and_profiles_a_step(tiny_model):
    out = run_benchmark("bench_reference_step.py", "--steps", "2", "--base-model", str(tiny_model))
    counted = re.search(r"^matmul: ([\d,]+) of ([\d,]+) product elements undecided", out, re.MULTILINE)
    assert counted and int(counted[2].replace(",", "")) > 0, out
    assert re.search(r"^step 2 under cProfile: [\d.]+ s$", out, re.MULTILINE), out
    assert "numerics/matmul.py" in out, out  # the profile names the reference numerics

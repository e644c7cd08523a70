"""Data parallelism through torchrun on the tiny job: world sizes 2, 3 and 4 on one node, and two torchrun
"nodes" on 127.0.0.1, each give the bytes of a plain single-process run; ranks that disagree fail the job."""

import socket
import subprocess
import sys
import textwrap

import pytest
from test_train import file_bytes

from conftest import train_args


def torchrun(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.mark.parametrize("nproc", [2, 3, 4])
def test_world_size_gives_the_single_process_bytes(
    nproc, tiny_adapter, tiny_config, tiny_base_model, tiny_dataset, tmp_path
):
    # The tiny job's steps have 4 micro-batches (2 at each epoch's end): 3 ranks don't divide them, 4 leave ranks
    # idle. Each rank runs the config's 2 threads (the thread count is part of what fixes the bytes: README).
    out = tmp_path / "adapter"
    finish(
        torchrun(
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "-m",
            "reprolora",
            *train_args(tiny_config, tiny_base_model, tiny_dataset, out),
        )
    )
    assert file_bytes(out) == file_bytes(tiny_adapter)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_give_the_single_process_bytes(tiny_adapter, tiny_config, tiny_base_model, tiny_dataset, tmp_path):
    # Two torchrun agents meet at one rendezvous endpoint, as two machines would; each has its own output path,
    # and only global rank 0 publishes.
    rendezvous = [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        "reprolora-two-nodes",
    ]
    nodes = [
        torchrun(
            *rendezvous,
            "--node-rank",
            str(rank),
            "-m",
            "reprolora",
            *train_args(tiny_config, tiny_base_model, tiny_dataset, tmp_path / f"node{rank}" / "adapter"),
        )
        for rank in range(2)
    ]
    for node in nodes:
        finish(node)
    published = [rank for rank in range(2) if (tmp_path / f"node{rank}" / "adapter").exists()]
    assert len(published) == 1
    assert file_bytes(tmp_path / f"node{published[0]}" / "adapter") == file_bytes(tiny_adapter)


DISAGREE = textwrap.dedent("""
    from reprolora.training import distributed
    from reprolora.core.errors import ReproloraError
    world = distributed.world()
    try:
        distributed.check_same(world, "the sha256 of the trained weights", f"digest-{world.rank}")
    except ReproloraError as e:
        print(f"rank {world.rank}: {e}")
    world.close()
""")


def test_ranks_that_hold_different_weights_fail(tmp_path):
    script = tmp_path / "disagree.py"
    script.write_text(DISAGREE)
    output = finish(torchrun("--standalone", "--nproc-per-node", "2", str(script)))
    for rank in range(2):
        assert (
            f"rank {rank}: the ranks disagree on the sha256 of the trained weights "
            "(rank 0: digest-0, rank 1: digest-1); nothing was published"
        ) in output

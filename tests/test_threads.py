"""The step's own reductions (the loss sum, the gradient norm) give the same bits at 1, 2 and 4 threads, where a
plain sum() over as many elements does not. The thread count still fixes the bytes of a job: some op of the
forward pass of wider models differs between thread counts (README, "Threads are still part of the bytes")."""

import subprocess
import sys
import textwrap

REDUCTIONS = textwrap.dedent("""
    import sys
    from reprolora import pins
    pins.apply("native", int(sys.argv[1]))
    import torch
    from reprolora import train
    values = torch.randn(100003, generator=torch.Generator().manual_seed(0))
    print(values.sum().item(), train.chunked_sum(values).item(), train.grad_norm(values, [100003]).item())
""")


def test_plain_sum_splits_by_thread_and_the_steps_reductions_do_not():
    # 100,003 elements: a power of two (65,536) happens to split on the cascade sum's own block boundaries.
    by_threads = {threads: subprocess.run([sys.executable, "-c", REDUCTIONS, str(threads)], capture_output=True,
                                          text=True, check=True, timeout=300).stdout.split()
                  for threads in (1, 2, 4)}
    assert len({values[0] for values in by_threads.values()}) > 1  # a plain sum() splits: what the step avoids
    assert len({tuple(values[1:]) for values in by_threads.values()}) == 1

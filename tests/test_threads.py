"""What the thread count changes. The step's own reductions (the loss sum, the gradient norm) give the same bits at
1, 2 and 4 threads, where a plain sum() over as many elements does not; under the `native` and `portable-fast`
profiles the default model's matrix products (MKL in its strict mode) do too, and so does a whole training job.
`portable`'s do not (README, "Threads")."""

import json
import platform
import subprocess
import sys
import textwrap

import pytest

from conftest import run_cli, train_args

# The profiles whose bytes hold at any thread count (portable-fast is x86-64 only: MKL's AVX2 branch).
THREAD_INVARIANT = ["native"] + (["portable-fast"] if platform.machine() == "x86_64" else [])

REDUCTIONS = textwrap.dedent("""
    import sys
    from reprolora.core import pins
    pins.apply("native", int(sys.argv[1]))
    import torch
    from reprolora.training.step import chunked_sum, grad_norm
    values = torch.randn(100003, generator=torch.Generator().manual_seed(0))
    print(values.sum().item(), chunked_sum(values).item(), grad_norm(values, [100003]).item())
""")


def printed_at_each_thread_count(script: str, *args: str) -> dict[int, str]:
    """What `script THREADS ARGS` prints at 1, 2 and 4 threads (stripped), each run in a fresh process."""
    return {
        threads: subprocess.run(
            [sys.executable, "-c", script, str(threads), *args], capture_output=True, text=True, check=True, timeout=300
        ).stdout.strip()
        for threads in (1, 2, 4)
    }


def test_plain_sum_splits_by_thread_and_the_steps_reductions_do_not():
    # 100,003 elements: a power of two (65,536) happens to split on the cascade sum's own block boundaries.
    by_threads = {threads: printed.split() for threads, printed in printed_at_each_thread_count(REDUCTIONS).items()}
    assert len({values[0] for values in by_threads.values()}) > 1  # a plain sum() splits: what the step avoids
    assert len({tuple(values[1:]) for values in by_threads.values()}) == 1


PRODUCTS = textwrap.dedent("""
    import hashlib, sys
    from reprolora.core import pins
    pins.apply(sys.argv[2], int(sys.argv[1]))
    import torch
    def rand(*shape, seed):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    digest = hashlib.sha256()
    # The default model's shapes where MKL, left to itself, splits between threads in a bit-changing way
    # (measured: AUTO gives other bits at 1 and 2 threads for each of these).
    for tokens in (40, 100, 157):
        x = rand(tokens, 576, seed=0).requires_grad_(True)
        up = (rand(1536, 576, seed=1) * 0.05).requires_grad_(True)  # an MLP projection
        lora_a = (rand(16, 576, seed=2) * 0.05).requires_grad_(True)  # a LoRA pair, r = 16
        lora_b = (rand(576, 16, seed=3) * 0.05).requires_grad_(True)
        outputs = [x @ up.T, (x @ lora_a.T) @ lora_b.T]
        torch.autograd.backward(outputs, [rand(*y.shape, seed=4) for y in outputs])
        for tensor in (*outputs, x.grad, up.grad, lora_a.grad, lora_b.grad):
            digest.update(tensor.detach().numpy().tobytes())
    print(digest.hexdigest())
""")


@pytest.mark.parametrize("profile", THREAD_INVARIANT)
def test_matrix_products_do_not_change_with_the_thread_count(profile):
    by_threads = printed_at_each_thread_count(PRODUCTS, profile)
    assert len(set(by_threads.values())) == 1, by_threads


@pytest.mark.parametrize("profile", THREAD_INVARIANT)
def test_the_tiny_job_gives_the_same_adapter_at_one_and_two_threads(profile, tmp_path, tiny_base_model, tiny_dataset):
    import tiny

    adapters, probes = {}, {}
    for threads in (1, 2):
        config = tmp_path / f"{threads}.toml"
        # r = 16: at a decoding step's rows MKL's x A^T product of that rank splits between threads (AMD EPYC), so
        # the golden probes, decoded at the job's thread count, check the decoder's way round it too.
        job = tiny.CONFIG.replace("threads = 2\n", f"threads = {threads}\n").replace(
            "r = 4\nalpha = 8\n", "r = 16\nalpha = 32\n"
        )
        config.write_text(f'profile = "{profile}"\n' + job)
        out = tmp_path / f"threads-{threads}"
        run_cli(*train_args(config, tiny_base_model, tiny_dataset, out))
        adapters[threads] = [(out / name).read_bytes() for name in ("adapter_model.safetensors", "adapter_config.json")]
        probes[threads] = json.loads((out / "manifest.json").read_text())["probes"]
    assert adapters[1] == adapters[2]
    assert probes[1] == probes[2]


DECODER_PRODUCTS = textwrap.dedent("""
    import hashlib, sys
    from reprolora.core import pins
    pins.apply(sys.argv[2], int(sys.argv[1]))
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from reprolora.decoding import generate, kernels
    def rand(*shape, seed):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    digest = hashlib.sha256()
    # Measured on this project's AMD EPYC: MKL's x W^T gives other bits at 1, 2 and 4 threads for 12-32 outputs at
    # 8 rows (and 20-32 at 16), and at r = 16 (4-15 rows) and r = 4 (2-3 rows): the default model's q_proj with LoRA
    # at r = 16 and r = 4, and a narrow projection (a key/value projection of 16 outputs, as the tiny model's).
    for width, r in ((576, 4), (576, 16), (16, 4)):
        holder = torch.nn.Module()
        holder.q_proj = torch.nn.Linear(576, width)
        lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj"])
        layer = inject_adapter_in_model(lora, holder).q_proj.eval()
        with torch.no_grad():
            layer.base_layer.weight.copy_(rand(width, 576, seed=3) * 0.04)
            layer.base_layer.bias.copy_(rand(width, seed=4) * 0.01)
            layer.lora_A["default"].weight.copy_(rand(r, 576, seed=1) * 0.05)
            layer.lora_B["default"].weight.copy_(rand(width, r, seed=2) * 0.05)
        x = rand(157, 576, seed=0)
        packed = kernels.PackedWeights()
        with torch.inference_mode():
            for rows in (*range(1, generate.SLOTS + 1), 16, 40, 100, 157):  # decoding steps, and prompts
                digest.update(kernels.linear(layer, x[:rows], packed).numpy().tobytes())
                digest.update(kernels.linear(layer.base_layer, x[:rows], packed).numpy().tobytes())
    print(digest.hexdigest())
""")


@pytest.mark.parametrize("profile", THREAD_INVARIANT)
def test_the_decoders_linear_layers_do_not_change_with_the_thread_count(profile):
    by_threads = printed_at_each_thread_count(DECODER_PRODUCTS, profile)
    assert len(set(by_threads.values())) == 1, by_threads

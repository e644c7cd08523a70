"""Profile `reference`: the decoder over reprolora.numerics computes what transformers computes (to float32's
precision), and its bytes depend on the job alone: not on how the step's examples are split into passes, the
thread count, the CPU code path or the world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reprolora.data.dataset import Tokenized
from reprolora.models import tiny
from reprolora.models.reference import Decoder
from reprolora.models.reference_layers import Lora, scalar
from reprolora.numerics import random as counter_random
from reprolora.numerics.exact import exact_sum, round_to_float32
from reprolora.training import reference

from conftest import train_args


def peft_model(family: str, folder: Path, targets: list[str]):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tiny.make_family_model(folder, family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(1)
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:  # B starts at zero: give it values so every gradient path carries something
            torch.nn.init.normal_(param, std=0.1)
    return wrapped


def examples(lengths: list[int], vocab: int = 200, seed: int = 0) -> list[Tokenized]:
    generator = torch.Generator().manual_seed(seed)
    items = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
        items.append(Tokenized(ids, [-100, -100, *ids[2:]]))  # the first tokens are the prompt: no labels
    return items


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_loss_and_lora_gradients_match_transformers(family, tmp_path):
    # mistral's tiny model has a sliding window of 64: an example of 80 tokens crosses it.
    model = peft_model(family, tmp_path / "model", ["q_proj", "v_proj", "down_proj"])
    items = examples([7, 80, 5])
    expected = 0
    for item in items:
        ids = torch.tensor(item.input_ids)
        logits = model(input_ids=ids[None]).logits[0, :-1]
        targets = torch.tensor(item.labels[1:])
        keep = targets != -100
        expected = expected + torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    expected.backward()

    decoder = Decoder(model)
    ids, lengths, targets = reference.packed(items)
    with torch.no_grad():
        losses, rows = decoder.loss_and_backward(ids, lengths, targets, None)
    assert float(losses.sum()) == pytest.approx(float(expected), rel=1e-5)
    loras = decoder.loras
    assert len(loras) == 6
    grads, _ = reference.gradients(loras, [(losses, rows)], 1)
    for lora, d_a, d_b in zip(loras, grads[0::2], grads[1::2], strict=True):
        for ours, theirs in ((d_a, lora.A.grad), (d_b, lora.B.grad)):
            assert float((ours - theirs).abs().max()) <= 1e-5 * float(theirs.abs().max()), lora.name


def exact_product(a: torch.Tensor, b: torch.Tensor) -> list[list[float]]:
    """a @ b, each element the float32 nearest the exact sum of its products (numerics.matmul's definition)."""
    rows, cols = a.double().tolist(), b.double().t().tolist()
    return [[round_to_float32(exact_sum([x * y for x, y in zip(r, c, strict=True)])) for c in cols] for r in rows]


def test_a_passes_lora_rows_are_the_exact_products_rounded(tmp_path):
    """The rows a pass hands back for the LoRA gradients are correctly rounded products of each other and the LoRA
    weights: u = x A^T and du = (dy * scaling) B, element for element the float32 nearest the exact dot product."""
    decoder = Decoder(peft_model("llama", tmp_path / "model", ["q_proj", "o_proj", "down_proj"]))
    ids, lengths, targets = reference.packed(examples([6, 9], seed=5))
    with torch.no_grad():
        _, rows = decoder.loss_and_backward(ids, lengths, targets, None)
    assert len(rows) == 6
    for lora in decoder.loras:
        r = rows[lora.name]
        assert r.u.tolist() == exact_product(r.x, lora.A.detach().t()), lora.name
        assert r.du.tolist() == exact_product(r.scaled_dy, lora.B.detach()), lora.name


def test_a_passes_dropout_masks_are_keyed_by_seed_step_layer_example_and_position():
    """Each row's mask is numerics.random.dropout_mask's for (seed, step, layer) at the row's example and position:
    the same whichever pass holds the example and whatever else that pass holds."""
    job = SimpleNamespace(config=SimpleNamespace(seed=42))
    lora = Lora("model.layers.1.self_attn.v_proj", torch.zeros(4, 48), torch.zeros(16, 4), scalar(2.0), 0.25)
    together = reference.dropout_for(job, 3, [7, 2], [5, 4])(lora, torch.ones(9, 48))
    examples_of_rows = torch.tensor([7] * 5 + [2] * 4)
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3])
    expected = counter_random.dropout_mask(0.25, (42, 3, lora.name), examples_of_rows, positions, 48)
    assert torch.equal(together, expected)
    assert 0 < int((together == 0).sum()) < together.numel()
    alone = reference.dropout_for(job, 3, [2], [4])(lora, torch.ones(4, 48))
    assert torch.equal(alone, together[5:])


def step_bytes(decoder: Decoder, items: list[Tokenized], passes: list[list[int]]) -> bytes:
    """The bytes of the gradients and the summed loss of `items`, split into `passes` (lists of indices)."""
    results = []
    with torch.no_grad():
        for indices in passes:
            ids, lengths, targets = reference.packed([items[i] for i in indices])
            results.append(decoder.loss_and_backward(ids, lengths, targets, None))
    grads, loss = reference.gradients(decoder.loras, results, 50)
    return b"".join(t.numpy().tobytes() for t in [*grads, loss])


def test_a_steps_gradients_do_not_depend_on_its_passes_or_threads(tmp_path):
    decoder = Decoder(peft_model("llama", tmp_path / "model", ["q_proj", "v_proj", "gate_proj"]))
    items = examples([9, 31, 4, 17, 12, 23], seed=3)
    one_pass = step_bytes(decoder, items, [[0, 1, 2, 3, 4, 5]])
    assert step_bytes(decoder, items, [[0], [1], [2], [3], [4], [5]]) == one_pass
    assert step_bytes(decoder, items, [[5, 3], [1, 0, 4], [2]]) == one_pass  # any grouping, any order
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            assert step_bytes(decoder, items, [[0, 1], [2, 3], [4, 5]]) == one_pass, f"{count} threads"
    finally:
        torch.set_num_threads(threads)


def test_other_families_get_one_clear_line(tmp_path):
    from transformers import AutoModelForCausalLM

    from reprolora.core.errors import ReproloraError

    model = AutoModelForCausalLM.from_pretrained(tiny.make_family_model(tmp_path / "gpt2", "gpt2"))
    with pytest.raises(ReproloraError, match="gpt2 and gpt_neox need LayerNorm and GELU"):
        Decoder(model)


# ---------------------------------------------------------------------------------------------------- whole jobs

REFERENCE_JOB = (
    tiny.CONFIG.replace("threads = 2\n", 'threads = {threads}\nprofile = "reference"\n')
    .replace("[train]\n", "[train]\nmax_steps = 3\nmicro_batch_size = {micro_batch}\n")
    .replace("max_new_tokens = 8", "max_new_tokens = 4")
)


def reference_run(
    tmp_path: Path,
    name: str,
    model: Path,
    data: Path,
    threads: int = 2,
    micro_batch: int = 1,
    env: dict[str, str] | None = None,
    nproc: int = 1,
    python: str = sys.executable,
) -> dict[str, object]:
    """Train the tiny job (3 steps) under `reference` in a fresh process (of `python`); what may not differ between
    runs."""
    config = tmp_path / f"{name}.toml"
    config.write_text(REFERENCE_JOB.format(threads=threads, micro_batch=micro_batch))
    out = tmp_path / name
    train = ["-m", "reprolora", *train_args(config, model, data, out)]
    launcher = (
        [python]
        if nproc == 1
        else [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    )
    result = subprocess.run(
        [*launcher, *train], env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "adapter_model.safetensors": (out / "adapter_model.safetensors").read_bytes(),
        "adapter_config.json": (out / "adapter_config.json").read_bytes(),
        "loss_trace": manifest["loss_trace"],
        "metrics": manifest["metrics"],
        "probes": manifest["probes"],
    }


@pytest.fixture(scope="module")
def first_reference_run(tmp_path_factory, tiny_base_model, tiny_dataset) -> dict[str, object]:
    """The tiny job at the defaults, once for the tests that compare other runs with it."""
    return reference_run(tmp_path_factory.mktemp("reference"), "base", tiny_base_model, tiny_dataset)


@pytest.mark.slow
def test_reference_bytes_depend_on_the_job_alone(tmp_path, tiny_base_model, tiny_dataset, first_reference_run):
    """One set of bytes at 1, 2 and 4 threads, micro-batches of 1, 2 and 4, world sizes 1, 2 and 3, and whatever
    ATEN_CPU_CAPABILITY says (the reference profile pins none of these)."""
    args = (tiny_base_model, tiny_dataset)
    first = first_reference_run
    variations = {
        "threads-1": dict(threads=1),
        "threads-4": dict(threads=4),
        "micro-batch-2": dict(micro_batch=2),
        "micro-batch-4": dict(micro_batch=4),
        "world-2": dict(nproc=2, threads=1),
        "world-3": dict(nproc=3, threads=1),
        "isa-default": dict(env={"ATEN_CPU_CAPABILITY": "default"}),
        "isa-avx2": dict(env={"ATEN_CPU_CAPABILITY": "avx2"}),
    }
    if sys.platform != "linux" or not Path("/proc/cpuinfo").read_text().count("avx2"):
        del variations["isa-avx2"]
    for name, variation in variations.items():
        assert reference_run(tmp_path, name, *args, **variation) == first, name


OLDEST = Path(__file__).resolve().parents[1] / ".venv-oldest" / "bin" / "python"


@pytest.mark.slow
def test_reference_bytes_are_the_same_with_the_oldest_supported_versions(
    tmp_path, tiny_base_model, tiny_dataset, request
):
    """The venv of pyproject's lower bounds (.ci/run's .venv-oldest: transformers 4.56, peft 0.17, safetensors
    0.4.3, numpy 1.26) against this one: the same weights, losses, eval and probes. adapter_config.json is peft's
    LoraConfig of each version (other fields), so it is not compared."""
    if not OLDEST.exists():
        message = f"no oldest-versions venv at {OLDEST} (.ci/run builds it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    here = dict(request.getfixturevalue("first_reference_run"))
    oldest = reference_run(tmp_path, "oldest", tiny_base_model, tiny_dataset, python=str(OLDEST))
    del here["adapter_config.json"], oldest["adapter_config.json"]
    assert oldest == here

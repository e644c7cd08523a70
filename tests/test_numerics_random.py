"""numerics.random: Philox4x32-10 against Random123's known answers and a pure-Python Philox; LoRA's A bit for bit
against an independent re-computation in Python integers and fractions; dropout masks one per key whatever the
batching, different across what keys them, kept at the stated rate; threads; bad input."""

from __future__ import annotations

import hashlib
import math
import struct
from fractions import Fraction

import pytest
import torch

from reprolora.numerics import random as counter_random
from reprolora.numerics.exact import round_to_float32

M32 = 0xFFFFFFFF

# Random123's kat_vectors, philox4x32 R=10: (key, counter, result).
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (M32, M32, M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0xA4093822, 0x299F31D0),
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def python_philox(key: tuple[int, int], counter: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 in Python integers, straight from Random123's philox4x32round / bumpkey."""
    k0, k1 = key
    c0, c1, c2, c3 = counter
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return c0, c1, c2, c3


def python_key(parts: tuple) -> tuple[int, int]:
    """The key derivation as random.encode_key's docstring states it, written again."""
    data = b"reprolora.numerics.random/1" + struct.pack(">Q", len(parts))
    for part in parts:
        if isinstance(part, int):
            n = abs(part)
            length = (n.bit_length() + 7) // 8
            data += b"i" + (b"-" if part < 0 else b"+") + struct.pack(">Q", length) + n.to_bytes(length, "big")
        else:
            raw = part.encode()
            data += b"s" + struct.pack(">Q", len(raw)) + raw
    digest = hashlib.sha256(data).digest()
    return struct.unpack(">II", digest[:8])


def float32_bits(x: torch.Tensor) -> list[int]:
    return x.contiguous().view(torch.int32).reshape(-1).tolist()


def bits_of(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


# ------------------------------------------------------------------------------------------------------ Philox


@pytest.mark.parametrize(("key", "counter", "expected"), KNOWN_ANSWERS)
def test_known_answers(key, counter, expected):
    assert python_philox(key, counter) == expected
    got = counter_random.philox4x32_10(torch.tensor([counter], dtype=torch.int64), key)
    assert tuple(got[0].tolist()) == expected


def test_philox_matches_python_on_random_counters():
    g = torch.Generator().manual_seed(5)  # only to pick test inputs
    counters = torch.randint(0, 2**32, (64, 4), generator=g, dtype=torch.int64)
    counters[0] = torch.tensor([M32, 0, M32, 0])
    key = (0x12345678, 0xFEDCBA98)
    got = counter_random.philox4x32_10(counters.reshape(8, 8, 4), key).reshape(64, 4)
    for row, out in zip(counters.tolist(), got.tolist(), strict=True):
        assert tuple(out) == python_philox(key, tuple(row))


def test_key_words_follow_the_stated_encoding():
    for parts in [(0, "model.layers.0.self_attn.q_proj"), (-7, 2**70, "é", ""), (), (1, 2, 3)]:
        assert counter_random.key_words(parts) == python_key(parts)
    assert counter_random.key_words((1, "a")) != counter_random.key_words(("a", 1))
    assert counter_random.key_words((1,)) != counter_random.key_words((-1,))
    assert counter_random.key_words(("1",)) != counter_random.key_words((1,))


@pytest.mark.parametrize("bad", [(1.0,), (True,), (None,), (b"x",), ((1, 2),), [1, 2]])
def test_key_parts_are_ints_and_strs(bad):
    with pytest.raises(ValueError, match="numerics.random"):
        counter_random.key_words(bad)


# ------------------------------------------------------------------------------------------------------ LoRA A


def test_inverse_sqrt_is_the_nearest_float32():
    for n in [*range(1, 300), 576, 1536, 4096, 49152, 2**31 - 1, 10**12 + 39]:
        b = counter_random.inverse_sqrt_float32(n)
        fb = Fraction(b)
        exponent = math.floor(math.log2(b))
        ulp = Fraction(2) ** (exponent - 23)
        below = ulp / 2 if fb != Fraction(2) ** exponent else ulp / 4  # the gap below a power of two is half
        # (b - below)^2 n < 1 < (b + ulp/2)^2 n: 1/sqrt(n) lies strictly between b's rounding midpoints.
        assert (fb - below) ** 2 * n < 1 <= (fb + ulp / 2) ** 2 * n, n
        assert (fb + ulp / 2) ** 2 * n != 1
    assert counter_random.inverse_sqrt_float32(4) == 0.5
    assert counter_random.inverse_sqrt_float32(1) == 1.0


def python_lora_a(seed: int, name: str, shape: tuple[int, int]) -> list[int]:
    rows, fan_in = shape
    key = python_key(("lora_a", seed, name))
    b = Fraction(counter_random.inverse_sqrt_float32(fan_in))
    out = []
    for i in range(rows * fan_in):
        word = python_philox(key, ((i // 4) & M32, (i // 4) >> 32, 0, 0))[i % 4]
        k = word >> 8
        u = Fraction(2 * k + 1 - 2**24, 2**24)
        out.append(bits_of(round_to_float32(u * b)))
    return out


@pytest.mark.parametrize(("seed", "name", "shape"), [(0, "base.layers.0.q_proj", (3, 7)), (1234, "v", (2, 576))])
def test_lora_a_bits_equal_exact_recomputation(seed, name, shape):
    got = counter_random.lora_a(seed, name, shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    assert float32_bits(got) == python_lora_a(seed, name, shape)


def test_lora_a_distribution_and_keys():
    a = counter_random.lora_a(3, "model.layers.1.mlp.down_proj", (16, 1536))
    b = counter_random.inverse_sqrt_float32(1536)
    assert float(a.abs().max()) <= b and float(a.abs().min()) > 0
    assert abs(float(a.double().mean())) < 0.02 * b  # sd of the mean: b / sqrt(3 * 24576) ~ 0.0037 b
    assert abs(float(a.double().pow(2).mean()) / b**2 - 1 / 3) < 0.01
    assert torch.equal(a, counter_random.lora_a(3, "model.layers.1.mlp.down_proj", (16, 1536)))
    assert not torch.equal(a, counter_random.lora_a(4, "model.layers.1.mlp.down_proj", (16, 1536)))
    assert not torch.equal(a, counter_random.lora_a(3, "model.layers.2.mlp.down_proj", (16, 1536)))


@pytest.mark.parametrize(
    "call",
    [
        lambda: counter_random.lora_a(0, "x", (3,)),
        lambda: counter_random.lora_a(0, "x", (3, 0)),
        lambda: counter_random.lora_a(0, "x", [3, 4]),
        lambda: counter_random.lora_a(0, "x", (3.0, 4)),
        lambda: counter_random.lora_a(0.5, "x", (3, 4)),
        lambda: counter_random.lora_a(0, 7, (3, 4)),
    ],
)
def test_lora_a_bad_input(call):
    with pytest.raises(ValueError, match="numerics.random"):
        call()


# ----------------------------------------------------------------------------------------------------- dropout


def mask(p, key, examples, positions, width):
    return counter_random.dropout_mask(
        p, key, torch.tensor(examples, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), width
    )


def test_dropout_row_is_one_function_of_its_key_whatever_the_batch():
    key = (0, 5, "model.layers.0.self_attn.q_proj")
    examples = [3] * 40 + [8] * 25 + [1] * 30
    positions = list(range(40)) + list(range(25)) + list(range(30))
    whole = mask(0.1, key, examples, positions, 37)
    assert whole.shape == (95, 37) and whole.dtype == torch.float32
    for i in [0, 39, 40, 64, 94]:  # each row on its own
        assert torch.equal(mask(0.1, key, [examples[i]], [positions[i]], 37)[0], whole[i])
    order = torch.randperm(95, generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = mask(0.1, key, [examples[i] for i in order], [positions[i] for i in order], 37)
    assert torch.equal(shuffled, whole[order])
    other = mask(0.1, key, [8] * 25 + [99] * 3, list(range(25)) + [0, 1, 2], 37)  # another batch holds example 8
    assert torch.equal(other[:25], whole[40:65])
    assert torch.equal(mask(0.1, key, examples, positions, 12), whole[:, :12])  # a column's bits ignore width


def test_dropout_differs_by_step_name_example_position():
    base = mask(0.5, (0, 1, "a"), [0, 0], [0, 1], 256)
    assert not torch.equal(base[0], base[1])  # positions
    assert not torch.equal(base, mask(0.5, (0, 2, "a"), [0, 0], [0, 1], 256))  # steps
    assert not torch.equal(base, mask(0.5, (0, 1, "b"), [0, 0], [0, 1], 256))  # names
    assert not torch.equal(base, mask(0.5, (1, 1, "a"), [0, 0], [0, 1], 256))  # seeds
    assert not torch.equal(base, mask(0.5, (0, 1, "a"), [1, 1], [0, 1], 256))  # examples
    assert not torch.equal(mask(0.5, (0, 1, "a"), [0], [1], 256), mask(0.5, (0, 1, "a"), [1], [0], 256))


def test_dropout_bits_equal_exact_recomputation():
    p, key, examples, positions, width = 0.3, (11, 4, "model.layers.3.mlp.up_proj"), [2, 7, 2], [5, 0, 2**32 - 1], 9
    got = mask(p, key, examples, positions, width)
    philox_key = python_key(("dropout_mask", *key))
    threshold = -(-Fraction(p) * 2**32 // 1)
    scale = round_to_float32(1 / (1 - Fraction(p)))
    assert threshold == counter_random.dropout_threshold(p) and scale == counter_random.dropout_scale(p)
    for i, (e, pos) in enumerate(zip(examples, positions, strict=True)):
        for j in range(width):
            word = python_philox(philox_key, (j // 4, pos, e, 0))[j % 4]
            assert float(got[i, j]) == (scale if word >= threshold else 0.0)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_dropout_kept_fraction_and_scale(p):
    rows, width = 600, 1536
    m = counter_random.dropout_mask(p, (0, 3, "l"), torch.zeros(rows, dtype=torch.int64), torch.arange(rows), width)
    scale = round_to_float32(1 / (1 - Fraction(p)))
    assert set(m.unique().tolist()) == {0.0, scale}
    kept = float((m > 0).double().mean())
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / (rows * width))


def test_dropout_p_zero_is_all_ones():
    m = mask(0.0, (0, 0, "x"), [0, 1, 2], [0, 0, 5], 10)
    assert m.dtype == torch.float32 and torch.equal(m, torch.ones(3, 10))
    assert counter_random.dropout_scale(0.0) == 1.0 and counter_random.dropout_threshold(0) == 0
    assert mask(0.1, (0, 0, "x"), [], [], 10).shape == (0, 10)


def test_dropout_extremes():
    p = 1 - 2**-53  # the largest float64 below 1: T = 2^32, nothing kept; scale 2^53
    assert counter_random.dropout_threshold(p) == 2**32 and counter_random.dropout_scale(p) == 2.0**53
    assert torch.equal(mask(p, (0, 0, "x"), [0, 1], [0, 0], 64), torch.zeros(2, 64))
    tiny = 2.0**-40  # T = 1: only the all-zero word is dropped
    assert counter_random.dropout_threshold(tiny) == 1
    assert counter_random.dropout_threshold(0.5) == 2**31 and counter_random.dropout_scale(0.5) == 2.0
    assert counter_random.dropout_scale(0.1) == round_to_float32(Fraction(2**55, 2**55 - int(Fraction(0.1) * 2**55)))


def test_threads_do_not_change_bits():
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(
                (
                    counter_random.lora_a(7, "q", (16, 576)),
                    counter_random.dropout_mask(0.1, (7, 2, "q"), torch.full((300,), 4), torch.arange(300), 576),
                )
            )
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "call",
    [
        lambda: mask(1.0, (0, 0, "x"), [0], [0], 4),
        lambda: mask(-0.1, (0, 0, "x"), [0], [0], 4),
        lambda: mask(float("nan"), (0, 0, "x"), [0], [0], 4),
        lambda: mask(True, (0, 0, "x"), [0], [0], 4),
        lambda: mask(0.1, [0, 0, "x"], [0], [0], 4),
        lambda: mask(0.1, (0, 0, 1.5), [0], [0], 4),
        lambda: mask(0.1, (0, 0, "x"), [0, 1], [0], 4),
        lambda: mask(0.1, (0, 0, "x"), [0], [-1], 4),
        lambda: mask(0.1, (0, 0, "x"), [2**32], [0], 4),
        lambda: mask(0.1, (0, 0, "x"), [0], [0], -1),
        lambda: mask(0.1, (0, 0, "x"), [0], [0], 4.0),
        lambda: counter_random.dropout_mask(0.1, (0, 0, "x"), torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2), 4),
        lambda: counter_random.dropout_mask(0.1, (0, 0, "x"), torch.zeros(2), torch.zeros(2, dtype=torch.int64), 4),
    ],
)
def test_dropout_bad_input(call):
    with pytest.raises(ValueError, match="numerics.random"):
        call()

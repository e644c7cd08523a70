"""Counter-based random numbers with one answer: Philox4x32-10 in integer tensor ops, LoRA's A and dropout masks.

Every random value here is a function of what it belongs to (a seed, a layer's name, a step, an example, a
position, an index), never of a generator's state, so it is the same whatever computes it, in whatever order,
batch or thread count. No torch RNG is used: the bits come from Philox4x32-10 (Salmon, Moraes, Dror, Shaw,
"Parallel random numbers: as easy as 1, 2, 3", SC'11; the Random123 library's philox4x32 with R = 10), written
in int64 tensor ops (exact: every intermediate is a non-negative integer below 2^63, every word is masked to 32
bits), and every float is built from those bits by exact integer arithmetic and at most one IEEE float32
multiply. There is no fallback path: nothing is approximated, so nothing needs deciding.

Keys. A caller's key is a tuple of ints and strs. `key_words` encodes it canonically (see there), takes
SHA-256 of the encoding and reads its first 8 bytes big-endian as the two 32-bit Philox key words (k0 the first
4 bytes, k1 the next 4). Python's `hash()` (salted per process) is never used. Each public function prefixes its
own tag to the caller's tuple, so LoRA's A and dropout never share a key.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import torch

from reprolora.numerics.exact import round_to_float32

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53  # Random123's PHILOX_M4x32_0
PHILOX_M1 = 0xCD9E8D57  # PHILOX_M4x32_1
PHILOX_W0 = 0x9E3779B9  # PHILOX_W32_0 (golden ratio)
PHILOX_W1 = 0xBB67AE85  # PHILOX_W32_1 (sqrt(3) - 1)
PHILOX_ROUNDS = 10

_ENCODING_VERSION = b"reprolora.numerics.random/1"
_LORA_A_TAG = "lora_a"
_DROPOUT_TAG = "dropout_mask"


# ------------------------------------------------------------------------------------------------------- keys


def encode_key(parts: tuple) -> bytes:
    """The canonical bytes of a key tuple: one definition, independent of Python's repr or hash.

    encoding = b"reprolora.numerics.random/1" + len(parts) as 8 bytes big-endian + each part, where
    an int n is b"i" + (b"-" if n < 0 else b"+") + L as 8 bytes big-endian + |n| as L bytes big-endian
    (L = the fewest bytes that hold |n|; 0 for n = 0), and a str s is b"s" + L as 8 bytes big-endian + its UTF-8
    bytes (L of them). Anything else (bool included, so that True never means 1) raises ValueError.
    """
    if not isinstance(parts, tuple):
        raise ValueError(f"numerics.random: a key is a tuple of ints and strs, got {type(parts).__name__}")
    out = [_ENCODING_VERSION, len(parts).to_bytes(8, "big")]
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, int | str):
            raise ValueError(f"numerics.random: key parts are ints and strs, got {part!r} ({type(part).__name__})")
        if isinstance(part, int):
            magnitude = abs(part)
            length = (magnitude.bit_length() + 7) // 8
            out += [b"i", b"-" if part < 0 else b"+", length.to_bytes(8, "big"), magnitude.to_bytes(length, "big")]
        else:
            data = part.encode("utf-8")
            out += [b"s", len(data).to_bytes(8, "big"), data]
    return b"".join(out)


def key_words(parts: tuple) -> tuple[int, int]:
    """The Philox key (k0, k1) of a key tuple: SHA-256 of `encode_key(parts)`, bytes 0-3 and 4-7 big-endian."""
    digest = hashlib.sha256(encode_key(parts)).digest()
    return int.from_bytes(digest[0:4], "big"), int.from_bytes(digest[4:8], "big")


# ----------------------------------------------------------------------------------------------------- Philox


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the exact 64-bit product a * b (a < 2^32 a constant, b int64 in [0, 2^32)).

    b = b_hi 2^16 + b_lo with b_hi, b_lo < 2^16, so p_lo = a b_lo < 2^48 and p_hi = a b_hi < 2^48 are exact in
    int64; a b = p_lo + (p_hi mod 2^16) 2^16 + floor(p_hi / 2^16) 2^32 = t + floor(p_hi / 2^16) 2^32 with
    t = p_lo + (p_hi mod 2^16) 2^16 < 2^49: low = t mod 2^32, high = floor(p_hi / 2^16) + floor(t / 2^32) (< 2^32
    since a b < 2^64)."""
    p_lo = b & 0xFFFF
    p_lo = p_lo * a
    p_hi = b >> 16
    p_hi = p_hi * a
    t = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (t >> 32), t & MASK32


def philox4x32_10(counters: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of each counter under one key: Random123's philox4x32(ctr, key) with R = 10.

    `counters` is an int64 tensor [..., 4] of words in [0, 2^32) (c0, c1, c2, c3); `key` is (k0, k1), ints in
    [0, 2^32). Returns int64 [..., 4], each word in [0, 2^32). Definition (all arithmetic mod 2^32 except the
    exact 64-bit products): ten rounds, the key bumped (k0 += 0x9E3779B9, k1 += 0xBB67AE85) between consecutive
    rounds (nine bumps); one round is (hi0, lo0) = M0 * c0, (hi1, lo1) = M1 * c2 (64-bit products split in
    32-bit halves, M0 = 0xD2511F53, M1 = 0xCD9E8D57), then (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1,
    hi0 ^ c3 ^ k1, lo0). Integer tensor ops only, so every machine gives the same words.
    """
    if not isinstance(counters, torch.Tensor) or counters.dtype != torch.int64 or counters.shape[-1:] != (4,):
        raise ValueError("numerics.random.philox4x32_10: counters must be an int64 tensor [..., 4]")
    k0, k1 = key
    if not (0 <= k0 <= MASK32 and 0 <= k1 <= MASK32):
        raise ValueError(f"numerics.random.philox4x32_10: key words must lie in [0, 2^32), got {key}")
    if counters.numel() and (bool((counters < 0).any()) or bool((counters > MASK32).any())):
        raise ValueError("numerics.random.philox4x32_10: counter words must lie in [0, 2^32)")
    c0, c1, c2, c3 = (counters[..., i].contiguous() for i in range(4))
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=-1)


# ----------------------------------------------------------------------------------------------------- LoRA A


def inverse_sqrt_float32(n: int) -> float:
    """The float32 nearest to 1/sqrt(n) (ties to even), for an integer n >= 1, computed exactly.

    For s bits, q = isqrt(floor(4^s / n)) = floor(2^s / sqrt(n)) (floor(sqrt(floor(x))) = floor(sqrt(x)) for
    x >= 0), so q / 2^s <= 1/sqrt(n) < (q + 1) / 2^s, with equality on the left iff q^2 n = 4^s. If equal, the
    answer is round_to_float32(q / 2^s). Otherwise, if round_to_float32 gives the same float32 at both ends,
    rounding is monotone, so every number between (1/sqrt(n) among them) rounds to it: that is the answer. Else
    s doubles. This ends: 1/sqrt(n) is never a float32 rounding midpoint (a midpoint m is a dyadic rational of 25
    significant bits; m = 1/sqrt(n) rational means n = r^2 and m = 1/r, dyadic only for r a power of two, where
    m has one significant bit), so for s large enough the interval holds no midpoint.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"numerics.random: 1/sqrt(n) needs an integer n >= 1, got {n!r}")
    s = 64 + n.bit_length()
    while True:
        q = math.isqrt((1 << (2 * s)) // n)
        low = round_to_float32(Fraction(q, 1 << s))
        if q * q * n == 1 << (2 * s) or round_to_float32(Fraction(q + 1, 1 << s)) == low:
            return low
        s *= 2


def _check_seed_name(seed: int, name: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"numerics.random: seed must be an int, got {seed!r}")
    if not isinstance(name, str):
        raise ValueError(f"numerics.random: name must be a str, got {name!r}")


def lora_a(seed: int, name: str, shape: tuple[int, int]) -> torch.Tensor:
    """LoRA's A for the layer `name`, as peft initialises it (kaiming_uniform_ with a = sqrt(5), i.e. uniform in
    [-1/sqrt(fan_in), 1/sqrt(fan_in)], fan_in = shape[1]), as a float32 tensor of `shape`, a function of
    (seed, name, shape) alone.

    Definition: key = key_words(("lora_a", seed, name)). Element i in row-major order takes word i mod 4 of
    philox4x32_10 under that key of the counter (floor(i/4) mod 2^32, floor(i/4 / 2^32), 0, 0); k = that word's
    top 24 bits (word >> 8, in [0, 2^24)); u = (2k + 1 - 2^24) / 2^24, the midpoints of 2^24 equal cells of
    (-1, 1): uniform on them, symmetric (k and 2^24 - 1 - k give -u and u), never 0 or +-1, and exact in float32
    (an odd integer below 2^24 in magnitude, times 2^-24). b = inverse_sqrt_float32(fan_in), the float32 nearest
    to 1/sqrt(fan_in) (proven there). The element is the float32 rounding of u * b: one IEEE float32 multiply of
    two exact float32 values (|u b| >= 2^-24 b: never subnormal for any fan_in below 2^200). So every element
    lies in [-b, b], strictly inside up to one rounding.
    """
    _check_seed_name(seed, name)
    if (
        not isinstance(shape, tuple)
        or len(shape) != 2
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)
    ):
        raise ValueError(f"numerics.random.lora_a: shape must be a tuple of two positive ints, got {shape!r}")
    rows, fan_in = shape
    count = rows * fan_in
    key = key_words((_LORA_A_TAG, seed, name))
    blocks = torch.arange((count + 3) // 4, dtype=torch.int64)
    zeros = torch.zeros_like(blocks)
    counters = torch.stack([blocks & MASK32, blocks >> 32, zeros, zeros], dim=-1)
    words = philox4x32_10(counters, key).reshape(-1)[:count]
    k = words >> 8
    odd = (2 * k + (1 - (1 << 24))).to(torch.float32)  # exact: |odd| < 2^24
    u = odd * (2.0**-24)  # exact: a power of two, the result normal
    b = torch.tensor(inverse_sqrt_float32(fan_in), dtype=torch.float32)
    return (u * b).reshape(rows, fan_in)


# ---------------------------------------------------------------------------------------------------- dropout


def _check_p(p: float) -> Fraction:
    if isinstance(p, bool) or not isinstance(p, int | float) or not (0 <= p < 1):
        raise ValueError(f"numerics.random.dropout_mask: p must be a number in [0, 1), got {p!r}")
    return Fraction(p)


def dropout_scale(p: float) -> float:
    """round_to_float32(1 / (1 - p)) with p's exact binary value (Fraction(p)); p in [0, 1). 1.0 for p = 0."""
    return round_to_float32(1 / (1 - _check_p(p)))


def dropout_threshold(p: float) -> int:
    """T = ceil(Fraction(p) * 2^32), in [0, 2^32], for p in [0, 1): 32 uniform random bits are kept iff
    bits >= T, with probability exactly (2^32 - T) / 2^32, the largest multiple of 2^-32 not above 1 - p
    (p 2^32 <= T < p 2^32 + 1, so 1 - p - 2^-32 < it <= 1 - p; equal to 1 - p where p 2^32 is an integer)."""
    return math.ceil(_check_p(p) * (1 << 32))


def _check_rows(values: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError(f"numerics.random.dropout_mask: {what} must be a 1-D integer tensor")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ValueError(f"numerics.random.dropout_mask: {what} must be an integer tensor, got {values.dtype}")
    values = values.to(torch.int64)
    if values.numel() and (bool((values < 0).any()) or bool((values > MASK32).any())):
        raise ValueError(f"numerics.random.dropout_mask: {what} must lie in [0, 2^32)")
    return values


def dropout_mask(
    p: float, key: tuple, example_of_row: torch.Tensor, position_of_row: torch.Tensor, width: int
) -> torch.Tensor:
    """Dropout's scaled keep mask, float32 [rows, width]: each element 0.0 (dropped) or scale (kept).

    key is the caller's (seed, step, layer name); row i belongs to example example_of_row[i] at position
    position_of_row[i] (1-D integer tensors of one length, values in [0, 2^32)). Definition: K =
    key_words(("dropout_mask",) + key); element (i, j) takes word j mod 4 of philox4x32_10 under K of the counter
    (floor(j/4), position_of_row[i], example_of_row[i], 0); it is kept iff that word >= T = dropout_threshold(p)
    = ceil(Fraction(p) 2^32), an exact integer comparison, with probability exactly (2^32 - T) / 2^32 (within
    2^-32 of 1 - p); scale = dropout_scale(p) = round_to_float32(1 / (1 - Fraction(p))). So row i is a function
    of (key, example_of_row[i], position_of_row[i], width) alone (its first columns do not even depend on width),
    whatever the other rows, their order or the batch. p = 0 gives T = 0 and scale 1: all ones. Extremes: p
    above 1 - 2^-32 gives T = 2^32, nothing kept (all 0.0); scale is finite (at most 2^53, at p = 1 - 2^-53).
    p must be a float or int in [0, 1) (NaN, bool and anything else raise ValueError), width an int in
    [0, 2^34); zero rows or zero width give an empty tensor.
    """
    threshold = dropout_threshold(p)
    scale = dropout_scale(p)
    if not isinstance(key, tuple):
        raise ValueError(f"numerics.random.dropout_mask: key must be a tuple (seed, step, name), got {key!r}")
    philox_key = key_words((_DROPOUT_TAG, *key))
    examples = _check_rows(example_of_row, "example_of_row")
    positions = _check_rows(position_of_row, "position_of_row")
    if examples.shape != positions.shape:
        raise ValueError(
            "numerics.random.dropout_mask: example_of_row and position_of_row must have one length, got "
            f"{examples.shape[0]} and {positions.shape[0]}"
        )
    if isinstance(width, bool) or not isinstance(width, int) or not (0 <= width < 1 << 34):
        raise ValueError(f"numerics.random.dropout_mask: width must be an int in [0, 2^34), got {width!r}")
    rows = examples.shape[0]
    if threshold == 0:
        return torch.ones(rows, width, dtype=torch.float32)
    blocks = (width + 3) // 4
    counters = torch.stack(
        torch.broadcast_tensors(
            torch.arange(blocks, dtype=torch.int64)[None, :],
            positions[:, None],
            examples[:, None],
            torch.zeros((), dtype=torch.int64),
        ),
        dim=-1,
    )  # [rows, blocks, 4]
    words = philox4x32_10(counters, philox_key).reshape(rows, blocks * 4)[:, :width]
    kept = words >= threshold
    return torch.where(kept, torch.tensor(scale, dtype=torch.float32), torch.tensor(0.0, dtype=torch.float32))

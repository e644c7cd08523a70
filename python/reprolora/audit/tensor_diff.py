"""Two safetensors files compared tensor by tensor, bits and all: which tensors differ, in how many elements, and
by how much (largest absolute and relative difference, largest distance in ULPs).

Tensors are read with numpy straight from the safetensors header, so a comparison needs no torch and no pins.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reprolora.core.errors import ReproloraError

# safetensors dtype -> (numpy dtype of the stored bits, float dtype to compare values in, or None for integers)
_DTYPES: dict[str, tuple[str, str | None]] = {
    "F64": ("<u8", "<f8"),
    "F32": ("<u4", "<f4"),
    "F16": ("<u2", "<f2"),
    "BF16": ("<u2", None),
    "I64": ("<i8", None),
    "I32": ("<i4", None),
    "I16": ("<i2", None),
    "I8": ("i1", None),
    "U8": ("u1", None),
    "BOOL": ("u1", None),
}
_FLOATS = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorDiff:
    file: str
    name: str
    status: str  # "identical", "differs", "shape", "dtype", "only in A", "only in B"
    shape: list[int] | None = None
    dtype: str | None = None
    elements: int = 0
    differing: int = 0
    max_abs: float | None = None
    max_rel: float | None = None
    max_ulp: int | None = None
    detail: str = ""


def read_safetensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw little-endian bytes), from the file's own header."""
    data = path.read_bytes()
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        start = 8 + length
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            tensors[name] = (info["dtype"], list(info["shape"]), data[start + begin : start + end])
        return tensors
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ReproloraError(f"{path}: not a readable safetensors file: {e}") from None


def _ordered(bits: np.ndarray, width: int) -> np.ndarray:
    """IEEE bits as integers that count ULPs: adjacent floats differ by one, -0 and +0 are both 0."""
    bits = bits.astype(np.uint64)
    sign = bits >> np.uint64(width - 1)
    magnitude = (bits & np.uint64((1 << (width - 1)) - 1)).astype(np.int64)
    return np.where(sign == 1, -magnitude, magnitude)


def _values(dtype: str, bits: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    return bits.view(_DTYPES[dtype][1]).astype(np.float64)


def compare_tensor(
    file: str, name: str, a: tuple[str, list[int], bytes], b: tuple[str, list[int], bytes]
) -> TensorDiff:
    (dtype_a, shape_a, raw_a), (dtype_b, shape_b, raw_b) = a, b
    if dtype_a != dtype_b:
        return TensorDiff(file, name, "dtype", shape_a, dtype_a, detail=f"dtype {dtype_a} -> {dtype_b}")
    if shape_a != shape_b:
        return TensorDiff(file, name, "shape", shape_a, dtype_a, detail=f"shape {shape_a} -> {shape_b}")
    elements = int(np.prod(shape_a)) if shape_a else 1
    if raw_a == raw_b:
        return TensorDiff(file, name, "identical", shape_a, dtype_a, elements)
    if dtype_a not in _DTYPES:
        return TensorDiff(
            file, name, "differs", shape_a, dtype_a, elements, detail=f"bytes differ (dtype {dtype_a} not compared)"
        )
    storage = _DTYPES[dtype_a][0]
    bits_a, bits_b = np.frombuffer(raw_a, dtype=storage), np.frombuffer(raw_b, dtype=storage)
    mask = bits_a != bits_b
    differing = int(mask.sum())
    if dtype_a not in _FLOATS:
        delta = np.abs(bits_a[mask].astype(np.float64) - bits_b[mask].astype(np.float64))
        return TensorDiff(file, name, "differs", shape_a, dtype_a, elements, differing, float(delta.max()))
    va, vb = _values(dtype_a, bits_a[mask]), _values(dtype_a, bits_b[mask])
    finite = np.isfinite(va) & np.isfinite(vb)
    delta = np.abs(va[finite] - vb[finite])
    scale = np.maximum(np.abs(va[finite]), np.abs(vb[finite]))
    width = np.dtype(storage).itemsize * 8
    ulps = np.abs(_ordered(bits_a[mask], width) - _ordered(bits_b[mask], width))
    return TensorDiff(
        file,
        name,
        "differs",
        shape_a,
        dtype_a,
        elements,
        differing,
        max_abs=float(delta.max()) if delta.size else None,
        max_rel=float(np.divide(delta, scale, out=np.zeros_like(delta), where=scale > 0).max()) if delta.size else None,
        max_ulp=int(ulps.max()),
        detail="" if finite.all() else f"{int((~finite).sum())} differing elements are NaN or infinite",
    )


def natural_order(name: str) -> list[Any]:
    """Sort key that puts layers.2 before layers.10: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def compare_tensors(file: str, a: Path, b: Path) -> list[TensorDiff]:
    ta, tb = read_safetensors(a), read_safetensors(b)
    result = []
    for name in sorted(set(ta) | set(tb), key=natural_order):
        if name not in tb:
            result.append(TensorDiff(file, name, "only in A", ta[name][1], ta[name][0]))
        elif name not in ta:
            result.append(TensorDiff(file, name, "only in B", tb[name][1], tb[name][0]))
        else:
            result.append(compare_tensor(file, name, ta[name], tb[name]))
    return result

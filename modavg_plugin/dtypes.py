"""The dtypes MXNet writes: which are averaged, in what, and exact conversions for bfloat16.

Floating arrays are averaged (float16, bfloat16 and float32 in float32,
float64 in float64); integer and boolean arrays are copied. NumPy has no
bfloat16: MXNet 1.x spells it as a record of the raw 16 bits
(:data:`BFLOAT16`), which is the upper half of a float32, so widening is a
shift and narrowing a rounding on the bits (to nearest, ties to even), done
here rather than by MXNet, whose rounding depends on the build.
"""

from typing import Optional

import numpy as np

__all__ = [
    "BFLOAT16",
    "averaging_dtype",
    "bfloat16_to_float32",
    "dtype_name",
    "is_bfloat16",
    "is_floating",
    "round_to_bfloat16",
]

BFLOAT16 = np.dtype([("bfloat16", np.uint16)])  #: MXNet's bfloat16 as NumPy sees it: 16 bits, a record
"""How MXNet 1.x spells bfloat16 to NumPy (``NDArray.dtype``, ``asnumpy()``): a record of the raw 16 bits."""
BLOCK_VALUES = 1 << 18  # values rounded per block: 1 MiB of uint32 scratch


def is_bfloat16(dtype: object) -> bool:
    """Whether ``dtype`` is MXNet's bfloat16 (:data:`BFLOAT16`, or the text ``"bfloat16"``)."""
    if isinstance(dtype, str):
        return dtype == "bfloat16"
    try:
        return np.dtype(dtype) == BFLOAT16
    except TypeError:
        return False


def is_floating(dtype: object) -> bool:
    """Whether arrays of ``dtype`` are averaged (every floating dtype, bfloat16 too) rather than copied (integers)."""
    return is_bfloat16(dtype) or bool(np.issubdtype(np.dtype(dtype), np.floating))


def averaging_dtype(dtype: object) -> np.dtype:
    """The dtype averages of ``dtype`` are kept in: float32 for bfloat16, float16 and float32; otherwise itself."""
    if is_bfloat16(dtype):
        return np.dtype(np.float32)
    dtype = np.dtype(dtype)
    if is_floating(dtype) and dtype.itemsize < 4:
        return np.dtype(np.float32)
    return dtype


def dtype_name(dtype: object) -> str:
    """``"float32"``, ``"int64"``, ``"bfloat16"``...: a dtype's name as messages show it."""
    return "bfloat16" if is_bfloat16(dtype) else np.dtype(dtype).name


def bfloat16_to_float32(bits: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """bfloat16 values (their 16 bits as ``uint16`` or :data:`BFLOAT16`) as float32, exactly.

    The bits shifted left by 16 are that float32, subnormals, infinities and
    NaN included. ``out``, a float32 array of the same size, receives them
    if given (no allocation).
    """
    bits = bits.view(np.uint16)
    if out is None:
        out = np.empty(bits.shape, dtype=np.float32)
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def round_to_bfloat16(values: np.ndarray, out: np.ndarray) -> None:
    """The flat float32 ``values`` rounded to bfloat16, to nearest with ties to even, into ``out`` (flat, 16 bits).

    On the bits: adding ``0x7FFF`` plus the lowest kept bit, then dropping
    the low 16 bits, rounds to nearest, ties to even; a carry into the
    exponent is right too (the largest floats round to infinity). NaN stays
    NaN (its sign and top payload bits kept, made quiet). Block by block.
    """
    out = out.view(np.uint16)
    scratch = np.empty(min(BLOCK_VALUES, max(values.size, 1)), dtype=np.uint32)
    for begin in range(0, values.size, scratch.size):
        block = values[begin : begin + scratch.size]
        bits, rounded = block.view(np.uint32), scratch[: block.size]
        np.right_shift(bits, 16, out=rounded)
        np.bitwise_and(rounded, 1, out=rounded)
        np.add(rounded, 0x7FFF, out=rounded)
        np.add(rounded, bits, out=rounded)  # wraps around only for negative NaN, replaced below
        np.right_shift(rounded, 16, out=rounded)
        out[begin : begin + block.size] = rounded
        not_a_number = np.isnan(block)
        if not_a_number.any():
            out[begin : begin + block.size][not_a_number] = (bits[not_a_number] >> 16) | 0x0040

"""The fixed code tables of bitsandbytes' formats, rebuilt bit for bit on the host with numpy.

NF4 and FP4 map a 4-bit code to a value in [-1, 1]; the dynamic 8-bit map quantises the absmax
of 4-bit blocks under double quantisation. tests/test_quant.py checks each table against
bitsandbytes itself.
"""

from __future__ import annotations

import functools

import numpy as np

f32 = np.float32

# NF4 (QLoRA): normal-distribution quantiles scaled to [-1, 1]; sorted, so the code is the rank.
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=f32,
)

# FP4 (bitsandbytes' own E2M1 with bias 2, not the OCP grid): listed by bit pattern, bit 3 the
# sign, divided by the largest magnitude in float32. Code 8 is -0, as in bnb's CUDA and native
# CPU kernels (its PyTorch kernel, used on CPU for an odd last dimension, gives +0).
FP4 = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], f32) / f32(12)

TABLES_4BIT = {"nf4": NF4, "fp4": FP4}


@functools.cache
def bounds_4bit(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(midpoints between the sorted values, code of each sorted value).

    A scaled weight x gets sorted rank #(midpoints < x): a value exactly on a midpoint takes the
    lower code, as torch.bucketize does in bitsandbytes. FP4's two zeros sort code 0 first, so
    x <= 0 rounding to zero gets code 0 and tiny positives code 8, as in bitsandbytes.
    """
    table = TABLES_4BIT[kind]
    order = np.argsort(table, kind="stable").astype(np.uint8)
    ranked = table[order]
    midpoints = ((ranked[:-1] + ranked[1:]) / f32(2)).astype(f32)
    return midpoints, order


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32 on CPU: each half is an fma from its own end."""
    s, e = f32(start), f32(end)
    step = f32((e - s) / f32(steps - 1))
    i = np.arange(steps)
    low = (np.float64(s) + np.float64(step) * i).astype(f32)
    high = (np.float64(e) - np.float64(step) * (steps - 1 - i)).astype(f32)
    return np.where(i < steps // 2, low, high).astype(f32)


@functools.cache
def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed "dynamic" 8-bit map (create_dynamic_map(), 7 exponent bits): 256
    sorted float32 values; 2**i linear fractions at decade 10**(i-6) for i < 7, their negatives,
    0 and 1. Not an IEEE fp8 or int8 grid."""
    positive = []
    for i in range(7):
        edges = _torch_linspace(0.1, 1.0, 2**i + 1)
        means = ((edges[:-1] + edges[1:]) / f32(2)).astype(f32)
        positive.append((means * f32(10.0 ** (i - 6))).astype(f32))
    pos = np.sort(np.concatenate(positive))
    return np.concatenate([-pos[::-1], [f32(0)], pos, [f32(1)]]).astype(f32)


LUT_SIZE = 65536


@functools.cache
def dynamic_lut() -> np.ndarray:
    """bitsandbytes' CPU 8-bit quantiser does not search the map: it rounds x in [-1, 1] to one of
    65536 evenly spaced points and reads that point's nearest code (ties low) from this table."""
    code = dynamic_map()
    midpoints = (f32(0.5) * (code[:-1] + code[1:])).astype(f32)
    i = np.arange(LUT_SIZE, dtype=f32)
    points = (f32(-1) + (f32(2) * i) / f32(LUT_SIZE - 1)).astype(f32)
    return np.searchsorted(midpoints, points, side="left").astype(np.uint8)

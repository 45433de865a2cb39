"""The C++ standard library's `std::mt19937` and `std::mt19937_64` streams, in numpy.

Megatron-LM builds its BERT sample map in C++ with these two generators, seeded the
standard way (`init_genrand` and its 64-bit twin). numpy's `MT19937(seed)` seeds through a
SeedSequence and so gives another stream; its legacy `RandomState(seed)` does seed with
`init_genrand`, and a full-range uint32 draw returns one raw output, so the 32-bit stream
comes from it. The 64-bit generator is written out here: the recurrence of Matsumoto and
Nishimura's mt19937-64, one block of 312 words at a time, vectorised.
"""
from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1


class MT19937:
    """`std::mt19937(seed)`: `next()` is one 32-bit output (as a Python int)."""

    BLOCK = 4096

    def __init__(self, seed: int):
        self._rs = np.random.RandomState(int(seed) & 0xFFFFFFFF)
        self._buf = np.empty(0, dtype=np.uint32)
        self._pos = 0

    def next(self) -> int:
        if self._pos == len(self._buf):
            self._buf = self._rs.randint(0, 1 << 32, size=self.BLOCK, dtype=np.uint32)
            self._pos = 0
        self._pos += 1
        return int(self._buf[self._pos - 1])


class MT19937_64:
    """`std::mt19937_64(seed)`: `draws(n)` are the next n 64-bit outputs (uint64 array)."""

    N, M = 312, 156
    MATRIX_A = np.uint64(0xB5026F5AA96619E9)
    UPPER = np.uint64(0xFFFFFFFF80000000)
    LOWER = np.uint64(0x7FFFFFFF)

    def __init__(self, seed: int):
        state = [int(seed) & MASK64]
        for i in range(1, self.N):
            prev = state[-1]
            state.append((6364136223846793005 * (prev ^ (prev >> 62)) + i) & MASK64)
        self._mt = np.array(state, dtype=np.uint64)
        self._out = np.empty(0, dtype=np.uint64)
        self._pos = 0

    def _mix(self, upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
        x = (upper & self.UPPER) | (lower & self.LOWER)
        return (x >> np.uint64(1)) ^ np.where(x & np.uint64(1), self.MATRIX_A, np.uint64(0))

    def _twist(self) -> None:
        mt, n, m = self._mt, self.N, self.M
        mt[: n - m] = mt[m:] ^ self._mix(mt[: n - m], mt[1: n - m + 1])  # reads only old words
        mt[n - m: n - 1] = mt[: m - 1] ^ self._mix(mt[n - m: n - 1], mt[n - m + 1:])  # new words from the first half
        mt[n - 1: n] = mt[m - 1: m] ^ self._mix(mt[n - 1: n], mt[:1])
        y = mt.copy()
        y ^= (y >> np.uint64(29)) & np.uint64(0x5555555555555555)
        y ^= (y << np.uint64(17)) & np.uint64(0x71D67FFFEDA60000)
        y ^= (y << np.uint64(37)) & np.uint64(0xFFF7EEE000000000)
        y ^= y >> np.uint64(43)
        self._out, self._pos = y, 0

    def draws(self, count: int) -> np.ndarray:
        parts, need = [], int(count)
        while need > 0:
            if self._pos == len(self._out):
                self._twist()
            take = min(need, len(self._out) - self._pos)
            parts.append(self._out[self._pos: self._pos + take])
            self._pos += take
            need -= take
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)

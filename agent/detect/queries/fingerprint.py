"""Compact fingerprints of input rows, after Blacklight (Li et al., USENIX Security 2022).

A black-box attack (boundary, HopSkipJump, Square) queries the model with inputs that differ from each other
by small perturbations. Blacklight's observation: quantise the input, hash every window of consecutive
quantised values, and keep only the largest hashes. A small perturbation moves few values across a
quantisation step, so most windows, and most of the kept hashes, stay the same; two unrelated inputs share
few. Two rows whose fingerprints share at least a threshold of hashes are near-duplicates.

:class:`Fingerprinter` does it in O(n) numpy work per row of n values:

- quantise: ``value / step`` rounded to the nearest integer (NaN and infinities clipped to +-2**62). Rounding,
  not flooring: then 0 and 1 (and 255 in steps of 51) are the middles of their steps, not their edges, and
  saturated values, which images are full of, do not change step at the least nudge;
- hash each window of ``window`` consecutive values with a polynomial hash, all windows at once from prefix
  sums modulo 2**64, then a 64-bit mix (splitmix64's finaliser) of the hash XOR a secret key. Multiplier and
  key are drawn at random per process: someone who knows this code cannot tell which windows will be kept;
- drop the windows whose values are all equal (a blank background says nothing of the input, and every
  image has one);
- keep the ``hashes`` largest distinct hashes, stored as their low 16 bits (sorted; 0 is stored as 1, so that
  0 can pad). 16 bits are plenty: two unrelated fingerprints of 50 hashes share 50 * 50 / 65536 = 0.04 hashes by
  chance, against a threshold of 20; the stored bits are not the bits the selection ranked by.

>>> fingerprinter = Fingerprinter(window=8, hashes=16, seed=1)
>>> rows = np.random.default_rng(0).random((2, 400))
>>> a = fingerprinter(rows[0], step=0.2)
>>> len(a), a.dtype.name
(16, 'uint16')
>>> nudged = rows[0].copy()
>>> nudged[[10, 200, 300]] += 0.3
>>> shared(a, fingerprinter(nudged, step=0.2)) >= 12  # three values moved: most hashes survive
True
>>> shared(a, fingerprinter(rows[1], step=0.2)) <= 2  # another input: next to none
True
"""

from __future__ import annotations

import random
import secrets
from collections import OrderedDict

import numpy as np

_MASK64 = (1 << 64) - 1
# splitmix64's finaliser constants.
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# Row lengths whose power tables are kept (models take one or a few input sizes).
_CACHED_LENGTHS = 8
# The candidates np.partition keeps before the sort: a few times the hashes kept, for duplicates among them.
_CANDIDATES = 4
_LARGEST = 2.0 ** 62  # quantised values are clipped here (int64 must hold them)


def _mix(values: np.ndarray) -> np.ndarray:
    values ^= values >> np.uint64(30)
    values *= _MIX1
    values ^= values >> np.uint64(27)
    values *= _MIX2
    values ^= values >> np.uint64(31)
    return values


def shared(a: np.ndarray, b: np.ndarray) -> int:
    """How many hashes two fingerprints share (both sorted, distinct)."""
    return int(np.intersect1d(a, b, assume_unique=True).size)


class Fingerprinter:
    """Fingerprints of rows (module docstring): ``window`` values per hashed window, ``hashes`` hashes kept.
    ``seed`` fixes the secret multiplier and key (tests); by default they are random per process."""

    def __init__(self, window: int, hashes: int, seed: int | None = None) -> None:
        self.window = window
        self.hashes = hashes
        bits = secrets.randbits if seed is None else random.Random(seed).getrandbits
        self._multiplier = bits(64) | 1  # odd: invertible modulo 2**64
        self._inverse = pow(self._multiplier, -1, 1 << 64)
        self._key = np.uint64(bits(64))
        # Row length -> (multiplier ** k for k < n, inverse ** k for k <= n - window), least recently used first.
        self._powers: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _power_tables(self, length: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        tables = self._powers.get(length)
        if tables is None:
            tables = (_powers(self._multiplier, length), _powers(self._inverse, length - window + 1))
            self._powers[length] = tables
            if len(self._powers) > _CACHED_LENGTHS:
                self._powers.popitem(last=False)
        else:
            self._powers.move_to_end(length)
        return tables

    def __call__(self, row: np.ndarray, step: float) -> np.ndarray:
        """The fingerprint of one row (any shape, flattened): sorted distinct uint16, at most ``hashes``."""
        return self.rows(np.asarray(row).reshape(1, -1), step)[0]

    def rows(self, rows: np.ndarray, step: float) -> list[np.ndarray]:
        """The fingerprints of the rows of a 2-D array, hashed all at once (a request's batch)."""
        scaled = np.asarray(rows, dtype=np.float64) / step
        # fmax and fmin take the number over a NaN: NaN becomes -_LARGEST, infinities are clipped.
        np.fmin(np.fmax(scaled, -_LARGEST, out=scaled), _LARGEST, out=scaled)
        quantised = np.floor(scaled + 0.5).astype(np.int64)
        count_rows, length = quantised.shape
        if length == 0:
            return [np.empty(0, np.uint16)] * count_rows
        window = min(self.window, length)
        count = length - window + 1
        # Windows with at least two distinct values: the changes between neighbours, summed over the window.
        changes = np.zeros((count_rows, length), np.int64)
        np.cumsum(quantised[:, 1:] != quantised[:, :-1], axis=1, out=changes[:, 1:])
        varied = changes[:, window - 1:] != changes[:, :count]
        if window == 1:
            varied[:] = True
        powers, inverses = self._power_tables(length, window)
        with np.errstate(over="ignore"):
            # sum over the window of q[m] * M**(n-1-m), from prefix sums, times M**-(n-window-i): the polynomial
            # hash sum_j q[i+j] * M**(window-1-j) of window i, modulo 2**64 (uint64 arithmetic wraps).
            prefix = np.zeros((count_rows, length + 1), np.uint64)
            np.cumsum(quantised.view(np.uint64) * powers[::-1], axis=1, out=prefix[:, 1:])
            hashes = _mix((prefix[:, window:] - prefix[:, :count]) * inverses[::-1] ^ self._key)
        return self._largest(np.where(varied, hashes, np.uint64(0)))

    def _largest(self, hashes: np.ndarray) -> list[np.ndarray]:
        """Each row's ``hashes`` largest distinct hashes (0: a window that was dropped), stored as uint16. All rows
        at once: the candidates by np.partition, duplicates set to 0 and sorted below the rest."""
        keep = self.hashes
        count_rows, columns = hashes.shape
        candidates = min(columns, _CANDIDATES * keep)
        top = np.partition(hashes, columns - candidates, axis=1)[:, columns - candidates:] \
            if candidates < columns else hashes.copy()
        top.sort(axis=1)
        top[:, 1:][top[:, 1:] == top[:, :-1]] = 0
        top.sort(axis=1)
        distinct = np.count_nonzero(top, axis=1)
        fingerprints = []
        for row, found in enumerate(distinct.tolist()):
            if found < keep and candidates < columns:
                chosen = _distinct(hashes[row][hashes[row] != 0])[-keep:]  # many equal among the largest: rare
            else:
                chosen = top[row, candidates - min(found, keep):]
            stored = (chosen & np.uint64(0xFFFF)).astype(np.uint16)
            stored[stored == 0] = 1  # 0 pads the unused slots of a client's table (clients.py)
            fingerprints.append(_distinct(stored))
        return fingerprints


def _distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values, sorted (np.unique, without its overhead on small arrays)."""
    values = np.sort(values)
    if values.size > 1:
        values = values[np.concatenate(([True], values[1:] != values[:-1]))]
    return values


def _powers(base: int, count: int) -> np.ndarray:
    """base ** k modulo 2**64 for k < count, as uint64."""
    factors = np.full(count, base & _MASK64, dtype=np.uint64)
    factors[:1] = 1
    with np.errstate(over="ignore"):
        return np.cumprod(factors, dtype=np.uint64)

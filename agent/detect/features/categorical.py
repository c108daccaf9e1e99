"""Categorical inputs or outputs: integer codes, or BYTES labels from a bounded vocabulary.

One or more columns (``[N]``, ``[N, 1]`` or ``[N, F]`` with ``F <= 16``). Per column, shares (one-hot,
values 0 or 1 per row) of:

``<col>=<category>``  each of the reference's ``top_k`` most frequent categories;
``<col>=<other>``     a category seen in the reference but not among the top ``top_k``;
``<col>=<unseen>``    a category never seen in the reference (the rate of new categories).

Categories are keys: an integer code (an integral float counts; NaN or None is ``<missing>``, a
category like any other), or the first 64 bytes of a label (UTF-8, invalid bytes escaped). A
non-integral number or an object that is neither makes the row invalid. The reference's vocabulary is
kept as a :class:`~agent.detect.features.block.HashedSet` (``buckets`` bits, 8 KiB by default), so
its size is bounded whatever the reference holds; a new category that hashes onto a seen one's bit is
missed (about :attr:`HashedSet.fill` of them).

>>> import numpy as np
>>> ref = np.array([b"fr", b"de", b"de", b"it"] * 10, dtype=object)
>>> cat = CategoricalFeatures(top_k=2, columns=["country"]).fit(ref)
>>> cat.top[0]
['de', 'fr']
>>> block = cat.transform(np.array([b"de", b"it", b"pl"], dtype=object))
>>> [(name, block.shares[name].tolist()) for name in block.shares]  # doctest: +NORMALIZE_WHITESPACE
[('country=de', [1.0, 0.0, 0.0]), ('country=fr', [0.0, 0.0, 0.0]), ('country=<other>', [0.0, 1.0, 0.0]),
 ('country=<unseen>', [0.0, 0.0, 1.0])]
>>> CategoricalFeatures().fit(np.arange(40) % 3).transform(np.array([0.5, 2])).valid.tolist()
[False, True]
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping, Self, Sequence

import numpy as np

from agent.detect.features.block import FeatureBlock, HashedSet, TensorFeatures, TensorShapeError, clean_name

MAX_COLUMNS = 16
MAX_TOP_K = 100
MAX_KEY_BYTES = 64
MISSING = "<missing>"


def category_key(value: Any) -> str | None:
    """The key of one element, or None if it cannot be a category.

    >>> category_key(3), category_key(3.0), category_key(b"DE"), category_key(float("nan")), category_key(2.5)
    ('3', '3', 'DE', '<missing>', None)
    """
    if value is None:
        return MISSING
    if isinstance(value, bytes | bytearray):
        return bytes(value[:MAX_KEY_BYTES]).decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")[:MAX_KEY_BYTES].decode("utf-8", "backslashreplace")
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return MISSING
        if math.isfinite(value) and float(value).is_integer():
            return str(int(value))
    return None


def _labels(top: list[str]) -> list[str]:
    """Bounded, unique labels of the top categories, then ``<other>`` and ``<unseen>``."""
    labels: list[str] = []
    for i, key in enumerate(top):
        label = clean_name(key, 32)
        labels.append(label if label not in labels and label not in ("<other>", "<unseen>") else f"{label}~{i}")
    return labels + ["<other>", "<unseen>"]


class CategoricalFeatures(TensorFeatures):
    """Category shares per column (module docstring). ``top_k`` (1 to 100) categories per column keep a
    share of their own; ``columns`` names the columns (``category`` for one, ``col_0...`` for several);
    ``buckets`` sizes the hashed vocabulary."""

    kind = "categorical"

    def __init__(self, top_k: int = 20, columns: Sequence[str] | None = None, buckets: int = 1 << 16) -> None:
        if not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"sidewatch: categorical top_k must be 1 to {MAX_TOP_K}")
        self.top_k = int(top_k)
        self.columns = None if columns is None else [clean_name(c) for c in columns]
        self.buckets = int(buckets)
        self.top: list[list[str]] = []
        self.vocabularies: list[HashedSet] = []

    def params(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "columns": self.columns, "buckets": self.buckets}

    def _keys(self, x: Any, width: int | None) -> tuple[list[list[str | None]], np.ndarray]:
        a = x if isinstance(x, np.ndarray) else np.asarray(x, dtype=object)
        if a.ndim == 1:
            a = a[:, None]
        if a.ndim != 2 or not 1 <= a.shape[1] <= MAX_COLUMNS:
            raise TensorShapeError(f"sidewatch: categorical features need [n] or [n, F] with F <= {MAX_COLUMNS}, "
                                   f"got shape {a.shape}")
        if width is not None and a.shape[1] != width:
            raise TensorShapeError(f"sidewatch: categorical features fitted on {width} columns, got {a.shape[1]}")
        if a.dtype.kind not in "biufOSU":
            raise TensorShapeError(f"sidewatch: cannot read categories from an array of {a.dtype}")
        columns = [[category_key(v) for v in a[:, j].tolist()] for j in range(a.shape[1])]
        ok = np.ones(a.shape[0], dtype=bool)
        for keys in columns:
            ok &= np.fromiter((k is not None for k in keys), dtype=bool, count=len(keys))
        return columns, ok

    def fit(self, reference: Any) -> Self:
        columns, ok = self._keys(reference, None if self.columns is None else len(self.columns))
        self._enough(ok)
        rows = np.flatnonzero(ok).tolist()
        self.top, self.vocabularies = [], []
        for keys in columns:
            kept = [keys[i] for i in rows]
            counts = Counter(kept)
            self.top.append(sorted(sorted(counts, key=lambda k: (-counts[k], k))[:self.top_k]))
            vocabulary = HashedSet(self.buckets)
            vocabulary.add(list(counts))
            self.vocabularies.append(vocabulary)
        if self.columns is None:
            self.columns = ["category"] if len(columns) == 1 else [f"col_{j}" for j in range(len(columns))]
        self.fitted = True
        return self

    def transform(self, batch: Any) -> FeatureBlock:
        self._check_fitted()
        columns, ok = self._keys(batch, len(self.columns))
        n = len(ok)
        shares: dict[str, np.ndarray] = {}
        groups: dict[str, str] = {}
        for name, keys, top, vocabulary in zip(self.columns, columns, self.top, self.vocabularies):
            index = {k: i for i, k in enumerate(top)}
            other, unseen = len(top), len(top) + 1
            known = vocabulary.contains([k or "" for k in keys])
            slot = np.array([index.get(k, other if seen else unseen) for k, seen in zip(keys, known.tolist())],
                            dtype=np.int64).reshape(n)
            for i, label in enumerate(_labels(top)):
                share = (slot == i).astype(np.float64)
                share[~ok] = np.nan
                shares[f"{name}={label}"] = share
                groups[f"{name}={label}"] = name
        return FeatureBlock(valid=ok, shares=shares, share_groups=groups)

    @property
    def feature_names(self) -> list[str]:
        return [f"{name}={label}" for name, top in zip(self.columns, self.top) for label in _labels(top)]

    def fitted_state(self) -> dict[str, Any]:
        return {"top": self.top, "vocabularies": [v.state_dict() for v in self.vocabularies]}

    def load_fitted(self, state: Mapping[str, Any]) -> None:
        self.top = [[str(k) for k in top] for top in state["top"]]
        self.vocabularies = [HashedSet.from_state(v) for v in state["vocabularies"]]
        if self.columns is None or not len(self.columns) == len(self.top) == len(self.vocabularies):
            raise ValueError("sidewatch: categorical feature state: one vocabulary per column expected")

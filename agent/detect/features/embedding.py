"""Embeddings and any wide float vector ``[N, D]``: a fixed random projection to ``k`` columns.

``proj_0 .. proj_{k-1}`` are ``x . r_i`` for ``k`` fixed random sign vectors ``r_i`` (entries
``+-1 / sqrt(D)``), and ``rms`` is the vector's root mean square. As continuous features they feed
:class:`~agent.detect.drift.moments.MomentFeatures`, which tests their means and, through its squared
random projections, their covariance: a two-moment test of the vectors' distribution on a
``k``-dimensional sketch (cheaper and easier to budget than a kernel MMD, and blind only to changes
orthogonal to every ``r_i`` in the first two moments).

The signs come from SplitMix64 of ``(seed, i, j)`` in integer arithmetic: the same on every host and
numpy version, so the state stores ``seed`` and ``D`` only. A row with NaN or Inf is invalid.

>>> import numpy as np
>>> emb = EmbeddingFeatures(k=4).fit(np.random.default_rng(0).normal(size=(50, 300)))
>>> block = emb.transform(np.ones((2, 300)))
>>> block.continuous_names, float(block.continuous[0, -1])
(['proj_0', 'proj_1', 'proj_2', 'proj_3', 'rms'], 1.0)
>>> bool((EmbeddingFeatures.from_state(emb.state_dict()).signs == emb.signs).all())
True
"""

from __future__ import annotations

from typing import Any, Mapping, Self

import numpy as np

from agent.detect.features.block import FeatureBlock, TensorFeatures, TensorShapeError, as_numbers

MAX_DIM = 1 << 16
MAX_K = 64


def random_signs(seed: int, rows: int, cols: int) -> np.ndarray:
    """``[rows, cols]`` of +-1 from SplitMix64 of ``seed * 2**32 + i * cols + j`` (deterministic).

    >>> random_signs(0, 2, 3).tolist()
    [[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]
    """
    z = (np.uint64(seed & 0xFFFFFFFF) << np.uint64(32)) + np.arange(rows * cols, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return np.where(z >> np.uint64(63), 1.0, -1.0).reshape(rows, cols)


class EmbeddingFeatures(TensorFeatures):
    """A seeded random projection of ``[N, D]`` vectors to ``k`` (1 to 64) columns, plus their rms."""

    kind = "embedding"

    def __init__(self, k: int = 16, seed: int = 0, dim: int | None = None) -> None:
        if not 1 <= k <= MAX_K:
            raise ValueError(f"sidewatch: embedding k must be 1 to {MAX_K}")
        self.k = int(k)
        self.seed = int(seed)
        self.dim = dim
        self.signs = np.zeros((0, self.k))

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "seed": self.seed, "dim": self.dim}

    def _matrix(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        values, ok = as_numbers(x)
        if values.ndim != 2 or not 1 <= values.shape[1] <= MAX_DIM:
            raise TensorShapeError(f"sidewatch: embedding features need [N, D] with D <= {MAX_DIM}, "
                                   f"got shape {values.shape}")
        if self.dim is not None and values.shape[1] != self.dim:
            raise TensorShapeError(f"sidewatch: embedding features fitted on D = {self.dim}, got {values.shape[1]}")
        return values, ok & np.isfinite(values).all(axis=1)

    def fit(self, reference: Any) -> Self:
        self.dim = None
        values, ok = self._matrix(reference)
        self._enough(ok)
        self.dim = int(values.shape[1])
        self.load_fitted({})
        self.fitted = True
        return self

    def transform(self, batch: Any) -> FeatureBlock:
        self._check_fitted()
        values, ok = self._matrix(batch)
        clean = np.where(ok[:, None], values, 0.0)
        features = np.empty((len(clean), self.k + 1))
        features[:, :self.k] = clean @ self.signs
        features[:, self.k] = np.sqrt(np.mean(clean * clean, axis=1)) if clean.size else 0.0
        features[~ok] = np.nan
        names = [f"proj_{i}" for i in range(self.k)] + ["rms"]
        return FeatureBlock(valid=ok, continuous=features, continuous_names=names)

    def fitted_state(self) -> dict[str, Any]:
        return {}

    def load_fitted(self, state: Mapping[str, Any]) -> None:
        if self.dim is None or not 1 <= self.dim <= MAX_DIM:
            raise ValueError("sidewatch: embedding feature state needs its dimension")
        self.signs = random_signs(self.seed, self.dim, self.k) / np.sqrt(self.dim)

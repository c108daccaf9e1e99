"""Model outputs: class probabilities or logits ``[N, K]``, and a value per row (regression or a score).

:class:`ClassifierOutput` (``[N, K]``, ``K >= 2``): as the image classifier has today, the predicted
class, the top-1 confidence and the entropy (nats) of the class probabilities; logits get their
softmax first. ``output`` says which the model answers; left None, :meth:`~ClassifierOutput.fit`
decides from the reference (probabilities if every row is in [0, 1] and sums to 1 within 1e-3).
Class shares are bounded: with ``K <= top_k`` every class has its share; otherwise the reference's
``top_k`` most predicted classes have one and the rest share ``class_other``. Block: ``classes`` (and
``class_names``), scalars ``confidence`` and ``entropy``.

:class:`ValueOutput` (``[N]``, ``[N, 1]``): the value as a continuous feature (its mean) and as a
scalar (its reference-decile bins: the distribution's shape). As a ``score`` (a binary classifier's
probability), also the share ``positive`` of values at or above ``threshold``.

A row with NaN or Inf (or, for probabilities, values outside [0, 1]) is invalid.

>>> import numpy as np
>>> clf = ClassifierOutput().fit(np.tile([[0.9, 0.1], [0.2, 0.8]], (10, 1)))
>>> block = clf.transform(np.array([[0.7, 0.3], [np.nan, 1.0]]))
>>> clf.output, block.classes.tolist(), block.scalars["confidence"].tolist(), block.valid.tolist()
('probabilities', [0, -1], [0.7, nan], [True, False])
>>> reg = ValueOutput().fit(np.arange(20.0))
>>> reg.transform(np.array([[1.5], [2.0]])).scalars["value"].tolist()
[1.5, 2.0]
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Self

import numpy as np

from agent.detect.features.block import FeatureBlock, TensorFeatures, TensorShapeError, as_numbers
from agent.detect.features.core import entropy, softmax

MAX_CLASSES = 100_000
OUTPUTS = ("probabilities", "logits")


class ClassifierOutput(TensorFeatures):
    """Predicted class, confidence and entropy of ``[N, K]`` probabilities or logits (module docstring)."""

    kind = "classifier"

    def __init__(self, output: str | None = None, top_k: int = 20, n_outputs: int | None = None) -> None:
        if output is not None and output not in OUTPUTS:
            raise ValueError(f"sidewatch: classifier output must be one of {OUTPUTS}, got {output!r}")
        if not 1 <= top_k <= 100:
            raise ValueError("sidewatch: classifier top_k must be 1 to 100")
        self.output = output
        self.top_k = int(top_k)
        self.n_outputs = n_outputs
        self.top: list[int] = []

    def params(self) -> dict[str, Any]:
        return {"output": self.output, "top_k": self.top_k, "n_outputs": self.n_outputs}

    def _matrix(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        values, ok = as_numbers(x)
        if values.ndim != 2 or not 2 <= values.shape[1] <= MAX_CLASSES:
            raise TensorShapeError(f"sidewatch: classifier outputs need [N, K] with K >= 2, got shape {values.shape}")
        if self.n_outputs is not None and values.shape[1] != self.n_outputs:
            raise TensorShapeError(f"sidewatch: classifier fitted on {self.n_outputs} classes, got {values.shape[1]}")
        return values, ok & np.isfinite(values).all(axis=1)

    def _probabilities(self, values: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        clean = np.where(ok[:, None], values, 0.0)
        if self.output == "logits":
            return softmax(clean), ok
        return clean, ok & ((clean >= -1e-6) & (clean <= 1 + 1e-6)).all(axis=1)

    def fit(self, reference: Any) -> Self:
        self.n_outputs = None
        values, ok = self._matrix(reference)
        self._enough(ok)
        if self.output is None:
            v = values[ok]
            sums_to_one = np.abs(v.sum(axis=1) - 1.0) < 1e-3
            self.output = "probabilities" if ((v >= 0) & (v <= 1)).all() and sums_to_one.all() else "logits"
        self.n_outputs = int(values.shape[1])
        p, ok = self._probabilities(values, ok)
        self._enough(ok)
        if self.n_outputs <= self.top_k:
            self.top = list(range(self.n_outputs))
        else:
            counts = Counter(p[ok].argmax(axis=1).tolist())
            self.top = sorted(sorted(counts, key=lambda k: (-counts[k], k))[:self.top_k])
        self.fitted = True
        return self

    @property
    def class_names(self) -> list[str]:
        names = [f"class_{k}" for k in self.top]
        return names + (["class_other"] if len(self.top) < (self.n_outputs or 0) else [])

    def transform(self, batch: Any) -> FeatureBlock:
        self._check_fitted()
        values, ok = self._matrix(batch)
        p, ok = self._probabilities(values, ok)
        predicted = p.argmax(axis=1) if len(p) else np.zeros(0, dtype=np.int64)
        names = self.class_names
        lookup = np.full(self.n_outputs, len(names) - 1, dtype=np.int64)
        lookup[self.top] = np.arange(len(self.top))
        classes = np.where(ok, lookup[predicted], -1)
        confidence = np.where(ok, p.max(axis=1) if len(p) else 0.0, np.nan)
        nats = np.where(ok, entropy(p, axis=1), np.nan)
        return FeatureBlock(valid=ok, classes=classes, n_classes=len(names), class_names=names,
                            scalars={"confidence": confidence, "entropy": nats})

    def fitted_state(self) -> dict[str, Any]:
        return {"top": self.top}

    def load_fitted(self, state: Mapping[str, Any]) -> None:
        self.top = [int(k) for k in state["top"]]
        if self.n_outputs is None or self.output is None or not all(0 <= k < self.n_outputs for k in self.top):
            raise ValueError("sidewatch: classifier feature state: bad classes, output or top classes")


class ValueOutput(TensorFeatures):
    """One value per row: a regression output, or with ``score=True`` a binary score (module docstring)."""

    kind = "regression"

    def __init__(self, score: bool = False, threshold: float = 0.5) -> None:
        self.score = bool(score)
        self.threshold = float(threshold)

    def params(self) -> dict[str, Any]:
        return {"score": self.score, "threshold": self.threshold}

    def _values(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        values, ok = as_numbers(x)
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise TensorShapeError(f"sidewatch: a value output needs [N] or [N, 1], got shape {values.shape}")
        ok = ok & np.isfinite(values)
        return np.where(ok, values, np.nan), ok

    def fit(self, reference: Any) -> Self:
        self._enough(self._values(reference)[1])
        self.fitted = True
        return self

    def transform(self, batch: Any) -> FeatureBlock:
        self._check_fitted()
        values, ok = self._values(batch)
        block = FeatureBlock(valid=ok, continuous=values[:, None], continuous_names=["value"],
                             scalars={"value": values})
        if self.score:
            positive = (values >= self.threshold).astype(np.float64)
            positive[~ok] = np.nan
            block.shares["positive"] = positive
        return block

    def fitted_state(self) -> dict[str, Any]:
        return {}

    def load_fitted(self, state: Mapping[str, Any]) -> None:
        return None

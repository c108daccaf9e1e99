"""Numeric tabular inputs ``[N, F]`` (FP*, INT*): one continuous feature per column, and two rates.

Continuous: each column standardised by the reference (``(x - mean) / sd``; a constant column keeps
sd 1), a missing value imputed by the reference mean (0 after standardising), so that NaN never
reaches a mean. The columns are standardised here, not only in MomentFeatures, because MomentFeatures
floors each column's scale at a share of the *group's* root mean square sd: with raw units of very
different sizes (an area in the thousands beside a smoothness near 0.1) the small columns would be
floored out of sight.

Shares (0 or 1 per row, whose means are rates; a rate of rows, not of values, so that one column
going missing in 20% of the rows is a 20% rate whatever the number of columns):

``missing``       1 if the row has a missing value (NaN or Inf);
``out_of_range``  1 if the row has a (finite) value outside the reference's range, widened by
                  ``margin`` times its width on each side (so that a held-out row from the same source
                  rarely leaves it, while a unit change, a sentinel such as -999 or a new regime does).

A row with an element that is not a number (a string where a number is expected) is invalid.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> ref = rng.normal([10.0, 1000.0], [1.0, 100.0], size=(500, 2))
>>> tab = NumericFeatures(columns=["age", "income"]).fit(ref)
>>> block = tab.transform(np.array([[10.0, np.nan], [10.0, 1e6], [np.inf, 1000.0]]))
>>> block.continuous_names, block.continuous[:, 1].round(2).tolist()
(['age', 'income'], [0.0, 10326.17, 0.01])
>>> block.shares["missing"].tolist(), block.shares["out_of_range"].tolist(), block.valid.tolist()
([1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [True, True, True])
>>> tab.transform(np.array([["10", "x"]], dtype=object)).valid.tolist()   # not a number: unreadable
[False]
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Self, Sequence

import numpy as np

from agent.detect.features.block import FeatureBlock, TensorFeatures, TensorShapeError, as_numbers, clean_name

MAX_COLUMNS = 256


class NumericFeatures(TensorFeatures):
    """Numeric columns ``[N, F]`` (``[N]`` is one column). ``columns``: names (``col_0...`` by default);
    ``margin``: how far beyond the reference's range (in shares of its width) a value is out of range."""

    kind = "numeric"

    def __init__(self, columns: Sequence[str] | None = None, margin: float = 0.1) -> None:
        if not 0 <= margin <= 10:
            raise ValueError("sidewatch: numeric margin must be in [0, 10]")
        self.columns = None if columns is None else [clean_name(c) for c in columns]
        self.margin = float(margin)
        self.mean = np.zeros(0)
        self.scale = np.ones(0)
        self.low = np.zeros(0)
        self.high = np.zeros(0)

    def params(self) -> dict[str, Any]:
        return {"columns": self.columns, "margin": self.margin}

    def _matrix(self, x: Any, width: int | None) -> tuple[np.ndarray, np.ndarray]:
        values, ok = as_numbers(x)
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2:
            raise TensorShapeError(f"sidewatch: numeric features need [n, F], got shape {values.shape}")
        if width is not None and values.shape[1] != width:
            raise TensorShapeError(f"sidewatch: numeric features fitted on {width} columns, got {values.shape[1]}")
        if values.shape[1] > MAX_COLUMNS or values.shape[1] < 1:
            raise TensorShapeError(f"sidewatch: numeric features take 1 to {MAX_COLUMNS} columns, "
                                   f"got {values.shape[1]} (an embedding kind fits wide vectors)")
        return values, ok

    def fit(self, reference: Any) -> Self:
        width = None if self.columns is None else len(self.columns)
        values, ok = self._matrix(reference, width)
        self._enough(ok)
        x = np.where(np.isfinite(values[ok]), values[ok], np.nan)
        seen = np.isfinite(x).any(axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)    # all-NaN columns
            mean = np.where(seen, np.nanmean(x, axis=0), 0.0)
            sd = np.where(seen, np.nanstd(x, axis=0), 1.0)
            low, high = np.nanmin(x, axis=0), np.nanmax(x, axis=0)
        width = (high - low) * self.margin
        self.mean = mean
        self.scale = np.where(sd > 0, sd, 1.0)
        self.low, self.high = low - width, high + width     # NaN for a column never seen: never out of range
        if self.columns is None:
            self.columns = [f"col_{j}" for j in range(x.shape[1])]
        self.fitted = True
        return self

    def transform(self, batch: Any) -> FeatureBlock:
        self._check_fitted()
        values, ok = self._matrix(batch, len(self.columns))
        finite = np.isfinite(values)
        z = np.where(finite, (values - self.mean) / self.scale, 0.0)
        with np.errstate(invalid="ignore"):
            outside = finite & ((values < self.low) | (values > self.high))
        missing = (~finite).any(axis=1).astype(np.float64)
        out_of_range = outside.any(axis=1).astype(np.float64)
        z[~ok], missing[~ok], out_of_range[~ok] = np.nan, np.nan, np.nan
        return FeatureBlock(valid=ok, continuous=z, continuous_names=list(self.columns),
                            shares={"missing": missing, "out_of_range": out_of_range})

    def fitted_state(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "low": [None if np.isnan(v) else v for v in self.low.tolist()],
                "high": [None if np.isnan(v) else v for v in self.high.tolist()]}

    def load_fitted(self, state: Mapping[str, Any]) -> None:
        def arr(key: str) -> np.ndarray:
            return np.array([np.nan if v is None else v for v in state[key]], dtype=np.float64)
        self.mean, self.scale, self.low, self.high = arr("mean"), arr("scale"), arr("low"), arr("high")
        if self.columns is None or not all(len(a) == len(self.columns) for a in (self.mean, self.scale, self.low)):
            raise ValueError("sidewatch: numeric feature state: one mean, scale and range per column expected")

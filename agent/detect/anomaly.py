"""Per-request anomaly scores: an isolation forest (Liu, Ting and Zhou, "Isolation Forest", ICDM
2008) fitted on reference feature vectors, with a threshold set at a target false-positive rate.

Why scikit-learn's IsolationForest rather than river's HalfSpaceTrees: the reference is fixed (the
traffic must not teach the scorer what normal is, or a slow attack becomes normal), so nothing
needs to learn online; the forest is fitted once, in one vectorised call, and scores micro-batches
with array operations, where HalfSpaceTrees scores and learns one dict at a time in Python (tens of
microseconds per row) and needs the features scaled to [0, 1] beforehand.

Storage. The fitted trees are stored in the calibration (per tree: split feature, split threshold,
children, and each leaf's path length), and :meth:`AnomalyScorer.score` walks them with numpy, so
serving needs neither scikit-learn nor a refit, and a stored calibration scores the same way under
any scikit-learn version. Refitting from a stored reference sample with a fixed seed was the
alternative; it would tie every calibration to one scikit-learn version's random stream and put
scikit-learn on the edge device. scikit-learn is imported by :meth:`AnomalyScorer.fit` only.
The stored forest is a few hundred kilobytes of JSON for the defaults (100 trees of 256 samples).

Score. The paper's anomaly score ``s(x) = 2 ** (-E[h(x)] / c(psi))`` in (0, 1], higher is more
anomalous: ``h(x)`` is the depth of the leaf ``x`` falls in plus ``c(leaf size)``, the average
path length of an unsuccessful search in a binary search tree of that size (``c(n) = 2 H(n-1) -
2 (n-1)/n``, ``H(i) ~ ln(i) + 0.5772...``), ``E`` the mean over trees and ``psi`` the subsample
size. This equals ``-IsolationForest.score_samples``; like scikit-learn, features are compared
as float32 with the float64 split thresholds.

Threshold. The reference is shuffled (fixed seed) and split: the forest is fitted on the first
``1 - holdout`` and scored on the held-out rest, and the threshold is the smallest value with at
most ``floor(target_fpr * m)`` of the ``m`` held-out scores strictly above it (numpy's
``quantile(..., 1 - target_fpr, method="inverted_cdf")``, the rule of
:mod:`agent.detect.calibration.threshold`). A row is flagged when its score is strictly above the threshold.
Held-out data, not the fitting data, because the forest isolates its own training points less
easily than new ones, which would set the threshold too low.

Non-finite rows (any NaN or Inf feature) get score ``+inf`` and are flagged: a feature vector no
reference row could resemble, usually a broken client or pre-processing, is worth seeing. They are
counted in ``n_nonfinite``.
"""

from __future__ import annotations

import math
from typing import Any, Self

import numpy as np

CALIBRATION_VERSION = 1
EULER_GAMMA = 0.5772156649015329


def average_path_length(n: np.ndarray | float) -> np.ndarray:
    """``c(n)``: average path length of an unsuccessful search in a binary search tree of ``n``
    keys (Liu et al. 2008); 0 for ``n <= 1`` and 1 for ``n == 2``."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + EULER_GAMMA) - 2.0 * (n[big] - 1.0) / n[big]
    return out


class AnomalyScorer:
    """Isolation-forest anomaly scores for feature vectors, flagged at a target FPR.

    Parameters
    ----------
    target_fpr
        Fraction of held-out reference rows flagged (the expected false-positive rate).
    n_estimators, max_samples
        Trees, and rows per tree (``psi``); the paper's defaults.
    holdout
        Fraction of the reference kept out of the fit to set the threshold.
    seed
        Seed of the split and of the forest.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> scorer = AnomalyScorer(target_fpr=0.01).fit(rng.normal(size=(3000, 4)))
    >>> scorer.score(np.array([[0.0, 0.0, 0.0, 0.0], [8.0, -8.0, 8.0, -8.0]])).round(2).tolist()
    [0.37, 0.75]
    >>> scorer.flags.tolist()
    [False, True]
    """

    kind = "isolation_forest"

    def __init__(
        self,
        target_fpr: float = 0.01,
        n_estimators: int = 100,
        max_samples: int = 256,
        holdout: float = 0.3,
        seed: int = 0,
    ):
        if not 0.0 < target_fpr < 1.0:
            raise ValueError("sidewatch: target_fpr must be in (0, 1)")
        if not 0.0 < holdout < 1.0:
            raise ValueError("sidewatch: holdout must be in (0, 1)")
        self.target_fpr = float(target_fpr)
        self.n_estimators = int(n_estimators)
        self.max_samples = int(max_samples)
        self.holdout = float(holdout)
        self.seed = int(seed)
        self.threshold_: float | None = None
        self.n_features_: int | None = None
        self.heldout_: dict[str, Any] = {}
        self._forest: dict[str, np.ndarray] | None = None
        self.reset()

    def reset(self) -> Self:
        """Zero the counters; keep the forest and the threshold."""
        self.n = 0
        self.n_flagged = 0
        self.n_nonfinite = 0
        self.scores = np.empty(0)
        self.flags = np.empty(0, dtype=bool)
        return self

    # --- fitting -------------------------------------------------------------------------------

    def fit(self, reference: Any) -> AnomalyScorer:
        """Fit the forest on part of the reference rows and set the threshold on the rest.
        Rows with a non-finite feature are dropped."""
        # Fitting only: serving walks the stored trees.
        from sklearn.ensemble import IsolationForest

        ref = np.asarray(reference, dtype=np.float64)
        if ref.ndim != 2:
            raise ValueError("sidewatch: reference must be [rows, features]")
        ref = ref[np.all(np.isfinite(ref), axis=1)]
        m = round(self.holdout * ref.shape[0])
        if m < 1.0 / self.target_fpr or ref.shape[0] - m < 2:
            raise ValueError(
                f"sidewatch: {ref.shape[0]} finite reference rows are too few: the held-out part "
                f"({m}) must hold at least 1/target_fpr = {math.ceil(1 / self.target_fpr)} rows"
            )
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(ref.shape[0])
        fit_rows, heldout_rows = ref[order[m:]], ref[order[:m]]
        forest = IsolationForest(
            n_estimators=self.n_estimators,
            max_samples=min(self.max_samples, fit_rows.shape[0]),
            max_features=1.0,  # every tree sees every feature, in the original order
            random_state=self.seed,
        ).fit(fit_rows)
        self.n_features_ = ref.shape[1]
        self._forest = _pack_forest(forest)
        self._forest_arrays()
        heldout_scores = self._score_finite(heldout_rows)
        self.threshold_ = float(np.quantile(heldout_scores, 1.0 - self.target_fpr, method="inverted_cdf"))
        above = int(np.sum(heldout_scores > self.threshold_))
        self.heldout_ = {
            "count": int(m),
            "fit_count": int(fit_rows.shape[0]),
            "above_threshold": above,
            "fpr": above / m,
            "quantiles": {
                str(q): float(np.quantile(heldout_scores, q)) for q in (0.5, 0.9, 0.99, 0.999)
            },
        }
        self.reset()
        return self

    def _forest_arrays(self) -> None:
        """Pad the trees into [tree, node] arrays so that all trees are walked at once."""
        f = self._forest
        self._feature = f["feature"]
        size = self._feature.shape[1]
        offset = (np.arange(self._feature.shape[0]) * size)[:, None]
        self._feature_flat = f["feature"].reshape(-1)
        self._split_flat = f["threshold"].reshape(-1)
        # Children as flat indices, so a step down is one take; -1 (leaf) stays -1 (never used).
        self._left_flat = np.where(f["left"] >= 0, f["left"] + offset, -1).reshape(-1)
        self._right_flat = np.where(f["right"] >= 0, f["right"] + offset, -1).reshape(-1)
        self._leaf_path_flat = f["leaf_path"].reshape(-1)
        self._depth = int(f["max_depth"])
        self._norm = float(self._feature.shape[0] * average_path_length(float(f["psi"])))

    def _check_fitted(self) -> None:
        if self.threshold_ is None:
            raise RuntimeError("sidewatch: AnomalyScorer is not fitted; call fit() first")

    # --- scoring -------------------------------------------------------------------------------

    def _score_finite(self, x: np.ndarray) -> np.ndarray:
        n_trees, size = self._feature.shape
        # scikit-learn walks its trees on float32 features against float64 thresholds.
        x32 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        # Flat indices (tree * size + node, row * d + feature): 1-D takes are the cheapest gathers.
        node = np.broadcast_to(np.arange(n_trees) * size, (x.shape[0], n_trees)).copy()
        row_start = (np.arange(x.shape[0]) * x.shape[1])[:, None]
        for _ in range(self._depth):
            feat = self._feature_flat.take(node)
            internal = feat >= 0
            go_left = x32.take(row_start + np.maximum(feat, 0)) <= self._split_flat.take(node)
            child = np.where(go_left, self._left_flat.take(node), self._right_flat.take(node))
            node = np.where(internal, child, node)
        path = self._leaf_path_flat.take(node).sum(axis=1)
        if self._norm == 0:
            return np.ones(x.shape[0])
        return np.power(2.0, -path / self._norm)

    def score(self, x: Any) -> np.ndarray:
        """Anomaly scores of rows ``x`` [n, d] (or one row [d]); also sets :attr:`scores`,
        :attr:`flags` and the counters."""
        self._check_fitted()
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.n_features_:
            raise ValueError(
                f"sidewatch: anomaly scorer expects rows of {self.n_features_} features, got shape {np.shape(x)}"
            )
        finite = np.all(np.isfinite(arr), axis=1)
        scores = np.full(arr.shape[0], np.inf)
        if finite.any():
            scores[finite] = self._score_finite(arr[finite])
        self.scores = scores
        self.flags = scores > self.threshold_
        self.n += arr.shape[0]
        self.n_nonfinite += int(arr.shape[0] - finite.sum())
        self.n_flagged += int(self.flags.sum())
        return scores

    def update(self, x: Any) -> AnomalyScorer:
        """:meth:`score`, returning the scorer (river's shape); read :attr:`scores`, :attr:`flags`."""
        self.score(x)
        return self

    # --- persistence ---------------------------------------------------------------------------

    def calibration_dict(self) -> dict[str, Any]:
        """Parameters, threshold, held-out summary and the trees, JSON-serialisable.

        ``forest.trees`` holds, per tree, node arrays in scikit-learn's node order: ``feature``
        (-1 at a leaf), ``threshold`` (go left when ``float32(x[feature]) <= threshold``),
        ``left``/``right`` (child node ids, -1 at a leaf) and ``leaf_path`` (at a leaf, its depth
        plus ``c(leaf size)``; 0 elsewhere)."""
        self._check_fitted()
        f = self._forest
        trees = []
        for t in range(f["feature"].shape[0]):
            size = int(f["node_count"][t])
            trees.append({
                "feature": f["feature"][t, :size].tolist(),
                "threshold": f["threshold"][t, :size].tolist(),
                "left": f["left"][t, :size].tolist(),
                "right": f["right"][t, :size].tolist(),
                "leaf_path": f["leaf_path"][t, :size].tolist(),
            })
        return {
            "kind": self.kind,
            "calibration_version": CALIBRATION_VERSION,
            "n_features": self.n_features_,
            "target_fpr": self.target_fpr,
            "threshold": self.threshold_,
            "threshold_rule": "quantile(heldout_scores, 1 - target_fpr, method='inverted_cdf'); flag score > threshold",
            "n_estimators": self.n_estimators,
            "max_samples": self.max_samples,
            "holdout": self.holdout,
            "seed": self.seed,
            "heldout": dict(self.heldout_),
            "fitted_with": f["fitted_with"],
            "forest": {"psi": int(f["psi"]), "max_depth": int(f["max_depth"]), "trees": trees},
        }

    @classmethod
    def from_calibration(cls, d: dict[str, Any]) -> AnomalyScorer:
        if d.get("kind") != cls.kind or d.get("calibration_version") != CALIBRATION_VERSION:
            raise ValueError(f"sidewatch: not an {cls.kind} calibration (version {CALIBRATION_VERSION})")
        scorer = cls(
            target_fpr=d["target_fpr"], n_estimators=d["n_estimators"], max_samples=d["max_samples"],
            holdout=d["holdout"], seed=d["seed"],
        )
        forest = d["forest"]
        trees = forest["trees"]
        size = max(len(t["feature"]) for t in trees)
        packed = _empty_forest(len(trees), size)
        for i, t in enumerate(trees):
            k = len(t["feature"])
            packed["node_count"][i] = k
            for name in ("feature", "threshold", "left", "right", "leaf_path"):
                packed[name][i, :k] = t[name]
        packed["psi"] = int(forest["psi"])
        packed["max_depth"] = int(forest["max_depth"])
        packed["fitted_with"] = d.get("fitted_with", {})
        scorer._forest = packed
        scorer._forest_arrays()
        scorer.n_features_ = int(d["n_features"])
        scorer.threshold_ = float(d["threshold"])
        scorer.heldout_ = dict(d.get("heldout", {}))
        return scorer


def _empty_forest(n_trees: int, size: int) -> dict[str, Any]:
    # Padding nodes are leaves with path 0 that nothing reaches.
    return {
        "node_count": np.zeros(n_trees, dtype=np.int64),
        "feature": np.full((n_trees, size), -1, dtype=np.int64),
        "threshold": np.zeros((n_trees, size)),
        "left": np.full((n_trees, size), -1, dtype=np.int64),
        "right": np.full((n_trees, size), -1, dtype=np.int64),
        "leaf_path": np.zeros((n_trees, size)),
    }


def _pack_forest(forest: Any) -> dict[str, Any]:
    """The fitted trees of a scikit-learn IsolationForest (``max_features=1.0``) as arrays."""
    import sklearn

    trees = [est.tree_ for est in forest.estimators_]
    packed = _empty_forest(len(trees), max(t.node_count for t in trees))
    max_depth = 0
    for i, tree in enumerate(trees):
        k = tree.node_count
        left, right = tree.children_left, tree.children_right
        # Node depths from the root (depth 0): scikit-learn numbers a child after its parent.
        depth = np.zeros(k, dtype=np.int64)
        for node in range(k):
            if left[node] >= 0:
                depth[left[node]] = depth[right[node]] = depth[node] + 1
        leaf = left < 0
        packed["node_count"][i] = k
        packed["feature"][i, :k] = np.where(leaf, -1, tree.feature)
        packed["threshold"][i, :k] = np.where(leaf, 0.0, tree.threshold)
        packed["left"][i, :k] = left
        packed["right"][i, :k] = right
        packed["leaf_path"][i, :k] = np.where(leaf, depth + average_path_length(tree.n_node_samples), 0.0)
        max_depth = max(max_depth, int(depth.max()))
    packed["psi"] = int(forest.max_samples_)
    packed["max_depth"] = max_depth
    packed["fitted_with"] = {"scikit-learn": sklearn.__version__}
    return packed

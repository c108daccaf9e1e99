"""Per-request anomaly scores: isolation forest walked from stored trees, threshold at a target FPR."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from agent.detect.anomaly import AnomalyScorer, _pack_forest, average_path_length

D = 8
MIX = np.random.default_rng(0).normal(size=(D, D)) / np.sqrt(D)  # correlated features


def features(rng, n):
    return rng.normal(size=(n, D)) @ MIX + 0.5


@pytest.fixture(scope="module")
def scorer():
    return AnomalyScorer(target_fpr=0.01, seed=3).fit(features(np.random.default_rng(1), 10_000))


def test_average_path_length_by_hand():
    # c(1) = 0, c(2) = 1, c(3) = 2 (ln 2 + gamma) - 4/3
    assert average_path_length(np.array([1, 2, 3])).tolist() == pytest.approx(
        [0.0, 1.0, 2 * (np.log(2) + 0.5772156649015329) - 4 / 3]
    )


def test_scores_are_sklearns():
    rng = np.random.default_rng(2)
    ref = features(rng, 3000)
    forest = IsolationForest(n_estimators=50, max_samples=128, max_features=1.0, random_state=0).fit(ref)
    scorer = AnomalyScorer()
    scorer._forest = _pack_forest(forest)
    scorer._forest_arrays()
    x = np.vstack([features(rng, 500), 5 * features(rng, 20)])
    np.testing.assert_allclose(scorer._score_finite(x), -forest.score_samples(x), rtol=1e-12)


def test_false_positive_rate_near_target_on_fresh_data(scorer):
    assert scorer.heldout_["fpr"] <= 0.01 and scorer.heldout_["count"] == 3000
    fresh = features(np.random.default_rng(99), 20_000)
    scorer.reset()
    scores = scorer.score(fresh)
    fpr = scorer.flags.mean()
    assert 0.005 < fpr < 0.02
    assert scorer.n == 20_000 and scorer.n_flagged == scorer.flags.sum()
    assert np.all((scores > 0) & (scores <= 1))


def test_obvious_outliers_flagged(scorer):
    rng = np.random.default_rng(5)
    outliers = features(rng, 50) + 6.0  # six units off in every feature
    assert scorer.update(outliers).flags.all()
    one = scorer.score(np.full(D, 0.5))  # a single row [d]: the centre of the reference
    assert one.shape == (1,) and not scorer.flags[0]


def test_calibration_round_trips_through_json(scorer):
    d = json.loads(json.dumps(scorer.calibration_dict()))
    assert d["threshold"] == scorer.threshold_ and len(d["forest"]["trees"]) == 100
    restored = AnomalyScorer.from_calibration(d)
    x = np.vstack([features(np.random.default_rng(6), 1000), features(np.random.default_rng(7), 10) * 4])
    np.testing.assert_array_equal(restored.score(x), scorer.score(x))
    np.testing.assert_array_equal(restored.flags, scorer.flags)


def test_nonfinite_rows_are_flagged_with_infinite_score(scorer):
    scorer.reset()
    x = features(np.random.default_rng(8), 6)
    clean = scorer.score(x).copy()
    x[1, 3] = np.nan
    x[4, 0] = -np.inf
    scores = scorer.score(x)
    assert np.isinf(scores[[1, 4]]).all() and scorer.flags[[1, 4]].all()
    np.testing.assert_array_equal(scores[[0, 2, 3, 5]], clean[[0, 2, 3, 5]])
    assert scorer.n_nonfinite == 2 and scorer.n == 12


def test_input_checks(scorer):
    with pytest.raises(ValueError, match="features"):
        scorer.score(np.zeros((3, D + 1)))
    with pytest.raises(RuntimeError, match="not fitted"):
        AnomalyScorer().score(np.zeros((1, D)))
    with pytest.raises(ValueError, match="too few"):
        AnomalyScorer(target_fpr=0.01).fit(np.zeros((200, D)))

"""Prediction drift (class mix, scalar windows) and change detection (Page-Hinkley, ADWIN).

The false-alarm tests run the calibrated detectors on FRESH no-drift streams (other seeds than the
calibration's, drawn from the generating distribution rather than from the reference sample) and
compare the mean run length, ``n / n_detections`` (alarms reset the detectors, so the run lengths
are independent), with the ERT.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from river import drift
from scipy import stats

from agent.detect.drift.change import AdwinChange, PageHinkleyChange, PageHinkleyPaths
from agent.detect.drift.prediction import ClassMixDrift, ScalarWindowDrift

FREQS = np.array([0.3, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03])


def feed(det, values, batch=500):
    for i in range(0, len(values), batch):
        det.update(values[i : i + batch])
    return det


def alarms(det, values, batch):
    """Global positions of every alarm, feeding ``values`` in batches of ``batch``."""
    out = []
    for i in range(0, len(values), batch):
        det.update(values[i : i + batch])
        out += [i + p for p in det.alarm_positions]
    return out


def confidence(rng, n, a=8.0):
    """A top-1-confidence-like scalar in (0, 1], piled up near 1 and rounded (ties)."""
    return np.round(rng.beta(a, 1.0, size=n), 3)


# --- chi-square by hand -------------------------------------------------------------------------


def test_class_mix_statistic_matches_scipy_on_small_counts():
    p = np.array([0.5, 0.3, 0.2])
    det = ClassMixDrift(window=10, threshold=1e9).fit(frequencies=p)
    det.update([0, 0, 0, 0, 0, 1, 1, 1, 2])  # 9 < W: no statistic yet
    assert np.isnan(det.result.statistic)
    det.update([2])  # counts [5, 3, 2] = expected exactly
    assert det.result.statistic == pytest.approx(0.0, abs=1e-12)
    det.update([0] * 5)  # window now 1,1,1,2,2,0,0,0,0,0: counts [5, 3, 2] again
    assert det.result.statistic == pytest.approx(0.0, abs=1e-12)
    det.update([0] * 5)  # all zeros: by hand 5^2/5 + 3^2/3 + 2^2/2 = 10
    assert det.result.statistic == pytest.approx(10.0)
    ref = stats.chisquare([10, 0, 0], f_exp=10 * p)
    assert det.result.statistic == pytest.approx(ref.statistic)
    assert det.result.p_value == pytest.approx(ref.pvalue)
    det.update([1, 2, 2, 1])  # counts [6, 2, 2]
    ref = stats.chisquare([6, 2, 2], f_exp=10 * p)
    assert det.result.statistic == pytest.approx(ref.statistic)
    assert det.result.p_value == pytest.approx(ref.pvalue)
    assert det.result.threshold == 1e9 and not det.drift_detected and det.n == 24


# --- calibrated false-alarm rate on fresh data --------------------------------------------------


def test_class_mix_run_length_matches_ert_on_fresh_data():
    rng = np.random.default_rng(101)
    reference = rng.choice(10, size=50_000, p=FREQS)
    det = ClassMixDrift(window=50, ert=200, n_streams=500, seed=1).fit(reference, n_classes=10)
    assert det.simulation_["estimated_ert"] == pytest.approx(200, rel=0.05)
    feed(det, np.random.default_rng(202).choice(10, size=100_000, p=FREQS))
    assert det.n_detections > 300
    assert det.n / det.n_detections == pytest.approx(200, rel=0.2)


def test_scalar_window_run_length_matches_ert_on_fresh_data():
    det = ScalarWindowDrift(window=50, ert=200, n_streams=500, seed=1)
    det.fit(confidence(np.random.default_rng(7), 20_000))
    feed(det, confidence(np.random.default_rng(8), 100_000))
    assert det.n / det.n_detections == pytest.approx(200, rel=0.2)


def test_page_hinkley_run_length_matches_ert_on_fresh_data():
    det = PageHinkleyChange(ert=200, n_streams=500, seed=1)
    det.fit(np.random.default_rng(3).gamma(2.0, 0.05, size=20_000))
    feed(det, np.random.default_rng(4).gamma(2.0, 0.05, size=60_000), batch=1000)
    assert det.n / det.n_detections == pytest.approx(200, rel=0.2)


def test_page_hinkley_simulation_follows_river_exactly():
    """The calibration's vectorised recursion is river's PageHinkley, float for float."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2000, 3))
    paths = PageHinkleyPaths(3, delta=0.1, alpha=1 - 1e-4, min_instances=30, mode="both")
    rivers = [drift.PageHinkley(delta=0.1, threshold=float("inf")) for _ in range(3)]
    for t in range(x.shape[0]):
        stat = paths.step(x[t])
        for s, ph in enumerate(rivers):
            ph.update(float(x[t, s]))
            if t >= 29:
                expected = max(ph._sum_increase - ph._min_increase, ph._max_decrease - ph._sum_decrease)
                assert stat[s] == expected
    # and river with the calibrated threshold alarms where the wrapper says
    det = PageHinkleyChange(ert=150, n_streams=200).fit(rng.normal(size=5000))
    stream = rng.normal(size=3000)
    ph = drift.PageHinkley(delta=det.delta, threshold=det.threshold_)
    river_alarms = []
    ref = det.reference_  # rank transform, by hand: the reference CDF (mid-rank), standardised
    cdf = (np.searchsorted(ref, stream, side="left") + np.searchsorted(ref, stream, side="right")) / (2 * ref.size)
    for i, v in enumerate(((cdf - 0.5) * np.sqrt(12)).tolist()):
        ph.update(v)
        if ph.drift_detected:
            river_alarms.append(i)
    assert alarms(det, stream, 700) == river_alarms and river_alarms


def test_page_hinkley_rank_transform_by_hand():
    """Values become the reference's mid-rank CDF, standardised as a uniform: (F - 1/2) * sqrt(12)."""
    det = PageHinkleyChange(threshold=5.0).fit(np.array([1.0, 2.0, 3.0, 4.0]))
    got = det._transformed(np.array([0.0, 2.0, 2.5, 9.0]))
    # 0: below all (F = 0); 2: one below, one equal (F = (1 + 2) / 8); 2.5: two below (F = 1/2); 9: F = 1
    expected = (np.array([0.0, 3 / 8, 0.5, 1.0]) - 0.5) * np.sqrt(12)
    np.testing.assert_allclose(got, expected)
    standardised = PageHinkleyChange(threshold=5.0, transform="standardise").fit(np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_allclose(standardised._transformed(np.array([2.5])), [0.0])


# --- detection ----------------------------------------------------------------------------------


def test_class_mix_shift_detected():
    det = ClassMixDrift(window=100, ert=500, n_streams=300).fit(frequencies=FREQS)
    rng = np.random.default_rng(11)
    feed(det, rng.choice(10, size=300, p=FREQS))
    shifted = FREQS.copy()
    shifted[2] = 0.3  # class 2 from 10% to 30%, the rest scaled down
    shifted[np.arange(10) != 2] *= 0.7 / 0.9
    det.update(rng.choice(10, size=300, p=shifted))
    assert det.drift_detected and det.alarm_positions[0] < 150
    assert det.result.drift and det.result.statistic > det.result.threshold
    assert det.result.p_value < 1e-3


def test_confidence_drop_detected():
    rng = np.random.default_rng(12)
    det = ScalarWindowDrift(window=100, ert=500, n_streams=300).fit(confidence(rng, 20_000))
    det.update(confidence(rng, 300))
    det.update(confidence(rng, 300, a=3.0))  # mean confidence 0.89 -> 0.75
    assert det.drift_detected and det.alarm_positions[0] < 100


def test_page_hinkley_and_adwin_detect_a_step_in_a_score_stream():
    rng = np.random.default_rng(13)
    reference = rng.gamma(2.0, 0.05, size=10_000)  # a benign score, mean 0.1
    ph = PageHinkleyChange(ert=2000, n_streams=200).fit(reference)
    adwin = AdwinChange(n_streams=5, horizon=5000).fit(reference)
    assert adwin.run_length_["censored_fraction"] == 1.0  # no false alarm in 5 x 5000 values
    # ADWIN checks every clock = 32 values, and its bound has a term that does not shrink with the
    # values' scale (it assumes [0, 1]), so on scores of this size it is the slower of the two.
    for det, within in ((ph, 100), (adwin, 300)):
        det.update(rng.gamma(2.0, 0.05, size=400))
        assert not det.drift_detected
        det.update(rng.gamma(2.0, 0.05, size=300) + 0.1)  # attack: scores up by 2 std
        assert det.drift_detected and det.alarm_positions[0] < within
        assert det.n_detections >= 1
    assert ph.result.statistic > ph.result.threshold and np.isnan(ph.result.p_value)


# --- batches, state, NaN ------------------------------------------------------------------------


def drifting_classes(seed):
    rng = np.random.default_rng(seed)
    later = np.roll(FREQS, 3)
    return np.concatenate([rng.choice(10, size=1500, p=FREQS), rng.choice(10, size=1500, p=later)])


def test_batch_size_does_not_change_the_alarms():
    data = drifting_classes(21)
    def make():
        return ClassMixDrift(window=60, threshold=25.0).fit(frequencies=FREQS)
    one_by_one = alarms(make(), data, 1)
    assert len(one_by_one) >= 5
    assert alarms(make(), data, 97) == one_by_one
    assert alarms(make(), data, 3000) == one_by_one


def roundtrip(make, data, cut, batch):
    """Alarms of an uninterrupted run vs. one saved (as JSON) after ``cut`` values and restored
    into a detector rebuilt from its JSON calibration."""
    whole = make()
    expected = alarms(whole, data, batch)
    first = make()
    got = alarms(first, data[:cut], batch)
    calibration = json.loads(json.dumps(first.calibration_dict()))
    state = json.loads(json.dumps(first.state_dict()))
    second = type(first).from_calibration(calibration).load_state_dict(state)
    got += [cut + p for p in alarms(second, data[cut:], batch)]
    assert got == expected
    np.testing.assert_equal(dataclasses.astuple(second.result), dataclasses.astuple(whole.result))
    assert (second.n, second.n_detections) == (whole.n, whole.n_detections)
    return expected


def test_state_round_trips():
    classes = drifting_classes(31)
    assert roundtrip(lambda: ClassMixDrift(window=60, ert=300, n_streams=200).fit(frequencies=FREQS), classes, 1234, 100)
    rng = np.random.default_rng(32)
    conf = np.concatenate([confidence(rng, 1500), confidence(rng, 1500, a=4.0)])
    ref = confidence(rng, 5000)
    assert roundtrip(lambda: ScalarWindowDrift(window=60, ert=300, n_streams=200).fit(ref), conf, 1711, 100)
    scores = np.concatenate([rng.gamma(2.0, 0.05, 1500), rng.gamma(2.0, 0.05, 1500) + 0.1])
    assert roundtrip(lambda: PageHinkleyChange(ert=300, n_streams=200).fit(scores[:1000]), scores, 1617, 100)
    assert roundtrip(lambda: AdwinChange(), scores, 1633, 100)


def test_state_saved_right_after_an_alarm():
    """river resets at the value after an alarm; a state taken in between keeps that pending."""
    rng = np.random.default_rng(41)
    scores = np.concatenate([rng.gamma(2.0, 0.05, 600), rng.gamma(2.0, 0.05, 600) + 0.2])
    for make in (lambda: PageHinkleyChange(ert=300, n_streams=200).fit(scores[:500]), AdwinChange):
        whole = make()
        expected = alarms(whole, scores, 1)
        cut = expected[0] + 1  # the state after the alarm's value
        roundtrip(make, scores, cut, 1)


def test_nan_and_inf_are_skipped_and_counted():
    data = drifting_classes(51).astype(np.float64)
    dirty = np.insert(data, [10, 500, 1700, 1700], [np.nan, np.inf, -np.inf, np.nan])
    clean_alarms = alarms(ClassMixDrift(window=60, threshold=25.0).fit(frequencies=FREQS), data, 250)
    det = ClassMixDrift(window=60, threshold=25.0).fit(frequencies=FREQS)
    dirty_alarms = alarms(det, dirty, 250)
    # positions refer to the input given; map them back to the clean stream
    skipped = np.flatnonzero(~np.isfinite(dirty))
    assert [p - int(np.sum(skipped < p)) for p in dirty_alarms] == clean_alarms
    assert det.n_skipped == 4 and det.n == data.size
    det.update([1.5, -1, 10, 3])  # not a class id: skipped too
    assert det.n_skipped == 7 and det.n == data.size + 1

    for det in (
        ScalarWindowDrift(window=50, threshold=30.0).fit(confidence(np.random.default_rng(1), 2000)),
        PageHinkleyChange(threshold=5.0).fit(np.arange(100.0)),
        AdwinChange(),
    ):
        det.update(np.array([0.5, np.nan, np.inf, -np.inf, 0.7]))
        assert (det.n, det.n_skipped) == (2, 3)
        det.reset()
        assert (det.n, det.n_skipped, det.n_detections) == (0, 0, 0)


def test_a_batch_is_one_dimensional():
    det = ClassMixDrift(window=10, threshold=1e9).fit(frequencies=[0.5, 0.5])
    with pytest.raises(ValueError, match="1-D"):
        det.update(np.full((4, 2), 0.5))  # probabilities, not class ids
    det.update(1)  # a scalar is a batch of one
    assert det.n == 1
    with pytest.raises(ValueError, match="1-D"):
        AdwinChange().update(np.zeros((3, 2)))


def test_calibration_checks():
    with pytest.raises(ValueError, match="ert"):
        ClassMixDrift(window=200, ert=100)
    with pytest.raises(ValueError, match="> 0"):
        ClassMixDrift(window=20, ert=100).fit(frequencies=[0.5, 0.5, 0.0])
    det = ClassMixDrift(window=20, ert=100, n_streams=100).fit([0, 0, 1, 1, 1], n_classes=3)
    assert det.frequencies.tolist() == pytest.approx([2.5 / 6.5, 3.5 / 6.5, 0.5 / 6.5])
    with pytest.raises(RuntimeError, match="not fitted"):
        ScalarWindowDrift().update([0.5])
    with pytest.raises(ValueError, match="constant"):
        ScalarWindowDrift(window=20, ert=100).fit(np.ones(100))
    ties = ScalarWindowDrift(window=20, ert=100, n_streams=100).fit(np.r_[np.ones(80), np.linspace(0, 0.9, 20)])
    assert np.all(ties.frequencies > 0) and ties.edges_.size < 9  # tied deciles merged

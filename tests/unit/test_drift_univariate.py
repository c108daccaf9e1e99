"""Univariate drift: the CVM statistic against scipy, the ERT calibration on fresh data, detection of a
shift, exact restore mid-stream, NaN/Inf rows, and PSI / Jensen-Shannon by hand."""

import json
import math

import numpy as np
import pytest

from agent.detect.drift.ert import run_length_estimate, threshold_for_ert
from agent.detect.drift.univariate import (
    WindowedCVM,
    _cvm_limit_cdf,
    _window_sums,
)
from tests.support.reference_math import BinnedDistance

# --- ert.py ---------------------------------------------------------------------------------------


def test_run_length_estimate_counts_exposure_after_the_warmup():
    # two alarms (at updates 7 and 12), one stream censored at 20; warm-up 5
    est, alarms, exposure = run_length_estimate(np.array([7, 12, 0]), length=20, warmup=5)
    assert (alarms, exposure) == (2, 2 + 7 + 15)
    assert est == 5 + 24 / 2
    assert run_length_estimate(np.array([0, 0]), 20, 5)[0] == math.inf


def test_threshold_for_ert_on_iid_statistics():
    rng = np.random.default_rng(3)
    # one statistic, i.i.d. uniform: a geometric run length of mean 1 / (1 - threshold) after the warm-up
    cal = threshold_for_ert(rng.random((2000, 300)), ert=110, warmup=10)
    assert cal.thresholds == pytest.approx(0.99, abs=0.001)
    assert cal.estimated_ert == pytest.approx(110, rel=0.01)
    # two independent features at one common level: 1 - (1 - alpha)**2 = 1/100
    cal = threshold_for_ert(rng.random((2000, 300, 2)).astype(np.float32), ert=100)
    assert cal.level == pytest.approx(1 - math.sqrt(0.99), rel=0.05)
    np.testing.assert_allclose(cal.thresholds, 1 - cal.level, atol=0.001)
    with pytest.raises(ValueError, match="ert"):
        threshold_for_ert(rng.random((10, 50)), ert=5, warmup=10)


# --- WindowedCVM: the statistic -------------------------------------------------------------------


def _small_detector(reference, window):
    """A calibrated detector on a small reference (K = N: no compaction), calibration kept tiny."""
    return WindowedCVM(window=window, ert=4 * window, n_bootstrap=40).fit(reference)


def test_cvm_statistic_and_p_value_equal_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 2))
    det = _small_detector(ref, window=15)
    stream = rng.normal(size=(30, 2)) + [0.0, 0.4]
    for t in range(30):
        det.update(stream[t])
        win = stream[max(0, t - 14):t + 1]
        if len(win) < 2:
            continue
        r = det.result
        for j in range(2):
            # scipy ranks the pooled sample; U = nx sum (r_i - i)^2 + ny sum (s_j - j)^2, T = U/(nm(n+m)) - ...
            want = stats.cramervonmises_2samp(ref[:, j], win[:, j], method="asymptotic")
            assert r.statistic[j] == pytest.approx(want.statistic, rel=1e-12, abs=1e-12)
            assert r.p_value[j] == pytest.approx(want.pvalue, rel=1e-6, abs=1e-9)
    assert det.n == 30 and np.array_equal(r.threshold, det.thresholds_)


def test_limit_cdf_equals_scipy():
    hyp = pytest.importorskip("scipy.stats._hypotests")
    x = np.array([0.0, 0.02, 0.1, 0.3, 0.6, 1.0, 2.0, 4.0])
    np.testing.assert_allclose(_cvm_limit_cdf(x), [hyp._cdf_cvm_inf(v) if v else 0.0 for v in x], atol=1e-10)


def test_incremental_sums_equal_recount_with_ties_and_batches_equal_rows():
    rng = np.random.default_rng(1)

    def draw(n):  # continuous, discrete, constant, uniform, binary
        return np.column_stack([rng.normal(size=n), rng.poisson(2, size=n), np.zeros(n), rng.random(n),
                                rng.integers(0, 2, size=n)])

    ref = draw(600)
    one = WindowedCVM(window=25, ert=100, n_bootstrap=50, n_quantiles=200).fit(ref)
    many = WindowedCVM.from_calibration(one.calibration_dict())
    stream = draw(300)
    stream[::7, 0] = ref[:43, 0]  # replayed reference values: ties in the continuous feature too
    for row in stream:
        one.update(row)
    for lo, hi in [(0, 3), (3, 40), (40, 41), (41, 300)]:  # small batches and a large one (259 rows)
        many.update(stream[lo:hi])
    np.testing.assert_array_equal(many.statistic, one.statistic)
    assert (many.first_alarm, many.n_alarm_steps) == (one.first_alarm, one.n_alarm_steps)
    np.testing.assert_array_equal(many._window, one._window)
    P, S = _window_sums(many._window[:, many.window - many._count:])
    np.testing.assert_array_equal(P, many._P)
    np.testing.assert_array_equal(S, many._S)
    # ties are broken at random: a constant feature fed its constant looks like no drift, not like a shift
    assert 0 < many.statistic[2] < many.thresholds_[2]


# --- WindowedCVM: calibration and detection --------------------------------------------------------


def _mixed(rng, n):
    """Three features no two alike: normal, exponential (skewed), Poisson (discrete, ties)."""
    return np.column_stack([rng.normal(size=n), rng.exponential(size=n), rng.poisson(3, size=n)])


def test_ert_holds_on_fresh_data_not_used_for_calibration():
    ert = 200
    det = WindowedCVM(window=30, ert=ert, n_bootstrap=600, n_quantiles=300).fit(
        _mixed(np.random.default_rng(10), 2000), rng=11)
    assert det.calibration_.estimated_ert == pytest.approx(ert, rel=0.02)
    rng = np.random.default_rng(12)  # fresh streams from the same distributions
    lengths = []
    for _ in range(600):
        det.reset()
        while det.first_alarm is None and det.n < 20 * ert:
            det.update(_mixed(rng, 256))
        lengths.append(det.first_alarm or det.n)
    assert np.mean(lengths) == pytest.approx(ert, rel=0.2)


@pytest.fixture(scope="module")
def twenty_features():
    rng = np.random.default_rng(20)
    det = WindowedCVM(window=50, ert=300, n_bootstrap=200).fit(rng.normal(size=(3000, 20)))
    return det, rng


def test_mean_shift_of_one_sd_in_one_feature_of_twenty_is_found_fast(twenty_features):
    det, rng = twenty_features
    delays = []
    for _ in range(10):
        det.reset()
        det.update(rng.normal(size=(det.window, 20)))  # a full window without drift
        before = det.n
        shifted = rng.normal(size=(200, 20))
        shifted[:, 7] += 1.0
        for row in shifted:  # row by row, as traffic comes; stop when feature 7 alarms
            if det.update(row).result.drift[7]:
                break
        assert det.result.drift[7]
        delays.append(det.n - before)
    # a 1 sd shift needs roughly half a window of shifted rows before the window's CVM crosses
    assert np.median(delays) < 40 and max(delays) < 1.5 * det.window


def test_state_dict_restores_mid_stream_exactly():
    rng = np.random.default_rng(30)
    ref = np.column_stack([rng.normal(size=800), rng.integers(0, 4, size=800)])
    whole = WindowedCVM(window=20, ert=80, n_bootstrap=60).fit(ref)
    stream = np.column_stack([rng.normal(size=400), rng.integers(0, 4, size=400)])
    stream[200:, 0] += 0.8
    stream[50] = np.nan
    stream[60, 1] = np.inf
    first = WindowedCVM.from_calibration(json.loads(json.dumps(whole.calibration_dict())))
    first.update(stream[:133])
    saved = json.loads(json.dumps(first.state_dict()))
    second = WindowedCVM.from_calibration(json.loads(json.dumps(whole.calibration_dict()))).load_state_dict(saved)
    second.update(stream[133:])
    whole.update(stream)
    for a, b in zip(whole.result.as_dict().values(), second.result.as_dict().values()):
        assert a == b
    assert (second.n, second.skipped, second.first_alarm, second.n_alarm_steps) == (
        whole.n, whole.skipped, whole.first_alarm, whole.n_alarm_steps)
    assert whole.first_alarm is not None and whole.n_alarm_steps > 100  # the shift at row 200 alarms on
    other = WindowedCVM(window=20, ert=80, n_bootstrap=60).fit(ref + 1.0)
    with pytest.raises(ValueError, match="another calibration"):
        other.load_state_dict(saved)


def test_nan_and_inf_rows_are_skipped_and_counted():
    rng = np.random.default_rng(40)
    ref = rng.normal(size=(500, 3))
    clean = WindowedCVM(window=10, ert=50, n_bootstrap=40).fit(ref)
    dirty = WindowedCVM.from_calibration(clean.calibration_dict())
    binned_clean = BinnedDistance(window=10, bins=5).fit(ref)
    binned_dirty = BinnedDistance.from_calibration(binned_clean.calibration_dict())
    rows = rng.normal(size=(40, 3))
    bad = rows.copy()
    bad[[3, 17, 18], [0, 2, 1]] = [np.nan, np.inf, -np.inf]
    for det in (dirty, binned_dirty):
        det.update(bad[:10]).update(bad[10:])
        det.update(np.full(3, np.nan))  # a lone bad row: nothing else happens
        assert (det.n, det.skipped) == (37, 4)
    keep = np.isfinite(bad).all(axis=1)
    clean.update(rows[keep])
    binned_clean.update(rows[keep])
    np.testing.assert_array_equal(dirty.statistic, clean.statistic)
    np.testing.assert_array_equal(binned_dirty.psi, binned_clean.psi)
    with pytest.raises(ValueError, match="3 features"):
        dirty.update(np.zeros(4))


def test_parameters_and_order_of_calls_are_checked():
    with pytest.raises(ValueError, match="must exceed window"):
        WindowedCVM(window=100, ert=100)
    with pytest.raises(RuntimeError, match="not calibrated"):
        WindowedCVM().update(np.zeros(3))
    with pytest.raises(ValueError, match="not a windowed_cvm calibration"):
        WindowedCVM.from_calibration({"kind": "something else"})


# --- BinnedDistance --------------------------------------------------------------------------------


def test_psi_and_js_by_hand():
    ref = np.arange(100.0)  # quartile edges 24.75, 49.5, 74.25: 25 reference values per bin
    det = BinnedDistance(window=10, bins=4, pseudo_count=0.0).fit(ref)
    np.testing.assert_array_equal(det.reference_counts_, [[25, 25, 25, 25]])
    det.update(np.array([0, 1, 2, 3, 4, 5, 30, 60, 80, 90.0])[:, None])  # 6, 1, 1, 2 per bin
    p, q = np.full(4, 0.25), np.array([0.6, 0.1, 0.1, 0.2])
    np.testing.assert_allclose(det.proportions, [q])
    psi = 0.35 * math.log(2.4) + 2 * (-0.15) * math.log(0.4) + (-0.05) * math.log(0.8)
    assert det.psi[0] == pytest.approx(psi)
    m = (p + q) / 2
    js = 0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m))
    assert det.js[0] == pytest.approx(js)
    r = det.result
    assert r.statistic[0] == pytest.approx(psi) and r.p_value is None and r.drift[0] == (psi > 0.2)
    # sliding: two more rows push out 0 and 1 -> counts 4, 1, 1, 4
    det.update(np.array([[95.0], [99.0]]))
    np.testing.assert_allclose(det.proportions, [[0.4, 0.1, 0.1, 0.4]])
    # pseudo-counts: 0.5 on each of the 4 bins
    smooth = BinnedDistance(window=10, bins=4).fit(ref).update(np.array([0, 1, 2, 3, 4, 5, 30, 60, 80, 90.0])[:, None])
    ps, qs = (np.full(4, 25) + 0.5) / 102, (np.array([6, 1, 1, 2]) + 0.5) / 12
    assert smooth.psi[0] == pytest.approx(np.sum((qs - ps) * np.log(qs / ps)))


def test_binned_counts_slide_and_atoms_leave_empty_bins_out():
    rng = np.random.default_rng(50)
    ref = np.column_stack([rng.normal(size=1000), np.where(rng.random(1000) < 0.6, 0.0, rng.random(1000))])
    det = BinnedDistance(window=64, bins=10).fit(ref)
    assert det._live[1].sum() < 10  # the atom at 0 merged the lower deciles of feature 1
    stream = np.column_stack([rng.normal(size=500), np.where(rng.random(500) < 0.6, 0.0, rng.random(500))])
    for lo, hi in [(0, 5), (5, 70), (70, 71), (71, 500)]:
        det.update(stream[lo:hi])
    recount = BinnedDistance.from_calibration(det.calibration_dict()).update(stream[-64:])
    np.testing.assert_array_equal(det._counts, recount._counts)
    assert np.all(np.isfinite(det.psi)) and np.all(det.js >= 0) and np.all(det.js <= 1)
    restored = BinnedDistance.from_calibration(json.loads(json.dumps(det.calibration_dict())))
    restored.load_state_dict(json.loads(json.dumps(det.state_dict())))
    restored.update(stream[:30])
    det.update(stream[:30])
    np.testing.assert_array_equal(restored.psi, det.psi)
    # a shift of 1 sd in feature 0 takes PSI far past 0.2
    det.update(rng.normal(size=(64, 2)) + [1.0, 0.0])
    assert det.result.drift[0] and det.psi[0] > 0.5

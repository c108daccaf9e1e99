"""The false-alarm budget in time (AlarmBudget, LookClock) and the moment test it spends (MomentTest,
MomentFeatures): parsing, looks per interval across restarts, false rejections on i.i.d. and bursty
null traffic against alpha, power, the effect gate, the held flag, low traffic, bad rows and state.

Traffic is simulated: rows with their arrival times in seconds, a look at the end of each minute.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from agent.detect.drift.budget import AlarmBudget, LookClock
from agent.detect.drift.moments import MomentFeatures, MomentResult, MomentTest

T = 60.0  # seconds between looks


def minute(look: int, rate: float) -> np.ndarray:
    """Arrival times of ``rate`` rows/s, evenly spread over look interval ``look``."""
    n = int(rate * T)
    return look * T + np.arange(n) * (T / n)


def standard_test(f: int, min_effect: float = 0.0, **kwargs) -> MomentTest:
    return MomentTest([f"f{i}" for i in range(f)], np.zeros(f), np.ones(f), min_effect, **kwargs)


def bursty_classes(rng, n: int, classes: int = 10, run: int = 20) -> np.ndarray:
    """Class labels in runs of ``run`` equal labels, the runs cut at a random offset."""
    offset = rng.integers(run)
    return np.repeat(rng.integers(0, classes, size=n // run + 2), run)[offset:offset + n]


# --- AlarmBudget -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, alarms, seconds", [
    ("1/30d", 1, 30 * 86400.0), ("1/10min", 1, 600.0), ("2/1h", 2, 3600.0), ("1/45s", 1, 45.0),
    ("1/2w", 1, 14 * 86400.0), (" 1 / 30d ", 1, 30 * 86400.0), ("1/d", 1, 86400.0), ("3/0.5h", 3, 1800.0),
])
def test_budget_parses_its_forms_and_prints_them_back(text, alarms, seconds):
    budget = AlarmBudget.parse(text)
    assert (budget.alarms, budget.period_seconds) == (alarms, seconds)
    assert budget.rate_per_second == pytest.approx(alarms / seconds)
    assert str(budget) == "".join(text.split())
    assert AlarmBudget.parse(str(budget)) == budget == AlarmBudget(alarms, seconds)


@pytest.mark.parametrize("text", ["", "30d", "1/30", "0/1d", "1/0d", "1/30m", "x/1d", "1/-1d", "1.5/1d", "1/30days",
                                  "1/30 d extra"])
def test_budget_rejects_other_texts_naming_the_text_and_the_form(text):
    with pytest.raises(ValueError) as error:
        AlarmBudget.parse(text)
    assert repr(text) in str(error.value) and "'1/30d'" in str(error.value) and str(error.value).startswith("sidewatch:")


def test_budget_alpha_is_split_over_tests_and_capped():
    budget = AlarmBudget.parse("1/30d")
    assert budget.alpha(60, 100) == pytest.approx(60 / (30 * 86400) / 100)
    assert budget.alpha(60, 1) == pytest.approx(60 / (30 * 86400))
    assert AlarmBudget.parse("1/1s").alpha(60, 1) == 0.5
    assert str(AlarmBudget(1, 30 * 86400.0)) == "1/30d" and str(AlarmBudget(2, 90.0)) == "2/90s"
    with pytest.raises(ValueError):
        budget.alpha(60, 0)
    with pytest.raises(ValueError):
        AlarmBudget(0, 60.0)


# --- LookClock ---------------------------------------------------------------------------------------


def test_look_clock_gives_at_most_one_look_per_interval():
    rng = np.random.default_rng(0)
    times = 1.7e9 + np.cumsum(rng.exponential(7.0, size=5000))        # irregular calls, many per interval
    times[2000:2100] -= 300.0                                           # and a clock that steps back
    clock = LookClock(T)
    looked = [math.floor(t / T) for t in times if clock.due(t)]
    assert len(looked) == len(set(looked))
    assert looked == sorted(looked)
    visited = {math.floor(t / T) for t in times}
    assert len(looked) == len(visited) - 1                             # every interval but the first
    assert not LookClock(T).due(times[0])                               # the first call only records


def test_look_clock_restart_adds_no_look():
    clock = LookClock(T)
    assert [clock.due(t) for t in (10.0, 61.0, 62.0)] == [False, True, False]
    saved = json.loads(json.dumps(clock.state_dict()))
    restarted = LookClock(T).load_state_dict(saved)
    assert restarted.due(100.0) is False                                # same interval as the last look
    assert restarted.due(121.0) is True
    assert restarted.next_due(121.0) == 180.0
    # Restored under another interval: the old look's interval [60, 120) is spent in the new units too.
    shorter = LookClock(20.0).load_state_dict(saved)
    assert [shorter.due(t) for t in (70.0, 110.0, 119.9, 120.0)] == [False, False, False, True]
    with pytest.raises(ValueError):
        LookClock(T).load_state_dict({"kind": "something else"})


# --- MomentTest: false rejections ----------------------------------------------------------------


def test_iid_null_rejects_at_most_at_alpha():
    rng = np.random.default_rng(1)
    test, alpha, looks, f = standard_test(10, cluster_rows=30), 0.01, 400, 10
    rejections = 0
    for look in range(looks):
        times = minute(look, rate=10)                                 # 30 rows a slot: one cluster each
        test.update(rng.normal(size=(len(times), f)), at=times)
        result = test.look(alpha)
        assert result.tested and result.slots == 20 and result.rows == 600
        rejections += len(result.rejected)
    # At most alpha per test (binomial bound); the floor makes it conservative, not dead.
    assert 1 <= rejections <= stats.binom.ppf(0.999, looks * f, alpha)


def null_classes(rng, rate: float, looks: int, min_effect: float = 0.0, **kwargs):
    """Bursty null class traffic (runs of 20): the robust test's and a naive i.i.d. z-test's rejections at 0.01."""
    features = MomentFeatures(n_classes=10).fit(classes=np.arange(10).repeat(1000))
    test = features.make_test(min_effect, **kwargs)
    robust = naive = 0
    for look in range(looks):
        times = minute(look, rate)
        x = features.transform(classes=bursty_classes(rng, len(times)))
        robust += len(test.update(x, at=times).look(0.01).rejected)
        z = (x.mean(axis=0) - features.reference_mean) / (features.reference_scale / math.sqrt(len(x)))
        naive += int((2 * stats.norm.sf(np.abs(z)) < 0.01).sum())
    return robust, naive


def test_robust_variance_keeps_bursty_null_traffic_near_alpha_where_the_iid_variance_does_not():
    looks, tests = 200, 10
    robust, naive = null_classes(np.random.default_rng(2), rate=100, looks=looks)
    bound = stats.binom.ppf(0.999, looks * tests, 0.01)
    assert robust <= bound
    assert naive > 20 * bound                                         # about half of all tests reject


def test_group_floor_keeps_absent_classes_from_rejecting_at_low_rates():
    # 10 rows/s in runs of 20: 30 runs a minute, so a class is absent from a whole look 4% of the time,
    # its robust variance is 0 and the i.i.d. floor alone lets it reject at any alpha.
    looks, tests = 200, 10
    bound = stats.binom.ppf(0.999, looks * tests, 0.01)
    with_groups, _ = null_classes(np.random.default_rng(3), rate=10, looks=looks)
    without, _ = null_classes(np.random.default_rng(3), rate=10, looks=looks, groups=None)
    assert with_groups <= bound < 2 * bound < without


# --- MomentTest: power and the effect gate -------------------------------------------------------


def test_one_sd_shift_is_rejected_in_one_look_at_a_tiny_alpha():
    rng = np.random.default_rng(4)
    test, clock, alpha = standard_test(10, min_effect=0.2), LookClock(T), 1e-7
    clock.due(0.0)
    results = []
    for second in np.arange(0.5, 120.0, 1.0):                       # 100 rows/s, a batch a second
        if clock.due(second):
            results.append(test.look(alpha))
        shift = [0.0] * 9 + [1.0 if second >= 60 else 0.0]
        test.update(rng.normal(size=(100, 10)) + shift, at=second)
    results.append(test.look(alpha))
    assert len(results) == 2
    assert results[0].tested and results[0].rejected == () and not results[0].drift
    assert results[1].rejected == ("f9",) and results[1].drift and test.n_alarms == 1
    assert results[1].statistic > results[1].threshold and results[1].p_value < alpha
    assert results[1].effect == pytest.approx(1.0, abs=0.1)


def test_correlation_change_with_unchanged_marginals_is_caught_by_the_projections():
    rng = np.random.default_rng(5)
    d = 6
    features = MomentFeatures(projections=16, seed=1).fit(continuous=rng.normal(size=(20000, d)))
    test = features.make_test(min_effect=0.2)
    alpha = AlarmBudget.parse("1/30d").alpha(T, len(features.names))
    cov = np.full((d, d), 0.6) + 0.4 * np.eye(d)                    # unit variances, correlation 0.6
    times = minute(0, rate=100)
    live = rng.multivariate_normal(np.zeros(d), cov, size=len(times))
    result = test.update(features.transform(continuous=live), at=times).look(alpha)
    assert result.rejected and all(name.startswith("proj") for name in result.rejected)
    marginal = np.array([name.startswith("x") for name in features.names])
    assert (result.effects[marginal] < 0.1).all()


def test_shape_change_of_a_scalar_with_the_same_mean_and_sd_is_caught_by_its_bins():
    rng = np.random.default_rng(6)
    features = MomentFeatures().fit(scalars={"score": rng.normal(size=20000)})
    test = features.make_test(min_effect=0.2)
    alpha = AlarmBudget.parse("1/30d").alpha(T, len(features.names))
    times = minute(0, rate=100)
    bimodal = rng.choice([-1.0, 1.0], size=len(times)) + 0.05 * rng.normal(size=len(times))
    result = test.update(features.transform(scalars={"score": bimodal}), at=times).look(alpha)
    assert result.rejected and all(name.startswith("score_bin") for name in result.rejected)


def test_effect_gate_a_tiny_shift_with_huge_n_is_significant_but_no_alarm():
    rng = np.random.default_rng(7)
    n = 1_000_000
    rows, times = rng.normal(size=(n, 2)) + [0.05, 0.0], np.linspace(0.0, T, n, endpoint=False)
    gated = standard_test(2, min_effect=0.2).update(rows, at=times)
    result = gated.look(1e-3)
    assert result.p_value < 1e-20 and result.effect == pytest.approx(0.05, abs=0.01)
    assert result.rejected == () and not result.drift and gated.n_alarms == 0
    assert standard_test(2, min_effect=0.02).update(rows, at=times).look(1e-3).rejected == ("f0",)


def test_the_effect_gate_uses_a_lower_bound_so_that_a_noisy_window_of_a_small_effect_does_not_alarm():
    """A shift of 0.25 sd, below min_effect 0.3 (the MNIST test sample against the validation reference
    is like this: 0.23): at 20 rows/s a window's effect scatters by about 0.03 and passes 0.3 in a few
    looks in a hundred; its lower bound (effect - 2 standard errors) does not. A 0.5 sd shift still does."""
    def rejecting_looks(shift: float, effect_se: float) -> int:
        rng = np.random.default_rng(16)
        test = standard_test(4, min_effect=0.3, effect_se=effect_se, reference_rows=5000)
        count = 0
        for index in range(200):
            times = minute(index, rate=20)
            count += bool(test.update(rng.normal(size=(len(times), 4)) + [shift, 0, 0, 0], at=times).look(1e-3).rejected)
        return count

    assert rejecting_looks(0.25, effect_se=0.0) >= 3
    assert rejecting_looks(0.25, effect_se=2.0) == 0
    assert rejecting_looks(0.5, effect_se=2.0) == 200


# --- MomentTest: the held flag, low traffic, bad rows ------------------------------------------


def test_flag_holds_across_looks_and_clears_after_quiet_looks():
    rng = np.random.default_rng(8)
    test = standard_test(3, min_effect=0.5, clear_looks=3, clear_ratio=0.5)

    def look(index: int, shift: float, rate: float = 100) -> MomentResult:
        times = minute(index, rate)
        return test.update(rng.normal(size=(len(times), 3)) + [shift, 0, 0], at=times).look(1e-6)

    assert look(0, 1.0).drift and test.n_alarms == 1
    assert look(1, 1.0).drift and test.n_alarms == 1                  # held, not a second alarm
    assert look(2, 0.0).drift                                          # quiet look 1
    untested = look(3, 0.0, rate=0.05)                                 # 3 rows: neither counts nor breaks
    assert not untested.tested and untested.drift
    assert look(4, 0.0).drift                                          # quiet look 2
    between = look(5, 0.4)                                             # below min_effect, above the clear bar
    assert between.rejected == () and between.drift                   # not quiet: the count starts again
    assert look(6, 0.0).drift and look(7, 0.0).drift
    assert not look(8, 0.0).drift and test.n_alarms == 1               # third quiet look in a row: cleared
    assert look(9, 1.0).drift and test.n_alarms == 2


def test_the_flag_clears_on_the_features_that_alarmed_while_others_stay_noisy():
    rng = np.random.default_rng(12)
    test = standard_test(3, min_effect=0.5, clear_looks=3, clear_ratio=0.5)

    def look(index: int, shift) -> MomentResult:
        times = minute(index, 100)
        return test.update(rng.normal(size=(len(times), 3)) + shift, at=times).look(1e-6)

    assert look(0, [1.0, 0.0, 0.0]).rejected == ("f0",)
    # f0 is back; f1 sits between the clear bar (0.25) and min_effect (0.5): no alarm of its own, and
    # it is not what alarmed, so it does not keep the flag up.
    results = [look(index, [0.0, 0.35, 0.0]) for index in (1, 2, 3)]
    assert [r.rejected for r in results] == [(), (), ()]
    assert [r.drift for r in results] == [True, True, False] and test.n_alarms == 1
    # f1 alarming later is a new alarm, and then f1 is what must go quiet.
    assert look(4, [0.0, 1.0, 0.0]).rejected == ("f1",) and test.n_alarms == 2
    assert look(5, [0.0, 0.35, 0.0]).drift                          # f1 above the clear bar: not quiet
    restored = standard_test(3, min_effect=0.5, clear_looks=3, clear_ratio=0.5).load_state_dict(
        json.loads(json.dumps(test.state_dict())))
    assert restored.drift_detected and restored.state_dict()["alarmed"] == ["f1"]


def test_the_reference_sample_s_own_error_is_in_the_variance():
    """Same-source traffic against a reference of 200 rows, 6,000 rows a look: the reference mean is off
    by ~1/sqrt(200) = 0.07 sd, which such windows resolve. Taking it as exact rejects most looks; with
    ``reference_rows`` the rejections stay near alpha."""
    rng = np.random.default_rng(13)
    reference = rng.normal(size=(200, 4))
    mean, scale = reference.mean(axis=0), reference.std(axis=0)

    def rejections(reference_rows):
        test = MomentTest([f"f{i}" for i in range(4)], mean, scale, 0.0, reference_rows=reference_rows)
        rejected = 0
        for index in range(40):
            times = minute(index, 100)
            rejected += len(test.update(rng.normal(size=(len(times), 4)), at=times).look(0.01).rejected)
        return rejected / (40 * 4)

    assert rejections(None) > 0.3
    assert rejections(200) <= 0.05


def test_low_traffic_is_skipped_and_carried_into_the_next_look():
    rng = np.random.default_rng(9)
    test = standard_test(2, cluster_rows=60)
    test.update(rng.normal(size=(3, 2)), at=[1.0, 20.0, 40.0])
    skipped = test.look(0.01)
    assert not skipped.tested and (skipped.rows, skipped.slots) == (3, 1)
    assert np.isnan(skipped.t).all() and skipped.rejected == () and test.n_tested == 0
    assert test.pending_rows == 3
    # 5 rows/s: 300 rows, 5 clusters of 60 (4 slots each) a look; the window needs 20 clusters, so it waits for 4 looks.
    for index in (1, 2, 3):
        times = minute(index, rate=5)
        result = test.update(rng.normal(size=(len(times), 2)), at=times).look(0.01)
        assert not result.tested and test.pending_rows == 3 + 300 * index
    times = minute(4, rate=5)
    result = test.update(rng.normal(size=(len(times), 2)), at=times).look(0.01)
    assert result.tested and result.slots == 20 and result.rows == 1203 and test.pending_rows == 0
    assert (test.n_looks, test.n_tested) == (5, 1)


def test_at_low_rates_the_window_reaches_back_over_earlier_looks_to_enough_clusters():
    """Every look tests its new rows and, when they make fewer than ``min_slots`` clusters, the rows
    just before them (already tested: the union bound needs no independence between looks)."""
    rng = np.random.default_rng(14)
    test = standard_test(2, cluster_rows=60)
    windows = []
    for index in range(10):
        times = minute(index, rate=5)
        result = test.update(rng.normal(size=(len(times), 2)), at=times).look(0.01)
        windows.append((result.tested, result.rows, result.slots, test.pending_rows, test.kept_rows))
    assert windows[3] == (True, 1200, 20, 0, 1200)
    # From then on: 300 new rows and the 900 before them, at every look.
    assert windows[4:] == [(True, 1200, 20, 0, 1200)] * 6
    # At 100 rows/s a look's own 20 slots are enough: nothing older is tested or kept.
    fast = standard_test(2, cluster_rows=60)
    for index in range(3):
        times = minute(index, rate=100)
        result = fast.update(rng.normal(size=(len(times), 2)), at=times).look(0.01)
        assert (result.rows, result.slots, fast.kept_rows) == (6000, 20, 6000)


def null_bursty_columns(rng, rate: float, looks: int, **kwargs) -> int:
    """Rejections at 0.01 of 10 continuous columns whose mean depends on the class (half their variance),
    the classes in runs of 20 (null: the class mix never changes)."""
    centres = rng.normal(size=(10, 10)) / math.sqrt(2)
    scale = np.sqrt(0.5 + centres.var(axis=0))
    test = MomentTest([f"f{i}" for i in range(10)], centres.mean(axis=0), scale, 0.0, **kwargs)
    rejected = 0
    for look in range(looks):
        times = minute(look, rate)
        classes = bursty_classes(rng, len(times))
        rows = centres[classes] + rng.normal(size=(len(times), 10)) / math.sqrt(2)
        rejected += len(test.update(rows, at=times).look(0.01).rejected)
    return rejected


def test_runs_longer_than_a_slot_at_low_rates_stay_near_alpha():
    """Runs of 20 rows of one class at 5 rows/s last 4 s, longer than a 3 s slot (bench/false_alarms.py's
    bursty traffic in its daily trough at 10 requests/s), here on columns that owe half their variance
    to the class (a worst case). With each slot a cluster the robust variance misses the covariance
    between neighbouring slots: 5 times alpha. With clusters of at least ``cluster_rows`` (40) rows the
    part it misses shrinks to about L / (3 b) of it (runs of L rows, clusters of b): under 2 times alpha."""
    looks, tests, alpha = 400, 10, 0.01
    expected = looks * tests * alpha
    clustered = null_bursty_columns(np.random.default_rng(15), rate=5, looks=looks)
    slots = null_bursty_columns(np.random.default_rng(15), rate=5, looks=looks, cluster_rows=1, min_slots=10)
    assert slots > 4 * expected
    assert clustered < 2 * expected and clustered < slots / 2


def test_rows_with_nan_or_inf_are_skipped():
    test = standard_test(2)
    rows = np.array([[0.0, 1.0], [np.nan, 0.0], [np.inf, 0.0], [1.0, -1.0]])
    test.update(rows, at=5.0)
    assert (test.n, test.n_skipped, test.pending_rows) == (2, 2, 2)
    test.update(np.zeros((2, 2)), at=[6.0, np.nan])                   # a row without a time is skipped too
    assert (test.n, test.n_skipped) == (3, 3)
    with pytest.raises(ValueError):
        test.update(np.zeros((2, 3)), at=5.0)
    with pytest.raises(ValueError):
        test.update(np.zeros((2, 2)), at=math.inf)


def test_batch_times_and_row_times_give_the_same_window():
    rng = np.random.default_rng(10)
    rows, times = rng.normal(size=(600, 4)), np.sort(rng.uniform(0, T, size=600))
    by_row = standard_test(4).update(rows, at=times).look(0.01)
    by_batch = standard_test(4)
    for slot in np.unique(np.floor(times / 3.0)):
        sel = np.floor(times / 3.0) == slot
        by_batch.update(rows[sel], at=float(times[sel][0]))
    result = by_batch.look(0.01)
    assert (result.rows, result.slots) == (by_row.rows, by_row.slots)
    np.testing.assert_allclose(result.t, by_row.t, rtol=1e-12)


# --- state, reset --------------------------------------------------------------------------------


def test_state_round_trip_gives_identical_results():
    rng = np.random.default_rng(11)
    data = [(rng.normal(size=(len(minute(i, 50)), 3)) + [1.0 if i in (1, 2) else 0.0, 0, 0], minute(i, 50))
            for i in range(8)]
    original = standard_test(3, min_effect=0.3, clear_looks=2)
    for rows, times in data[:3]:
        original.update(rows, at=times).look(1e-4)
    rows, times = data[3]
    original.update(rows[:1000], at=times[:1000])                     # mid-window, flag held
    assert original.drift_detected
    restored = standard_test(3, min_effect=0.3, clear_looks=2)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert restored.state_dict() == original.state_dict()
    for det in (original, restored):
        det.update(rows[1000:], at=times[1000:])
    for rows, times in [(rows[:0], times[:0])] + data[4:]:
        a = original.update(rows, at=times).look(1e-4) if len(rows) else original.look(1e-4)
        b = restored.update(rows, at=times).look(1e-4) if len(rows) else restored.look(1e-4)
        assert json.dumps(a.as_dict()) == json.dumps(b.as_dict())     # exact, NaN included
        np.testing.assert_array_equal(a.t, b.t)
    assert (original.n_alarms, original.drift_detected) == (restored.n_alarms, restored.drift_detected)
    with pytest.raises(ValueError):
        standard_test(3, min_effect=0.5).load_state_dict(original.state_dict())


def test_reset_returns_the_test_and_forgets_the_stream():
    test = standard_test(2, min_effect=0.1)
    times = minute(0, 20)
    test.update(np.ones((len(times), 2)), at=times).look(1e-3)
    assert test.drift_detected and test.n_alarms == 1
    test.update(np.ones((5, 2)), at=70.0)
    assert test.reset() is test
    assert (test.drift_detected, test.n_alarms, test.n, test.pending_rows, test.n_looks, test.last) == \
        (False, 0, 0, 0, 0, None)
    assert np.isnan(test.result.statistic).all()


# --- MomentFeatures ------------------------------------------------------------------------------


def test_moment_features_names_scales_and_calibration_round_trip():
    rng = np.random.default_rng(12)
    n = 5000
    continuous = rng.normal(size=(n, 4)) * [1.0, 2.0, 0.0, 1.0]      # a constant column: its sd is floored
    scalars = {"confidence": rng.beta(8, 1, size=n), "entropy": rng.exponential(size=n)}
    classes = rng.integers(0, 9, size=n)                              # class 9 never seen: a finite scale all the same
    features = MomentFeatures(projections=5, n_classes=10).fit(continuous, scalars, classes,
                                                                continuous_names=["a", "b", "c", "d"])
    names = features.names
    assert names[:6] == ["a", "b", "c", "d", "proj0_sq", "proj1_sq"] and names[-1] == "class_9"
    assert sum(name.startswith("confidence_bin") for name in names) == 10
    assert len(features.groups) == len(names) == len(features.reference_mean) == len(features.reference_scale)
    assert (features.reference_scale > 0).all() and np.isfinite(features.reference_scale).all()
    assert features.reference_mean[names.index("class_9")] == 0.0
    shares = [i for i, name in enumerate(names) if name.startswith(("confidence_bin", "class_")) and name != "class_9"]
    p = features.reference_mean[shares]
    np.testing.assert_allclose(features.reference_scale[shares], np.sqrt(p * (1 - p)), atol=1e-3)
    assert features.reference_scale[-1] == pytest.approx(math.sqrt(0.5 / (n + 1)), rel=1e-3)   # smoothed share

    copy = MomentFeatures.from_calibration(json.loads(json.dumps(features.calibration_dict())))
    live = (rng.normal(size=(7, 4)), {"confidence": rng.uniform(size=7), "entropy": rng.uniform(size=7)},
            np.array([0, 1, 2, 3, 12, 5, 9]))
    np.testing.assert_array_equal(copy.transform(*live), features.transform(*live))
    assert copy.names == names and copy.groups == features.groups
    out = features.transform(*live)
    assert np.isnan(out[4]).any() and not np.isnan(out[[0, 1, 2, 3, 5, 6]]).any()   # class 12 is out of range
    test = features.make_test(0.2).update(out, at=1.0)
    assert (test.n, test.n_skipped) == (6, 1)
    with pytest.raises(ValueError):
        MomentFeatures.from_calibration({**features.calibration_dict(), "names": names[::-1]})
    with pytest.raises(ValueError):
        features.transform(continuous=live[0], scalars=live[1])       # the class ids are missing


def test_reference_transformed_has_the_reference_moments():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(3000, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]]) + 5.0
    features = MomentFeatures(projections=4).fit(continuous=x)
    z = features.transform(continuous=x)
    np.testing.assert_allclose(z.mean(axis=0), features.reference_mean, atol=1e-9)
    np.testing.assert_allclose(z[:, :3].std(axis=0), 1.0, atol=1e-9)   # standardised columns: scale 1
    np.testing.assert_allclose(z[:, 3:].std(axis=0), features.reference_scale[3:], rtol=1e-9)


def test_greater_alternative_alarms_on_a_rise_only():
    """A one-sided test (a share of flagged inputs against its calibrated rate): a fall is no alarm,
    a rise is, and its threshold is the one-sided critical value."""
    rng = np.random.default_rng(5)
    fpr = 0.05
    test = MomentTest(["flagged"], [fpr], [math.sqrt(fpr * (1 - fpr))], 0.2, alternative="greater")
    alpha = 1e-6
    test.update((rng.random(3000) < 0.0).astype(float)[:, None], minute(0, 50))  # nothing flagged: a fall
    fell = test.look(alpha)
    assert fell.tested and fell.rejected == () and fell.p_value > 0.5 and not test.drift_detected
    assert fell.threshold == pytest.approx(stats.t.isf(alpha, fell.slots - 1))
    test.update((rng.random(3000) < 0.3).astype(float)[:, None], minute(1, 50))  # 30% flagged: a rise
    rose = test.look(alpha)
    assert rose.rejected == ("flagged",) and test.drift_detected and rose.statistic > rose.threshold
    # The same fall (effect 0.23, standard error 0.018), two-sided: rejected once its effect less two
    # standard errors clears min_effect.
    two_sided = MomentTest(["flagged"], [fpr], [math.sqrt(fpr * (1 - fpr))], 0.15)
    two_sided.update(np.zeros((3000, 1)), minute(0, 50))
    assert two_sided.look(alpha).rejected == ("flagged",)
    with pytest.raises(ValueError, match="alternative"):
        MomentTest(["flagged"], [fpr], [0.2], 0.2, alternative="less")

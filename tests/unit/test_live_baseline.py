"""Drift of a model sidewatch has no file for, from a baseline learned from its own traffic (the drift watch
with no model repository, on a simulated clock): collecting, then watching; benign traffic from the same
source stays quiet; a unit change is flagged on the right detector; garbage rows never poison the baseline;
the baseline survives a restart; an operator's reset collects again. (Through MLServer:
tests/integration/test_live_baseline_mlserver.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.config import load_config
from agent.dataplane.tap import TappedInference
from agent.detect.drift.watch import DriftWatch
from agent.metrics import BoundedModels, DriftMetrics
from tests.support import scenarios
from tests.support.drift_watch import Clock, registry_flags, tapped

MODEL, VERSION = "diabetes", "v1"
LABELS = {"model": MODEL, "version": VERSION}
START = 1_800_000_000.0
WEIGHTS = np.random.default_rng(0).normal(size=10)


def _inference(features: np.ndarray, version: str = "") -> TappedInference:
    """A tapped copy as the tap hands it over: request and response protos, decoded tensors. The model is a
    fixed linear one (MLServer's Ridge in the integration test); the request names no version, the
    response does, as MLServer answers."""
    value = (features @ WEIGHTS[:features.shape[1]]).astype(np.float32)[:, None]   # NaN in, NaN out
    return tapped(MODEL, {"features": features.astype(np.float32)}, {"value": value}, version, VERSION)


def _watch(clock, tmp_path=None, **overrides):
    settings = {"drift.baseline.rows": 1000, **overrides}
    if tmp_path is not None:
        settings["drift.checkpoint_dir"] = str(tmp_path)
    metrics = CollectorRegistry()
    return DriftWatch(None, load_config(overrides=settings).drift, DriftMetrics(metrics), BoundedModels(8),
                      clock=clock), metrics


def _feed(watch, clock, tensors, seconds, rate=20.0):
    rows = tensors["features"]
    for i in range(int(seconds * rate)):
        clock.now += 1.0 / rate
        watch(_inference(rows[i % len(rows):i % len(rows) + 1]))
        watch.tick()


def _value(metrics, name, **labels):
    return metrics.get_sample_value(name, {**LABELS, **labels})


@pytest.fixture(scope="module")
def traffic():
    return (scenarios.resample(scenarios.reference("diabetes"), 3000, seed=1),
            scenarios.resample(scenarios.benign("diabetes"), 3000, seed=2),
            scenarios.drift("diabetes", "rescaled", n=3000))


def test_a_baseline_learned_from_traffic_keeps_benign_quiet_and_flags_a_unit_change(traffic):
    reference, benign, rescaled = traffic
    clock = Clock()
    watch, metrics = _watch(clock)
    _feed(watch, clock, reference, seconds=30)        # 600 rows: still collecting
    assert _value(metrics, "sidewatch_drift_baseline_state", state="collecting") == 1
    _feed(watch, clock, reference, seconds=25)        # 1,000 rows: learned, watching
    assert _value(metrics, "sidewatch_drift_baseline_state", state="watching") == 1
    assert _value(metrics, "sidewatch_drift_baseline_state", state="collecting") == 0
    live = watch.live[(MODEL, VERSION)]             # keyed by the version that answered
    assert set(live.moments) == {"inputs", "outputs"}
    _feed(watch, clock, benign, seconds=300)          # held-out rows of the same source
    assert _value(metrics, "sidewatch_drift_looks_total", result="tested") >= 3
    flags = registry_flags(metrics)
    assert {"inputs_mean", "features.out_of_range", "features.missing", "outputs_mean"} <= set(flags), flags
    assert not any(flags.values()), flags
    _feed(watch, clock, rescaled, seconds=240)        # s5 in other units
    flags = registry_flags(metrics)
    assert flags["features.out_of_range"] == 1, flags
    assert _value(metrics, "sidewatch_drift_alarms_total", detector="features.out_of_range") == 1


def test_garbage_rows_never_poison_the_baseline(traffic):
    """Rows whose answer is NaN (unreadable outputs) are left out of the baseline's fit: the fitted output
    features equal those of the same traffic without them. (A missing input value is not garbage: the
    baseline learns its rate.)"""
    reference = traffic[0]
    garbage = reference["features"][:1000].copy()
    garbage[::7, 3] = np.nan                          # every 7th answer NaN
    clean_clock, dirty_clock = Clock(), Clock()
    clean, _ = _watch(clean_clock, **{"drift.baseline.rows": 857})
    dirty, _ = _watch(dirty_clock)
    _feed(clean, clean_clock, {"features": np.delete(garbage, np.s_[::7], axis=0)}, seconds=857 / 20)
    _feed(dirty, dirty_clock, {"features": garbage}, seconds=50)
    clean_live, dirty_live = clean.live[(MODEL, VERSION)], dirty.live[(MODEL, VERSION)]
    assert clean_live.state == dirty_live.state == "watching"
    assert json.dumps(clean_live.features.state_dict()["features"]["output"], sort_keys=True) == \
        json.dumps(dirty_live.features.state_dict()["features"]["output"], sort_keys=True)
    assert dirty_live.moments["outputs"].n_reference == clean_live.moments["outputs"].n_reference == 857


def test_the_baseline_survives_a_restart_and_an_operator_reset_learns_again(traffic, tmp_path):
    reference, benign, _ = traffic
    clock = Clock()
    first, _ = _watch(clock, tmp_path)
    _feed(first, clock, reference, seconds=55)
    _feed(first, clock, benign, seconds=120)
    first.close()
    assert len(list(tmp_path.glob("baseline-*.json"))) == 1
    second, metrics = _watch(clock, tmp_path)         # restart: watching at once, no new collection
    live = second.live[(MODEL, VERSION)]
    assert live.state == "watching" and _value(metrics, "sidewatch_drift_baseline_state", state="watching") == 1
    looks = live.tests.tests["inputs"].n_looks
    assert looks == first.live[(MODEL, VERSION)].tests.tests["inputs"].n_looks
    assert second.reset_baseline(MODEL, VERSION) and not second.reset_baseline(MODEL, "v9")
    second.tick()
    assert live.state == "collecting" and not list(tmp_path.glob("baseline-*.json"))
    assert _value(metrics, "sidewatch_drift_baseline_state", state="collecting") == 1


def test_a_baseline_of_rows_that_cannot_be_stacked_is_collected_again(traffic):
    """A model with a dynamic dimension whose size changed while collecting: the kept rows cannot be stacked,
    so the baseline is collected again (it used to stay in calibrating for good)."""
    reference = traffic[0]["features"]
    clock = Clock()
    watch, metrics = _watch(clock, **{"drift.baseline.rows": 20})
    for i in range(19):
        clock.now += 0.05
        watch(_inference(reference[i:i + 1]))
    clock.now += 0.05
    watch(_inference(reference[19:20, :9]))           # the 20th row: 9 columns instead of 10
    assert watch.live[(MODEL, VERSION)].state == "collecting"
    assert _value(metrics, "sidewatch_drift_baseline_state", state="collecting") == 1

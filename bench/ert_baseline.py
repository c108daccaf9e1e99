"""Today's ERT-calibrated drift detectors, for bench/false_alarms.py's same-run comparison (``--only ert``).

Before the false-alarm budget, the sidecar ran per model version the detectors that
``agent.detect.drift.calibrate.calibrate_drift`` built (:func:`ert_detector_set` here builds them the same
way, now that the sidecar no longer does: ``WindowedCVM`` and ``OnlineMMD`` on the
inputs' block means, ``ClassMixDrift`` on the predicted class, ``ScalarWindowDrift`` on the
confidence and on the entropy, ``PageHinkleyChange`` on the squeezing score, ``AdwinChange`` on
the confidence), each set to an expected run time (ERT) in requests, 500 by default, and fed in
micro-batches of 64. This module builds that set from the library (they stay in it) and measures

* ``cost``: microseconds per request of the whole set, fed micro-batches of 64, beside the budgeted
  path as the sidecar wires it (three ``MomentFeatures`` per model version: inputs, outputs, score;
  ``transform`` + ``MomentTest.update`` per micro-batch, a look every 60 s amortised over the
  requests of a minute at 10 and at 100 requests/s); blocks of the two alternate, the median block
  of each counts;
* ``delay``: requests from a change to the first alarm of any detector of the set, on the same
  scenarios as false_alarms.py's delays, at one or more ERTs; seconds at a rate are requests / rate
  (these detectors alarm at the request, not at looks).

The squeezing score needs the model three more times per image; the cost figures feed the score
detectors a stand-in (1 - confidence): their cost does not depend on the values. The delay figures
leave the score detector out on both sides (false_alarms.py's budgeted test has no score either).

Same false-alarm rate. A budget of one false alarm per ``P`` seconds at ``r`` requests/s, spread over
``d`` detectors, is an ERT of ``P * r * d`` requests per detector: 1/30d at 10 requests/s and 6
detectors is 1.6e8 requests, 1/1h is 216,000. ERT calibration simulates about 1,000 streams of 5 ERTs
(the CVM 500 bootstrap streams, each of 49 features), so its cost grows with the ERT; ``ert_levels``
are the ERTs calibrated here, and :func:`calibration_seconds` times them. A delay at an ERT below the
budget's is a lower bound on the delay at the budget (a higher ERT means higher thresholds).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

BATCH = 64
WINDOW = 100  # calibrate_drift's default window
# Reference points the online MMD kept (calibrate_drift's); it held out the rest to simulate no-drift streams.
MMD_REFERENCE_POINTS = 300
# Detectors whose delays are measured (the score detector is left out: no real score here).
MNIST_DELAY_DETECTORS = ("inputs_cvm", "inputs_mmd", "class_mix", "confidence", "entropy", "confidence_change")
SYNTHETIC_DELAY_DETECTORS = ("inputs_cvm", "inputs_mmd")


def views(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What each source name of calibrate_drift reads, from bench/drift.py's image arrays."""
    return {"regions": arrays["features"], "classes": arrays["class"], "confidence": arrays["confidence"],
            "entropy": arrays["entropy"], "score": 1.0 - arrays["confidence"]}


def ert_detector_set(v: dict[str, np.ndarray], n_classes: int, ert: float, window: int = WINDOW,
                     seed: int = 0) -> dict[str, tuple[str, Any]]:
    """The detectors the sidecar ran per model version before the budget, fitted as its calibration did:
    name -> (source, detector), sources as in :func:`views`."""
    from agent.detect.drift.change import AdwinChange, PageHinkleyChange
    from agent.detect.drift.mmd import OnlineMMD
    from agent.detect.drift.prediction import ClassMixDrift, ScalarWindowDrift
    from agent.detect.drift.univariate import WindowedCVM

    return {
        "inputs_cvm": ("regions", WindowedCVM(window=window, ert=ert, seed=seed).fit(v["regions"])),
        "inputs_mmd": ("regions", OnlineMMD(ert=ert, window_size=window, n_ref=MMD_REFERENCE_POINTS,
                                            seed=seed).fit(v["regions"])),
        "class_mix": ("classes", ClassMixDrift(window=max(window, 2 * n_classes * 10), ert=ert, seed=seed)
                      .fit(v["classes"], n_classes=n_classes)),
        "confidence": ("confidence", ScalarWindowDrift(window=window, ert=ert, seed=seed).fit(v["confidence"])),
        "entropy": ("entropy", ScalarWindowDrift(window=window, ert=ert, seed=seed).fit(v["entropy"])),
        "score_change": ("score", PageHinkleyChange(ert=ert, seed=seed).fit(v["score"])),
        "confidence_change": ("confidence", AdwinChange(seed=seed).fit(v["confidence"])),
    }


def mnist_set(reference: dict[str, np.ndarray], ert: float, seed: int) -> dict[str, tuple[str, Any]]:
    """The ERT detector set at ``ert`` on the MNIST reference arrays: name -> (source, detector)."""
    return ert_detector_set(views(reference), 10, ert, seed=seed)


def synthetic_set(reference: np.ndarray, ert: float, seed: int) -> dict[str, tuple[str, Any]]:
    """The input detectors of the ERT set (CVM, MMD) on a model-less synthetic reference."""
    from agent.detect.drift.mmd import OnlineMMD
    from agent.detect.drift.univariate import WindowedCVM

    return {"inputs_cvm": ("regions", WindowedCVM(window=WINDOW, ert=ert, seed=seed).fit(reference)),
            "inputs_mmd": ("regions", OnlineMMD(ert=ert, window_size=WINDOW, n_ref=MMD_REFERENCE_POINTS,
                                                seed=seed).fit(reference))}


def calibrated(build, ert: float) -> tuple[dict[str, tuple[str, Any]], float]:
    started = time.perf_counter()
    detectors = build(ert)
    return detectors, time.perf_counter() - started


def first_alarm_after(detectors: dict[str, tuple[str, Any]], stream: dict[str, np.ndarray], onset: int,
                      names: tuple[str, ...]) -> tuple[int | None, str | None, int]:
    """Reset, feed ``stream`` (source -> values, one row per request) in micro-batches of 64; return the
    position (0-based) of the first alarm of any of ``names`` at or after ``onset``, who raised it, and
    the alarms before the onset."""
    for name in names:
        detectors[name][1].reset()
    n = len(next(iter(stream.values())))
    early = 0
    for start in range(0, n, BATCH):
        stop = min(n, start + BATCH)
        hit, who = None, None
        for name in names:
            source, detector = detectors[name]
            detector.update(stream[source][start:stop])
            for position in detector.alarm_positions:
                at = start + int(position)
                if at < onset:
                    early += 1
                elif hit is None or at < hit:
                    hit, who = at, name
                    break
        if hit is not None:
            return hit, who, early
    return None, None, early


def delays(detectors: dict[str, tuple[str, Any]], names: tuple[str, ...], make_stream, runs: int, warm: int,
           horizon: int) -> dict[str, Any]:
    """``runs`` streams of ``warm`` benign requests then the change (``make_stream(run)`` gives the stream,
    ``warm + horizon`` requests): requests from the change to the first alarm (1 = the first changed one)."""
    out, who, early = [], {}, 0
    for run in range(runs):
        hit, name, before = first_alarm_after(detectors, make_stream(run), warm, names)
        early += before
        out.append(None if hit is None else hit - warm + 1)
        if name:
            who[name] = who.get(name, 0) + 1
    hits = [d for d in out if d is not None]
    return {"runs": runs, "detected": len(hits), "horizon_requests": horizon, "requests": hits,
            "mean_requests": float(np.mean(hits)) if hits else None,
            "median_requests": float(np.median(hits)) if hits else None,
            "first_alarm_by": who, "alarms_before_change": early}


def blind_delay(ert: float, detectors: int) -> float:
    """Requests from a change to the set's first *false* alarm, were it blind to the change: about
    ERT / detectors (each detector's run length roughly geometric with mean ERT)."""
    return ert / detectors


# --- cost ------------------------------------------------------------------------------------------


def budgeted_path(reference: dict[str, np.ndarray], seed: int, min_effect: float, test_kwargs: dict[str, Any]):
    """The three MomentFeatures (and tests) the sidecar builds per model version: inputs, outputs, score."""
    from agent.detect.drift.moments import MomentFeatures

    v = views(reference)
    inputs = MomentFeatures(seed=seed).fit(continuous=v["regions"])
    outputs = MomentFeatures(n_classes=10, seed=seed).fit(
        scalars={"confidence": v["confidence"], "entropy": v["entropy"]}, classes=v["classes"])
    score = MomentFeatures(seed=seed).fit(scalars={"score": v["score"]})
    parts = []
    for features, args in ((inputs, lambda w: {"continuous": w["regions"]}),
                           (outputs, lambda w: {"scalars": {"confidence": w["confidence"], "entropy": w["entropy"]},
                                                "classes": w["classes"]}),
                           (score, lambda w: {"scalars": {"score": w["score"]}})):
        parts.append((features, features.make_test(min_effect=min_effect, **test_kwargs), args))
    return parts


def measure_cost(reference: dict[str, np.ndarray], traffic: dict[str, np.ndarray], params: Any,
                 rows: int = 12_800, blocks: int = 5) -> dict[str, Any]:
    """Microseconds per request, before (the ERT set at 500, calibrate_drift's default) and after (the
    budgeted path), alternating blocks; the look cost measured apart and amortised per rate."""
    from agent.detect.drift.budget import AlarmBudget

    ert_set, fit_seconds = calibrated(lambda e: mnist_set(reference, e, params.seed), 500.0)
    parts = budgeted_path(reference, params.seed, params.min_effect, params.test_kwargs)
    v = views(traffic)
    n = len(v["regions"])
    per_block = rows // blocks // BATCH * BATCH
    epoch = 1_700_000_000.0

    def before(block: int) -> None:
        for i in range(block * per_block, (block + 1) * per_block, BATCH):
            take = np.arange(i, i + BATCH) % n
            for source, detector in ert_set.values():
                detector.update(v[source][take])

    def after(block: int) -> None:
        for i in range(block * per_block, (block + 1) * per_block, BATCH):
            take = np.arange(i, i + BATCH) % n
            w = {k: a[take] for k, a in v.items()}
            for features, test, args in parts:
                test.update(features.transform(**args(w)), epoch + i * 0.01)

    before(0), after(0)  # warm: windows full, caches hot
    times: dict[str, list[float]] = {"before": [], "after": []}
    for block in range(1, blocks + 1):
        for name, run in (("before", before), ("after", after)):
            started = time.perf_counter()
            run(block)
            times[name].append((time.perf_counter() - started) / per_block * 1e6)
    # Looks: each of the three tests after a fresh 60 s window (6,000 rows over 20 slots).
    features_total = sum(len(features.names) for features, _, _ in parts)
    alpha = AlarmBudget.parse(params.default_budget).alpha(params.look_seconds, tests=features_total)
    w = {k: a[np.arange(6000) % n] for k, a in v.items()}
    windows = [features.transform(**args(w)) for features, _, args in parts]
    stamps = epoch + 1000 * params.look_seconds + np.repeat(np.arange(20) * 3.0, 300)
    look_us = []
    for i in range(50):
        for (_, test, _), window in zip(parts, windows):
            test.update(window, stamps + i * params.look_seconds)
        started = time.perf_counter()
        for _, test, _ in parts:
            test.look(alpha)
        look_us.append((time.perf_counter() - started) * 1e6)
    before_us, after_us = float(np.median(times["before"])), float(np.median(times["after"]))
    look = float(np.median(look_us))
    amortised = {f"{rate:g}": after_us + look / (rate * params.look_seconds) for rate in (10.0, 100.0, 1000.0)}
    return {"before": {"detectors": {name: type(d).__name__ for name, (_, d) in ert_set.items()},
                       "ert": 500.0, "us_per_request_batch_64": before_us, "blocks": times["before"],
                       "calibration_seconds": fit_seconds},
            "after": {"features": {"inputs": len(parts[0][0].names), "outputs": len(parts[1][0].names),
                                   "score": len(parts[2][0].names)},
                      "us_per_request_batch_64": after_us, "blocks": times["after"],
                      "us_per_look_all_three": look, "us_per_request_with_looks": amortised},
            "ratio_after_over_before": {rate: a / before_us for rate, a in amortised.items()},
            "rows_per_block": per_block, "blocks": blocks,
            "note": "block means and softmax outputs are computed once for both paths and not timed; "
                    "the score detectors get a stand-in score (1 - confidence)"}


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))

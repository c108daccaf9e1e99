#!/usr/bin/env python3
"""Figures for the prediction-drift, change and anomaly detectors, on this machine's CPU.

    .venv/bin/python bench/drift_report.py --out bench-results/drift_report.json [--quick]

* cost: microseconds per value (per row for the anomaly scorer) of ``update`` at batch sizes 1,
  64 and 1024 (best of 3 runs; the machine is shared).
* run length: ClassMixDrift and PageHinkleyChange calibrated for ERT = 500, then run on FRESH
  no-drift streams (other seeds than the calibration's); the measured mean run length is
  ``values / alarms`` (alarms reset the detectors, so run lengths are independent). Page-Hinkley
  on a light-tailed (gamma) and a heavy-tailed (lognormal, like feature-squeezing scores) stream.
  ADWIN (river's default delta) on the same streams: its alarms per value, for the record.
* detection delay: the class mix of the bundled MNIST model's reference predictions (about 10%
  per class, from its calibration artifact); after ``pre`` no-drift predictions class 0 goes to
  30% (the others scaled down). The delay is the number of predictions from the change to the
  first alarm, over many trials; trials with a false alarm before the change are counted and left
  out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.detect.anomaly import AnomalyScorer
from agent.detect.drift.change import AdwinChange, PageHinkleyChange
from agent.detect.drift.prediction import ClassMixDrift, ScalarWindowDrift

CALIBRATION = ROOT / "agent/demo/models/mnist_cnn/1/sidewatch-calibration.json"


def mnist_class_frequencies() -> np.ndarray:
    counts = json.loads(CALIBRATION.read_text())["reference"]["predictions"]["counts"]
    return np.asarray(counts, dtype=np.float64) / np.sum(counts)


def timed(run, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def cost_per_value(make, data: np.ndarray, batch: int) -> float:
    """Microseconds per value of ``update`` over ``data`` in batches of ``batch``."""

    def run():
        det = make()
        for i in range(0, len(data), batch):
            det.update(data[i : i + batch])

    return round(timed(run) / len(data) * 1e6, 3)


def mean_run_length(det, data: np.ndarray, batch: int = 4096) -> dict:
    for i in range(0, len(data), batch):
        det.update(data[i : i + batch])
    return {
        "values": int(det.n),
        "alarms": int(det.n_detections),
        "mean_run_length": round(det.n / det.n_detections, 1) if det.n_detections else None,
    }


def delays(det, before, after, trials: int, pre: int, post: int, rng) -> dict:
    """Values from the change to the first alarm: ``pre`` values from ``before(n, rng)``, then
    up to ``post`` from ``after(n, rng)``."""
    found, false_alarms, missed = [], 0, 0
    for _ in range(trials):
        det.reset()
        det.update(before(pre, rng))
        if det.n_detections:
            false_alarms += 1
            continue
        det.update(after(post, rng))
        if det.alarm_positions:
            found.append(det.alarm_positions[0] + 1)
        else:
            missed += 1
    d = np.asarray(found, dtype=np.float64)
    return {
        "trials": trials,
        "false_alarm_before_change": false_alarms,
        "missed": missed,
        "mean": round(float(d.mean()), 1),
        "median": float(np.median(d)),
        "p90": float(np.quantile(d, 0.9)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="fewer values and trials")
    args = parser.parse_args()
    scale = 0.2 if args.quick else 1.0
    rng = np.random.default_rng(2024)
    freqs = mnist_class_frequencies()
    report: dict = {
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
    }

    # --- calibration --------------------------------------------------------------------------
    gamma_ref = rng.gamma(2.0, 0.05, size=20_000)
    lognormal_ref = np.exp(rng.normal(-9.0, 3.0, size=20_000))
    started = time.perf_counter()
    class_mix = ClassMixDrift(window=200, ert=500).fit(frequencies=freqs)
    fit_class_mix = time.perf_counter() - started
    started = time.perf_counter()
    ph_gamma = PageHinkleyChange(ert=500).fit(gamma_ref)
    fit_ph = time.perf_counter() - started
    ph_lognormal = PageHinkleyChange(ert=500).fit(lognormal_ref)
    conf_ref = np.round(rng.beta(8.0, 1.0, size=20_000), 3)
    scalar = ScalarWindowDrift(window=200, ert=500).fit(conf_ref)
    features = rng.normal(size=(10_000, 49))
    started = time.perf_counter()
    scorer = AnomalyScorer().fit(features)
    fit_anomaly = time.perf_counter() - started
    report["calibration_seconds"] = {
        "class_mix_w200_ert500": round(fit_class_mix, 2),
        "page_hinkley_ert500": round(fit_ph, 2),
        "anomaly_isolation_forest_10000x49": round(fit_anomaly, 2),
    }
    report["thresholds"] = {
        "class_mix_w200_ert500": class_mix.calibration_dict()["threshold"],
        "class_mix_simulation": class_mix.simulation_,
        "page_hinkley_gamma": ph_gamma.threshold_,
        "page_hinkley_lognormal": ph_lognormal.threshold_,
    }

    # --- cost ---------------------------------------------------------------------------------
    n_cost = int(20_000 * scale)
    classes = rng.choice(10, size=n_cost, p=freqs)
    conf = np.round(rng.beta(8.0, 1.0, size=n_cost), 3)
    scores = rng.gamma(2.0, 0.05, size=n_cost)
    rows = rng.normal(size=(int(4096 * scale), 49))
    cal = {
        "class_mix": class_mix.calibration_dict(),
        "scalar": scalar.calibration_dict(),
        "ph": ph_gamma.calibration_dict(),
    }
    makers = {
        "class_mix_w200": (lambda: ClassMixDrift.from_calibration(cal["class_mix"]), classes),
        "scalar_window_w200": (lambda: ScalarWindowDrift.from_calibration(cal["scalar"]), conf),
        "page_hinkley": (lambda: PageHinkleyChange.from_calibration(cal["ph"]), scores),
        "adwin": (AdwinChange, scores),
        "anomaly_per_row_49_features": (lambda: AnomalyScorer.from_calibration(scorer.calibration_dict()), rows),
    }
    report["cost_us_per_value"] = {
        name: {str(b): cost_per_value(make, data, b) for b in (1, 64, 1024)} for name, (make, data) in makers.items()
    }

    # --- run length with no drift (fresh streams) ---------------------------------------------
    n_fresh = int(1_000_000 * scale)
    fresh = np.random.default_rng(77)
    report["run_length_ert500"] = {
        "class_mix_w200": mean_run_length(class_mix, fresh.choice(10, size=n_fresh, p=freqs)),
        "page_hinkley_gamma": mean_run_length(ph_gamma, fresh.gamma(2.0, 0.05, size=n_fresh)),
        "page_hinkley_lognormal": mean_run_length(ph_lognormal, np.exp(fresh.normal(-9.0, 3.0, size=n_fresh))),
        "adwin_default_delta_gamma": mean_run_length(AdwinChange(), fresh.gamma(2.0, 0.05, size=n_fresh)),
        "adwin_default_delta_lognormal": mean_run_length(AdwinChange(), np.exp(fresh.normal(-9.0, 3.0, size=n_fresh))),
    }
    for det in (class_mix, ph_gamma, ph_lognormal):
        det.reset()

    # --- detection delay: class 0 from ~10% to 30% --------------------------------------------
    shifted = freqs.copy()
    shifted[0] = 0.3
    shifted[1:] *= 0.7 / freqs[1:].sum()
    trials = int(500 * scale)
    def before(n, r):
        return r.choice(10, size=n, p=freqs)
    def after(n, r):
        return r.choice(10, size=n, p=shifted)
    report["class_mix_delay_class0_10_to_30pct"] = {}
    for window, ert in ((100, 500), (200, 500), (100, 10_000), (200, 10_000), (500, 10_000)):
        det = ClassMixDrift(window=window, ert=ert).fit(frequencies=freqs)
        report["class_mix_delay_class0_10_to_30pct"][f"w{window}_ert{ert}"] = {
            "threshold": round(det.threshold_, 3),
            **delays(det, before, after, trials, pre=2 * window, post=20 * window, rng=np.random.default_rng(window)),
        }
    # and a score step of 2 reference standard deviations for Page-Hinkley and ADWIN
    step = 2 * gamma_ref.std()
    def before_s(n, r):
        return r.gamma(2.0, 0.05, size=n)
    def after_s(n, r):
        return r.gamma(2.0, 0.05, size=n) + step
    report["score_step_2sd_delay"] = {
        "page_hinkley_ert500": delays(ph_gamma, before_s, after_s, trials, 200, 5000, np.random.default_rng(5)),
        "page_hinkley_ert10000": delays(
            PageHinkleyChange(ert=10_000).fit(gamma_ref), before_s, after_s, trials, 200, 5000, np.random.default_rng(5)
        ),
        "adwin_default": delays(AdwinChange(), before_s, after_s, trials, 200, 5000, np.random.default_rng(6)),
    }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

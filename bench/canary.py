"""Canary against stable: delays and quiet of the in-sidecar comparison, in simulated time.

For each scikit-learn model of the test suite (tests/support/sklearn_models.py) two versions serve side by
side; each request goes to the canary with probability ``--share`` (10% by default, as a canary rollout
starts), else to the stable version. The sidecar's drift watch (agent/detect/drift/watch.py, no model
repository, the default settings: budget 1/30d, looks every 15 s, clusters of 60 rows, windows of at least
300 rows of each version, a fit on 500 stable rows; ``drift.canary.routing`` both ``sticky``, the default,
whose clusters hold 60 rows of each version, and ``random``, 60 rows of both together, which is valid for
this traffic, split per request) gets tapped copies stamped by a simulated clock, with the versions' real outputs
computed in-process. Two kinds of canary:

* ``same``: the stable version's own pipeline (a canary that answers alike): any ``canary.*`` flag within
  ``--benign-seconds`` is a false alarm;
* one that diverges, as a retrain that went wrong does: diabetes's regressor fitted with its feature
  columns reversed; flare's classifier refitted with balanced class weights (it predicts the rare class
  far more often); topics's text classifier refitted on a hashing space of 64 features (an under-fitted
  retrain): the seconds and requests from the canary's first request to its first ``canary.*`` flag
  (horizon ``--horizon-seconds``), and which detectors raised it.

    .venv/bin/python bench/canary.py --out bench-results/canary.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sklearn.feature_extraction.text import HashingVectorizer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402

from agent.config import load_config  # noqa: E402
from agent.detect.drift.watch import DriftWatch  # noqa: E402
from agent.metrics import BoundedModels, DriftMetrics  # noqa: E402
from bench.live_baseline import OVERRIDES, predict  # noqa: E402
from tests.support import scenarios  # noqa: E402
from tests.support.drift_watch import tapped  # noqa: E402
from tests.support.sklearn_models import training_data  # noqa: E402
from tests.support.sklearn_train import fit_all, fit_diabetes, fit_flare  # noqa: E402

START = 1_800_000_000.0


def diverging(data: dict) -> dict:
    """The canaries that diverge, one per model (module docstring)."""
    flare = fit_flare(data["flare_numeric"], data["flare_categorical"], data["flare_labels"])
    flare.steps[-1][1].set_params(class_weight="balanced")
    x = np.hstack([data["flare_numeric"].astype(object), data["flare_categorical"].astype(str).astype(object)])
    flare.fit(x, data["flare_labels"])
    topics = make_pipeline(HashingVectorizer(n_features=64, alternate_sign=False, norm="l2"),
                           LogisticRegression(max_iter=1000)).fit([str(t) for t in data["topics_text"]],
                                                                  data["topics_labels"])
    return {"diabetes": fit_diabetes(data["diabetes_features"][:, ::-1], data["diabetes_target"]),
            "flare": flare, "topics": topics}


def run(model: str, stable, canary, rate: float, share: float, seconds: float, stop_on_flag: bool, seed: int,
        routing: str = "sticky"):
    """Returns (seconds, requests, detectors) at the first canary flag (or None), or the flags raised."""
    now = [START]
    registry = CollectorRegistry()
    config = load_config(overrides={"models": {name: {"tensors": t} for name, t in OVERRIDES.items()},
                                    "drift": {"canary": {"routing": routing}}})
    watch = DriftWatch(None, config.drift, DriftMetrics(registry), BoundedModels(8), clock=lambda: now[0],
                       overrides={m: s.tensors for m, s in config.models.items()})
    tensors = scenarios.resample(scenarios.benign(model), 3000, seed=seed)
    copies = {}
    for version, pipeline in (("1", stable), ("2", canary)):
        outputs = predict({model: pipeline}, model, tensors)
        copies[version] = [tapped(model, {k: v[i:i + 1] for k, v in tensors.items()},
                                  {k: v[i:i + 1] for k, v in outputs.items()}, version, version) for i in range(3000)]
    rng = np.random.default_rng(seed)

    def flags() -> list[str]:
        return sorted(s.labels["detector"] for family in registry.collect() if family.name == "sidewatch_drift_detected"
                      for s in family.samples if s.labels["feature"] == "all" and s.value == 1.0
                      and s.labels["detector"].startswith("canary."))

    total = int(rate * seconds)
    for i in range(total):
        now[0] += 1.0 / rate
        version = "2" if rng.random() < share else "1"
        watch(copies[version][i % 3000])
        if i % 16 == 0 or i == total - 1:
            watch.tick()
            if stop_on_flag and (up := flags()):
                return round(now[0] - START, 1), i + 1, up
    return None if stop_on_flag else flags()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(scenarios.MODELS))
    parser.add_argument("--rates", default="10,100")
    parser.add_argument("--share", type=float, default=0.1)
    parser.add_argument("--routing", default="sticky,random",
                        help="drift.canary.routing values to run (the traffic itself is split per request)")
    parser.add_argument("--benign-seconds", type=float, default=3600.0)
    parser.add_argument("--horizon-seconds", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    data = training_data()
    stable, bad = fit_all(data), diverging(data)
    results = []
    for model in args.models.split(","):
        for rate, routing in ((float(r), g) for r in args.rates.split(",") for g in args.routing.split(",")):
            benign = run(model, stable[model], stable[model], rate, args.share, args.benign_seconds, False, seed=2,
                         routing=routing)
            hit = run(model, stable[model], bad[model], rate, args.share, args.horizon_seconds, True, seed=3,
                      routing=routing)
            entry = {"model": model, "rate": rate, "routing": routing, "canary_share": args.share,
                     "benign_seconds": args.benign_seconds, "benign_flags": benign,
                     "detected": hit is not None, "seconds": hit[0] if hit else None,
                     "requests": hit[1] if hit else None, "raised_by": hit[2] if hit else []}
            results.append(entry)
            print(json.dumps(entry), flush=True)
    out = {"benchmark": "canary", "settings": "sidecar defaults (budget 1/30d, looks every 15 s, clusters of 60 rows, "
           "windows of 300 rows of each version, fit on 500 stable rows)",
           "parameters": {k: str(v) for k, v in vars(args).items()},
           "results": results, "machine": {"python": platform.python_version(), "machine": platform.machine()},
           "seconds": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"benign: no flag in {sum(not r['benign_flags'] for r in results)}/{len(results)} runs; detected "
          f"{sum(r['detected'] for r in results)}/{len(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

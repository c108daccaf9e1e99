"""Drift of models sidewatch cannot run, from baselines learned from their traffic: delays and quiet, in
simulated time.

For each scikit-learn model of the test suite (tests/support/sklearn_models.py: ``flare``, a tabular
classifier with numeric and categorical inputs; ``diabetes``, a regressor; ``topics``, a text classifier)
and each request rate: the sidecar's drift watch (agent/detect/drift/watch.py, no model repository, the
default settings: budget 1/30d, looks every 15 s) gets tapped copies of requests one row each, stamped
by a simulated clock, with the models' real outputs computed in-process. It learns the baseline from the
reference split (tests/support/scenarios.py), then sees ``--benign-seconds`` of held-out traffic from the
same source (any flag there is a false alarm), then one drift scenario of issue 12 (a unit change, missing
values, a new category, a segment or class mix, shorter or foreign text) until a flag rises or
``--horizon-seconds`` pass. Reported per model, scenario and rate: the seconds and requests from the change
to the first flag, which detector raised it, and the flags raised on benign traffic.

    .venv/bin/python bench/live_baseline.py --out bench-results/live_baseline.json      # about 10 minutes
    .venv/bin/python bench/live_baseline.py --rates 10 --models flare --out /tmp/lb.json
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

from agent.config import load_config  # noqa: E402
from agent.dataplane.tap import TappedInference  # noqa: E402
from agent.detect.drift.watch import DriftWatch  # noqa: E402
from agent.metrics import BoundedModels, DriftMetrics  # noqa: E402
from agent.protocol import codec, oip_pb2  # noqa: E402
from tests.support import scenarios  # noqa: E402
from tests.support.sklearn_models import SIGNATURES, training_data  # noqa: E402
from tests.support.sklearn_train import fit_all  # noqa: E402

START = 1_800_000_000.0
# As an operator declares flare's BYTES category codes (they would be read as text otherwise).
OVERRIDES = {"flare": {"categorical": {"kind": "categorical", "columns": ["zurich", "spot_size", "distribution"]}}}


def predict(pipelines: dict, model: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's outputs, as MLServer's runtime computes them (tests/support/mlserver_runtime.py)."""
    signature = SIGNATURES[model]
    pipeline = pipelines[model]
    names = [spec[0] for spec in signature["inputs"]]
    if signature.get("text"):
        x = [b.decode("utf-8") for b in np.asarray(tensors[names[0]]).reshape(-1)]
    elif len(names) == 1:
        x = tensors[names[0]]
    else:  # numeric columns, then the categories as strings, in one object array (the runtime's layout)
        parts = []
        for name in names:
            a = np.asarray(tensors[name])
            if a.dtype == object or a.dtype.kind == "S":
                a = np.vectorize(lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b), otypes=[object])(a)
            parts.append(a.astype(object))
        x = np.hstack(parts)
    out = pipeline.predict_proba(x) if signature["method"] == "predict_proba" else pipeline.predict(x)
    out = np.asarray(out, dtype=np.float32)
    return {signature["outputs"][0][0]: out if out.ndim == 2 else out[:, None]}


def tapped(model: str, tensors: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> TappedInference:
    request = oip_pb2.ModelInferRequest(model_name=model)
    for name, array in tensors.items():
        codec.add_input(request, name, array)
    response = oip_pb2.ModelInferResponse(model_name=model, model_version="v1")
    for name, array in outputs.items():
        codec.add_output(response, name, array)
    return TappedInference(model, "", codec.decode_request(request), codec.decode_response(response), request,
                           response, 0.0, 0.0)


class Run:
    """One drift watch on a simulated clock, fed one row per request."""

    def __init__(self, model: str, pipelines: dict) -> None:
        self.model, self.pipelines = model, pipelines
        self.now = START
        self.registry = CollectorRegistry()
        config = load_config(overrides={"models": {name: {"tensors": t} for name, t in OVERRIDES.items()}})
        self.watch = DriftWatch(None, config.drift, DriftMetrics(self.registry), BoundedModels(8),
                                clock=lambda: self.now, overrides={m: s.tensors for m, s in config.models.items()})

    def flags(self) -> dict[str, float]:
        return {s.labels["detector"]: s.value for family in self.registry.collect()
                if family.name == "sidewatch_drift_detected" for s in family.samples if s.labels["feature"] == "all"}

    def feed(self, tensors: dict[str, np.ndarray], rate: float, seconds: float, stop_on_flag: bool = False):
        """Requests at ``rate`` for ``seconds`` (rows drawn in order, cycling); returns (seconds, requests,
        detectors up) at the first flag when ``stop_on_flag``, else the flags raised."""
        n = len(next(iter(tensors.values())))
        outputs = predict(self.pipelines, self.model, tensors)
        copies = [tapped(self.model, {k: v[i:i + 1] for k, v in tensors.items()},
                         {k: v[i:i + 1] for k, v in outputs.items()}) for i in range(n)]
        started = self.now
        for i in range(int(rate * seconds)):
            self.now += 1.0 / rate
            self.watch(copies[i % n])
            if i % 16 == 0 or i == int(rate * seconds) - 1:
                self.watch.tick()
                if stop_on_flag and any(self.flags().values()):
                    up = sorted(d for d, v in self.flags().items() if v)
                    return round(self.now - started, 1), i + 1, up
        return None if stop_on_flag else sorted(d for d, v in self.flags().items() if v)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(scenarios.MODELS))
    parser.add_argument("--rates", default="10,100")
    parser.add_argument("--benign-seconds", type=float, default=300.0)
    parser.add_argument("--horizon-seconds", type=float, default=900.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    pipelines = fit_all(training_data())
    results = []
    for model in args.models.split(","):
        for scenario in scenarios.DRIFT[model]:
            for rate in (float(r) for r in args.rates.split(",")):
                run = Run(model, pipelines)
                baseline_rows = run.watch._settings.baseline.rows
                run.feed(scenarios.resample(scenarios.reference(model), 3000, seed=1), rate, baseline_rows / rate + 1)
                live = next(iter(run.watch.live.values()))
                benign_flags = run.feed(scenarios.resample(scenarios.benign(model), 3000, seed=2), rate,
                                        args.benign_seconds)
                hit = run.feed(scenarios.drift(model, scenario, n=3000), rate, args.horizon_seconds, stop_on_flag=True)
                entry = {"model": model, "scenario": scenario, "rate": rate, "baseline_state": live.state,
                         "benign_seconds": args.benign_seconds, "benign_flags": benign_flags,
                         "detected": hit is not None, "seconds": hit[0] if hit else None,
                         "requests": hit[1] if hit else None, "raised_by": hit[2] if hit else []}
                results.append(entry)
                print(json.dumps(entry), flush=True)
    out = {"benchmark": "live_baseline", "settings": "sidecar defaults (budget 1/30d, looks every 15 s, baseline "
           "of 2,000 rows)", "parameters": {k: str(v) for k, v in vars(args).items()}, "results": results,
           "machine": {"python": platform.python_version(), "machine": platform.machine()},
           "seconds": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    quiet = sum(not r["benign_flags"] for r in results)
    print(f"benign: no flag in {quiet}/{len(results)} runs; detected {sum(r['detected'] for r in results)}"
          f"/{len(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

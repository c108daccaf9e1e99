"""Drift of a colour-image classifier watched from a reference file: delays and quiet, in simulated time.

The classifier of tests/support/colour_images.py (32 x 32 RGB patches of scikit-learn's two sample photos,
four classes; sidewatch has no model file for it) is watched from ``models.colour_patches.reference``: a
``.npz`` of held-out patches and the model's probabilities for them. The sidecar's drift watch
(agent/detect/drift/watch.py, no model repository, the default drift settings: budget 1/30d, looks every
15 s) gets tapped copies of requests, ``--batch`` patches each, stamped by a simulated clock, with the
model's outputs computed in numpy (the served ONNX graph's computation). Its baseline is fitted from the file
at the first request; then ``--benign-seconds`` of held-out patches of the same source (any flag is a false
alarm; ``--benign-runs`` runs with other seeds), then one scenario (``darker``: pixels x 0.6; ``rotated``:
np.rot90) until a flag rises or ``--horizon-seconds`` pass. Reported per scenario and rate: the seconds and
requests from the change to the first flag, and the detectors that raised it.

    .venv/bin/python bench/image_reference.py --out bench-results/image_reference.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.config import load_config  # noqa: E402
from agent.dataplane.tap import TappedInference  # noqa: E402
from agent.detect.drift.reference_file import read_references  # noqa: E402
from agent.detect.drift.watch import DriftWatch  # noqa: E402
from agent.metrics import BoundedModels, DriftMetrics  # noqa: E402
from agent.protocol import codec, oip_pb2  # noqa: E402
from tests.support import colour_images  # noqa: E402

START = 1_800_000_000.0
MODEL = colour_images.MODEL


def tapped(x: np.ndarray) -> TappedInference:
    request = oip_pb2.ModelInferRequest(model_name=MODEL)
    codec.add_input(request, "x", x)
    response = oip_pb2.ModelInferResponse(model_name=MODEL, model_version=colour_images.VERSION)
    codec.add_output(response, "probabilities", colour_images.predict(x))
    return TappedInference(MODEL, "", codec.decode_request(request), codec.decode_response(response), request,
                           response, 0.0, 0.0)


class Run:
    """One drift watch on a simulated clock, watching from the reference file."""

    def __init__(self, reference: Path) -> None:
        self.now = START
        self.registry = CollectorRegistry()
        config = load_config(overrides={"models": {MODEL: {"reference": str(reference)}}})
        self.watch = DriftWatch(None, config.drift, DriftMetrics(self.registry), BoundedModels(8),
                                clock=lambda: self.now, references=read_references(config.models))

    def flags(self) -> dict[str, float]:
        return {s.labels["detector"]: s.value for family in self.registry.collect()
                if family.name == "sidewatch_drift_detected" for s in family.samples if s.labels["feature"] == "all"}

    def feed(self, x: np.ndarray, rate: float, batch: int, seconds: float, stop_on_flag: bool = False):
        """Requests of ``batch`` patches at ``rate`` for ``seconds`` (patches in order, cycling); returns
        (seconds, requests, detectors up) at the first flag when ``stop_on_flag``, else the flags raised."""
        copies = [tapped(x[np.arange(i, i + batch) % len(x)]) for i in range(0, len(x), batch)]
        started = self.now
        total = int(rate * seconds)
        for i in range(total):
            self.now += 1.0 / rate
            self.watch(copies[i % len(copies)])
            if i % 16 == 0 or i == total - 1:
                self.watch.tick()
                if stop_on_flag and any(self.flags().values()):
                    return round(self.now - started, 1), i + 1, sorted(d for d, v in self.flags().items() if v)
        return None if stop_on_flag else sorted(d for d, v in self.flags().items() if v)


def shuffled(x: np.ndarray, seed: int) -> np.ndarray:
    return x[np.random.default_rng(seed).permutation(len(x))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="10,100")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--benign-seconds", type=float, default=300.0)
    parser.add_argument("--benign-runs", type=int, default=10)
    parser.add_argument("--horizon-seconds", type=float, default=900.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    benign, _ = colour_images.split("benign")
    results, quiet = [], []
    with tempfile.TemporaryDirectory() as folder:
        reference = colour_images.write_reference(Path(folder) / "reference.npz")
        for rate in (float(r) for r in args.rates.split(",")):
            for seed in range(args.benign_runs):
                run = Run(reference)
                flags = run.feed(shuffled(benign, seed), rate, args.batch, args.benign_seconds)
                quiet.append({"rate": rate, "seed": seed, "benign_flags": flags})
                if seed == 0:
                    for scenario, change in colour_images.DRIFT.items():
                        drifted = Run(reference)
                        drifted.feed(shuffled(benign, 100), rate, args.batch, args.benign_seconds)
                        hit = drifted.feed(change(shuffled(benign, 200)), rate, args.batch, args.horizon_seconds,
                                           stop_on_flag=True)
                        entry = {"scenario": scenario, "rate": rate, "batch": args.batch,
                                 "state": drifted.watch.live[(MODEL, colour_images.VERSION)].state,
                                 "detected": hit is not None, "seconds": hit[0] if hit else None,
                                 "requests": hit[1] if hit else None, "raised_by": hit[2] if hit else []}
                        results.append(entry)
                        print(json.dumps(entry), flush=True)
    n_quiet = sum(not q["benign_flags"] for q in quiet)
    out = {"benchmark": "image_reference", "settings": "sidecar defaults (budget 1/30d, looks every 15 s); baseline "
           f"fitted from a .npz of {len(colour_images.split('reference')[0])} held-out patches",
           "parameters": {k: str(v) for k, v in vars(args).items()}, "results": results, "benign": quiet,
           "benign_quiet": f"{n_quiet}/{len(quiet)}",
           "machine": {"python": platform.python_version(), "machine": platform.machine()},
           "seconds": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"benign: no flag in {n_quiet}/{len(quiet)} runs of {args.benign_seconds:.0f} s; detected "
          f"{sum(r['detected'] for r in results)}/{len(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

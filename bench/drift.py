#!/usr/bin/env python3
"""Streaming drift detectors, sidewatch's against peers, every one set to the same expected run time.

    .venv/bin/python bench/drift.py --out bench-results/drift.json      # full run, 8-10 minutes
    .venv/bin/python bench/drift.py --quick --out /tmp/drift.json       # smoke run, 1-2 minutes

Peers: alibi-detect's ``CVMDriftOnline`` and ``MMDDriftOnline`` (PyTorch backend) and river's
``ADWIN``. alibi-detect 0.13 pins numpy<2 and numba<0.60 (which cannot run on numpy 2), so it
lives in a virtual environment of its own, like MLServer's::

    python3 -m venv .venv-alibi && .venv-alibi/bin/pip install 'alibi-detect[torch]==0.13.0'

and this script runs the alibi detectors in a child process under ``--peer-python``
(``.venv-alibi/bin/python`` by default; in-process when ``alibi_detect`` imports here). The child
gets the reference data in an .npz and rebuilds every stream from the same seeds; the streams'
checksums are compared in the JSON (``checks``).

ERT (expected run time): the mean number of updates, with no drift, until the first false alarm,
counted from the first update. Every ERT-calibrated detector gets ``--ert``; alibi's CVM counts its
ERT from the update that fills the window, so it gets ``ert - (window - 1)``. ADWIN's ``delta`` sets
no ERT: it keeps river's default and its run length is measured and reported as it is.

Streams (details in bench/README.md):

* ``synthetic``: 20 features, reference and no-drift streams i.i.d. N(0, 1); changes: a mean shift
  of 0.5 and of 1 standard deviation in feature 0, and the 10 feature pairs (0,1), (2,3), ...
  going from independent to correlated 0.9 (marginals stay N(0, 1)).
* ``mnist``: the bundled model's traffic. The 5,000 reference images (``agent.demo.data.REFERENCE``,
  the first 5,000 of MNIST's validation split) are split at random: 3,000 to fit every detector,
  2,000 held out as the no-drift traffic (random orders of them), so that "no drift" really is
  the reference's distribution. Input detectors see the 49 block means (``input_features``), the
  class-mix detector the predicted class, the scalar detectors the top-1 confidence
  (``output_features`` of the ONNX model's probabilities). Changes, each after held-out traffic:
  one digit (true label) over-sampled to ``CLASS_SHARE`` of the traffic (``class_mix``); or the
  traffic switching to the demo's benign stream, the next 2,000 validation images
  (``benign_stream``). A benign stream that must stay quiet: the demo's test sample, the first
  2,000 images of MNIST's test split (``test_sample``, ``load_images()``), run from its first
  request like no-drift traffic: its run length is reported against the ERT (``benign``). Neither
  stream can serve as no-drift traffic for calibration. The test sample
  comes from other writers and carries less ink (18 of the 49 block means differ from the
  reference's at KS p < 0.001); the benign stream differs mildly (0 of 49 at p < 0.001, but 3%
  more ink on average, about 4 standard errors; sidewatch's MMD fitted on all 5,000 alarms about
  twice as soon on it as on reference rows its calibration never used).

Figures: run length with no drift (mean and standard error over many runs), detection delay
(updates from the change to the alarm, after ``2 * window`` no-drift updates), cost
per update (one row per call, as alibi's API takes them; and micro-batches for sidewatch), state
size and allocation peak, calibration time. Each detector's runs are time-budgeted and count
whole runs; the counts are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
import types
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_PEER_PYTHON = ROOT / ".venv-alibi" / "bin" / "python"
MODEL = ROOT / "agent/demo/models/mnist_cnn/1/model.onnx"

FAMILIES = ("synthetic", "mnist")
SCENARIOS = {"synthetic": ("shift_0.5", "shift_1.0", "correlation_0.9"),
             "mnist": ("class_mix", "benign_stream")}
# Benign streams from the same source, which must stay quiet (issue 11): a detector's run length on
# them, as on no-drift traffic, should be at least its ERT (within RUN_LENGTH_GOAL). The MNIST test
# sample is benign for the product (same source, the model as accurate on it), not a drift to detect.
BENIGN_STREAMS = {"synthetic": (), "mnist": ("test_sample",)}
SYNTHETIC_DIM = 20
SYNTHETIC_REFERENCE_ROWS = 5000
CORRELATION = 0.9
CLASS_DIGIT = 0
CLASS_SHARE = 0.3
MNIST_FIT_IMAGES = 3000  # of the 5,000 reference images; the other 2,000 are the no-drift traffic
TRAFFIC_SOURCES = ("held_out", "benign_stream", "test_sample")  # MNIST stream images, in this order
RUN_LENGTH_GOAL = 0.2  # measured mean within 20% of the ERT
COST_GOAL = 10.0  # alibi's cost per update at least 10x sidewatch's
COST_BLOCKS = 5  # cost = the median block's: a burst of other work on a shared box hits one block
BATCH = 64  # micro-batch rows for sidewatch's batched cost (the sidecar scores micro-batches)
FEED_CHUNK = 50  # rows per call when sidewatch detectors run a stream (they are batch-invariant)


# --- parameters -----------------------------------------------------------------------------------


@dataclass
class Budget:
    """Runs of one detector on one kind of stream: at least ``min_runs``, then more until
    ``seconds`` have passed or ``max_runs`` are done (whole runs only)."""

    min_runs: int
    max_runs: int
    seconds: float


@dataclass
class Params:
    ert: float
    window: int
    seed: int
    quick: bool
    mmd_n_ref: int = 300  # reference rows each MMD keeps (alibi: its sub-reference after the split)
    alibi_cvm_reference: int = 500  # alibi's CVM threshold simulation is O(B (N + 2W)^2)
    alibi_mmd_bootstrap_factor: float = 10.0  # n_bootstraps = factor * ERT (alibi's docs: >= 10x)
    horizon_factor: float = 5.0  # no-drift runs are censored at this many ERTs
    # sidewatch's detectors are refitted on this many reference samples in all (the first is the
    # main run's) for the run length: the ERT a calibration promises is an average over them.
    reference_draws: int = 8
    run_length_per_draw: Budget = field(default_factory=lambda: Budget(40, 200, 4.0))
    cost_updates: int = 1000
    memory_updates: int = 100
    run_length_fast: Budget = field(default_factory=lambda: Budget(100, 1000, 20.0))
    run_length_slow: Budget = field(default_factory=lambda: Budget(20, 400, 25.0))
    delay_fast: Budget = field(default_factory=lambda: Budget(50, 300, 5.0))
    delay_slow: Budget = field(default_factory=lambda: Budget(10, 100, 8.0))

    @property
    def delay_warm(self) -> int:
        # No-drift updates before the change: two windows, so every window is full of no-drift
        # data and every detector is past its start-up. A sliding-window test alarms most readily
        # when its window first fills (that statistic is not yet conditioned on having survived
        # earlier ones; alibi's CVM thresholds also vary until update 2W - 1): with the change one
        # window in, those false alarms would pass for detections.
        return 2 * self.window

    @property
    def delay_horizon(self) -> int:
        # A detector that does not see the change still alarms (falsely) within one ERT about 63%
        # of the time, so waiting longer than an ERT measures false alarms, not detection.
        return int(self.ert)


def make_params(args: argparse.Namespace) -> Params:
    window = args.window
    if args.quick:
        # A smoke run: ERT 200 unless given (cheaper alibi calibration: it simulates ~ERT*d
        # streams), fewer runs; the figures are rough.
        return Params(ert=args.ert or 200.0, window=window, seed=args.seed, quick=True,
                      alibi_mmd_bootstrap_factor=3.0, cost_updates=300, memory_updates=50,
                      run_length_fast=Budget(50, 200, 3.0), run_length_slow=Budget(5, 40, 2.5),
                      delay_fast=Budget(20, 60, 1.0), delay_slow=Budget(4, 15, 1.0),
                      reference_draws=2, run_length_per_draw=Budget(20, 60, 1.5))
    return Params(ert=args.ert or 500.0, window=window, seed=args.seed, quick=False)


def params_from_dict(d: dict[str, Any]) -> Params:
    budgets = {k: Budget(**d[k]) for k in ("run_length_fast", "run_length_slow", "delay_fast", "delay_slow")}
    return Params(**{**d, **budgets})


# --- logging --------------------------------------------------------------------------------------

_STARTED = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the table."""
    print(f"[{time.perf_counter() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


# --- data -----------------------------------------------------------------------------------------


def synthetic_reference(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 7919]).standard_normal((SYNTHETIC_REFERENCE_ROWS, SYNTHETIC_DIM))


def model_probabilities(images: np.ndarray) -> np.ndarray:
    """The bundled model's class probabilities (its output is already softmaxed)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + 500]})[0] for i in range(0, len(images), 500)])


def image_arrays(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: block-mean features, predicted class, top-1 confidence, entropy (nats), true label."""
    from agent.detect.features import input_features, output_features

    classes, confidence, entropy = output_features(model_probabilities(images))
    return {"features": input_features(images), "class": classes.astype(np.int64),
            "confidence": confidence, "entropy": entropy, "label": labels}


def mnist_arrays(seed: int) -> dict[str, np.ndarray]:
    """``ref_*``: the images detectors are fitted on (a random 3,000 of the reference images).
    ``traffic_*``: the other reference images, the benign stream, the test sample, in that order
    (``traffic_source`` says which: an index into TRAFFIC_SOURCES); streams are indices into it."""
    from agent.demo.data import BENIGN_STREAM, REFERENCE, load_images

    ref = image_arrays(*load_images(REFERENCE))
    order = np.random.default_rng([seed, 104729]).permutation(len(ref["label"]))
    fit, held_out = order[:MNIST_FIT_IMAGES], order[MNIST_FIT_IMAGES:]
    parts = [{k: v[held_out] for k, v in ref.items()}, image_arrays(*load_images(BENIGN_STREAM)),
             image_arrays(*load_images())]
    out = {f"ref_{k}": v[fit] for k, v in ref.items()}
    out.update({f"traffic_{k}": np.concatenate([part[k] for part in parts]) for k in ref})
    out["traffic_source"] = np.repeat(np.arange(len(parts)), [len(part["label"]) for part in parts])
    return out


def build_data(params: Params) -> dict[str, np.ndarray]:
    """Everything the detectors are fitted on and streams are drawn from (saved for the peer worker)."""
    data = {"synthetic_reference": synthetic_reference(params.seed)}
    data.update(mnist_arrays(params.seed))
    return data


# --- streams: a function of (seed, family, scenario, run), identical in both processes ------------


def stream_rng(seed: int, family: str, scenario: str, run: int) -> np.random.Generator:
    # A stable integer per name (zlib.crc32, not hash(): that is salted per process).
    return np.random.default_rng([seed, zlib.crc32(family.encode()), zlib.crc32(scenario.encode()), run])


class SyntheticFamily:
    """Rows drawn afresh for every run; the one view is the rows themselves."""

    name = "synthetic"

    def __init__(self, data: dict[str, np.ndarray], params: Params):
        self.ref = data["synthetic_reference"]
        self.seed = params.seed
        self.max_length = None  # fresh draws: any length

    def reference(self, view: str) -> np.ndarray:
        return self.ref

    def view(self, items: np.ndarray, view: str) -> np.ndarray:
        return items

    def no_drift(self, run: int, length: int) -> np.ndarray:
        return stream_rng(self.seed, self.name, "no_drift", run).standard_normal((length, SYNTHETIC_DIM))

    def drifted(self, scenario: str, run: int, warm: int, post: int) -> np.ndarray:
        rows = stream_rng(self.seed, self.name, scenario, run).standard_normal((warm + post, SYNTHETIC_DIM))
        after = rows[warm:]
        if scenario.startswith("shift_"):
            after[:, 0] += float(scenario.split("_")[1])
        elif scenario == "correlation_0.9":
            # x_odd <- rho x_even + sqrt(1 - rho^2) x_odd: correlation rho, both still N(0, 1).
            after[:, 1::2] = CORRELATION * after[:, 0::2] + math.sqrt(1 - CORRELATION**2) * after[:, 1::2]
        else:
            raise ValueError(f"unknown synthetic scenario {scenario!r}")
        return rows


class MnistFamily:
    """Streams are indices into the traffic images; a detector's view maps them to what it watches."""

    name = "mnist"

    def __init__(self, data: dict[str, np.ndarray], params: Params):
        self.data = data
        self.seed = params.seed
        self.pools = {name: np.flatnonzero(data["traffic_source"] == k) for k, name in enumerate(TRAFFIC_SOURCES)}
        self.labels = data["traffic_label"]
        self.window = params.window
        self.max_length = None  # no-drift streams draw with replacement (never twice within a window)

    def reference(self, view: str) -> np.ndarray:
        return self.data[f"ref_{view}"]

    def view(self, items: np.ndarray, view: str) -> np.ndarray:
        return self.data[f"traffic_{view}"][items]

    def no_drift(self, run: int, length: int) -> np.ndarray:
        return draw_without_repeats(self.pools["held_out"], length, self.window,
                                    stream_rng(self.seed, self.name, "no_drift", run))

    def benign(self, stream: str, run: int, length: int) -> np.ndarray:
        """A same-source stream that must stay quiet, from its first request (drawn as no_drift is)."""
        return draw_without_repeats(self.pools[stream], length, self.window,
                                    stream_rng(self.seed, self.name, f"benign/{stream}", run))

    def drifted(self, scenario: str, run: int, warm: int, post: int) -> np.ndarray:
        rng = stream_rng(self.seed, self.name, scenario, run)
        order = rng.permutation(self.pools["held_out"])
        if scenario in ("benign_stream", "test_sample"):
            return np.concatenate([order[:warm], cycle(rng.permutation(self.pools[scenario]), post)])
        if scenario != "class_mix":
            raise ValueError(f"unknown mnist scenario {scenario!r}")
        warm_items, rest = order[:warm], order[warm:]
        # After the change: CLASS_DIGIT makes CLASS_SHARE of the traffic, the other digits keep
        # their held-out proportions among the rest.
        counts = np.bincount(self.labels[rest], minlength=10).astype(float)
        share = counts / counts.sum()
        mix = np.where(np.arange(10) == CLASS_DIGIT, CLASS_SHARE, share * (1 - CLASS_SHARE) / (1 - share[CLASS_DIGIT]))
        digits = rng.choice(10, size=post, p=mix / mix.sum())
        after = np.empty(post, dtype=np.int64)
        for k in range(10):
            pool = rest[self.labels[rest] == k]  # already in random order
            where = np.flatnonzero(digits == k)
            after[where] = cycle(pool, where.size)
        return np.concatenate([warm_items, after])


def draw_without_repeats(pool: np.ndarray, length: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """``length`` items drawn uniformly from ``pool``, except that none repeats within ``window`` draws.

    Why not a permutation of the pool: a run as long as the pool would then be the pool itself, its
    running mean pinned to the pool's mean at the end (a bridge, not a random walk), which makes
    cumulative detectors (Page-Hinkley) alarm far less than on real traffic. Why not plain draws with
    replacement: a repeated image in a window is a tie no real traffic shows (and an MMD pair with
    kernel value 1). Candidates are drawn in bulk; one inside the current window is redrawn.
    """
    out = np.empty(length, dtype=pool.dtype)
    recent: dict[int, int] = {}  # item -> last position drawn
    candidates = iter(())
    for t in range(length):
        while True:
            item = next(candidates, None)
            if item is None:
                candidates = iter(pool[rng.integers(len(pool), size=max(64, length - t))].tolist())
                continue
            if t - recent.get(item, -window) >= window:
                break
        recent[item] = t
        out[t] = item
    return out


def cycle(items: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` of ``items`` repeated: an image comes back only once the pool is used up."""
    return items[np.arange(n) % len(items)]


def make_families(data: dict[str, np.ndarray], params: Params) -> dict[str, Any]:
    return {"synthetic": SyntheticFamily(data, params), "mnist": MnistFamily(data, params)}


def stream_checksums(families: dict[str, Any], params: Params) -> dict[str, int]:
    """crc32 of the first run of each stream kind: both processes must draw the same streams."""
    w = params.window
    out = {}
    for fam in families.values():
        out[f"{fam.name}/no_drift"] = zlib.crc32(np.ascontiguousarray(fam.no_drift(0, 3 * w)).tobytes())
        for scenario in SCENARIOS[fam.name]:
            items = np.ascontiguousarray(fam.drifted(scenario, 0, w, 2 * w))
            out[f"{fam.name}/{scenario}"] = zlib.crc32(items.tobytes())
    return out


# --- detectors: one adapter per implementation, each a thin layer over the detector's own API ----


class Adapter:
    """``fit(reference)``; ``reset()``; ``feed(rows, offset)`` returns the 1-based stream position of
    the first alarm within ``rows`` (0 for none); ``update_one(x)`` is one request through the
    detector's own API; ``update_batch(rows)`` for detectors that take micro-batches."""

    implementation = ""
    batched = False  # sidewatch detectors: batched updates equal row-by-row ones (their tests say so)
    slow = False  # alibi: fewer runs, by time budget
    run_length_cap: int | None = None  # at most this many no-drift runs

    def __init__(self, name: str, family: str, view: str, params: Params):
        self.name, self.family, self.view, self.params = name, family, view, params
        self.detector: Any = None

    def info(self) -> dict[str, Any]:
        return {"implementation": self.implementation, "view": self.view}

    def state(self) -> Any:
        """What the detector keeps between updates (for its size)."""
        return self.detector

    def update_batch(self, rows: np.ndarray) -> None:
        raise NotImplementedError


class SidewatchCVM(Adapter):
    implementation = "sidewatch WindowedCVM"
    batched = True

    def fit(self, reference: np.ndarray) -> None:
        from agent.detect.drift.univariate import WindowedCVM

        p = self.params
        self.detector = WindowedCVM(window=p.window, ert=p.ert, seed=p.seed).fit(reference)

    def info(self) -> dict[str, Any]:
        cal = self.detector.calibration_
        return {**super().info(), "ert_param": self.params.ert, "window": self.params.window,
                "n_bootstrap": self.detector.n_bootstrap, "n_quantiles": self.detector.n_quantiles,
                "n_reference": self.detector.n_reference, "calibration_estimated_ert": cal.estimated_ert}

    def reset(self) -> None:
        self.detector.reset()

    def feed(self, rows: np.ndarray, offset: int) -> int:
        self.detector.update(rows)
        return self.detector.first_alarm or 0

    def update_one(self, x: np.ndarray) -> None:
        self.detector.update(x)

    def update_batch(self, rows: np.ndarray) -> None:
        self.detector.update(rows)


class SidewatchMMD(Adapter):
    implementation = "sidewatch OnlineMMD"
    batched = True

    def fit(self, reference: np.ndarray) -> None:
        from agent.detect.drift.mmd import OnlineMMD

        p = self.params
        self.detector = OnlineMMD(ert=p.ert, window_size=p.window, n_ref=p.mmd_n_ref, seed=p.seed).fit(reference)

    def info(self) -> dict[str, Any]:
        d = self.detector
        return {**super().info(), "ert_param": self.params.ert, "window": self.params.window,
                "n_ref": d.n_ref, "n_bootstrap": d.n_bootstrap, "sigma": d.sigma_,
                "calibration": d.calibration_info_}

    def reset(self) -> None:
        self.detector.reset()

    def feed(self, rows: np.ndarray, offset: int) -> int:
        self.detector.update(rows)
        return self.detector.first_drift_at or 0

    def update_one(self, x: np.ndarray) -> None:
        self.detector.update(x)

    def update_batch(self, rows: np.ndarray) -> None:
        self.detector.update(rows)


class SidewatchWindowChi2(Adapter):
    """ClassMixDrift (view "class") or ScalarWindowDrift (view "confidence"); PageHinkleyChange
    shares the interface (``alarm_positions``: positions in the last update's input)."""

    batched = True

    def fit(self, reference: np.ndarray) -> None:
        from agent.detect.drift.prediction import ClassMixDrift, ScalarWindowDrift

        p = self.params
        if self.view == "class":
            self.implementation = "sidewatch ClassMixDrift"
            self.detector = ClassMixDrift(window=p.window, ert=p.ert, seed=p.seed).fit(reference, n_classes=10)
        else:
            self.implementation = "sidewatch ScalarWindowDrift"
            self.detector = ScalarWindowDrift(window=p.window, ert=p.ert, seed=p.seed).fit(reference)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "ert_param": self.params.ert, "window": self.params.window,
                "n_streams": self.detector.n_streams, "calibration": dict(self.detector.simulation_)}

    def reset(self) -> None:
        self.detector.reset()

    def feed(self, rows: np.ndarray, offset: int) -> int:
        self.detector.update(rows)
        positions = self.detector.alarm_positions
        return offset + positions[0] + 1 if positions else 0

    def update_one(self, x: Any) -> None:
        self.detector.update(np.atleast_1d(x))

    def update_batch(self, rows: np.ndarray) -> None:
        self.detector.update(rows)


class SidewatchPageHinkley(SidewatchWindowChi2):
    implementation = "sidewatch PageHinkleyChange"

    def fit(self, reference: np.ndarray) -> None:
        from agent.detect.drift.change import PageHinkleyChange

        self.detector = PageHinkleyChange(ert=self.params.ert, seed=self.params.seed).fit(reference)

    def info(self) -> dict[str, Any]:
        d = self.detector
        return {"implementation": self.implementation, "view": self.view, "ert_param": self.params.ert,
                "delta_sd": d.delta, "min_instances": d.min_instances, "n_streams": d.n_streams,
                "calibration": dict(d.simulation_)}


def alibi_seed(seed: int) -> None:
    """alibi draws its bootstrap streams from numpy's and torch's global generators."""
    import torch

    np.random.seed(seed)
    torch.manual_seed(seed)


class AlibiCVM(Adapter):
    implementation = "alibi-detect CVMDriftOnline"
    slow = True

    def alibi_ert(self) -> float:
        # alibi counts a univariate detector's ERT from the update that fills the window.
        return self.params.ert - (self.params.window - 1)

    def n_bootstraps(self, d: int) -> int:
        """alibi sets every feature's per-step level to beta = 1 - (1 - 1/ERT)^(1/d) and refuses a
        (1 - beta) quantile from fewer than 1/beta streams; its docs ask for >= 10x the ERT."""
        beta = 1 - (1 - 1 / self.alibi_ert()) ** (1 / d)
        return int(max(10 * self.alibi_ert(), math.ceil(1.25 / beta)))

    def fit(self, reference: np.ndarray) -> None:
        from alibi_detect.cd import CVMDriftOnline

        ref = reference.reshape(len(reference), -1).astype(np.float64)
        rng = np.random.default_rng([self.params.seed, 17])
        ref = ref[rng.permutation(len(ref))[: self.params.alibi_cvm_reference]]
        alibi_seed(self.params.seed)
        self.bootstraps = self.n_bootstraps(ref.shape[1])
        self.detector = CVMDriftOnline(ref, ert=self.alibi_ert(), window_sizes=[self.params.window],
                                       n_bootstraps=self.bootstraps, verbose=False)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "ert_param": self.alibi_ert(),
                "ert_convention": "alibi counts from the update that fills the window: ert - (window - 1)",
                "window_sizes": [self.params.window], "n_bootstraps": self.bootstraps,
                "n_reference": int(self.detector.n)}

    def reset(self) -> None:
        self.detector.reset_state()

    def feed(self, rows: np.ndarray, offset: int) -> int:
        hit = self.detector.predict(self.as_row(rows[0]), return_test_stat=False)["data"]["is_drift"]
        return offset + 1 if hit else 0

    @staticmethod
    def as_row(x: Any) -> np.ndarray:
        return np.atleast_1d(np.asarray(x, dtype=np.float64))

    def update_one(self, x: Any) -> None:
        self.detector.predict(self.as_row(x), return_test_stat=False)


class AlibiMMD(Adapter):
    implementation = "alibi-detect MMDDriftOnline (pytorch)"
    slow = True

    def fit(self, reference: np.ndarray) -> None:
        from alibi_detect.cd import MMDDriftOnline

        p = self.params
        # alibi keeps n - (2W - 1) rows for the statistic (the rest make the simulated test
        # windows): n_ref + 2W - 1 rows give it the same N_ref as sidewatch's OnlineMMD.
        rows = p.mmd_n_ref + 2 * p.window - 1
        rng = np.random.default_rng([p.seed, 23])
        ref = reference[rng.permutation(len(reference))[:rows]].astype(np.float32)
        alibi_seed(p.seed)
        self.bootstraps = int(p.alibi_mmd_bootstrap_factor * p.ert)
        self.detector = MMDDriftOnline(ref, ert=p.ert, window_size=p.window, backend="pytorch",
                                       n_bootstraps=self.bootstraps, device="cpu", verbose=False)

    def info(self) -> dict[str, Any]:
        import torch

        return {**super().info(), "ert_param": self.params.ert, "ert_convention": "from the first update",
                "window": self.params.window, "n_bootstraps": self.bootstraps,
                "n_reference_given": int(self.detector._detector.n),  # the backend detector's
                "n_reference_in_statistic": len(self.detector._detector.ref_inds),
                "torch_threads": torch.get_num_threads()}

    def reset(self) -> None:
        self.detector.reset_state()

    def feed(self, rows: np.ndarray, offset: int) -> int:
        hit = self.detector.predict(rows[0].astype(np.float32), return_test_stat=False)["data"]["is_drift"]
        return offset + 1 if hit else 0

    def update_one(self, x: np.ndarray) -> None:
        self.detector.predict(x.astype(np.float32), return_test_stat=False)


class RiverADWIN(Adapter):
    """One river ADWIN (default delta) per feature; an alarm when any of them detects."""

    implementation = "river ADWIN"
    # Its no-drift runs nearly all reach the horizon: more of them cost time and say little more.
    run_length_cap = 300

    def fit(self, reference: np.ndarray) -> None:
        from river import drift

        self.n_features = 1 if reference.ndim == 1 else reference.shape[1]
        self.make = drift.ADWIN
        self.reset()

    def info(self) -> dict[str, Any]:
        import river

        return {**super().info(), "river": river.__version__, "delta": self.detector[0].delta,
                "detectors": self.n_features, "ert_param": None,
                "ert_convention": "delta is a confidence level of each cut test; it sets no ERT"}

    def reset(self) -> None:
        self.detector = [self.make() for _ in range(self.n_features)]

    def feed(self, rows: np.ndarray, offset: int) -> int:
        hit = False
        for adwin, value in zip(self.detector, np.atleast_1d(rows[0]).tolist()):
            adwin.update(value)
            hit |= adwin.drift_detected
        return offset + 1 if hit else 0

    def update_one(self, x: Any) -> None:
        for adwin, value in zip(self.detector, np.atleast_1d(x).tolist()):
            adwin.update(value)

    def state(self) -> Any:
        # ADWIN's buckets live in river's Rust extension: its pickled state is their size.
        return [pickle.dumps(a) for a in self.detector]


ADAPTERS = {"sw_cvm": SidewatchCVM, "sw_mmd": SidewatchMMD, "sw_class_mix": SidewatchWindowChi2,
            "sw_confidence": SidewatchWindowChi2, "sw_page_hinkley": SidewatchPageHinkley,
            "alibi_cvm": AlibiCVM, "alibi_cvm_conf": AlibiCVM, "alibi_mmd": AlibiMMD,
            "river_adwin": RiverADWIN, "river_adwin_conf": RiverADWIN}

# (family, detector, view): which detector watches what.
DETECTORS = (
    ("synthetic", "sw_cvm", "features"), ("synthetic", "sw_mmd", "features"),
    ("synthetic", "alibi_cvm", "features"), ("synthetic", "alibi_mmd", "features"),
    ("synthetic", "river_adwin", "features"),
    ("mnist", "sw_cvm", "features"), ("mnist", "sw_mmd", "features"),
    ("mnist", "sw_class_mix", "class"), ("mnist", "sw_confidence", "confidence"),
    ("mnist", "sw_page_hinkley", "confidence"),
    ("mnist", "alibi_cvm", "features"), ("mnist", "alibi_mmd", "features"),
    ("mnist", "alibi_cvm_conf", "confidence"),
    ("mnist", "river_adwin", "features"), ("mnist", "river_adwin_conf", "confidence"),
)

# Like for like, for the ratios: (sidewatch, alibi) on the same view.
PAIRS = (("sw_cvm", "alibi_cvm"), ("sw_mmd", "alibi_mmd"), ("sw_confidence", "alibi_cvm_conf"))


def is_peer(name: str) -> bool:
    return not name.startswith("sw_")


def is_alibi(name: str) -> bool:
    return name.startswith("alibi_")


# --- measurements ---------------------------------------------------------------------------------


def first_alarm(adapter: Adapter, data: np.ndarray) -> int:
    """Reset, run ``data`` through, stop at the first alarm: its 1-based position, or 0 for none."""
    adapter.reset()
    step = FEED_CHUNK if adapter.batched else 1
    for start in range(0, len(data), step):
        hit = adapter.feed(data[start:start + step], start)
        if hit:
            return hit
    return 0


def budgeted_runs(budget: Budget, run) -> int:
    """Call ``run(i)`` for i = 0, 1, ... within the budget; ``run`` returns False to not count one."""
    started, done, attempt = time.perf_counter(), 0, 0
    while done < budget.max_runs and (done < budget.min_runs or time.perf_counter() - started < budget.seconds):
        if run(attempt):
            done += 1
        attempt += 1
        if attempt > 3 * budget.max_runs + 10:  # a detector that alarms before every change
            break
    return attempt


def run_length_horizon(family: Any, params: Params) -> int:
    horizon = int(params.horizon_factor * params.ert)
    return min(horizon, family.max_length) if family.max_length else horizon


def measure_run_length(adapter: Adapter, family: Any, params: Params, stream: str | None = None) -> dict[str, Any]:
    """Runs of no-drift traffic (or of the benign ``stream``) until the first alarm."""
    horizon = run_length_horizon(family, params)
    budget = params.run_length_slow if adapter.slow else params.run_length_fast
    if adapter.run_length_cap:
        budget = Budget(min(budget.min_runs, adapter.run_length_cap), min(budget.max_runs, adapter.run_length_cap),
                        budget.seconds)
    lengths: list[int] = []

    def run(i: int) -> bool:
        items = family.no_drift(i, horizon) if stream is None else family.benign(stream, i, horizon)
        lengths.append(first_alarm(adapter, family.view(items, adapter.view)))
        return True

    started = time.perf_counter()
    budgeted_runs(budget, run)
    return {**summarise_run_lengths(lengths, horizon, params.ert),
            "early_alarm_fraction": early_alarm_fraction(lengths, params.window),
            "blind_delay": blind_delay(lengths, horizon, params.delay_warm, params.delay_horizon),
            "seconds": time.perf_counter() - started, "lengths": lengths}


def early_alarm_fraction(lengths: list[int], window: int) -> float:
    """Runs alarming by update ``window + 10``: a burst when the window fills shows here
    (a constant hazard of 1/ERT from the full window would put about 2% there)."""
    t = np.asarray(lengths)
    return float(((t > 0) & (t <= window + 10)).mean())


def blind_delay(lengths: list[int], horizon: int, warm: int, post: int) -> float | None:
    """The mean delay a detector blind to the change would show: its no-drift runs that outlive
    ``warm`` updates, run on for ``post`` more (a miss counts as ``post``). A measured delay near
    this is a false alarm, not a detection."""
    t = np.where(np.asarray(lengths) > 0, lengths, horizon)
    alive = t[t > warm]
    return float(np.minimum(alive - warm, post).mean()) if alive.size and horizon >= warm + post else None


def summarise_run_lengths(lengths: list[int], horizon: int, ert: float) -> dict[str, Any]:
    """Mean run length and its standard error. Without censoring: the sample mean. With runs
    censored at the horizon: updates at risk per alarm (the constant-hazard estimate), standard
    error mean / sqrt(alarms)."""
    t = np.asarray(lengths, dtype=np.int64)
    alarmed = t > 0
    observed = np.where(alarmed, t, horizon)
    alarms, n = int(alarmed.sum()), len(t)
    if alarms == n:
        mean, se, method = float(observed.mean()), float(observed.std(ddof=1) / math.sqrt(n)), "sample mean"
    elif alarms:
        mean = float(observed.sum() / alarms)
        se, method = mean / math.sqrt(alarms), "updates at risk per alarm (censored runs)"
    else:
        mean, se, method = None, None, f"no alarm in {n} runs of {horizon}: above {horizon}"
    return {"runs": n, "alarms": alarms, "censored": n - alarms, "horizon": horizon, "mean": mean, "se": se,
            "method": method, "median_observed": float(np.median(observed)),
            "ratio_to_ert": None if mean is None else mean / ert,
            "within_goal": None if mean is None else abs(mean / ert - 1) <= RUN_LENGTH_GOAL}


def measure_delay(adapter: Adapter, family: Any, scenario: str, params: Params) -> dict[str, Any]:
    """Runs of ``delay_warm`` no-drift updates, then the change: updates from the change to the
    alarm (1 = the first changed update). A run that alarms before the change is counted and
    redrawn."""
    warm, post = params.delay_warm, params.delay_horizon
    budget = params.delay_slow if adapter.slow else params.delay_fast
    delays: list[int] = []
    early = [0]

    def run(i: int) -> bool:
        hit = first_alarm(adapter, family.view(family.drifted(scenario, i, warm, post), adapter.view))
        if 0 < hit <= warm:
            early[0] += 1
            return False
        delays.append(hit - warm if hit else 0)
        return True

    started = time.perf_counter()
    budgeted_runs(budget, run)
    return {**summarise_delays(delays, post), "alarms_before_change": early[0],
            "seconds": time.perf_counter() - started, "delays": delays}


def summarise_delays(delays: list[int], horizon: int) -> dict[str, Any]:
    """``mean``: the mean delay with a run that never alarmed counted as ``horizon`` (a restricted
    mean; compares detectors that miss some changes fairly); ``mean_detected`` over detections only."""
    d = np.asarray(delays, dtype=np.int64)
    if d.size == 0:
        return {"runs": 0, "mean": None, "se": None}
    detected = d > 0
    restricted = np.where(detected, d, horizon)
    return {"runs": int(d.size), "detected": int(detected.sum()), "detected_fraction": float(detected.mean()),
            "horizon": horizon, "mean": float(restricted.mean()),
            "se": float(restricted.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else None,
            "median": float(np.median(restricted)),
            "mean_detected": float(d[detected].mean()) if detected.any() else None}


def cost_stream(adapter: Adapter, family: Any, params: Params) -> np.ndarray:
    """No-drift data for the cost runs (run numbers of their own, away from the measured runs)."""
    n = params.window + params.cost_updates
    length = min(n, family.max_length) if family.max_length else n
    items = np.concatenate([family.no_drift(10**6 + k, length) for k in range(-(-n // length))])[:n]
    return family.view(items, adapter.view)


def measure_cost(adapter: Adapter, family: Any, params: Params) -> dict[str, Any]:
    """Microseconds per update, one row per call, after a warm window; per row in micro-batches of
    BATCH for detectors that take them. Alarms during the timing are part of the cost."""
    data = cost_stream(adapter, family, params)
    warm, timed = data[:params.window], data[params.window:]
    adapter.reset()
    for x in warm:
        adapter.update_one(x)
    state_warm = deep_size(adapter.state())
    blocks = [per_row_us(lambda rows=block: [adapter.update_one(x) for x in rows], len(block))
              for block in np.array_split(timed, COST_BLOCKS)]
    out = {"us_per_update": float(np.median(blocks)), "us_per_update_blocks": blocks,
           "updates_timed": len(timed), "state_bytes": deep_size(adapter.state())}
    # alibi appends every update's statistic (and CVM every value) to arrays it keeps.
    out["state_growth_bytes_per_update"] = (out["state_bytes"] - state_warm) / len(timed)
    out["update_peak_bytes"] = update_allocation_peak(adapter, timed[:params.memory_updates])
    if adapter.batched:
        adapter.reset()
        batches = [data[i:i + BATCH] for i in range(0, len(data), BATCH)]
        groups = [[batches[i] for i in idx] for idx in np.array_split(np.arange(len(batches)), COST_BLOCKS)]
        blocks = [per_row_us(lambda g=group: [adapter.update_batch(b) for b in g], sum(len(b) for b in group))
                  for group in groups]
        out["us_per_row_batched"] = float(np.median(blocks))
    return out


def per_row_us(run, rows: int) -> float:
    """Microseconds per row of ``run()``, which updates ``rows`` rows."""
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) / rows * 1e6


def update_allocation_peak(adapter: Adapter, rows: np.ndarray) -> int:
    """Peak bytes allocated above the starting point while updating row by row (tracemalloc sees
    Python and numpy allocations, not torch's own allocator)."""
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for x in rows:
            adapter.update_one(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return int(peak - base)


def deep_size(root: Any) -> int:
    """Bytes held by an object graph: numpy buffers (views count their base once), torch storages,
    bytes, containers and object attributes; functions, classes and modules are not followed."""
    seen: set[int] = set()
    total, stack = 0, [root]
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            if obj.base is not None:
                stack.append(obj.base)
            else:
                total += obj.nbytes
            continue
        if type(obj).__module__.startswith("torch") and hasattr(obj, "untyped_storage"):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            continue
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.append(obj.__dict__)
    return total


# --- one process's share of the work -------------------------------------------------------------


def timed_fit(adapter: Adapter, reference: np.ndarray) -> float:
    started = time.perf_counter()
    adapter.fit(reference)
    return time.perf_counter() - started


def evaluate(specs: list[tuple[str, str, str]], families: dict[str, Any], params: Params) -> dict[str, Any]:
    """Fit, run length, delays and cost of each (family, detector, view) in ``specs``."""
    out: dict[str, Any] = {"detectors": {}, "run_length": {}, "delay": {}, "benign": {}, "cost": {}}
    for family_name, name, view in specs:
        family = families[family_name]
        adapter = ADAPTERS[name](name, family_name, view, params)
        log(f"{family_name}/{name}: fitting")
        fit_s = timed_fit(adapter, family.reference(view))
        out["detectors"].setdefault(family_name, {})[name] = {**adapter.info(), "fit_seconds": fit_s}
        log(f"{family_name}/{name}: fitted in {fit_s:.1f}s; run length")
        rl = measure_run_length(adapter, family, params)
        out["run_length"].setdefault(family_name, {})[name] = rl
        log(f"{family_name}/{name}: run length {fmt(rl['mean'])} over {rl['runs']} runs; delays")
        for scenario in SCENARIOS[family_name]:
            delay = measure_delay(adapter, family, scenario, params)
            out["delay"].setdefault(family_name, {}).setdefault(scenario, {})[name] = delay
        for stream in BENIGN_STREAMS[family_name]:
            quiet = measure_run_length(adapter, family, params, stream=stream)
            quiet["quiet"] = quiet["ratio_to_ert"] is None or quiet["ratio_to_ert"] >= 1 - RUN_LENGTH_GOAL
            out["benign"].setdefault(family_name, {}).setdefault(stream, {})[name] = quiet
        out["cost"].setdefault(family_name, {})[name] = measure_cost(adapter, family, params)
        log(f"{family_name}/{name}: done ({out['cost'][family_name][name]['us_per_update']:.1f} us/update)")
    return out


def merge(into: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Nested dict update: the peer worker's results join the local ones."""
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def between_draws_se(means: list[float | None]) -> float | None:
    values = [m for m in means if m is not None]
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def measure_reference_draws(specs: list[tuple[str, str, str]], results: dict[str, Any],
                            params: Params) -> dict[str, Any]:
    """Run length of sidewatch's detectors over ``reference_draws`` reference samples.

    A calibration sets the threshold so that the run length, averaged over the reference samples
    the data could have given, is the ERT; for one given reference it varies (for a heavy-tailed
    scalar such as the top-1 confidence, by a factor of 2 or more between samples of 3,000). So
    each detector is refitted on other reference samples (synthetic: fresh reference rows; MNIST:
    other random 3,000/2,000 splits of the reference images), the runs of every draw are pooled
    (with the main run's, which is draw 0) and the per-draw means are kept to show the spread.
    """
    out: dict[str, Any] = {}
    wanted = [spec for spec in specs if not is_peer(spec[1])]
    if params.reference_draws < 2 or not wanted:
        return out
    for draw in range(1, params.reference_draws):
        draw_params = Params(**{**asdict(params), "seed": params.seed + 1000 * draw,
                                "run_length_fast": params.run_length_per_draw})
        families = make_families(build_data(draw_params), draw_params)
        for family_name, name, view in wanted:
            adapter = ADAPTERS[name](name, family_name, view, draw_params)
            adapter.fit(families[family_name].reference(view))
            rl = measure_run_length(adapter, families[family_name], draw_params)
            out.setdefault(family_name, {}).setdefault(name, []).append(rl)
            log(f"{family_name}/{name}: reference draw {draw}: run length {fmt(rl['mean'])} over {rl['runs']} runs")
    pooled: dict[str, Any] = {}
    for family_name, by_name in out.items():
        for name, draws in by_name.items():
            main = results["run_length"][family_name][name]
            every = [main] + draws
            lengths = [x for rl in every for x in rl["lengths"]]
            pooled.setdefault(family_name, {})[name] = {
                **summarise_run_lengths(lengths, every[0]["horizon"], params.ert),
                "draws": len(every), "per_draw_mean": [rl["mean"] for rl in every],
                # The spread between references, as a standard error of their mean: the pooled SE
                # counts runs only, and the runs on one reference share it.
                "between_draws_se": between_draws_se([rl["mean"] for rl in every]),
                "per_draw_runs": [rl["runs"] for rl in every]}
    return pooled


# --- the peer worker (alibi-detect in its own environment) ----------------------------------------


def alibi_importable() -> bool:
    try:
        import alibi_detect  # noqa: F401
    except ImportError:
        return False
    return True


def save_worker_inputs(tmp: Path, data: dict[str, np.ndarray], params: Params,
                       specs: list[tuple[str, str, str]]) -> Path:
    np.savez(tmp / "data.npz", **data)
    spec = {"params": asdict(params), "specs": specs, "data": str(tmp / "data.npz")}
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def run_peer_worker(python: Path, data: dict[str, np.ndarray], params: Params,
                    specs: list[tuple[str, str, str]]) -> dict[str, Any]:
    """Run ``specs`` in a child process under ``python``; its progress goes to our stderr."""
    with tempfile.TemporaryDirectory(prefix="sidewatch-drift-bench-") as tmp:
        spec = save_worker_inputs(Path(tmp), data, params, specs)
        result = Path(tmp) / "result.json"
        subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", str(spec), str(result)],
                       check=True, cwd=str(ROOT))
        return json.loads(result.read_text())


def worker_main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    params = params_from_dict(spec["params"])
    with np.load(spec["data"]) as npz:
        data = {k: npz[k] for k in npz.files}
    families = make_families(data, params)
    result = evaluate([tuple(s) for s in spec["specs"]], families, params)
    result["environment"] = {"peer": environment_versions(("numpy", "scipy", "torch", "numba", "alibi_detect"))}
    result["stream_checksums_peer"] = stream_checksums(families, params)
    result["max_rss_bytes_peer"] = max_rss_bytes()
    Path(result_path).write_text(json.dumps(result))


# --- machine and environment ---------------------------------------------------------------------


def environment_versions(packages: tuple[str, ...]) -> dict[str, Any]:
    from importlib import metadata

    names = {"alibi_detect": "alibi-detect", "scikit_learn": "scikit-learn"}
    out: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(names.get(pkg, pkg))
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "detectors_modified": bool(git("status", "--porcelain", "agent/detect/drift"))}


def machine_info() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpu": cpu_model(), "nproc": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)), "load_average_start": os.getloadavg(),
            "git": git_commit(),
            "main": environment_versions(("numpy", "scipy", "torch", "river", "onnxruntime", "scikit_learn"))}


# --- summary: ratios and goals -------------------------------------------------------------------


def run_length_goals(results: dict[str, Any]) -> dict[str, Any]:
    """Each ERT-calibrated sidewatch detector's measured mean run length against the ERT."""
    out = {}
    pooled = results.get("run_length_over_references", {})
    for family, by_detector in results["run_length"].items():
        for name, rl in by_detector.items():
            if not is_peer(name):
                over = pooled.get(family, {}).get(name)
                goal = {"ratio_to_ert": rl["ratio_to_ert"], "se_ratio": ratio_se(rl), "met": rl["within_goal"],
                        "reference_draws": 1}
                if over is not None:
                    # The goal is judged on the average over reference samples (what the calibration
                    # promises); the main reference alone is kept beside it.
                    goal = {"ratio_to_ert": over["ratio_to_ert"], "se_ratio": ratio_se(over),
                        "between_draws_se_ratio": (None if over["between_draws_se"] is None
                                                   else over["between_draws_se"] / params_ert(rl)),
                            "met": over["within_goal"], "reference_draws": over["draws"],
                            "per_draw_ratio": [None if m is None else m / rl["mean"] * rl["ratio_to_ert"]
                                               for m in over["per_draw_mean"]],
                            "main_reference_ratio": rl["ratio_to_ert"]}
                out[f"{family}/{name}"] = goal
    return out


def params_ert(rl: dict[str, Any]) -> float:
    """The ERT a run-length summary was measured against."""
    return rl["mean"] / rl["ratio_to_ert"]


def ratio_se(rl: dict[str, Any]) -> float | None:
    return None if rl["se"] is None else rl["se"] / rl["mean"] * rl["ratio_to_ert"]


def benign_goals(results: dict[str, Any]) -> dict[str, Any]:
    """Per benign stream and detector: its run length there over the ERT; quiet when at least
    1 - RUN_LENGTH_GOAL (a same-source stream must not alarm more often than no-drift traffic)."""
    return {f"{family}/{stream}/{name}": {"ratio_to_ert": q["ratio_to_ert"], "mean": q["mean"], "runs": q["runs"],
                                          "quiet": q["quiet"]}
            for family, by_stream in results.get("benign", {}).items()
            for stream, by_detector in by_stream.items() for name, q in by_detector.items()}


def delay_goals(results: dict[str, Any]) -> dict[str, Any]:
    """Per scenario: sidewatch's best detector against the best alibi detector (the peers at the
    same ERT), restricted mean delays. "met": no worse; "within noise": worse by less than two
    standard errors of the difference."""
    out = {}
    for family, by_scenario in results["delay"].items():
        for scenario, by_detector in by_scenario.items():
            ours = best_delay(by_detector, lambda n: not is_peer(n))
            peer = best_delay(by_detector, is_alibi)
            adwin = best_delay(by_detector, lambda n: n.startswith("river_"))
            out[f"{family}/{scenario}"] = {"sidewatch_best": ours, "alibi_best": peer,
                                           "adwin_best_not_same_ert": adwin, "verdict": delay_verdict(ours, peer),
                                           "pairs": pair_delays(by_detector)}
    return out


def best_delay(by_detector: dict[str, Any], keep) -> dict[str, Any] | None:
    rows = [(d["mean"], name) for name, d in by_detector.items() if keep(name) and d.get("mean") is not None]
    if not rows:
        return None
    mean, name = min(rows)
    return {"detector": name, "mean": mean, "se": by_detector[name]["se"],
            "detected_fraction": by_detector[name]["detected_fraction"], "runs": by_detector[name]["runs"]}


def delay_verdict(ours: dict[str, Any] | None, peer: dict[str, Any] | None) -> str:
    if ours is None or peer is None:
        return "not measured"
    if ours["mean"] <= peer["mean"]:
        return "met"
    noise = 2 * math.hypot(ours["se"] or 0.0, peer["se"] or 0.0)
    return "within noise" if ours["mean"] - peer["mean"] <= noise else "not met"


def pair_delays(by_detector: dict[str, Any]) -> dict[str, Any]:
    """alibi's mean delay over sidewatch's for each like-for-like pair (above 1: sidewatch faster)."""
    out = {}
    for ours, peer in PAIRS:
        if ours in by_detector and peer in by_detector and by_detector[ours].get("mean"):
            out[f"{peer}/{ours}"] = by_detector[peer]["mean"] / by_detector[ours]["mean"]
    return out


def cost_goals(results: dict[str, Any]) -> dict[str, Any]:
    """alibi's microseconds per update over sidewatch's, one row per call (and sidewatch batched)."""
    out = {}
    for family, by_detector in results["cost"].items():
        for ours, peer in PAIRS:
            if ours in by_detector and peer in by_detector:
                a, s = by_detector[peer], by_detector[ours]
                single = a["us_per_update"] / s["us_per_update"]
                out[f"{family}/{peer}/{ours}"] = {
                    "ratio_one_row_per_call": single, "met": single >= COST_GOAL,
                    "ratio_vs_batched": a["us_per_update"] / s["us_per_row_batched"]
                    if "us_per_row_batched" in s else None}
    return out


def check_streams(local: dict[str, int], peer: dict[str, int] | None) -> dict[str, Any]:
    if peer is None:
        return {"streams_identical_across_processes": None}
    return {"streams_identical_across_processes": local == peer, "local": local, "peer": peer}


# --- the table ------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.0e}" if abs(value) >= 1e4 else f"{value:.{digits}f}"  # ADWIN's rare alarms


def mean_se(d: dict[str, Any] | None) -> str:
    if not d or d.get("mean") is None:
        return "-" if not d else f">{d.get('horizon', '?')}"
    return f"{fmt(d['mean'])}±{fmt(d['se'])}"


def family_table(report: dict[str, Any], family: str) -> list[str]:
    scenarios = SCENARIOS[family]
    benign = BENIGN_STREAMS[family]
    head = f"{'detector':18} {'view':10} {'run length':>11} {'/ERT':>5} {'cens':>4} {'blind':>5} " + " ".join(
        f"{s:>17}" for s in scenarios) + "".join(f" {'quiet: ' + s:>22}" for s in benign) + \
        f" {'us/upd':>8} {'us/row@64':>9} {'fit s':>6} {'state KiB':>9}"
    lines = [head, "-" * len(head)]
    for name, info in report["detectors"][family].items():
        rl = report["run_length"][family][name]
        delays = []
        for s in scenarios:
            d = report["delay"][family][s][name]
            det = "" if d.get("detected_fraction") is None else f" {100 * d['detected_fraction']:.0f}%"
            delays.append(f"{mean_se(d) + det:>17}")
        for s in benign:
            q = report.get("benign", {}).get(family, {}).get(s, {}).get(name)
            text = "-" if q is None else f"{mean_se(q)} {fmt(q['ratio_to_ert'], 2)}x {'ok' if q['quiet'] else 'LOUD'}"
            delays.append(f"{text:>22}")
        cost = report["cost"][family][name]
        lines.append(f"{name:18} {info['view']:10} {mean_se(rl):>11} {fmt(rl['ratio_to_ert'], 2):>5} "
                     f"{rl['censored']:>4} {fmt(rl['blind_delay']):>5} " + " ".join(delays) + f" {cost['us_per_update']:8.1f} "
                     f"{fmt(cost.get('us_per_row_batched'), 1):>9} {info['fit_seconds']:6.1f} "
                     f"{cost['state_bytes'] / 1024:9.0f}")
    return lines


def print_report(report: dict[str, Any]) -> None:
    p = report["parameters"]
    print(f"\nDrift detectors at ERT {p['ert']:.0f}, window {p['window']} "
          f"({'quick' if p['quick'] else 'full'} run, {report['wall_seconds']:.0f} s)")
    print("run length: mean±SE updates to the first false alarm (no drift; cens = runs without an alarm "
          "by the horizon). Delays: mean±SE updates from the change to the alarm (a miss counts as the "
          f"horizon, {p['ert']:.0f}), and the % of runs detected; blind: the delay a detector that does "
          "not see the change would show (false alarms), from its no-drift runs. quiet: the run length on a "
          "benign same-source stream, /ERT, ok when at least 0.8 x ERT (it must stay quiet), LOUD otherwise.")
    for family in report["detectors"]:
        print(f"\n{family}")
        print("\n".join(family_table(report, family)))
    print_goals(report["goals"])


def print_goals(goals: dict[str, Any]) -> None:
    print("\ngoals")
    for key, g in goals["run_length"].items():
        spread = ""
        if g["reference_draws"] > 1:
            spread = (f"; {g['reference_draws']} references: "
                      + " ".join(fmt(r, 2) for r in g["per_draw_ratio"])
                      + f", ±{fmt(g['between_draws_se_ratio'], 2)} between them")
        print(f"  run length {key:28} {fmt(g['ratio_to_ert'], 2)} x ERT (±{fmt(g['se_ratio'], 2)}{spread}): "
              f"{'met' if g['met'] else 'NOT met'}")
    for key, g in goals["delay"].items():
        ours, peer = g["sidewatch_best"], g["alibi_best"]
        print(f"  delay {key:33} sidewatch {describe(ours)} vs alibi {describe(peer)}: {g['verdict']}")
    for key, g in goals.get("benign_quiet", {}).items():
        print(f"  quiet {key:33} run length {fmt(g['mean'])} = {fmt(g['ratio_to_ert'], 2)} x ERT "
              f"({g['runs']} runs): {'met' if g['quiet'] else 'NOT met'}")
    for key, g in goals["cost"].items():
        print(f"  cost {key:34} alibi/sidewatch {g['ratio_one_row_per_call']:.1f}x one row per call, "
              f"{fmt(g['ratio_vs_batched'], 1)}x vs batched: {'met' if g['met'] else 'NOT met'}")


def describe(best: dict[str, Any] | None) -> str:
    if best is None:
        return "-"
    return f"{best['detector']} {best['mean']:.0f}±{fmt(best['se'])} ({best['runs']} runs)"


# --- main -----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer runs, ERT 200 unless --ert")
    parser.add_argument("--ert", type=float, default=None, help="expected run time (500; 200 with --quick)")
    parser.add_argument("--window", type=int, default=100, help="window of every windowed detector")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer-python", type=Path, default=DEFAULT_PEER_PYTHON,
                        help="interpreter with alibi-detect, when it does not import here")
    parser.add_argument("--only", default="", help="comma-separated detector names (e.g. sw_cvm,alibi_cvm)")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.worker and not args.out:
        parser.error("--out is required")
    return args


def split_specs(only: str, peer_python: Path) -> tuple[list, list, str]:
    """Which detectors run here, which in the peer worker, and where alibi comes from."""
    wanted = [s for s in DETECTORS if not only or s[1] in only.split(",")]
    local = [s for s in wanted if not is_alibi(s[1])]
    alibi = [s for s in wanted if is_alibi(s[1])]
    if not alibi or alibi_importable():
        return local + alibi, [], "in process"
    if peer_python.exists():
        return local, alibi, f"worker: {peer_python}"
    log(f"alibi-detect does not import here and {peer_python} is missing: alibi detectors skipped")
    return local, [], "unavailable"


def in_table_order(detectors: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Detectors in DETECTORS order (the peer worker's come back after the local ones)."""
    return {family: {name: detectors[family][name] for fam, name, _ in DETECTORS
                     if fam == family and name in detectors[family]}
            for family in FAMILIES if family in detectors}


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(*args.worker)
        return
    params = make_params(args)
    machine = machine_info()
    log(f"ERT {params.ert:.0f}, window {params.window}, {'quick' if params.quick else 'full'} run; data")
    data = build_data(params)
    families = make_families(data, params)
    local, remote, alibi_source = split_specs(args.only, args.peer_python)
    results = evaluate(local, families, params)
    peer = run_peer_worker(args.peer_python, data, params, remote) if remote else {}
    peer_checksums = peer.pop("stream_checksums_peer", None)
    machine["peer"] = peer.pop("environment", {}).get("peer")
    machine["max_rss_bytes_peer"] = peer.pop("max_rss_bytes_peer", None)
    merge(results, peer)
    results["run_length_over_references"] = measure_reference_draws(local, results, params)
    results["detectors"] = in_table_order(results["detectors"])
    machine.update(load_average_end=os.getloadavg(), max_rss_bytes_main=max_rss_bytes())
    report = {
        "machine": machine,
        "parameters": {**asdict(params), "delay_horizon": params.delay_horizon, "alibi": alibi_source,
                       "synthetic": {"dim": SYNTHETIC_DIM, "reference_rows": SYNTHETIC_REFERENCE_ROWS,
                                     "correlation": CORRELATION},
                       "mnist": {"class_digit": CLASS_DIGIT, "class_share": CLASS_SHARE,
                                 "fit_images": len(data["ref_label"]),
                                 **{f"{name}_images": int((data["traffic_source"] == k).sum())
                                    for k, name in enumerate(TRAFFIC_SOURCES)}},
                       "batch": BATCH, "feed_chunk": FEED_CHUNK},
        **results,
        "goals": {"run_length": run_length_goals(results), "delay": delay_goals(results),
                  "benign_quiet": benign_goals(results), "cost": cost_goals(results)},
        "checks": check_streams(stream_checksums(families, params), peer_checksums),
        "wall_seconds": time.perf_counter() - _STARTED,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print_report(report)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

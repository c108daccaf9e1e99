"""Drift references from files (``models.<name>.reference``, agent/detect/drift/reference_file.py): the drift
watch with no model repository, on a simulated clock, fits a version's baseline from a CSV or a JSON-lines file
at its first request and watches at once; benign traffic stays quiet, a unit change is flagged; a file
without outputs watches the inputs only; a reset fits from the file again. Every malformed file is refused
with the key, the file and the line. (Through real processes: tests/integration/test_reference_file_sidecar.py.)"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.config import ConfigError, load_config
from agent.dataplane.tap import TappedInference
from agent.detect.drift import reference_file
from agent.detect.drift.reference_file import read_reference, read_references
from agent.detect.drift.watch import DriftWatch
from agent.metrics import BoundedModels, DriftMetrics
from tests.support import scenarios
from tests.support.drift_watch import Clock, registry_flags, tapped

MODEL, VERSION = "diabetes", "v1"
LABELS = {"model": MODEL, "version": VERSION}
KEY = f"models.{MODEL}.reference"
WEIGHTS = np.random.default_rng(0).normal(size=10)


def _inference(features: np.ndarray) -> TappedInference:
    """A tapped copy of a fixed linear model's call (MLServer's Ridge in the integration tests)."""
    return tapped(MODEL, {"features": features.astype(np.float32)},
                  {"value": (features @ WEIGHTS).astype(np.float32)[:, None]}, "", VERSION)


def _watch(clock, path, **settings):
    config = load_config(overrides={"models": {MODEL: {"reference": str(path)}}, **settings})
    metrics = CollectorRegistry()
    watch = DriftWatch(None, config.drift, DriftMetrics(metrics), BoundedModels(8), clock=clock,
                       references=read_references(config.models))
    return watch, metrics


def _feed(watch, clock, features, seconds, rate=20.0):
    for i in range(int(seconds * rate)):
        clock.now += 1.0 / rate
        watch(_inference(features[i % len(features):i % len(features) + 1]))
        watch.tick()


def _value(metrics, name, **labels):
    return metrics.get_sample_value(name, {**LABELS, **labels})


def _write_csv(path, features, value):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"features[{k}]" for k in range(features.shape[1])] + ["value"])
        for row, v in zip(features.tolist(), value.tolist()):
            writer.writerow([repr(x) for x in row] + [repr(v)])


@pytest.fixture(scope="module")
def traffic():
    reference = scenarios.reference("diabetes")["features"]
    return (reference, scenarios.resample(scenarios.benign("diabetes"), 3000, seed=2)["features"],
            scenarios.drift("diabetes", "rescaled", n=3000)["features"])


def test_a_csv_reference_is_watched_from_the_first_request(traffic, tmp_path):
    reference, benign, rescaled = traffic
    path = tmp_path / "reference.csv"
    _write_csv(path, reference.astype(np.float64), (reference.astype(np.float32) @ WEIGHTS).astype(np.float32))
    clock = Clock()
    watch, metrics = _watch(clock, path)
    _feed(watch, clock, benign, seconds=0.05)        # one request: fitted from the file, watching
    live = watch.live[(MODEL, VERSION)]
    assert live.state == "watching" and _value(metrics, "sidewatch_drift_baseline_state", state="watching") == 1
    assert set(live.moments) == {"inputs", "outputs"}
    assert live.moments["inputs"].n_reference == len(reference)
    _feed(watch, clock, benign, seconds=300)
    assert _value(metrics, "sidewatch_drift_looks_total", result="tested") >= 3
    flags = registry_flags(metrics)
    assert {"inputs_mean", "features.out_of_range", "outputs_mean"} <= set(flags), flags
    assert not any(flags.values()), flags
    _feed(watch, clock, rescaled, seconds=240)       # s5 in other units
    assert registry_flags(metrics)["features.out_of_range"] == 1, registry_flags(metrics)
    # A reset fits from the file again at the next request: watching, every flag down.
    assert watch.reset_baseline(MODEL, VERSION)
    watch.tick()
    assert live.state == "collecting" and not any(registry_flags(metrics).values())
    _feed(watch, clock, benign, seconds=0.05)
    assert live.state == "watching" and live.moments["inputs"].n_reference == len(reference)


def test_a_reference_is_watched_with_learned_baselines_off_and_restored_only_while_the_file_is_the_same(
        traffic, tmp_path):
    reference, benign, _ = traffic
    path = tmp_path / "reference.csv"
    _write_csv(path, reference.astype(np.float64), (reference.astype(np.float32) @ WEIGHTS).astype(np.float32))
    settings = {"drift.baseline.enabled": False, "drift.checkpoint_dir": str(tmp_path / "state")}
    clock = Clock()
    watch, _ = _watch(clock, path, **settings)
    _feed(watch, clock, benign, seconds=120)
    first = watch.live[(MODEL, VERSION)]
    assert first.state == "watching"      # from a file, though baselines from traffic are off
    tested = first.tests.tests["inputs"].n_tested
    assert tested > 0
    watch.close()
    # Restarted with the same file: the fitted baseline and its tests come back (the looks go on).
    restored, _ = _watch(clock, path, **settings)
    live = restored.live[(MODEL, VERSION)]
    assert live.state == "watching" and live.tests.tests["inputs"].n_tested == tested
    # Restarted with a changed file: not restored; fitted from the new file at the first request.
    _write_csv(path, reference[:200].astype(np.float64),
               (reference[:200].astype(np.float32) @ WEIGHTS).astype(np.float32))
    changed, _ = _watch(clock, path, **settings)
    live = changed.live[(MODEL, VERSION)]
    assert live.state == "collecting"
    _feed(changed, clock, benign, seconds=0.05)
    assert live.state == "watching" and live.moments["inputs"].n_reference == 200


def test_a_jsonl_reference_without_outputs_watches_the_inputs(traffic, tmp_path):
    """Keys with a role prefix, no output tensor in the file, a line whose value cannot be read (a string
    where numbers go: left out of the fit as a live row would be) and a key the model does not have."""
    reference, benign, rescaled = traffic
    path = tmp_path / "reference.jsonl"
    lines = [json.dumps({"input:features": row, "note": "x"}) for row in reference.astype(np.float64).tolist()]
    lines.append(json.dumps({"input:features": ["oops"] * 10, "note": "y"}))
    path.write_text("\n".join(lines) + "\n")
    clock = Clock()
    watch, metrics = _watch(clock, path)
    _feed(watch, clock, benign, seconds=300)
    live = watch.live[(MODEL, VERSION)]
    assert set(live.moments) == {"inputs"} and live.moments["inputs"].n_reference == len(reference)
    flags = registry_flags(metrics)
    assert flags and not any(flags.values()) and not any(d.startswith("outputs") for d in flags), flags
    _feed(watch, clock, rescaled, seconds=240)
    assert registry_flags(metrics)["features.out_of_range"] == 1, registry_flags(metrics)


def test_a_reference_that_fits_no_tensor_is_learned_from_traffic(traffic, tmp_path):
    path = tmp_path / "reference.csv"
    path.write_text("other\n1\n2\n")
    clock = Clock()
    watch, metrics = _watch(clock, path)
    _feed(watch, clock, traffic[0], seconds=1)
    live = watch.live[(MODEL, VERSION)]
    assert live.reference is None and live.state == "collecting"


def test_formats_read_the_same_tensors(tmp_path):
    x = np.arange(6, dtype=np.float64).reshape(3, 2)
    np.savez(tmp_path / "r.npz", **{"x": x, "output:label": np.array([b"a", b"b", b"c"])})
    (tmp_path / "r.csv").write_text("x[1],output:label,x[0]\n1,a,0\n3,b,2\n5,c,4\n")
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"x": r, "output:label": s}) + "\n"
                                              for r, s in zip(x.tolist(), "abc")))
    for suffix in ("npz", "csv", "jsonl"):
        tensors = read_reference(tmp_path / f"r.{suffix}", KEY)
        assert tensors["x"].tolist() == x.tolist(), suffix
        assert tensors["output:label"].tolist() == [b"a", b"b", b"c"], suffix
    roles = reference_file.split_roles(tensors, inputs={"x", "label"}, outputs={"label"})
    assert set(roles["input"]) == {"x"} and set(roles["output"]) == {"label"}


BAD = [
    ("r.csv", "a,b\n1,2\n3\n", "line 3: 1 fields, the header has 2"),
    ("r.csv", "x[0],x[2]\n1,2\n", "line 1: the columns of 'x' must be x[0] to x[1]"),
    ("r.csv", "x,x[0]\n1,2\n", "line 1: 'x' is both a column"),
    ("r.csv", "", "line 1: no header row"),
    ("r.csv", 'a,b\n1,"2\n', "line 2: not valid CSV"),
    ("r.jsonl", '{"a": 1}\n{"a": 2,}\n', "line 2: not JSON"),
    ("r.jsonl", '{"a": 1}\n\n{"b": 2}\n', "line 3: keys ['b'] differ from line 1's ['a']"),
    ("r.jsonl", '{"a": [1, 2]}\n{"a": [1, 2, 3]}\n', "line 2: 'a' has shape [3], the first row [2] (ragged)"),
    ("r.jsonl", '{"a": [[1], [2, 3]]}\n', "line 1: 'a' is a ragged list"),
    ("r.jsonl", '[1, 2]\n', "line 1: expected a JSON object"),
    ("r.jsonl", '{"a": {"b": 1}}\n', "line 1: 'a' is a dict"),
    ("r.npz", "not a zip", "not a .npz archive"),
    ("r.parquet", "x", "the suffix must be one of .npz, .csv, .jsonl"),
]


@pytest.mark.parametrize("name,text,message", BAD, ids=[m for _, _, m in BAD])
def test_a_malformed_file_names_the_key_the_file_and_the_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_reference(path, KEY)
    assert str(err.value).startswith(f"sidewatch: {KEY}: {path}: "), err.value
    assert message in str(err.value), err.value


def test_missing_large_and_unsafe_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=f"{KEY}: .*missing.csv: cannot read it: No such file"):
        read_reference(tmp_path / "missing.csv", KEY)
    large = tmp_path / "large.csv"
    with large.open("wb") as f:
        f.truncate(reference_file.MAX_BYTES + 1)     # sparse: its size without writing it
    with pytest.raises(ConfigError, match="more than the 268435456 a reference may have"):
        read_reference(large, KEY)
    np.savez(tmp_path / "objects.npz", x=np.array([b"a", 1], dtype=object))
    with pytest.raises(ConfigError, match="holds Python objects"):
        read_reference(tmp_path / "objects.npz", KEY)
    np.savez(tmp_path / "ragged.npz", x=np.zeros((3, 2)), y=np.zeros(4))
    with pytest.raises(ConfigError, match="different numbers of rows"):
        read_reference(tmp_path / "ragged.npz", KEY)

"""The calibration artifact: a versioned JSON file beside the model (``sidewatch-calibration.json``).

It holds the feature-squeezing threshold (:mod:`agent.detect.calibration.threshold`), the reference
summary (:mod:`agent.detect.calibration.reference`) and the drift detectors' calibration
(:mod:`agent.detect.drift.calibrate`). It names the model by sha256, and :func:`load_artifact`
refuses to pair it with another model.

Artifact schema (``format_version`` 2; floats in the summaries rounded to 7 significant digits,
the thresholds exact)::

    {
      "format_version": 2,
      "kind": "sidewatch-calibration",
      "created_at": "2025-01-01T00:00:00Z",
      "created_by": {"sidewatch": "0.1.0", "onnxruntime": "1.x", "execution_provider": "CPUExecutionProvider"},
      "model": {"file": "model.onnx", "sha256": "...", "input": "input", "output": "probabilities",
                "output_kind": "probabilities", "input_shape": [null, 1, 28, 28], "classes": 10},
      "detector": "feature_squeezing+autoencoder",   # or "feature_squeezing" alone
      "squeezers": ["bit_depth:1", "median:2"],
      "threshold": 1.0,                      # flag when score > threshold
      "target_fpr": 0.05,
      "threshold_rule": "...",
      "benign_scores": {"count", "above_threshold", "fpr", "min", "max", "mean", "std",
                        "quantiles": {"0.5": ..., "0.9", "0.95", "0.99", "0.999"}},
      "detectors": [                         # one per column of the fused graph's detector_scores
        {"name": "feature_squeezing", "threshold": 0.09, "benign_scores": {...}},
        {"name": "autoencoder", "threshold": 0.004, "error": "l2", "training": {...}, "benign_scores": {...},
         "onnx_sha256": "...", "onnx": "<base64 of the autoencoder's ONNX graph>"}
      ],
      "split": {...},                        # which reference rows trained, which calibrated (with an autoencoder)
      "reference": {...},                    # agent.detect.calibration.reference
      "drift": {...}                         # agent.detect.drift.calibrate; {} when skipped
    }

With feature squeezing alone, ``score`` is the squeezing score and ``threshold`` its threshold at the
target false-positive rate. With the autoencoder beside it, the detectors' thresholds are set jointly
(agent.detect.calibration.threshold.joint_thresholds) on reference rows the autoencoder never saw, so that
flagging an input when ANY detector is over its own threshold keeps the target rate; ``score`` is then the
largest detector score over its threshold, and ``threshold`` is 1. Format 1 (no ``detectors``: feature
squeezing alone) is still read, as squeezing alone.

>>> artifact = load_artifact("agent/demo/models/mnist_cnn/1/" + ARTIFACT_FILE, "agent/demo/models/mnist_cnn/1/model.onnx")
>>> artifact.squeezers, artifact.target_fpr
(['bit_depth:1', 'median:2'], 0.05)
>>> default_artifact_path("models/mnist/1/model.onnx").as_posix()
'models/mnist/1/sidewatch-calibration.json'
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.detect.adversarial.autoencoder import ERRORS
from agent.detect.adversarial.graph import AUTOENCODER, SQUEEZING, FeatureSqueezingDetector, ModelSource
from agent.detect.calibration import CalibrationError
from agent.detect.calibration.threshold import THRESHOLD_RULE
from agent.durable import write_atomic

FORMAT_VERSION = 2
# Format 1: feature squeezing alone, no "detectors" (still read; the registry warns that it lacks the autoencoder).
SQUEEZING_ONLY_FORMAT = 1
ARTIFACT_KIND = "sidewatch-calibration"
ARTIFACT_FILE = "sidewatch-calibration.json"


def model_sha256(model: str | Path | bytes) -> str:
    """sha256 of a model file (or of serialized model bytes)."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return hashlib.sha256(bytes(model)).hexdigest()
    digest = hashlib.sha256()
    with open(model, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class CalibrationArtifact:
    """A calibrated adversarial detector for one model: the JSON artifact, as an object."""

    model: dict                 # file, sha256, input, output, output_kind, input_shape, classes
    squeezers: list[str]
    threshold: float
    target_fpr: float
    benign_scores: dict
    reference: dict
    created_at: str = ""
    created_by: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    kind: str = ARTIFACT_KIND
    detector: str = SQUEEZING
    threshold_rule: str = THRESHOLD_RULE
    # One entry per detector (agent.detect.adversarial.graph.detector_names' order); format 1 has none.
    detectors: list[dict] = field(default_factory=list)
    # Which reference rows trained the autoencoder and which calibrated the thresholds; {} without one.
    split: dict = field(default_factory=dict)
    # The drift and anomaly detectors' calibration (agent.detect.drift.calibrate); empty when skipped.
    drift: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        order = ["format_version", "kind", "created_at", "created_by", "model", "detector", "squeezers",
                 "threshold", "target_fpr", "threshold_rule", "benign_scores", "detectors", "split", "reference",
                 "drift"]
        return {key: data[key] for key in order}

    @classmethod
    def from_dict(cls, data: dict, source: str = "the artifact") -> CalibrationArtifact:
        if not isinstance(data, dict) or data.get("kind") != ARTIFACT_KIND:
            raise CalibrationError(f"sidewatch: {source} is not a sidewatch calibration artifact "
                                   f"(no \"kind\": \"{ARTIFACT_KIND}\")")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
            raise CalibrationError(f"sidewatch: {source} has format_version {version!r}; this sidewatch reads "
                                   f"versions up to {FORMAT_VERSION} (upgrade sidewatch, or recalibrate)")
        required = ["model", "squeezers", "threshold", "target_fpr", "benign_scores", "reference"]
        if version > SQUEEZING_ONLY_FORMAT:
            required.append("detectors")
        missing = [key for key in required if key not in data]
        if missing:
            raise CalibrationError(f"sidewatch: {source} lacks {', '.join(missing)}")
        wrong = [f"{key}: expected {expected}, got {_shown(value)}" for key, value, expected in _malformed(data)]
        wrong += _malformed_detectors(data.get("detectors", []))
        if wrong:
            raise CalibrationError(f"sidewatch: {source}: " + "; ".join(wrong))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})

    @property
    def squeezing_only_format(self) -> bool:
        """Whether this is a format-1 artifact, made before the autoencoder detector (squeezing alone)."""
        return self.format_version <= SQUEEZING_ONLY_FORMAT

    @property
    def autoencoder(self) -> dict | None:
        """The autoencoder detector's entry, or None when squeezing is alone."""
        return next((d for d in self.detectors if d["name"] == AUTOENCODER), None)

    @property
    def detector_thresholds(self) -> list[float]:
        """Each detector's own threshold, squeezing first (format 1: the squeezing threshold)."""
        return [d["threshold"] for d in self.detectors] if self.detectors else [self.threshold]

    def make_detector(self, model: ModelSource, device: str = "auto", **options) -> FeatureSqueezingDetector:
        """A detector with this artifact's squeezers, autoencoder, model I/O, output kind and thresholds."""
        autoencoder = self.autoencoder
        joint = {} if autoencoder is None else {
            "autoencoder": autoencoder_bytes(autoencoder), "autoencoder_error": autoencoder["error"],
            "detector_thresholds": self.detector_thresholds}
        return FeatureSqueezingDetector(model, self.squeezers, output_kind=self.model["output_kind"],
                                        input_name=self.model["input"], output_name=self.model["output"],
                                        device=device, threshold=self.threshold, **joint, **options)


def autoencoder_bytes(entry: dict) -> bytes:
    """The autoencoder's ONNX graph from its artifact entry (checked against its sha256 at load)."""
    return base64.b64decode(entry["onnx"], validate=True)


def autoencoder_entry_fields(onnx_bytes: bytes) -> dict:
    """The ``onnx`` and ``onnx_sha256`` fields of an autoencoder entry."""
    return {"onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(), "onnx": base64.b64encode(onnx_bytes).decode("ascii")}


def _malformed_detectors(detectors) -> list[str]:
    """What is wrong with a ``detectors`` list: its names and order, thresholds, and the autoencoder's graph."""
    if not isinstance(detectors, list) or not all(isinstance(d, dict) for d in detectors):
        return [f"detectors: expected a list of objects, got {_shown(detectors)}"]
    if not detectors:
        return []
    names = [d.get("name") for d in detectors]
    if names not in ([SQUEEZING], [SQUEEZING, AUTOENCODER]):
        return [f"detectors: expected {SQUEEZING!r} or {SQUEEZING!r} then {AUTOENCODER!r}, got {_shown(names)}"]
    wrong = [f"detectors.{d['name']}.threshold: expected a positive number, got {_shown(d.get('threshold', _ABSENT))}"
             for d in detectors if not (_number(d.get("threshold")) and d["threshold"] > 0)]
    autoencoder = next((d for d in detectors if d["name"] == AUTOENCODER), None)
    if autoencoder is not None:
        if autoencoder.get("error") not in ERRORS:
            wrong.append(f"detectors.{AUTOENCODER}.error: expected one of {', '.join(ERRORS)}, "
                         f"got {_shown(autoencoder.get('error', _ABSENT))}")
        try:
            graph = autoencoder_bytes(autoencoder)
        except (KeyError, TypeError, ValueError, binascii.Error):
            wrong.append(f"detectors.{AUTOENCODER}.onnx: expected the autoencoder's ONNX graph in base64")
        else:
            if hashlib.sha256(graph).hexdigest() != autoencoder.get("onnx_sha256"):
                wrong.append(f"detectors.{AUTOENCODER}.onnx: its sha256 is not onnx_sha256 (the file was changed)")
    return wrong


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value) -> bool:
    return isinstance(value, str) and bool(value)


# What each value the detectors use must be: (dotted key, test, what it must be). A hand-edited or corrupted
# artifact fails at load (start and --check-config) naming its key, not later as a bare ValueError or KeyError.
_SCHEMA = (
    ("model", lambda v: isinstance(v, dict), "an object"),
    ("model.sha256", _text, "the model file's sha256"),
    ("model.input", _text, "the input's name"),
    ("model.output", _text, "the output's name"),
    ("model.output_kind", _text, "the output's kind"),
    ("model.input_shape", lambda v: v is None or (isinstance(v, list) and all(
        d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in v)), "a list of dimensions"),
    ("squeezers", lambda v: isinstance(v, list) and bool(v) and all(_text(s) for s in v), "a list of squeezers"),
    ("threshold", _number, "a number"),
    ("target_fpr", lambda v: _number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    ("benign_scores", lambda v: isinstance(v, dict), "an object"),
    ("reference", lambda v: isinstance(v, dict), "an object"),
    ("split", lambda v: isinstance(v, dict), "an object"),
    ("drift", lambda v: isinstance(v, dict), "an object"),
)
_ABSENT = object()


def _malformed(data: dict):
    """(key, value, what it must be) for each value of ``data`` that :data:`_SCHEMA` refuses (absent optional
    keys pass: the missing required ones are named before)."""
    for key, test, expected in _SCHEMA:
        parent, _, leaf = key.rpartition(".")
        container = data.get(parent) if parent else data
        if not isinstance(container, dict):
            continue  # the parent is reported
        value = container.get(leaf, _ABSENT)
        if value is _ABSENT and key in ("model.input_shape", "split", "drift"):
            continue
        if value is _ABSENT or not test(value):
            yield key, value, expected


def _shown(value) -> str:
    if value is _ABSENT:
        return "nothing"
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _to_json(value, indent: str = "") -> str:
    """JSON with one key per line but each list of scalars on one line: readable, and diffs stay small."""
    inner = indent + "  "
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(key)}: {_to_json(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return "[\n" + ",\n".join(inner + _to_json(item, inner) for item in value) + "\n" + indent + "]"
    return json.dumps(value, separators=(", ", ": "))


def save_artifact(artifact: CalibrationArtifact, path: str | Path) -> Path:
    """Write the artifact as JSON (atomically: a reader never sees half a file)."""
    return write_atomic(Path(path), _to_json(artifact.to_dict()) + "\n")


def load_artifact(path: str | Path, model_path: str | Path | bytes | None) -> CalibrationArtifact:
    """Read an artifact and check that it belongs to the model at ``model_path`` (same sha256).

    ``model_path=None`` skips the check (to inspect an artifact on its own); a mismatch raises a
    CalibrationError naming both hashes and both files, because a threshold set for one model means
    nothing for another.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CalibrationError(f"sidewatch: cannot read calibration artifact {path}: {err}") from err
    artifact = CalibrationArtifact.from_dict(data, str(path))
    if model_path is not None:
        actual = model_sha256(model_path)
        expected = artifact.model["sha256"]
        if actual != expected:
            model_name = "the given model bytes" if isinstance(model_path, (bytes, bytearray, memoryview)) else str(model_path)
            raise CalibrationError(
                f"sidewatch: calibration {path} was made for model file {artifact.model.get('file')!r} with sha256 "
                f"{expected}, but {model_name} has sha256 {actual}; recalibrate: "
                f"sidewatch calibrate --model {model_name} --reference DATA.npz")
    return artifact


def default_artifact_path(model_path: str | Path) -> Path:
    """Where an artifact goes by default: ``sidewatch-calibration.json`` beside the model."""
    return Path(model_path).with_name(ARTIFACT_FILE)

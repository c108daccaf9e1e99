"""The calibrated adversarial detectors of every model in a repository, loaded at start.

The repository is laid out as the model server's: ``DIR/<model>/<version>/model.onnx``, with the
calibration artifact ``sidewatch-calibration.json`` beside each model file. A model file whose hash
does not match its artifact is refused at start: a threshold calibrated for one model means nothing
for another.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.detect.adversarial.autoencoder import AutoencoderError
from agent.detect.adversarial.graph import FeatureSqueezingDetector, FusedModelError
from agent.detect.adversarial.squeeze import SqueezerSpecError
from agent.detect.calibration import CalibrationError
from agent.detect.calibration.artifact import ARTIFACT_FILE, CalibrationArtifact, load_artifact
from agent.execution import ORT_TO_DATATYPE
from agent.repository import LAYOUT, MODEL_FILE, latest_version, version_dirs

log = logging.getLogger(__name__)


@dataclass
class CalibratedDetector:
    model: str
    version: str
    detector: FeatureSqueezingDetector
    artifact: CalibrationArtifact

    @property
    def threshold(self) -> float:
        return self.artifact.threshold

    @functools.cached_property
    def detector_thresholds(self) -> np.ndarray:
        """Each detector's own threshold, in the order of ``detector.detectors`` (float32, as in the graph)."""
        return np.asarray(self.artifact.detector_thresholds, dtype=np.float32)

    @property
    def input_name(self) -> str:
        return self.artifact.model["input"]

    @functools.cached_property
    def input_datatype(self) -> str:
        """The protocol's datatype of the model's input (FP32, ...), from the type its graph declares."""
        return ORT_TO_DATATYPE.get(self.detector.session.get_inputs()[0].type, "")

    def fits_input(self, rows: np.ndarray) -> bool:
        """Whether a decoded input is numeric with the calibrated input's rank and static dimensions.

        A model server may accept other inputs; the detectors must not take them (a wrong row would
        also spoil the micro-batch it joins), and they are the client's doing, not a detector failure.
        """
        shape = self.artifact.model.get("input_shape")
        if rows.dtype.kind not in "biuf" or rows.ndim < 1:
            return False
        return shape is None or (rows.ndim == len(shape) and all(
            want is None or want == got for want, got in zip(shape[1:], rows.shape[1:])))


class DetectorRegistry:
    """(model, version) -> CalibratedDetector; an empty version means the latest, as model servers do."""

    def __init__(self, repository: Path, device: str = "auto") -> None:
        self.repository = Path(repository)
        if not self.repository.is_dir():
            raise FileNotFoundError(f"sidewatch: detection.model_repository {self.repository} is not a directory")
        self._detectors: dict[tuple[str, str], CalibratedDetector] = {}
        # What the sidecar starts without, logged here and printed by --check-config (agent/app.py).
        self.warnings: list[str] = []
        for model, version, version_dir in version_dirs(self.repository):
            model_file, artifact_file = version_dir / MODEL_FILE, version_dir / ARTIFACT_FILE
            if not model_file.is_file():
                if artifact_file.exists():
                    self._warn(f"{version_dir} has {ARTIFACT_FILE} but no {MODEL_FILE}; model {model} version "
                               f"{version} is not watched for adversarial inputs (put the calibrated {MODEL_FILE} "
                               f"beside it)")
                continue
            if not artifact_file.exists():
                self._warn(f"{model_file} has no {ARTIFACT_FILE}; model {model} version {version} is not watched "
                           f"for adversarial inputs (run sidewatch calibrate)")
                continue
            try:
                artifact = load_artifact(artifact_file, model_file)
            except CalibrationError as err:
                raise _refused(err) from None
            try:
                detector = artifact.make_detector(model_file, device=device)
                # Build the fused graph and open its session now: failures belong to start-up, not to traffic.
                detector.session  # noqa: B018
            except (FusedModelError, SqueezerSpecError, AutoencoderError) as err:
                raise _refused(err, f"{artifact_file}: ") from None
            self._detectors[(model, version)] = CalibratedDetector(model, version, detector, artifact)
            log.info("sidewatch: adversarial detector for %s version %s (%s; threshold %.4f, squeezers %s)",
                     model, version, "+".join(detector.detectors), artifact.threshold, ",".join(artifact.squeezers))
            if artifact.squeezing_only_format:
                self._warn(f"{artifact_file} is a calibration of format {artifact.format_version}, from before the "
                           f"autoencoder detector: model {model} version {version} is watched by feature squeezing "
                           "alone, which misses high-confidence attacks; recalibrate it (sidewatch calibrate) to "
                           "add the autoencoder")
        if not self._detectors:
            raise FileNotFoundError(f"sidewatch: no calibrated model ({LAYOUT} with {ARTIFACT_FILE}) under "
                                    f"{self.repository}" + "".join(f"; {warning}" for warning in self.warnings))
        versions: dict[str, list[str]] = {}
        for model, version in self._detectors:
            versions.setdefault(model, []).append(version)
        self._latest = {model: latest_version(names) for model, names in versions.items()}

    def _warn(self, warning: str) -> None:
        self.warnings.append(warning)
        log.warning("sidewatch: %s", warning)

    def get(self, model: str, version: str) -> CalibratedDetector | None:
        if not version:
            version = self._latest.get(model, "")
        return self._detectors.get((model, version))

    def __iter__(self):
        return iter(self._detectors.values())


def _refused(err: ValueError, where: str = "") -> CalibrationError:
    """A calibration the sidecar cannot use, named by the configuration key and the file."""
    return CalibrationError(f"sidewatch: detection.model_repository: {where}{str(err).removeprefix('sidewatch: ')}")

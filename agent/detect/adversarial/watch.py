"""Adversarial-input detection on live traffic: micro-batched from the tap, or inline per request.

One fused ONNX Runtime call gives the verdict's score (feature squeezing's, or with the autoencoder beside
it the combined one) and each detector's own score, exported per detector
(``sidewatch_adversarial_detector_score`` over its threshold, ``..._detector_detections_total``).

Shadow mode (the default) scores copies of the traffic from the tap, gathered into micro-batches
(bounded by rows and by age) so that one fused ONNX Runtime call scores many requests. Flag and
enforce modes score each request on the hot path, in a small thread pool (ONNX Runtime releases
the GIL), and hand the verdict back to the data plane.

A detector that fails never affects the forwarded call: the failure is counted and the call goes on
(in enforce mode too: sidewatch fails open, so a broken detector cannot take the service down).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from agent.config import Detection
from agent.dataplane.tap import TappedInference
from agent.detect.adversarial.rate import FlaggedShareWatch
from agent.detect.registry import CalibratedDetector, DetectorRegistry
from agent.logs import ThrottledLog
from agent.metrics import BoundedModels, DetectionMetrics
from agent.protocol import codec, oip_pb2

log = logging.getLogger(__name__)

DETECTOR = "feature_squeezing"
SCORE_KEY = "sidewatch-adversarial-score"
VERDICT_KEY = "sidewatch-adversarial"
ERROR_KEY = "sidewatch-adversarial-error"


@dataclass(frozen=True, slots=True)
class Verdict:
    """One request's verdict: its highest row score against the threshold."""

    score: float
    threshold: float
    adversarial: bool

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((SCORE_KEY, f"{self.score:.6f}"), (VERDICT_KEY, "true" if self.adversarial else "false"))

    def rejection(self) -> str | None:
        """Why enforce mode refuses the request; None when it is not adversarial."""
        if not self.adversarial:
            return None
        return (f"sidewatch: input rejected as adversarial (score={self.score:.6f}, "
                f"threshold={self.threshold:.6f})")


@dataclass(frozen=True, slots=True)
class NoVerdict:
    """A request that could not be scored: it goes on (sidewatch fails open), and the caller is told why."""

    reason: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((ERROR_KEY, self.reason),)

    def rejection(self) -> None:
        return None


class DetectionFailed(Exception):
    """Why a request could not be scored; the reason is a metric label and a metadata value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AdversarialWatch:
    """The adversarial detectors of a repository on live traffic: a tap sink (shadow mode) and the data
    plane's inline verdicts (flag and enforce modes). ``settings`` is the ``detection`` section;
    ``modes`` the models whose mode differs from ``settings.adversarial_mode``."""

    def __init__(self, registry: DetectorRegistry, settings: Detection, metrics: DetectionMetrics,
                 bounded: BoundedModels, modes: Mapping[str, str] | None = None) -> None:
        self.registry = registry
        self._default_mode = settings.adversarial_mode
        self._modes = dict(modes or {})
        self._metrics = metrics
        self._bounded = bounded
        self._max_batch = settings.max_batch_size
        self._max_wait = settings.max_wait_seconds
        self._log = ThrottledLog(log)  # a detector failing on every request logs once a minute
        self._executor = ThreadPoolExecutor(settings.inline_threads, thread_name_prefix="sidewatch-detect")
        # Shadow-mode micro-batches, per calibrated detector: rows waiting and when the oldest arrived.
        self._pending: dict[tuple[str, str], tuple[list[np.ndarray], int, float]] = {}
        # Called with (model, version, scores) after each scoring, from the scoring thread.
        self.score_listeners: list = []
        # The alarm on the share of flagged inputs, fed by every scoring, looked at from tick().
        self.flagged_share = FlaggedShareWatch(registry, settings.rate_alarm, metrics, bounded)
        for calibrated in registry:
            labels = bounded.admit(calibrated.model, calibrated.version)
            metrics.threshold.labels(*labels).set(calibrated.threshold)
            metrics.target_fpr.labels(*labels).set(calibrated.artifact.target_fpr)
            for name, threshold in zip(calibrated.detector.detectors, calibrated.detector_thresholds.tolist()):
                metrics.detector_threshold.labels(*labels, name).set(threshold)

    def mode(self, model: str) -> str:
        """``shadow``, ``flag`` or ``enforce``: the model's own mode, else the default."""
        return self._modes.get(model, self._default_mode)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- scoring, shared by both paths ---------------------------------------------------------

    def _score(self, calibrated: CalibratedDetector, rows: np.ndarray, mode: str) -> np.ndarray:
        labels = self._bounded.admit(calibrated.model, calibrated.version)
        started = time.perf_counter()
        try:
            result = calibrated.detector.score(rows)
        except Exception as err:
            self._metrics.errors.labels(*labels, DETECTOR, "detector_failed").inc()
            self._log.warning(labels, "sidewatch: adversarial detector for %s version %s failed: %s",
                              calibrated.model, calibrated.version, err)
            raise DetectionFailed("detector_failed") from err
        scores = result.scores
        metrics = self._metrics
        metrics.duration.labels(*labels, DETECTOR).observe(time.perf_counter() - started)
        metrics.batch_size.labels(*labels, DETECTOR).observe(len(rows))
        finite = scores[np.isfinite(scores)]
        if len(finite) < len(scores):
            # NaN or infinite inputs score NaN: counted as inputs the detector could not take, and kept
            # out of the histogram and the drift detectors (one NaN would spoil the histogram's sum for good).
            metrics.errors.labels(*labels, DETECTOR, "non_finite").inc(len(scores) - len(finite))
        metrics.inputs.labels(*labels, mode).inc(len(finite))
        flagged = finite > calibrated.threshold
        self.flagged_share.record(calibrated.model, calibrated.version, flagged)
        detected = int(np.count_nonzero(flagged))
        if detected:
            metrics.detections.labels(*labels, mode).inc(detected)
        histogram = metrics.score.labels(*labels)
        for score in finite.tolist():
            histogram.observe(score)
        self._record_detectors(calibrated, labels, result.detector_scores[np.isfinite(scores)], mode)
        for listener in self.score_listeners:
            listener(calibrated.model, calibrated.version, finite)
        return scores

    def _record_detectors(self, calibrated: CalibratedDetector, labels: tuple[str, str], detector_scores: np.ndarray,
                          mode: str) -> None:
        """Each detector's own score over its threshold, and the inputs over it: which detector saw what."""
        thresholds = calibrated.detector_thresholds
        for name, column, threshold in zip(calibrated.detector.detectors, detector_scores.T, thresholds):
            over = int(np.count_nonzero(column > threshold))
            if over:
                self._metrics.detector_detections.labels(*labels, name, mode).inc(over)
            histogram = self._metrics.detector_score.labels(*labels, name)
            for ratio in (column / threshold).tolist():
                histogram.observe(ratio)

    def _rows(self, calibrated: CalibratedDetector, inputs: dict[str, np.ndarray]) -> np.ndarray:
        rows = inputs.get(calibrated.input_name)
        if rows is None:
            self._metrics.errors.labels(*self._bounded.admit(calibrated.model, calibrated.version), DETECTOR,
                                        "missing_input").inc()
            raise DetectionFailed("missing_input")
        if not calibrated.fits_input(rows):
            self._metrics.errors.labels(*self._bounded.admit(calibrated.model, calibrated.version), DETECTOR,
                                        "wrong_shape").inc()
            raise DetectionFailed("wrong_shape")
        return rows

    # --- inline: flag and enforce ----------------------------------------------------------------

    def _score_request(self, model: str, version: str, request: bytes) -> Verdict:
        calibrated = self.registry.get(model, version)
        if calibrated is None:
            # Inline, before the upstream answered: an unknown name is looked up, never admitted (BoundedModels).
            self._metrics.errors.labels(*self._bounded(model, version), DETECTOR, "not_calibrated").inc()
            raise DetectionFailed("not_calibrated")
        try:
            message = oip_pb2.ModelInferRequest.FromString(request)
            inputs = codec.decode_request(message)
        except Exception as err:  # noqa: BLE001 - a malformed request is the model server's to refuse
            self._metrics.errors.labels(*self._bounded.admit(model, version), DETECTOR, "undecodable").inc()
            raise DetectionFailed("undecodable") from err
        rows = self._rows(calibrated, inputs)
        declared = next(tensor.datatype for tensor in message.inputs if tensor.name == calibrated.input_name)
        if declared != calibrated.input_datatype:
            # Inline, the request has not reached the model server yet: one with another datatype is
            # the model server's to refuse (with its own error), not the detector's to judge. (Copies
            # from the tap were answered by the model server, so it took their datatype.)
            self._metrics.errors.labels(*self._bounded.admit(model, calibrated.version), DETECTOR, "wrong_datatype").inc()
            raise DetectionFailed("wrong_datatype")
        scores = self._score(calibrated, rows, self.mode(model))
        finite = scores[np.isfinite(scores)]
        top = float(finite.max()) if len(finite) else 0.0
        if top <= calibrated.threshold and len(finite) < len(scores):
            raise DetectionFailed("non_finite")  # no row over the threshold, and some rows could not be scored
        return Verdict(top, calibrated.threshold, top > calibrated.threshold)

    def _verdict(self, model: str, version: str, request: bytes) -> Verdict | NoVerdict:
        try:
            verdict = self._score_request(model, version, request)
        except DetectionFailed as failure:
            return NoVerdict(failure.reason)
        if verdict.adversarial and self.mode(model) == "enforce":
            # Enforce mode refuses every adversarial verdict: counted here, where the version is known.
            calibrated = self.registry.get(model, version)
            self._metrics.rejected.labels(*self._bounded.admit(model, calibrated.version if calibrated else version)).inc()
        return verdict

    async def score_request(self, model: str, version: str, request: bytes) -> Verdict | NoVerdict:
        """Score a request off the event loop (flag and enforce modes); a request that cannot be scored
        gets a NoVerdict, never an exception: the call goes on."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._verdict, model, version, request)

    # --- shadow: a tap sink with micro-batches ---------------------------------------------------

    def __call__(self, inference: TappedInference) -> None:
        if self.mode(inference.model) != "shadow":
            return  # scored inline on the hot path already
        calibrated = self.registry.get(inference.model, inference.version)
        if calibrated is None:
            return
        try:
            rows = self._rows(calibrated, inference.inputs)
        except DetectionFailed:
            return
        if len(rows) >= self._max_batch:
            self._run_batch(calibrated, [rows])  # a big request is a batch of its own
            return
        key = (calibrated.model, calibrated.version)
        waiting, count, since = self._pending.get(key, ([], 0, time.monotonic()))
        waiting.append(rows)
        count += len(rows)
        if count >= self._max_batch:
            self._pending.pop(key, None)
            self._run_batch(calibrated, waiting)
        else:
            self._pending[key] = (waiting, count, since)

    def tick(self, max_wait: float | None = None) -> None:
        """Close the micro-batches that have waited long enough, and look at the flagged shares when a look
        is due (the tap calls this between copies)."""
        max_wait = self._max_wait if max_wait is None else max_wait
        now = time.monotonic()
        for key in [key for key, (_, _, since) in self._pending.items() if now - since >= max_wait]:
            waiting, _, _ = self._pending.pop(key)
            self._run_batch(self.registry.get(*key), waiting)
        self.flagged_share.look()

    def flush(self) -> None:
        """Score every waiting micro-batch now (at shutdown)."""
        self.tick(max_wait=0.0)

    def _run_batch(self, calibrated: CalibratedDetector, parts: list[np.ndarray]) -> None:
        try:
            self._score(calibrated, parts[0] if len(parts) == 1 else np.concatenate(parts), "shadow")
        except DetectionFailed:
            pass
        except ValueError:
            # Rows of different shapes cannot share a batch: score each request alone.
            for rows in parts:
                try:
                    self._score(calibrated, rows, "shadow")
                except (DetectionFailed, ValueError):
                    pass

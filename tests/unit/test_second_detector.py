"""The autoencoder detector beside feature squeezing: the fused graph's scores against a plain computation,
the joint calibration's false-positive rate, the artifact (old and new), the per-detector metrics."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry

from agent.cli import main as cli_main
from agent.config import load_config
from agent.dataplane.tap import TappedInference
from agent.demo.data import MODEL_DIR, REFERENCE, load_images
from agent.detect.adversarial.autoencoder import AutoencoderError
from agent.detect.adversarial.graph import FeatureSqueezingDetector, build_fused_model
from agent.detect.adversarial.watch import AdversarialWatch
from agent.detect.calibration import CalibrationError
from agent.detect.calibration.artifact import (
    ARTIFACT_FILE,
    CalibrationArtifact,
    autoencoder_entry_fields,
    load_artifact,
    save_artifact,
)
from agent.detect.calibration.autoencoder_export import export_onnx
from agent.detect.calibration.autoencoder_network import Autoencoder
from agent.detect.calibration.autoencoder_training import TrainingRecipe, reconstruct, train_autoencoder
from agent.detect.calibration.threshold import joint_thresholds, threshold_at_fpr
from agent.detect.registry import DetectorRegistry
from agent.metrics import BoundedModels, DetectionMetrics
from agent.modelserver.repository import BUNDLED_REPOSITORY
from tests.support.reference_math import reference_score

MNIST_V1 = MODEL_DIR / "1" / "model.onnx"
SQUEEZERS = "bit_depth:1,median:2"
ATOL = 2e-5


def tiny_autoencoder(opset: int = 17, channels: int = 1, seed: int = 0, outputs: int = 1) -> bytes:
    """Conv 3x3 (channels -> 3), Sigmoid, Conv 3x3 (3 -> channels), Sigmoid, with random weights: an
    autoencoder graph as calibration exports one, built by hand."""
    rng = np.random.default_rng(seed)
    weights = {"w1": rng.normal(0, 0.5, (3, channels, 3, 3)), "b1": rng.normal(0, 0.1, 3),
               "w2": rng.normal(0, 0.5, (channels, 3, 3, 3)), "b2": rng.normal(0, 0.1, channels)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["h"], ["s"]),
             helper.make_node("Conv", ["s", "w2", "b2"], ["o"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["o"], ["reconstruction"])]
    names = ["reconstruction", "s"][:outputs]
    graph = helper.make_graph(
        nodes, "tiny_autoencoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, 28, 28])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model.SerializeToString()


def plain_errors(autoencoder: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    """The reconstruction errors without fusing: the autoencoder alone in its own session, then numpy."""
    session = ort.InferenceSession(autoencoder, providers=["CPUExecutionProvider"])
    difference = (x - session.run(["reconstruction"], {"x": x})[0]).reshape(len(x), -1).astype(np.float64)
    return {"l1": np.abs(difference).mean(axis=1), "l2": (difference ** 2).mean(axis=1)}


@pytest.fixture(scope="module")
def images():
    x, _ = load_images()
    noisy = np.clip(x[:32] + np.random.default_rng(1).uniform(-0.3, 0.3, x[:32].shape), 0, 1).astype(np.float32)
    return np.concatenate([x[:32], noisy])


@pytest.fixture(scope="module")
def plain_v1():
    return ort.InferenceSession(str(MNIST_V1), providers=["CPUExecutionProvider"])


# --- the fused graph ----------------------------------------------------------------------------------


@pytest.mark.parametrize("error", ["l1", "l2"])
def test_fused_scores_match_the_plain_computation(images, plain_v1, error):
    autoencoder = tiny_autoencoder()
    thresholds = [0.05, 0.02]
    detector = FeatureSqueezingDetector(MNIST_V1, SQUEEZERS, device="cpu", autoencoder=autoencoder,
                                        autoencoder_error=error, detector_thresholds=thresholds, threshold=1.0)
    got = detector.score(images)
    probabilities, squeezing, distances = reference_score(plain_v1, images, SQUEEZERS, "probabilities", "input",
                                                          "probabilities")
    reconstruction = plain_errors(autoencoder, images)[error]
    assert detector.detectors == ("feature_squeezing", "autoencoder")
    np.testing.assert_allclose(got.probabilities, probabilities, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got.distances, distances, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got.detector_scores[:, 0], squeezing, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got.detector_scores[:, 1], reconstruction, rtol=1e-5, atol=1e-7)
    # The combined score: each detector's score over its threshold, the largest of them; flagged above 1.
    combined = np.max(np.stack([squeezing / thresholds[0], reconstruction / thresholds[1]], axis=1), axis=1)
    np.testing.assert_allclose(got.scores, combined, rtol=1e-4, atol=ATOL / min(thresholds))
    assert np.array_equal(got.flagged, got.scores > 1.0)
    # Without thresholds, the score is the squeezing score (what calibration reads the detectors from).
    uncalibrated = FeatureSqueezingDetector(MNIST_V1, SQUEEZERS, device="cpu", autoencoder=autoencoder,
                                            autoencoder_error=error).score(images)
    np.testing.assert_array_equal(uncalibrated.scores, uncalibrated.detector_scores[:, 0])


def test_fused_graph_with_the_autoencoder_is_one_valid_graph():
    fused, _ = build_fused_model(MNIST_V1, SQUEEZERS, autoencoder=tiny_autoencoder(), detector_thresholds=[1.0, 1.0])
    onnx.checker.check_model(fused, full_check=True)
    assert [i.name for i in fused.graph.input] == ["input"]
    assert [o.name for o in fused.graph.output] == ["probabilities", "score", "distances", "detector_scores"]
    assert all(node.domain in ("", "ai.onnx") for node in fused.graph.node)
    assert sum(node.op_type == "Conv" for node in fused.graph.node) == 2 + 2   # the model's two, the autoencoder's two
    empty = FeatureSqueezingDetector(MNIST_V1, SQUEEZERS, device="cpu", autoencoder=tiny_autoencoder(),
                                     detector_thresholds=[1.0, 1.0]).score(np.zeros((0, 1, 28, 28), np.float32))
    assert empty.detector_scores.shape == (0, 2) and empty.scores.shape == (0,)


def test_autoencoders_that_do_not_fit_are_refused():
    with pytest.raises(AutoencoderError, match="opset 13, the model 17"):
        build_fused_model(MNIST_V1, SQUEEZERS, autoencoder=tiny_autoencoder(opset=13))
    with pytest.raises(AutoencoderError, match="one input and one output"):
        build_fused_model(MNIST_V1, SQUEEZERS, autoencoder=tiny_autoencoder(outputs=2))
    with pytest.raises(AutoencoderError, match="not a readable ONNX model"):
        build_fused_model(MNIST_V1, SQUEEZERS, autoencoder=b"not a model")
    with pytest.raises(AutoencoderError, match="error must be one of l1, l2"):
        build_fused_model(MNIST_V1, SQUEEZERS, autoencoder=tiny_autoencoder(), autoencoder_error="l3")
    with pytest.raises(ValueError, match="2 positive detector thresholds"):
        build_fused_model(MNIST_V1, SQUEEZERS, autoencoder=tiny_autoencoder(), detector_thresholds=[0.1])


def test_a_trained_autoencoder_runs_the_same_in_the_fused_graph_as_in_numpy(images):
    net = train_autoencoder(images, TrainingRecipe(epochs=1, filters=4, batch_size=32))
    graph = export_onnx(net, images.shape[1:], opset=17)
    errors = ((images - reconstruct(net, images)) ** 2).reshape(len(images), -1).mean(axis=1)
    fused = FeatureSqueezingDetector(MNIST_V1, SQUEEZERS, device="cpu", autoencoder=graph).score(images)
    np.testing.assert_allclose(fused.detector_scores[:, 1], errors, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("architecture", ["magnet_i", "magnet_ii"])
@pytest.mark.parametrize("opset", [11, 17])
def test_the_exported_autoencoder_computes_what_the_numpy_network_computes(images, architecture, opset):
    net = Autoencoder.initial(architecture, channels=1, filters=5, rng=np.random.default_rng(3))
    session = ort.InferenceSession(export_onnx(net, images.shape[1:], opset), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["reconstruction"], {"x": images})[0], net.forward(images), atol=1e-5)


def test_the_network_gradients_match_finite_differences():
    """Backpropagation checked against central differences of the loss, in float64 arithmetic's stead a
    loss scaled to keep float32's rounding far below the differences."""
    rng = np.random.default_rng(0)
    net = Autoencoder.initial("magnet_i", channels=1, filters=3, rng=rng)
    x = rng.random((2, 1, 6, 6), dtype=np.float32)
    target = rng.random((2, 1, 6, 6), dtype=np.float32)

    def loss() -> float:
        return float(((net.forward(x).astype(np.float64) - target) ** 2).sum())

    out, cache = net.forward_with_cache(x)
    grad_weights, grad_biases = net.backward(2.0 * (out - target), cache)
    step = 1e-2
    for parameter, gradient in [(net.weights[0], grad_weights[0]), (net.weights[2], grad_weights[2]),
                                (net.biases[4], grad_biases[4])]:
        for index in [(0,) * parameter.ndim, tuple(s - 1 for s in parameter.shape)]:
            kept = parameter[index]
            parameter[index] = kept + step
            above = loss()
            parameter[index] = kept - step
            below = loss()
            parameter[index] = kept
            assert gradient[index] == pytest.approx((above - below) / (2 * step), rel=2e-2, abs=1e-4)


def test_training_on_benign_images_lowers_their_error_below_that_of_noise(images):
    benign = images[:32]
    noise = np.random.default_rng(2).random(benign.shape, dtype=np.float32)
    recipe = TrainingRecipe(filters=4, epochs=40, batch_size=16, brightness=0.0)
    untrained = Autoencoder.initial(recipe.architecture, 1, recipe.filters, np.random.default_rng(recipe.seed))
    net = train_autoencoder(benign, recipe)

    def error(model, x):
        return float(((x - reconstruct(model, x)) ** 2).mean())

    assert error(net, benign) < 0.5 * error(untrained, benign)
    assert error(net, benign) < 0.5 * error(net, noise)
    again = train_autoencoder(benign, recipe)   # seeded: the same parameters
    assert all(np.array_equal(a, b) for a, b in zip(net.parameters(), again.parameters()))


# --- the joint calibration ----------------------------------------------------------------------------


def _correlated_scores(n: int, seed: int) -> np.ndarray:
    """Two benign detector scores on different scales, positively correlated (as squeezing and reconstruction
    error are: both grow on unusual digits)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=n)
    return np.stack([np.exp(0.6 * shared + 0.8 * rng.normal(size=n)) * 0.01,
                     np.exp(0.6 * shared + 0.8 * rng.normal(size=n)) * 3.0], axis=1)


@pytest.mark.parametrize("target_fpr", [0.01, 0.05, 0.2])
def test_joint_thresholds_flag_at_most_the_target_share_of_the_calibration_rows(target_fpr):
    scores = _correlated_scores(2000, seed=0)
    thresholds = joint_thresholds(scores, target_fpr)
    flagged = np.any(scores > thresholds, axis=1)
    assert flagged.sum() <= math.floor(target_fpr * len(scores))
    assert flagged.sum() >= math.floor(target_fpr * len(scores)) - 2    # and no more conservative than ties force
    # Both detectors get the same benign level (neither is favoured by its scale).
    levels = [np.mean(scores[:, i] <= thresholds[i]) for i in range(2)]
    assert abs(levels[0] - levels[1]) <= 1 / len(scores)


def test_joint_thresholds_keep_the_target_on_held_out_benign_data_where_two_5pct_detectors_would_not():
    calibration, held_out = _correlated_scores(2000, seed=1), _correlated_scores(100_000, seed=2)
    joint = np.any(held_out > joint_thresholds(calibration, 0.05), axis=1).mean()
    # Binomial sampling error of the calibration quantile, 3 sigma (the held-out estimate's is negligible).
    assert abs(joint - 0.05) < 3 * math.sqrt(0.05 * 0.95 / 2000), joint
    separate = [threshold_at_fpr(calibration[:, i], 0.05) for i in range(2)]
    or_ed = np.any(held_out > separate, axis=1).mean()
    assert or_ed > 0.08   # two 5% detectors OR-ed: far over the target


def test_joint_thresholds_refuse_what_they_cannot_calibrate():
    with pytest.raises(CalibrationError, match="not finite"):
        joint_thresholds(np.array([[0.1, np.nan], [0.2, 0.3]]), 0.05)
    with pytest.raises(CalibrationError, match=r"\[n, detectors\]"):
        joint_thresholds(np.zeros((0, 2)), 0.05)


def test_calibration_with_the_autoencoder_keeps_the_target_on_held_out_benign_data():
    from agent.detect.calibration.calibrate import calibrate

    reference, _ = load_images(REFERENCE)
    artifact = calibrate(MNIST_V1, reference[:2000], SQUEEZERS, 0.05, device="cpu", calibration_share=0.5,
                         autoencoder=TrainingRecipe(epochs=1, filters=4))
    assert artifact.detector == "feature_squeezing+autoencoder" and artifact.threshold == 1.0
    assert artifact.split["calibration_rows"] == 1000 and artifact.split["autoencoder_rows"] == 1000
    assert artifact.benign_scores["count"] == 1000 and artifact.benign_scores["above_threshold"] <= 50
    assert [d["name"] for d in artifact.detectors] == ["feature_squeezing", "autoencoder"]
    assert all(d["benign_scores"]["above_threshold"] < 50 for d in artifact.detectors)  # each alone under the target
    test_images, _ = load_images()   # 2,000 test images: calibration never saw them
    flagged = artifact.make_detector(MNIST_V1, device="cpu").score(test_images).flagged
    sigma = math.sqrt(0.05 * 0.95 * (1 / len(test_images) + 1 / 1000))
    assert abs(flagged.mean() - 0.05) < 3 * sigma, flagged.mean()


# --- the artifact -------------------------------------------------------------------------------------


def _joint_artifact(autoencoder: bytes | None = None) -> CalibrationArtifact:
    """An artifact with the bundled model's squeezing calibration and a (tiny) autoencoder beside it."""
    bundled = load_artifact(MNIST_V1.with_name(ARTIFACT_FILE), MNIST_V1)
    data = bundled.to_dict()
    data["detectors"] = [{"name": "feature_squeezing", "threshold": 0.08},
                         {"name": "autoencoder", "threshold": 0.02, "error": "l2", "training": {},
                          **autoencoder_entry_fields(autoencoder or tiny_autoencoder())}]
    data.update(threshold=1.0, format_version=2, detector="feature_squeezing+autoencoder")
    return CalibrationArtifact.from_dict(data)


def test_an_artifact_with_the_autoencoder_round_trips_and_scores_as_calibrated(tmp_path, images):
    artifact = _joint_artifact()
    path = save_artifact(artifact, tmp_path / ARTIFACT_FILE)
    again = load_artifact(path, MNIST_V1)
    assert again.to_dict() == artifact.to_dict()
    assert again.detector_thresholds == [0.08, 0.02] and again.autoencoder["error"] == "l2"
    result = again.make_detector(MNIST_V1, device="cpu").score(images)
    np.testing.assert_allclose(result.scores, np.max(result.detector_scores / [0.08, 0.02], axis=1), rtol=1e-5)


def test_a_format_1_artifact_keeps_working_with_squeezing_alone_and_warns_once(tmp_path, images, caplog):
    data = load_artifact(MNIST_V1.with_name(ARTIFACT_FILE), MNIST_V1).to_dict()
    legacy = {key: value for key, value in data.items() if key not in ("detectors", "split")}
    legacy.update(format_version=1, threshold=0.0797, detector="feature_squeezing")
    version_dir = tmp_path / "mnist_cnn" / "1"
    version_dir.mkdir(parents=True)
    shutil.copy(MNIST_V1, version_dir / "model.onnx")
    (version_dir / ARTIFACT_FILE).write_text(json.dumps(legacy))
    artifact = load_artifact(version_dir / ARTIFACT_FILE, MNIST_V1)
    assert artifact.squeezing_only_format and artifact.autoencoder is None
    assert artifact.detector_thresholds == [0.0797]
    result = artifact.make_detector(MNIST_V1, device="cpu").score(images)
    plain = FeatureSqueezingDetector(MNIST_V1, SQUEEZERS, device="cpu").score(images)
    np.testing.assert_array_equal(result.scores, plain.scores)     # the squeezing score, as before
    with caplog.at_level(logging.WARNING):
        registry = DetectorRegistry(tmp_path, "cpu")
    warnings = [w for w in registry.warnings if "format 1" in w]
    assert len(warnings) == 1 and "recalibrate" in warnings[0]
    assert sum("format 1" in record.getMessage() for record in caplog.records) == 1
    assert registry.get("mnist_cnn", "1").detector.detectors == ("feature_squeezing",)


def test_artifacts_with_a_broken_autoencoder_are_refused(tmp_path):
    data = _joint_artifact().to_dict()
    cases = {
        "its sha256 is not onnx_sha256": lambda d: d["detectors"][1].update(onnx_sha256="0" * 64),
        "in base64": lambda d: d["detectors"][1].update(onnx="***"),
        "error: expected one of l1, l2": lambda d: d["detectors"][1].update(error="l7"),
        "detectors: expected 'feature_squeezing'": lambda d: d["detectors"].reverse(),
        "autoencoder.threshold: expected a positive number": lambda d: d["detectors"][1].update(threshold=0),
        "lacks detectors": lambda d: d.pop("detectors"),
    }
    for message, breaks in cases.items():
        broken = json.loads(json.dumps(data))
        breaks(broken)
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(CalibrationError, match=message):
            load_artifact(path, None)


# --- on live traffic ----------------------------------------------------------------------------------


def test_each_detector_is_exported_with_its_threshold_and_verdicts(images):
    registry = CollectorRegistry()
    config = load_config(overrides={"detection.model_repository": str(BUNDLED_REPOSITORY)})
    watch = AdversarialWatch(DetectorRegistry(BUNDLED_REPOSITORY, "cpu"), config.detection,
                             DetectionMetrics(registry), BoundedModels(8))
    calibrated = watch.registry.get("mnist_cnn", "1")
    assert calibrated.detector.detectors == ("feature_squeezing", "autoencoder")
    watch._run_batch(calibrated, [images])
    scores = calibrated.detector.score(images).detector_scores
    for index, name in enumerate(calibrated.detector.detectors):
        labels = {"model": "mnist_cnn", "version": "1", "detector": name}
        threshold = calibrated.artifact.detector_thresholds[index]
        assert registry.get_sample_value("sidewatch_adversarial_detector_threshold", labels) == pytest.approx(threshold)
        assert registry.get_sample_value("sidewatch_adversarial_detector_score_count", labels) == len(images)
        over = int((scores[:, index] > np.float32(threshold)).sum())
        assert (registry.get_sample_value("sidewatch_adversarial_detector_detections_total",
                                          {**labels, "mode": "shadow"}) or 0.0) == over
    flagged = registry.get_sample_value("sidewatch_adversarial_detections_total",
                                        {"model": "mnist_cnn", "version": "1", "mode": "shadow"})
    assert flagged == int((scores > calibrated.detector_thresholds).any(axis=1).sum())
    watch.close()


def test_tapped_rows_reach_every_detector():
    registry = CollectorRegistry()
    config = load_config(overrides={"detection.model_repository": str(BUNDLED_REPOSITORY),
                                    "detection.max_batch_size": 1})
    watch = AdversarialWatch(DetectorRegistry(BUNDLED_REPOSITORY, "cpu"), config.detection,
                             DetectionMetrics(registry), BoundedModels(8))
    watch(TappedInference("mnist_cnn", "1", {"input": load_images()[0][:1]}, {}, None, None, 0.0, 0.0))
    for name in ("feature_squeezing", "autoencoder"):
        assert registry.get_sample_value("sidewatch_adversarial_detector_score_count",
                                         {"model": "mnist_cnn", "version": "1", "detector": name}) == 1
    watch.close()


# --- the command --------------------------------------------------------------------------------------


def test_calibrate_trains_the_autoencoder_without_torch(tmp_path, capsys, monkeypatch):
    reference = tmp_path / "ref.npy"
    np.save(reference, np.random.default_rng(0).integers(0, 256, (600, 28, 28), dtype=np.uint8))
    monkeypatch.setitem(sys.modules, "torch", None)   # as if torch were not installed: it is not needed
    assert cli_main(["calibrate", "--model", str(MNIST_V1), "--reference", str(reference), "--device", "cpu",
                     "--no-drift", "--autoencoder-epochs", "1", "--out", str(tmp_path / "a.json")]) == 0
    assert "an autoencoder trained on 360 others" in capsys.readouterr().out
    assert load_artifact(tmp_path / "a.json", MNIST_V1).detector == "feature_squeezing+autoencoder"
    assert cli_main(["calibrate", "--model", str(MNIST_V1), "--reference", str(reference), "--device", "cpu",
                     "--detectors", "autoencoder", "--out", str(tmp_path / "a.json")]) == 2
    assert "--detectors must be" in capsys.readouterr().err

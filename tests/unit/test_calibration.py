"""Calibration: the threshold rule, held-out false-positive rate, the artifact, the model check, the CLI."""

import json
import math

import numpy as np
import pytest

from agent.cli import main as cli_main
from agent.demo.data import MODEL_DIR, REFERENCE, load_images
from agent.detect.calibration import CalibrationError
from agent.detect.calibration.artifact import ARTIFACT_FILE, FORMAT_VERSION, load_artifact, model_sha256, save_artifact
from agent.detect.calibration.calibrate import calibrate
from agent.detect.calibration.reference import load_reference
from agent.detect.calibration.threshold import threshold_at_fpr

MNIST_V1 = MODEL_DIR / "1" / "model.onnx"
MNIST_V2 = MODEL_DIR / "2" / "model.onnx"


@pytest.fixture(scope="module")
def calibrated_v1():
    """v1 calibrated on the first 3,000 reference images (validation split) only."""
    x, _ = load_images(REFERENCE)
    return calibrate(MNIST_V1, x[:3000], "bit_depth:1,median:2", 0.05, device="cpu",
                     reference_source="mnist_reference.npz[:3000]")


# --- the threshold rule ----------------------------------------------------------------------------


def test_threshold_rule():
    scores = np.arange(1, 101, dtype=np.float64)
    # 5 of 100 may lie above: the 95th smallest score.
    assert threshold_at_fpr(scores, 0.05) == 95
    assert threshold_at_fpr(np.random.default_rng(0).permutation(scores), 0.05) == 95
    assert threshold_at_fpr(scores, 0.0) == 100
    assert threshold_at_fpr(scores, 0.29) == 71        # 0.29 * 100 is 28.999... in floating point
    assert threshold_at_fpr(scores, 0.999) == 1
    # Ties: half the scores are 1, so no threshold below 1 keeps 30% or fewer above it.
    assert threshold_at_fpr(np.array([0.0] * 50 + [1.0] * 50), 0.3) == 1.0
    for bad in (-0.1, 1.0):
        with pytest.raises(CalibrationError, match="sidewatch: target false-positive rate"):
            threshold_at_fpr(scores, bad)


# --- calibration -----------------------------------------------------------------------------------


def test_target_fpr_holds_on_held_out_benign_data(calibrated_v1):
    artifact = calibrated_v1
    assert artifact.benign_scores["count"] == 3000
    assert artifact.benign_scores["above_threshold"] <= 150
    # Score the 2,000 test images, which calibration never saw, with the artifact's detector.
    x_test, _ = load_images()
    flagged = artifact.make_detector(MNIST_V1, device="cpu").score(x_test).flagged
    fpr = flagged.mean()
    # Binomial sampling error of the test estimate and of the calibration quantile, 3 sigma.
    sigma = math.sqrt(0.05 * 0.95 * (1 / len(x_test) + 1 / 3000))
    assert abs(fpr - 0.05) < 3 * sigma, fpr


def test_artifact_round_trip_and_schema(calibrated_v1, tmp_path):
    path = save_artifact(calibrated_v1, tmp_path / ARTIFACT_FILE)
    assert path.stat().st_size < 50_000
    data = json.loads(path.read_text())
    assert data["format_version"] == FORMAT_VERSION and data["kind"] == "sidewatch-calibration"
    assert data["model"] == {"file": "model.onnx", "sha256": model_sha256(MNIST_V1), "input": "input",
                             "output": "probabilities", "output_kind": "probabilities",
                             "input_shape": [None, 1, 28, 28], "classes": 10}
    assert data["squeezers"] == ["bit_depth:1", "median:2"] and data["target_fpr"] == 0.05
    reference = data["reference"]
    assert reference["count"] == 3000
    assert len(reference["regions"]["mean"]) == 49 and len(reference["regions"]["deciles"]) == 49
    assert all(len(d) == 9 for d in reference["regions"]["deciles"])
    assert reference["regions"]["block_rows"] == [4] * 7
    assert sum(reference["predictions"]["counts"]) == 3000
    for key in ("confidence", "entropy", "score"):
        deciles = reference[key]["deciles"]
        assert len(deciles) == 9 and deciles == sorted(deciles)
    assert 0.1 < reference["input"]["mean"] < 0.15      # MNIST: mostly black
    loaded = load_artifact(path, MNIST_V1)
    assert loaded.threshold == calibrated_v1.threshold   # exact, not rounded
    assert loaded.to_dict() == json.loads(json.dumps(calibrated_v1.to_dict()))


def test_artifact_for_another_model_is_refused(calibrated_v1, tmp_path):
    path = save_artifact(calibrated_v1, tmp_path / ARTIFACT_FILE)
    with pytest.raises(CalibrationError) as caught:
        load_artifact(path, MNIST_V2)
    message = str(caught.value)
    assert message.startswith("sidewatch:")
    for part in (str(path), str(MNIST_V2), "'model.onnx'", model_sha256(MNIST_V1), model_sha256(MNIST_V2)):
        assert part in message


def test_bad_artifacts_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CalibrationError, match="sidewatch: cannot read calibration artifact"):
        load_artifact(bad, None)
    bad.write_text(json.dumps({"kind": "sidewatch-calibration", "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CalibrationError, match=f"format_version {FORMAT_VERSION + 1}"):
        load_artifact(bad, None)
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(CalibrationError, match="not a sidewatch calibration artifact"):
        load_artifact(bad, None)


@pytest.mark.parametrize("version", ["1", "2"])
def test_bundled_models_ship_calibrated(version):
    model = MODEL_DIR / version / "model.onnx"
    artifact = load_artifact(model.with_name(ARTIFACT_FILE), model)
    assert artifact.squeezers == ["bit_depth:1", "median:2"] and artifact.target_fpr == 0.05
    # Both detectors: the autoencoder trained on 3,000 reference images, the thresholds set on the other 2,000.
    assert artifact.detector == "feature_squeezing+autoencoder" and not artifact.squeezing_only_format
    assert artifact.split["autoencoder_rows"] == 3000 and artifact.split["calibration_rows"] == 2000
    assert artifact.benign_scores["count"] == 2000 and artifact.benign_scores["above_threshold"] <= 100
    assert artifact.reference["source"] == "mnist_reference.npz" and artifact.reference["count"] == 5000


# --- reference data files ---------------------------------------------------------------------------


def test_load_reference_formats(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", x=images, y=np.arange(5))
    x = load_reference(tmp_path / "x.npz", [None, 1, 28, 28])
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0], images / 255.0, atol=1e-7)
    np.savez(tmp_path / "only.npz", pixels=images.astype(np.float32)[:, None] / 255)
    np.testing.assert_allclose(load_reference(tmp_path / "only.npz", [None, 1, 28, 28]), x, atol=1e-7)
    np.save(tmp_path / "x.npy", images)
    assert load_reference(tmp_path / "x.npy", ["batch", 1, 28, 28]).shape == (5, 1, 28, 28)
    np.savez(tmp_path / "two.npz", a=images, b=images)
    with pytest.raises(CalibrationError, match="holds a, b; put the inputs under key 'x'"):
        load_reference(tmp_path / "two.npz")
    np.save(tmp_path / "int.npy", images.astype(np.int32))
    with pytest.raises(CalibrationError, match="is int32; give uint8"):
        load_reference(tmp_path / "int.npy")
    np.save(tmp_path / "small.npy", images[:, :14])
    with pytest.raises(CalibrationError, match=r"has shape \[5, 14, 28\]; the model wants \[N, 1, 28, 28\]"):
        load_reference(tmp_path / "small.npy", [None, 1, 28, 28])


# --- the command ------------------------------------------------------------------------------------


def test_cli_calibrate_refuses_too_little_data_for_drift(tmp_path, capsys):
    ref = tmp_path / "ref.npy"
    np.save(ref, np.zeros((300, 28, 28), np.uint8))
    assert cli_main(["calibrate", "--model", str(MNIST_V1), "--reference", str(ref), "--device", "cpu",
                     "--out", str(tmp_path / "a.json")]) == 2
    assert capsys.readouterr().err.startswith("sidewatch: the drift detectors need at least 500 reference inputs")
    assert not (tmp_path / "a.json").exists()


def test_cli_calibrate_refuses_the_expected_run_time_flags_with_what_replaced_them(tmp_path, capsys):
    for flag in (["--ert", "500"], ["--drift-window", "100"]):
        assert cli_main(["calibrate", "--model", str(MNIST_V1), "--reference", str(tmp_path / "r.npy"), *flag]) == 2
        assert "drift.false_alarm_budget" in capsys.readouterr().err


def test_cli_calibrate_errors(tmp_path, capsys):
    ref = tmp_path / "ref.npy"
    np.save(ref, np.zeros((4, 28, 28), np.uint8))
    assert cli_main(["calibrate", "--model", str(MNIST_V1), "--reference", str(ref), "--squeezers", "median:1",
                     "--out", str(tmp_path / "a.json")]) == 2
    assert capsys.readouterr().err.startswith("sidewatch: median needs a window size")
    assert cli_main(["calibrate", "--model", str(tmp_path / "missing.onnx"), "--reference", str(ref)]) == 2
    assert capsys.readouterr().err.startswith("sidewatch:")
    assert not (tmp_path / "a.json").exists()

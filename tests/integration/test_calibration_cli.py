"""`sidewatch calibrate` run as a command, end to end. (The calibration itself and the command's errors,
in-process: tests/unit/test_calibration.py.)"""

import shutil
import subprocess
import sys

import numpy as np

from agent.demo.data import MODEL_DIR, REFERENCE
from agent.detect.calibration.artifact import ARTIFACT_FILE, load_artifact

MNIST_V1 = MODEL_DIR / "1" / "model.onnx"


def test_cli_calibrate_end_to_end(tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copy(MNIST_V1, model)
    with np.load(REFERENCE) as data:
        np.savez(tmp_path / "ref.npz", x=data["x"][:300])
    done = subprocess.run([sys.executable, "-m", "agent.cli", "calibrate", "--model", str(model),
                           "--reference", str(tmp_path / "ref.npz"), "--target-fpr", "0.1", "--device", "cpu",
                           "--no-drift", "--detectors", "feature_squeezing"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "threshold" in done.stdout
    artifact = load_artifact(tmp_path / ARTIFACT_FILE, model)
    assert artifact.benign_scores["count"] == 300 and artifact.target_fpr == 0.1
    assert artifact.benign_scores["above_threshold"] <= 30


def test_cli_calibrate_with_the_autoencoder_end_to_end(tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copy(MNIST_V1, model)
    with np.load(REFERENCE) as data:
        np.savez(tmp_path / "ref.npz", x=data["x"][:600])
    done = subprocess.run([sys.executable, "-m", "agent.cli", "calibrate", "--model", str(model),
                           "--reference", str(tmp_path / "ref.npz"), "--target-fpr", "0.1", "--device", "cpu",
                           "--no-drift", "--autoencoder-epochs", "2"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "an autoencoder trained on 360 others" in done.stdout and "set jointly" in done.stdout
    artifact = load_artifact(tmp_path / ARTIFACT_FILE, model)
    assert artifact.detector == "feature_squeezing+autoencoder" and artifact.autoencoder["training"]["epochs"] == 2
    assert artifact.benign_scores["count"] == 240 and artifact.benign_scores["above_threshold"] <= 24

"""`sidewatch calibrate` run as a command, end to end. (The calibration itself and the command's errors,
in-process: tests/unit/test_calibration.py.)"""

import shutil
import subprocess
import sys

import numpy as np

from agent.demo.data import MODEL_DIR, REFERENCE
from agent.detect.calibration.artifact import ARTIFACT_FILE, load_artifact

MNIST_V1 = MODEL_DIR / "1" / "model.onnx"


def _calibrate(tmp_path, rows: int, *flags: str):
    """``sidewatch calibrate`` on a copy of mnist_cnn version 1 and the first ``rows`` reference images; the
    command's result and the artifact it wrote."""
    model = tmp_path / "model.onnx"
    shutil.copy(MNIST_V1, model)
    with np.load(REFERENCE) as data:
        np.savez(tmp_path / "ref.npz", x=data["x"][:rows])
    done = subprocess.run([sys.executable, "-m", "agent.cli", "calibrate", "--model", str(model),
                           "--reference", str(tmp_path / "ref.npz"), "--target-fpr", "0.1", "--device", "cpu",
                           "--no-drift", *flags],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done, load_artifact(tmp_path / ARTIFACT_FILE, model)


def test_cli_calibrate_end_to_end(tmp_path):
    done, artifact = _calibrate(tmp_path, 300, "--detectors", "feature_squeezing")
    assert "threshold" in done.stdout
    assert artifact.benign_scores["count"] == 300 and artifact.target_fpr == 0.1
    assert artifact.benign_scores["above_threshold"] <= 30


def test_cli_calibrate_with_the_autoencoder_end_to_end(tmp_path):
    done, artifact = _calibrate(tmp_path, 600, "--autoencoder-epochs", "2")
    assert "an autoencoder trained on 360 others" in done.stdout and "set jointly" in done.stdout
    assert artifact.detector == "feature_squeezing+autoencoder" and artifact.autoencoder["training"]["epochs"] == 2
    assert artifact.benign_scores["count"] == 240 and artifact.benign_scores["above_threshold"] <= 24

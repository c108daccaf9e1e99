"""Three scikit-learn models trained here, served by a real MLServer on loopback (in its own virtual
environment, .venv-mlserver), for the tests of models sidewatch cannot run itself.

``write_repository(root)`` trains the models (in MLServer's Python, from the reference splits of
tests/support/scenarios.py; a few seconds) and writes an MLServer model repository under ``root/models``:
per model a folder with ``model-settings.json`` (declared inputs and outputs, so ModelMetadata carries names,
datatypes and shapes), ``model.joblib`` and the custom runtime ``sidewatch_sklearn.py``
(tests/support/mlserver_runtime.py). ``start_mlserver(root)`` starts MLServer on free loopback ports.

Models (version "v1" each):

* ``flare``: inputs ``numeric`` FP32 [-1, 6] and ``categorical`` BYTES [-1, 3]; output ``probabilities``
  FP32 [-1, 2] (no C-class flare, a C-class flare). Median imputer + scaler, one-hot (unknown categories
  ignored), logistic regression.
* ``diabetes``: input ``features`` FP32 [-1, 10]; output ``value`` FP32 [-1, 1]. Median imputer + ridge.
* ``topics``: input ``text`` BYTES [-1, 1]; output ``probabilities`` FP32 [-1, 3] (sport, food, computing).
  Hashing vectorizer + logistic regression.

and ``ridge``, diabetes's signature in three versions served side by side, for canary against stable:
``1`` and ``2`` are diabetes's regressor, ``3`` one fitted with its feature columns in reverse order (a
canary whose predictions diverge).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.support import scenarios
from tests.support.harness import REPO, Process, free_port, wait_for_http

MLSERVER_VENV = REPO / ".venv-mlserver"
SUPPORT = Path(__file__).resolve().parent
RUNTIME_MODULE = "sidewatch_sklearn"
VERSION = "v1"

CANARY_MODEL = "ridge"
CANARY_VERSIONS = {"1": "diabetes", "2": "diabetes", "3": "ridge_swapped"}

SIGNATURES: dict[str, dict] = {
    "flare": {"inputs": [("numeric", "FP32", [-1, 6]), ("categorical", "BYTES", [-1, 3])],
              "outputs": [("probabilities", "FP32", [-1, 2])], "method": "predict_proba", "text": False},
    "diabetes": {"inputs": [("features", "FP32", [-1, 10])],
                 "outputs": [("value", "FP32", [-1, 1])], "method": "predict", "text": False},
    "topics": {"inputs": [("text", "BYTES", [-1, 1])],
               "outputs": [("probabilities", "FP32", [-1, 3])], "method": "predict_proba", "text": True},
}


def mlserver_python() -> Path:
    python = MLSERVER_VENV / "bin" / "python"
    if not python.exists():
        raise RuntimeError("MLServer's virtual environment is missing: run `make test`, which builds .venv-mlserver")
    return python


def training_data() -> dict[str, np.ndarray]:
    """The reference splits and their labels, as the arrays tests/support/sklearn_train.py fits on."""
    flare, diabetes, topics = scenarios.flare(), scenarios.diabetes(), scenarios.topics()
    return {
        "flare_numeric": flare.reference["numeric"],
        "flare_categorical": flare.reference["categorical"].astype(bytes).astype(str),
        "flare_labels": flare.labels,
        "diabetes_features": diabetes.reference["features"],
        "diabetes_target": diabetes.labels,
        "topics_text": topics.reference["text"][:, 0].astype(bytes).astype(str),
        "topics_labels": topics.labels,
    }


def _tensors(specs) -> list[dict]:
    return [{"name": name, "datatype": datatype, "shape": shape} for name, datatype, shape in specs]


def _write_model(folder: Path, name: str, version: str, joblib_file: Path, signature: dict) -> None:
    """One model version's folder: the pickle, the runtime and model-settings.json (declared tensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(joblib_file, folder / "model.joblib")
    shutil.copy(SUPPORT / "mlserver_runtime.py", folder / f"{RUNTIME_MODULE}.py")
    (folder / "model-settings.json").write_text(json.dumps({
        "name": name, "implementation": f"{RUNTIME_MODULE}.SklearnTensors",
        "inputs": _tensors(signature["inputs"]), "outputs": _tensors(signature["outputs"]),
        "parameters": {"uri": "./model.joblib", "version": version, "extra": {
            "inputs": [spec[0] for spec in signature["inputs"]], "output": signature["outputs"][0][0],
            "method": signature["method"], "text": signature["text"]}},
    }, indent=1))


def write_repository(root: Path) -> Path:
    """Train the three models and write MLServer's repository under ``root/models``; returns that folder."""
    models = root / "models"
    trained = root / "trained"
    trained.mkdir(parents=True, exist_ok=True)
    np.savez(root / "training.npz", **training_data())
    subprocess.run([str(mlserver_python()), str(SUPPORT / "sklearn_train.py"), str(root / "training.npz"),
                    str(trained)], check=True)
    for name, signature in SIGNATURES.items():
        _write_model(models / name, name, VERSION, trained / f"{name}.joblib", signature)
    for version, trained_name in CANARY_VERSIONS.items():
        _write_model(models / f"{CANARY_MODEL}-{version}", CANARY_MODEL, version, trained / f"{trained_name}.joblib",
                     SIGNATURES["diabetes"])
    return models


@dataclass
class MLServer:
    process: Process
    grpc_port: int
    http_port: int

    def stop(self) -> None:
        self.process.stop()


def start_mlserver(root: Path, models: list[str], timeout: float = 90.0) -> MLServer:
    """Start MLServer on free loopback ports on the repository ``root / "models"`` (written by the caller,
    e.g. by write_repository) and wait until each of ``models`` is ready."""
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    (root / "models" / "settings.json").write_text(json.dumps({
        "grpc_port": grpc_port, "http_port": http_port, "metrics_port": metrics_port,
        "parallel_workers": 0, "host": "127.0.0.1",
    }))
    mlserver_python()
    process = Process([str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(root / "models")], root / "mlserver.log")
    try:
        for name in models:
            wait_for_http(f"http://127.0.0.1:{http_port}/v2/models/{name}/ready", timeout=timeout)
        process.wait_listening(grpc_port)
    except Exception:
        print(process.log()[-3000:])
        process.stop()
        raise
    return MLServer(process, grpc_port, http_port)


def start_sklearn_mlserver(root: Path) -> MLServer:
    """write_repository + start_mlserver: MLServer serving flare, diabetes, topics and ridge's three versions."""
    write_repository(root)
    server = start_mlserver(root, list(SIGNATURES))
    try:
        for version in CANARY_VERSIONS:
            wait_for_http(f"http://127.0.0.1:{server.http_port}/v2/models/{CANARY_MODEL}/versions/{version}/ready",
                          timeout=60)
    except Exception:
        server.stop()
        raise
    return server

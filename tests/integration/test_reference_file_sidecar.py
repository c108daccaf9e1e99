"""Drift watched from a reference file (models.<name>.reference), end to end, for models sidewatch has no file
for: client -> sidewatch serve (no model repository, no calibration artifact) -> a model server.

* A colour-image classifier (tests/support/colour_images.py: 32 x 32 RGB patches of scikit-learn's sample
  photos, logistic regression as ONNX) served by the bundled model server, watched from a ``.npz`` of held-out
  patches: watching from the first request; benign held-out patches keep every flag down; darker patches and
  turned patches (np.rot90) are each flagged by an image detector.
* MLServer's diabetes regressor (tests/support/sklearn_models.py) watched from a CSV of its reference rows'
  inputs only: a unit change is flagged.

Short looks (10 s, clusters of 10 rows) so that each test takes seconds; the budget is the default (1/30d).
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import yaml

from agent.protocol.client import InferenceClient
from tests.support import colour_images, scenarios
from tests.support.drift_watch import text_flags, text_state
from tests.support.harness import http_get, start_model_server, start_sidecar
from tests.support.pacing import send_paced

RATE = 30.0      # requests per second
BATCH = 4        # patches per request: 1,200 patches per 10-s look
IMAGE_DETECTORS = ("inputs_mean", "inputs_shape")
SHORT_LOOKS = {"look_interval_seconds": 10, "slot_seconds": 0.25, "cluster_rows": 10, "min_clusters": 20,
               "export_interval_seconds": 0.5}


def _sidecar(tmp_path, upstream_port: int, model: str, reference):
    config = tmp_path / "sidewatch.yaml"
    config.write_text(yaml.safe_dump({"drift": SHORT_LOOKS, "models": {model: {"reference": str(reference)}}}))
    sidecar, port, metrics_port = start_sidecar(tmp_path, upstream_port, config=config)
    return sidecar, InferenceClient(f"127.0.0.1:{port}"), f"http://127.0.0.1:{metrics_port}/metrics"


@pytest.fixture(scope="module")
def colour_server(tmp_path_factory):
    """The bundled model server serving the colour-patch classifier; yields (port, reference .npz)."""
    root = tmp_path_factory.mktemp("colour")
    repository = colour_images.write_repository(root / "models")
    reference = colour_images.write_reference(root / "reference.npz")
    process, port = start_model_server(root, repository)
    yield port, reference
    process.stop()


def _send_patches(client, patches: np.ndarray):
    def one(i: int) -> None:
        rows = np.arange(i * BATCH, (i + 1) * BATCH) % len(patches)
        client.infer(colour_images.MODEL, {"x": patches[rows]})
    return one


def test_benign_patches_stay_quiet_from_a_reference_file(tmp_path, colour_server):
    port, reference = colour_server
    sidecar, client, url = _sidecar(tmp_path, port, colour_images.MODEL, reference)
    benign, _ = colour_images.split("benign")
    try:
        send_paced(_send_patches(client, benign), RATE, 1)
        text = http_get(url)
        assert text_state(text, colour_images.MODEL) == "watching", text[-2000:]
        send_paced(_send_patches(client, benign[np.random.default_rng(1).permutation(len(benign))]), RATE, 21)
        flags = text_flags(http_get(url), colour_images.MODEL)
        assert set(IMAGE_DETECTORS) <= set(flags) and "probabilities.class_mix" in flags, flags
        assert not any(flags.values()), flags
        assert "fitted the drift baseline of colour_patches" in sidecar.log()
    finally:
        client.close()
        sidecar.stop()


@pytest.mark.parametrize("scenario", sorted(colour_images.DRIFT))
def test_darker_and_turned_patches_are_flagged_by_an_image_detector(tmp_path, colour_server, scenario):
    port, reference = colour_server
    sidecar, client, url = _sidecar(tmp_path, port, colour_images.MODEL, reference)
    benign, _ = colour_images.split("benign")
    drifted = colour_images.DRIFT[scenario](benign[np.random.default_rng(2).permutation(len(benign))])

    def flagged() -> bool:
        return any(text_flags(http_get(url), colour_images.MODEL).get(d) == 1 for d in IMAGE_DETECTORS)

    try:
        send_paced(_send_patches(client, drifted), RATE, 45, until=flagged)
        assert flagged(), text_flags(http_get(url), colour_images.MODEL)
    finally:
        client.close()
        sidecar.stop()


def test_a_regressor_on_mlserver_is_watched_from_a_csv_of_its_inputs(tmp_path, sklearn_mlserver):
    features = scenarios.reference("diabetes")["features"]
    reference = tmp_path / "diabetes.csv"
    with reference.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"features[{k}]" for k in range(features.shape[1])])
        writer.writerows(features.tolist())
    sidecar, client, url = _sidecar(tmp_path, sklearn_mlserver.grpc_port, "diabetes", reference)
    rescaled = scenarios.drift("diabetes", "rescaled", n=2000)["features"]

    def send(rows: np.ndarray):
        def one(i: int) -> None:
            client.infer("diabetes", {"features": rows[i % len(rows):i % len(rows) + 1]})
        return one

    def flagged() -> bool:
        return text_flags(http_get(url), "diabetes").get("features.out_of_range") == 1

    try:
        send_paced(send(rescaled), 60.0, 1)
        assert text_state(http_get(url), "diabetes") == "watching"
        assert "only its inputs are watched" in sidecar.log()
        send_paced(send(rescaled), 60.0, 40, until=flagged)
        flags = text_flags(http_get(url), "diabetes")
        assert flagged(), flags
        assert not any(d.startswith("outputs") for d in flags), flags
    finally:
        client.close()
        sidecar.stop()

"""Shadow, flag and enforce through real gRPC calls: sidecar + bundled model server + calibrated detector."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from agent.demo.data import load_images
from agent.detect.adversarial.watch import SCORE_KEY, VERDICT_KEY
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol.client import InferenceClient
from tests.support.adversarial_data import adversarial_and_benign
from tests.support.harness import http_get, metric_value, start_sidecar

MODEL = "mnist_cnn"


@pytest.fixture(scope="module")
def examples():
    return adversarial_and_benign()


def _sidecar(tmp_path, model_port, mode):
    return start_sidecar(tmp_path, model_port, "--model-repository", str(BUNDLED_REPOSITORY),
                         "--adversarial-mode", mode)


def _metric(metrics_port, name, **labels):
    try:
        return metric_value(http_get(f"http://127.0.0.1:{metrics_port}/metrics"), name, **labels)
    except KeyError:
        return 0.0


def test_flag_mode_puts_the_verdict_in_trailing_metadata(tmp_path, model_server, examples):
    adversarial, benign = examples
    process, port, metrics_port = _sidecar(tmp_path, model_server, "flag")
    client = InferenceClient(f"127.0.0.1:{port}")
    try:
        verdicts = {}
        for name, batch in (("adversarial", adversarial), ("benign", benign)):
            verdicts[name] = []
            for row in batch:
                outputs, _, trailers = client.infer(MODEL, {"input": row[None]}, version="1", timeout=10)
                assert outputs["probabilities"].shape == (1, 10)  # the call itself went through
                trailers = dict(trailers)
                assert float(trailers[SCORE_KEY]) >= 0
                verdicts[name].append(trailers[VERDICT_KEY] == "true")
        assert np.mean(verdicts["adversarial"]) >= 0.8
        assert np.mean(verdicts["benign"]) <= 0.2
        detections = _metric(metrics_port, "sidewatch_adversarial_detections_total", model=MODEL, version="1",
                             mode="flag")
        assert detections == sum(verdicts["adversarial"]) + sum(verdicts["benign"])
    finally:
        client.close()
        process.stop()


def test_enforce_mode_rejects_adversarial_inputs_before_the_model_server(tmp_path, model_server, examples):
    adversarial, benign = examples
    process, port, metrics_port = _sidecar(tmp_path, model_server, "enforce")
    client = InferenceClient(f"127.0.0.1:{port}")
    try:
        rejected = 0
        for row in adversarial:
            try:
                client.infer(MODEL, {"input": row[None]}, version="1", timeout=10)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.details().startswith("sidewatch: input rejected as adversarial (score=")
                assert "threshold=" in err.details()
                rejected += 1
        assert rejected >= 0.8 * len(adversarial)
        outputs, _, trailers = client.infer(MODEL, {"input": benign[:1]}, version="1", timeout=10)
        assert dict(trailers)[VERDICT_KEY] == "false"
        assert _metric(metrics_port, "sidewatch_adversarial_rejected_total", model=MODEL, version="1") == rejected
        # Rejected calls never reached the model server: only the benign call was forwarded upstream.
        assert _metric(metrics_port, "sidewatch_requests_total", model=MODEL, version="1",
                       method="ModelInfer", code="INVALID_ARGUMENT") == rejected
    finally:
        client.close()
        process.stop()


def test_shadow_mode_scores_off_the_hot_path(tmp_path, model_server, examples):
    adversarial, benign = examples
    process, port, metrics_port = _sidecar(tmp_path, model_server, "shadow")
    client = InferenceClient(f"127.0.0.1:{port}")
    try:
        for row in np.concatenate([adversarial, benign]):
            _, _, trailers = client.infer(MODEL, {"input": row[None]}, version="1", timeout=10)
            assert SCORE_KEY not in dict(trailers)
        total = len(adversarial) + len(benign)
        deadline = time.monotonic() + 10
        while _metric(metrics_port, "sidewatch_adversarial_inputs_total", model=MODEL, version="1",
                      mode="shadow") < total:
            assert time.monotonic() < deadline, "shadow detector did not score every input"
            time.sleep(0.05)
        detections = _metric(metrics_port, "sidewatch_adversarial_detections_total", model=MODEL, version="1",
                             mode="shadow")
        assert detections >= 0.8 * len(adversarial)
        assert _metric(metrics_port, "sidewatch_adversarial_threshold", model=MODEL, version="1") > 0
    finally:
        client.close()
        process.stop()


def test_unversioned_requests_use_the_latest_calibrated_version(tmp_path, model_server):
    process, port, metrics_port = _sidecar(tmp_path, model_server, "flag")
    client = InferenceClient(f"127.0.0.1:{port}")
    try:
        _, response, trailers = client.infer(MODEL, {"input": load_images()[0][:1]}, timeout=10)
        assert response.model_version == "2"
        assert VERDICT_KEY in dict(trailers)
        assert _metric(metrics_port, "sidewatch_adversarial_inputs_total", model=MODEL, version="2", mode="flag") == 1
    finally:
        client.close()
        process.stop()


def test_model_whose_hash_does_not_match_its_calibration_is_refused(tmp_path):
    import shutil
    import subprocess

    from tests.support.harness import sidewatch

    repository = tmp_path / "models"
    shutil.copytree(BUNDLED_REPOSITORY, repository)
    # Version 2's model file under version 1's calibration.
    shutil.copy(repository / MODEL / "2" / "model.onnx", repository / MODEL / "1" / "model.onnx")
    done = subprocess.run(sidewatch("serve", "--model-repository", str(repository), "--check-config"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("sidewatch: calibration")
    assert "sha256" in done.stderr and "recalibrate" in done.stderr
    good = subprocess.run(sidewatch("serve", "--model-repository", str(BUNDLED_REPOSITORY), "--check-config"),
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr

"""Shadow, flag and enforce through real gRPC calls: sidecar + bundled model server + calibrated detector,
on both data planes (the grpc.aio relay, and Envoy with its verdict filter: agent/dataplane/envoy/verdicts.py)."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest

from agent.demo.data import load_images
from agent.detect.adversarial.watch import SCORE_KEY, VERDICT_KEY
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol.client import InferenceClient
from tests.support.adversarial_data import adversarial_and_benign
from tests.support.harness import free_port, http_get, metric_value, start_sidecar
from tests.support.upstream import MODEL_INFER, RecordingUpstream

MODEL = "mnist_cnn"
DATA_PLANES = ["python", "envoy"]


@pytest.fixture(scope="module")
def examples():
    return adversarial_and_benign()


@pytest.fixture(params=DATA_PLANES)
def data_plane(request):
    return request.param


def _sidecar(tmp_path, model_port, mode, data_plane="python", config=None):
    return start_sidecar(tmp_path, model_port, "--model-repository", str(BUNDLED_REPOSITORY),
                         "--adversarial-mode", mode, "--data-plane", data_plane, config=config)


def _metric(metrics_port, name, **labels):
    try:
        return metric_value(http_get(f"http://127.0.0.1:{metrics_port}/metrics"), name, **labels)
    except KeyError:
        return 0.0


def _metric_reaches(metrics_port, expected, name, timeout=5.0, **labels):
    deadline = time.monotonic() + timeout
    while _metric(metrics_port, name, **labels) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} {labels}: {_metric(metrics_port, name, **labels)}, not {expected}")
        time.sleep(0.05)
    return True


def test_flag_mode_puts_the_verdict_in_trailing_metadata(tmp_path, model_server, examples, data_plane):
    adversarial, benign = examples
    process, port, metrics_port = _sidecar(tmp_path, model_server, "flag", data_plane)
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


def test_enforce_mode_rejects_adversarial_inputs_before_the_model_server(tmp_path, model_server, examples, data_plane):
    adversarial, benign = examples
    process, port, metrics_port = _sidecar(tmp_path, model_server, "enforce", data_plane)
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
        # (Envoy's access log reaches the metrics a moment after the call: waited for.)
        assert _metric_reaches(metrics_port, rejected, "sidewatch_requests_total", model=MODEL, version="1",
                               method="ModelInfer", code="INVALID_ARGUMENT")
    finally:
        client.close()
        process.stop()


def test_shadow_mode_scores_off_the_hot_path(tmp_path, model_server, examples, data_plane):
    adversarial, benign = examples
    process, port, metrics_port = _sidecar(tmp_path, model_server, "shadow", data_plane)
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


def test_unversioned_requests_use_the_latest_calibrated_version(tmp_path, model_server, data_plane):
    process, port, metrics_port = _sidecar(tmp_path, model_server, "flag", data_plane)
    client = InferenceClient(f"127.0.0.1:{port}")
    try:
        _, response, trailers = client.infer(MODEL, {"input": load_images()[0][:1]}, timeout=10)
        assert response.model_version == "2"
        assert VERDICT_KEY in dict(trailers)
        assert _metric(metrics_port, "sidewatch_adversarial_inputs_total", model=MODEL, version="2", mode="flag") == 1
    finally:
        client.close()
        process.stop()


def _envoy_stat(admin_port: int, name: str) -> int:
    """One of Envoy's counters, from its admin API."""
    for line in http_get(f"http://127.0.0.1:{admin_port}/stats?filter={name}").splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


VERDICT_STREAMS = "http.ingress.ext_proc.sidewatch_verdicts.streams_started"


def _raw_infer(channel, model, rows, version="1"):
    """A ModelInfer call as bytes (the recording upstream answers an empty response): its trailers."""
    request = InferenceClient.request(model, {"input": rows}, version=version).SerializeToString()
    _, call = channel.unary_unary(MODEL_INFER).with_call(request, timeout=10)
    return dict(call.trailing_metadata())


def test_enforce_rejections_never_reach_the_upstream(tmp_path, examples, data_plane):
    adversarial, benign = examples
    with RecordingUpstream() as upstream:
        process, port, _ = _sidecar(tmp_path, upstream.port, "enforce", data_plane)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                rejected = 0
                for row in adversarial:
                    try:
                        _raw_infer(channel, MODEL, row[None])
                    except grpc.RpcError as err:
                        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
                        assert dict(err.trailing_metadata())[VERDICT_KEY] == "true"
                        rejected += 1
                assert rejected >= 0.8 * len(adversarial)
                assert _raw_infer(channel, MODEL, benign[:1])[VERDICT_KEY] == "false"
            # Only the calls that were not rejected reached the upstream.
            assert len([seen for seen in upstream.seen if seen.method == MODEL_INFER]) == len(adversarial) - rejected + 1
        finally:
            process.stop()


def test_only_the_configured_models_pay_for_verdicts(tmp_path, examples, data_plane):
    """Enforce by default, mnist_cnn in shadow mode: its calls never wait for a verdict (under Envoy: they
    never reach the verdict filter), while any other model's calls do."""
    adversarial, _ = examples
    admin_port = free_port()
    config = tmp_path / "sidewatch.json"
    config.write_text(json.dumps({"detection": {"model_repository": str(BUNDLED_REPOSITORY),
                                                "adversarial_mode": "enforce"},
                                  "models": {MODEL: {"adversarial_mode": "shadow"}},
                                  "envoy": {"admin_port": admin_port}}))
    with RecordingUpstream() as upstream:
        process, port, _ = start_sidecar(tmp_path, upstream.port, "--data-plane", data_plane, config=config)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                for row in adversarial[:4]:
                    trailers = _raw_infer(channel, MODEL, row[None])  # adversarial, and not refused: shadow
                    assert VERDICT_KEY not in trailers and SCORE_KEY not in trailers
                    # A client cannot route its call to the verdict filter by sending the Lua filter's header.
                    request = InferenceClient.request(MODEL, {"input": row[None]}, version="1").SerializeToString()
                    _, call = channel.unary_unary(MODEL_INFER).with_call(
                        request, timeout=10, metadata=(("x-sidewatch-inline", "enforce"),))
                    assert VERDICT_KEY not in dict(call.trailing_metadata())
                if data_plane == "envoy":
                    assert _envoy_stat(admin_port, VERDICT_STREAMS) == 0
                # Another model is in enforce mode: judged (no calibration for it: an error verdict, fail open).
                trailers = _raw_infer(channel, "other_model", adversarial[:1])
                assert trailers["sidewatch-adversarial-error"] == "not_calibrated"
                if data_plane == "envoy":
                    assert _envoy_stat(admin_port, VERDICT_STREAMS) == 1
            assert len([seen for seen in upstream.seen if seen.method == MODEL_INFER]) == 9
            if data_plane == "envoy":  # Envoy keeps the name for itself; the grpc.aio relay forwards it
                assert all("x-sidewatch-inline" not in seen.metadata for seen in upstream.seen)
        finally:
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
    assert done.stderr.startswith("sidewatch: detection.model_repository: calibration")
    assert "sha256" in done.stderr and "recalibrate" in done.stderr
    good = subprocess.run(sidewatch("serve", "--model-repository", str(BUNDLED_REPOSITORY), "--check-config"),
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr

"""tritonclient's gRPC client -> sidewatch -> the bundled model server, all real processes on loopback, on both
data planes (the grpc.aio relay and Envoy; the request metrics and the tap are the python data plane's until the
Envoy data plane carries them)."""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from agent.demo.data import load_images
from tests.support.harness import http_get, metric_value, start_sidecar

MODEL = "mnist_cnn"


@pytest.fixture(scope="module", params=["python", "envoy"])
def servers(request, model_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"triton-{request.param}")
    sidecar, sidecar_port, metrics_port = start_sidecar(tmp, model_server, "--data-plane", request.param)
    yield {"model": model_server, "sidecar": sidecar_port, "metrics": metrics_port, "data_plane": request.param}
    sidecar.stop()


@pytest.fixture(scope="module")
def via_sidecar(servers):
    client = triton.InferenceServerClient(f"127.0.0.1:{servers['sidecar']}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def direct(servers):
    client = triton.InferenceServerClient(f"127.0.0.1:{servers['model']}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def images():
    return load_images()[0][:8]


def _infer_input(batch: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return tensor


def test_server_live_and_ready(via_sidecar):
    assert via_sidecar.is_server_live()
    assert via_sidecar.is_server_ready()
    assert via_sidecar.is_model_ready(MODEL)
    assert not via_sidecar.is_model_ready("no_such_model")


def test_model_metadata_matches_direct(via_sidecar, direct):
    through = via_sidecar.get_model_metadata(MODEL, as_json=True)
    assert through == direct.get_model_metadata(MODEL, as_json=True)
    assert through["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    assert through["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert set(through["versions"]) == {"1", "2"}


def test_model_infer_output_equals_direct_call(via_sidecar, direct, images):
    through = via_sidecar.infer(MODEL, [_infer_input(images)], model_version="1", request_id="r-1")
    straight = direct.infer(MODEL, [_infer_input(images)], model_version="1", request_id="r-1")
    np.testing.assert_array_equal(through.as_numpy("probabilities"), straight.as_numpy("probabilities"))
    assert through.get_response().id == "r-1"
    assert through.get_response().model_version == "1"
    probabilities = through.as_numpy("probabilities")
    assert probabilities.shape == (8, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_model_stream_infer(via_sidecar, images):
    results: queue.Queue = queue.Queue()
    via_sidecar.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for index in range(4):
            via_sidecar.async_stream_infer(MODEL, [_infer_input(images[index:index + 1])], request_id=str(index))
        answers = [results.get(timeout=10) for _ in range(4)]
    finally:
        via_sidecar.stop_stream()
    for index, (result, error) in enumerate(answers):
        assert error is None
        assert result.get_response().id == str(index)
        assert result.as_numpy("probabilities").shape == (1, 10)


def test_unknown_model_is_not_found_unchanged(via_sidecar, direct, images):
    errors = []
    for client in (via_sidecar, direct):
        with pytest.raises(InferenceServerException) as raised:
            client.infer("no_such_model", [_infer_input(images[:1])])
        errors.append(raised.value)
    assert errors[0].status() == "StatusCode.NOT_FOUND"
    assert errors[0].message() == errors[1].message()


def test_wrong_shape_is_invalid_argument(via_sidecar):
    with pytest.raises(InferenceServerException) as raised:
        via_sidecar.infer(MODEL, [_infer_input(np.zeros((1, 1, 27, 28), np.float32))])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "shape" in raised.value.message()


def test_deadline_is_enforced(via_sidecar, images):
    # A batch big enough to take longer than a 1 ms deadline on this machine.
    big = np.repeat(images, 256, axis=0)
    with pytest.raises(InferenceServerException) as raised:
        via_sidecar.infer(MODEL, [_infer_input(big)], client_timeout=0.001)
    assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"


def test_metrics_count_requests_and_tap_decodes_them(servers, via_sidecar, images):
    for _ in range(5):
        via_sidecar.infer(MODEL, [_infer_input(images[:2])], model_version="2")
    url = f"http://127.0.0.1:{servers['metrics']}/metrics"

    def counted() -> bool:
        # Envoy's access log reaches sidewatch in batches (every 0.5 s): poll rather than read once.
        text = http_get(url)
        try:
            return metric_value(text, "sidewatch_requests_total", model=MODEL, version="2", method="ModelInfer",
                                code="OK") >= 5 and metric_value(
                text, "sidewatch_request_duration_seconds_count", model=MODEL, version="2", method="ModelInfer") >= 5
        except KeyError:
            return False

    deadline = time.monotonic() + 5
    while not counted():
        assert time.monotonic() < deadline, "the calls were not counted"
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while metric_value(http_get(url), "sidewatch_tap_processed_total", model=MODEL, version="2") < 5:
        assert time.monotonic() < deadline, "the tap did not decode the calls"
        time.sleep(0.05)
    assert metric_value(http_get(url), "sidewatch_tap_dropped_total") == 0


def test_method_the_upstream_lacks_comes_back_unimplemented(via_sidecar, direct):
    # ModelStatistics is a Triton extension: sidewatch relays it as bytes, the bundled server lacks it.
    errors = []
    for client in (via_sidecar, direct):
        with pytest.raises(InferenceServerException) as raised:
            client.get_inference_statistics(MODEL)
        errors.append((raised.value.status(), raised.value.message()))
    assert errors[0] == errors[1]
    assert errors[0][0] == "StatusCode.UNIMPLEMENTED"


def test_health_service_says_the_inference_service_is_serving(servers):
    """Readiness through the sidecar's health service follows the model server's ServerReady (the recording
    upstream of test_dataplane_conformance.py has none, so there it is NOT_SERVING)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{servers['sidecar']}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        deadline = time.monotonic() + 10  # the first poll of the upstream
        while stub.Check(request, timeout=5).status != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "the inference service never became SERVING"
            time.sleep(0.1)

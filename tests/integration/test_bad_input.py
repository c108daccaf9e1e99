"""Bad input through a real sidecar (detectors on, shadow and enforce mode) in front of the real model server.

Every bad input either passes through to the model server unchanged, so the caller gets exactly the
answer the model server gives when called directly, or gets a clear error from sidewatch itself. In
both cases it is counted, and the sidecar goes on serving. Which input gets which:

* sidewatch's own error: a message over ``max_message_bytes`` (RESOURCE_EXHAUSTED, from gRPC before
  any sidewatch code runs).
* everything else passes through: malformed protobuf bytes, wrong datatype, a shape that disagrees with
  the byte length, huge or negative declared shapes, unknown datatypes and tensor names, NaN and Inf,
  empty tensors. In enforce mode, inputs the detector cannot score are forwarded too (fail open) with
  ``sidewatch-adversarial-error`` in the trailers: undecodable, non_finite, detector_failed.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from agent.demo.data import load_images
from agent.detect.adversarial.watch import ERROR_KEY
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol import codec, oip_pb2, paths
from agent.protocol.peek import peek_model
from tests.support.adversarial_data import adversarial_and_benign
from tests.support.answer import Answer
from tests.support.harness import http_get, metric_value, start_sidecar

MODEL = "mnist_cnn"
MAX_MESSAGE_BYTES = 1 << 20


def _request(array: np.ndarray | None = None, datatype: str = "FP32", shape=None, raw: bytes | None = None,
             name: str = "input", model: str = MODEL) -> bytes:
    """A ModelInferRequest whose declared datatype and shape need not match its bytes."""
    request = oip_pb2.ModelInferRequest(model_name=model, model_version="1")
    if array is not None:
        codec.add_input(request, name, array)
        return request.SerializeToString()
    request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    request.raw_input_contents.append(raw if raw is not None else np.zeros((1, 1, 28, 28), np.float32).tobytes())
    return request.SerializeToString()


def _image(value: float = 0.5, rows: int = 1) -> np.ndarray:
    return np.full((rows, 1, 28, 28), value, np.float32)


def _typed_huge_shape() -> bytes:
    request = oip_pb2.ModelInferRequest(model_name=MODEL, model_version="1")
    request.inputs.add(name="input", datatype="FP32", shape=[2**62, 2**62])
    return request.SerializeToString()


DIGIT = load_images()[0][:1]            # a real MNIST digit: benign, OK in every mode
VALID = _request(DIGIT)
half_nan = DIGIT.copy()
half_nan[0, 0, ::2] = np.nan

# name -> (request bytes, rows the detector sees when the model server answers OK)
BAD_INPUTS = {
    "random_bytes": (b"\xff\xfe\x00garbage\x12\x99", 0),
    "truncated_protobuf": (VALID[:-17], 0),
    "empty_message": (b"", 0),
    "wrong_datatype_int64": (_request(np.zeros((1, 1, 28, 28), np.int64)), 0),
    "wrong_datatype_fp64": (_request(np.zeros((1, 1, 28, 28), np.float64)), 0),
    # An attack example as FP64: the model server refuses the datatype, and enforce mode must not
    # answer in its place (the detector does not judge what the model would not take).
    "adversarial_as_fp64": (_request(adversarial_and_benign()[0][:1].astype(np.float64)), 0),
    "bytes_datatype": (_request(datatype="BYTES", shape=[1, 1, 28, 28], raw=b"\x01\x00\x00\x00a"), 0),
    "unknown_datatype": (_request(datatype="FP8", shape=[1, 1, 28, 28]), 0),
    "shape_longer_than_bytes": (_request(shape=[2, 1, 28, 28]), 0),
    "shape_shorter_than_bytes": (_request(shape=[1, 1, 28, 27]), 0),
    "same_bytes_wrong_shape": (_request(shape=[1, 1, 14, 56]), 0),
    "negative_dimension": (_request(shape=[-1, 1, 28, 28]), 0),
    "huge_declared_shape": (_request(shape=[2**40, 1, 28, 28]), 0),
    "huge_shape_no_data": (_typed_huge_shape(), 0),
    "unknown_input_name": (_request(name="pixels", shape=[1, 1, 28, 28]), 0),
    "unknown_model": (_request(_image(), model="no-such-model"), 0),
    "all_nan": (_request(_image(np.nan)), 1),
    "all_inf": (_request(_image(np.inf)), 1),
    "some_nan": (_request(half_nan), 1),
    "empty_batch": (_request(np.zeros((0, 1, 28, 28), np.float32)), 0),
}
NON_FINITE_ROWS = 3   # all_nan, all_inf, some_nan
# Numeric inputs of the model's shape in another datatype than its FP32: not judged inline.
WRONG_DATATYPE = ("wrong_datatype_int64", "wrong_datatype_fp64", "adversarial_as_fp64")


@pytest.fixture(scope="module", params=["shadow", "enforce"])
def sidecar(request, model_server, tmp_path_factory):
    process, port, metrics_port = start_sidecar(
        tmp_path_factory.mktemp(f"sidecar-{request.param}"), model_server, "--model-repository", str(BUNDLED_REPOSITORY),
        "--adversarial-mode", request.param, "--max-message-bytes", str(MAX_MESSAGE_BYTES))
    yield request.param, process, port, metrics_port
    process.stop()


def _metrics(metrics_port: int) -> str:
    return http_get(f"http://127.0.0.1:{metrics_port}/metrics")


def _value(metrics: str, name: str, **labels) -> float:
    try:
        return metric_value(metrics, name, **labels)
    except KeyError:
        return 0.0


def test_bad_inputs_pass_through_unchanged_are_counted_and_the_sidecar_goes_on(sidecar, model_server):
    mode, process, port, metrics_port = sidecar
    before = _metrics(metrics_port)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as through, \
            grpc.insecure_channel(f"127.0.0.1:{model_server}") as direct:
        expected_codes: dict[str, int] = {}
        for name, (request, _) in BAD_INPUTS.items():
            want = Answer.of(direct, request)
            got = Answer.of(through, request)
            assert (got.code, got.details, got.response) == (want.code, want.details, want.response), name
            expected_codes[want.code.name] = expected_codes.get(want.code.name, 0) + 1
            if mode == "enforce" and got.code is grpc.StatusCode.OK:
                if name in ("all_nan", "all_inf", "some_nan"):
                    assert got.trailers[ERROR_KEY] == "non_finite", name
        # And then a good call: nothing wedged.
        assert Answer.of(through, VALID).code is grpc.StatusCode.OK
        expected_codes["OK"] += 1

    wait = time.monotonic() + 10
    while time.monotonic() < wait:   # shadow mode scores copies a little later
        after = _metrics(metrics_port)
        if _value(after, "sidewatch_tap_queue_depth") == 0 and (
                mode != "shadow" or _value(after, "sidewatch_detector_errors_total", reason="non_finite") >= NON_FINITE_ROWS):
            break
        time.sleep(0.1)

    def counted(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    # Every call counted under the status the caller got; errors as upstream errors too.
    for code, count in expected_codes.items():
        assert counted("sidewatch_requests_total", method="ModelInfer", code=code) == count, code
        if code != "OK":
            assert counted("sidewatch_upstream_errors_total", method="ModelInfer", code=code) == count, code
    # What the detectors could not take is counted by reason; none of it broke a detector.
    assert counted("sidewatch_detector_errors_total", reason="non_finite") == NON_FINITE_ROWS
    assert _value(after, "sidewatch_tap_sink_errors_total") == 0
    assert _value(after, "sidewatch_tap_sink_timeouts_total") == 0
    assert np.isfinite(_value(after, "sidewatch_adversarial_score_sum"))
    if mode == "enforce":
        undecodable = [name for name, (request, _) in BAD_INPUTS.items() if not _decodes(request)]
        assert counted("sidewatch_detector_errors_total", reason="undecodable") == len(undecodable)
        assert counted("sidewatch_detector_errors_total", reason="wrong_datatype") == len(WRONG_DATATYPE)
    else:
        assert counted("sidewatch_drift_skipped_total", reason="non_finite") == NON_FINITE_ROWS
    assert _value(after, "sidewatch_requests_in_flight") == 0
    assert process.popen.poll() is None


def _decodes(request: bytes) -> bool:
    """Whether sidewatch's codec reads a request's tensors (those it cannot are forwarded unscored)."""
    if peek_model(request)[0] != MODEL:
        return True          # not a calibrated model: not scored at all, so never "undecodable"
    try:
        codec.decode_request(oip_pb2.ModelInferRequest.FromString(request))
        return True
    except Exception:  # noqa: BLE001 - DecodeError or CodecError: either way not decodable
        return False


def test_oversized_messages_get_resource_exhausted_from_sidewatch(sidecar):
    mode, process, port, metrics_port = sidecar
    oversized = _request(_image(rows=MAX_MESSAGE_BYTES // (28 * 28 * 4) + 1))
    assert len(oversized) > MAX_MESSAGE_BYTES
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        for _ in range(3):
            answer = Answer.of(channel, oversized)
            assert answer.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in answer.details
        stream = channel.stream_stream(paths.MODEL_STREAM_INFER)
        with pytest.raises(grpc.RpcError) as raised:
            list(stream(iter([VALID, oversized]), timeout=10))
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert Answer.of(channel, VALID).code is grpc.StatusCode.OK
    assert process.popen.poll() is None


def test_bad_messages_on_a_stream_pass_through_and_the_stream_goes_on(sidecar, model_server):
    mode, process, port, metrics_port = sidecar
    messages = [request for request, _ in BAD_INPUTS.values()] + [VALID]

    def replies(channel):
        call = channel.stream_stream(paths.MODEL_STREAM_INFER)(iter(messages), timeout=30)
        try:
            return [bytes(reply) for reply in call], grpc.StatusCode.OK
        except grpc.RpcError as err:
            return None, err.code()

    with grpc.insecure_channel(f"127.0.0.1:{port}") as through, \
            grpc.insecure_channel(f"127.0.0.1:{model_server}") as direct:
        assert replies(through) == replies(direct)
        assert Answer.of(through, VALID).code is grpc.StatusCode.OK
    assert process.popen.poll() is None

"""Fuzzing a running sidecar over gRPC: bad ModelInfer requests (tests/support/fuzz_inputs.py) through a real
sidecar in shadow and in enforce mode (which decodes and scores requests on the hot path), in front of the
real model server.

For every input: the call ends (no hang: a status before its deadline), and its answer is exactly what the
model server answers when called directly, except for sidewatch's own verdicts in enforce mode. At the end
the sidecar is alive, nothing is in flight, no detector raised, and a good call still goes through.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families

from agent.modelserver.repository import BUNDLED_REPOSITORY
from tests.support.answer import Answer
from tests.support.fuzz_inputs import requests, valid_request
from tests.support.harness import http_get, start_model_server, start_sidecar

EXAMPLES = 300   # per mode
REJECTED = "sidewatch: input rejected as adversarial"
TRIED = {"shadow": 0, "enforce": 0}   # inputs sent, per mode (hypothesis skips the ones it has tried)


def total(metrics: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples; a real exposition parser, since fuzzed model names end up in labels
    with quotes, commas and newlines (escaped)."""
    return sum(sample.value for family in text_string_to_metric_families(metrics) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    process, port = start_model_server(tmp_path_factory.mktemp("model-server"))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield port, channel
    process.stop()


@pytest.fixture(scope="module", params=["shadow", "enforce"])
def sidecar(request, model_server, tmp_path_factory):
    process, port, metrics_port = start_sidecar(
        tmp_path_factory.mktemp(f"sidecar-{request.param}"), model_server[0],
        "--model-repository", str(BUNDLED_REPOSITORY), "--adversarial-mode", request.param)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield request.param, process, channel, metrics_port
    process.stop()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests())
def test_fuzzed_requests_get_the_model_servers_answer_and_never_hang(sidecar, model_server, request):
    mode, process, channel, _ = sidecar
    TRIED[mode] += 1
    got = Answer.of(channel, request)
    want = Answer.of(model_server[1], request)
    assert got.code is not grpc.StatusCode.DEADLINE_EXCEEDED
    if mode == "enforce" and got.details.startswith(REJECTED):
        assert got.code is grpc.StatusCode.INVALID_ARGUMENT and want.code is grpc.StatusCode.OK
    else:
        assert (got.code, got.details, got.response) == (want.code, want.details, want.response)
    assert process.popen.poll() is None


def test_after_the_fuzzing_the_sidecar_is_sound(sidecar):
    mode, process, channel, metrics_port = sidecar
    assert Answer.of(channel, valid_request().SerializeToString()).code is grpc.StatusCode.OK
    metrics = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert total(metrics, "sidewatch_requests_in_flight") == 0
    assert TRIED[mode] > EXAMPLES // 2
    assert total(metrics, "sidewatch_requests_total", method="ModelInfer") == TRIED[mode] + 1
    assert total(metrics, "sidewatch_tap_sink_errors_total") == 0      # no detector ever raised
    assert process.popen.poll() is None
    assert "Traceback" not in process.log()

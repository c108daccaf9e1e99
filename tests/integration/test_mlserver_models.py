"""client -> sidewatch -> MLServer serving three scikit-learn models trained here (tests/support/sklearn_models.py):
a tabular classifier with numeric and categorical inputs (flare), a regressor (diabetes) and a text classifier
with a BYTES input (topics). sidewatch is given no model file and no repository: it relays and taps.

Checks: benign traffic of each model (the held-out split of tests/support/scenarios.py) is answered through the
sidecar exactly as MLServer answers it directly (the serialized responses are equal), and the tap decodes every
copy; the drift scenarios' traffic is served and decoded too (MLServer's pipelines impute NaN and ignore unknown
categories); bad inputs get MLServer's own gRPC error, unchanged, are counted by status code, never reach the
tap, and the sidecar goes on serving.
"""

from __future__ import annotations

import grpc
import pytest
import tritonclient.grpc as triton

from agent.protocol import paths
from agent.protocol.client import InferenceClient
from tests.support import scenarios
from tests.support.harness import http_get, metric_value, start_sidecar
from tests.support.polling import wait_for
from tests.support.sklearn_models import SIGNATURES

BATCH = 16


@pytest.fixture(scope="module")
def sidecar(sklearn_mlserver, tmp_path_factory):
    process, port, metrics_port = start_sidecar(tmp_path_factory.mktemp("sidecar"), sklearn_mlserver.grpc_port)
    yield port, metrics_port
    process.stop()


@pytest.fixture(scope="module")
def calls(sidecar, sklearn_mlserver):
    """Raw-bytes ModelInfer callables: (through the sidecar, direct to MLServer)."""
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in (sidecar[0], sklearn_mlserver.grpc_port)]
    yield tuple(channel.unary_unary(paths.MODEL_INFER) for channel in channels)
    for channel in channels:
        channel.close()


def metrics(sidecar) -> str:
    return http_get(f"http://127.0.0.1:{sidecar[1]}/metrics")


def counter(text: str, name: str, **labels: str) -> float:
    try:
        return metric_value(text, name, **labels)
    except KeyError:
        return 0.0


def _send(calls, model: str, tensors: dict, tag: str) -> int:
    through, direct = calls
    sent = 0
    for i, batch in enumerate(scenarios.batches(tensors, BATCH)):
        request = InferenceClient.request(model, batch)
        request.id = f"{tag}-{i}"
        body = request.SerializeToString()
        assert through(body, timeout=20) == direct(body, timeout=20), f"{model} {tag} request {i}"
        sent += 1
    return sent


def _processed(sidecar, model: str) -> float:
    return counter(metrics(sidecar), "sidewatch_tap_processed_total", model=model)


def test_metadata_declares_the_tensors(sidecar, sklearn_mlserver):
    through = triton.InferenceServerClient(f"127.0.0.1:{sidecar[0]}")
    direct = triton.InferenceServerClient(f"127.0.0.1:{sklearn_mlserver.grpc_port}")
    try:
        for model, signature in SIGNATURES.items():
            metadata = through.get_model_metadata(model, as_json=True)
            assert metadata == direct.get_model_metadata(model, as_json=True)
            assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]] == \
                [(n, d, s) for n, d, s in signature["inputs"]]
            assert [t["name"] for t in metadata["outputs"]] == [n for n, _, _ in signature["outputs"]]
    finally:
        through.close()
        direct.close()


@pytest.mark.parametrize("model", scenarios.MODELS)
def test_benign_and_drift_traffic_pass_through_and_are_decoded(sidecar, calls, model):
    before = _processed(sidecar, model)
    sent = _send(calls, model, scenarios.benign(model), "benign")
    for name in scenarios.DRIFT[model]:
        sent += _send(calls, model, scenarios.drift(model, name, n=4 * BATCH, seed=1), name)
    wait_for(lambda: _processed(sidecar, model) - before == sent, f"the tap decoded {model}'s {sent} calls", timeout=20)
    text = metrics(sidecar)
    assert counter(text, "sidewatch_decode_errors_total") == 0
    assert counter(text, "sidewatch_tap_dropped_total") == 0
    assert counter(text, "sidewatch_requests_total", model=model, code="OK") >= sent


def test_bad_inputs_get_mlservers_error_are_counted_and_never_tapped(sidecar, calls):
    through, direct = calls
    errors: dict[tuple[str, str], int] = {}
    passed = []
    before = metrics(sidecar)
    tapped_before = {model: _processed(sidecar, model) for model in scenarios.MODELS}
    for model in scenarios.MODELS:
        for name, body in scenarios.bad_requests(model).items():
            answers = []
            for call in (through, direct):
                try:
                    answers.append(("OK", call(body, timeout=20)))
                except grpc.RpcError as err:
                    answers.append((err.code().name, err.details()))
            assert answers[0] == answers[1], f"{model} {name}"
            if answers[0][0] == "OK":
                passed.append((model, name))
            else:
                errors[model, answers[0][0]] = errors.get((model, answers[0][0]), 0) + 1
    # NaN rows are imputed by the diabetes pipeline: served; everything else is refused by MLServer.
    assert passed == [("diabetes", "nan_rows")]
    assert {code for _, code in errors} == {"INVALID_ARGUMENT", "INTERNAL"}
    wait_for(lambda: _processed(sidecar, "diabetes") == tapped_before["diabetes"] + 1,
             "the served NaN call was tapped", timeout=10)
    after = metrics(sidecar)
    for (model, code), count in errors.items():
        for name in ("sidewatch_requests_total", "sidewatch_upstream_errors_total"):
            moved = counter(after, name, model=model, code=code) - counter(before, name, model=model, code=code)
            assert moved == count, (name, model, code)
    assert {model: _processed(sidecar, model) for model in ("flare", "topics")} == \
        {model: tapped_before[model] for model in ("flare", "topics")}         # refused calls never reach the tap
    assert counter(after, "sidewatch_decode_errors_total") == 0
    good = InferenceClient.request("topics", {"text": scenarios.benign("topics")["text"][:2]}).SerializeToString()
    assert through(good, timeout=20) == direct(good, timeout=20)               # still serving

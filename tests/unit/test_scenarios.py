"""The traffic of tests/support/scenarios.py does what it says, judged by agent.detect.features and the
MomentTest (as in tests/unit/test_feature_kinds.py): each model's held-out benign split is not rejected at
alpha 1e-7 against its reference split, and each drift scenario is rejected on the feature one would expect
(scenarios.EXPECTED). Outputs come from the same pipelines MLServer serves (tests/support/sklearn_train.py),
fitted here in-process. Bad requests are what they claim. No processes."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from agent.detect.features import CategoricalFeatures, ClassifierOutput, NumericFeatures, TextFeatures, ValueOutput
from agent.protocol import codec, oip_pb2
from tests.support import scenarios
from tests.support.moment_checks import rejected_features
from tests.support.sklearn_models import training_data
from tests.support.sklearn_train import fit_all


def rejected(reference_block, live_block, min_effect=0.2):
    return rejected_features(reference_block, live_block, min_effect)


@functools.cache
def models():
    return fit_all(training_data())


def _predict(model: str, tensors: dict[str, np.ndarray]) -> np.ndarray:
    pipeline = models()[model]
    if model == "flare":
        x = np.hstack([tensors["numeric"].astype(object), tensors["categorical"].astype(bytes).astype(str)])
        return pipeline.predict_proba(x)
    if model == "topics":
        return pipeline.predict_proba([t.decode() for t in tensors["text"][:, 0]])
    return pipeline.predict(tensors["features"])


def features(model: str) -> dict:
    """tensor -> (features fitted on the reference, a function from request tensors to that tensor's values)."""
    ref = scenarios.reference(model)
    out = _predict(model, ref)
    if model == "flare":
        return {"numeric": (NumericFeatures(columns=scenarios.FLARE_NUMERIC).fit(ref["numeric"]), None),
                "categorical": (CategoricalFeatures(top_k=6, columns=scenarios.FLARE_CATEGORICAL)
                                .fit(ref["categorical"]), None),
                "probabilities": (ClassifierOutput().fit(out), "output")}
    if model == "diabetes":
        return {"features": (NumericFeatures(columns=scenarios.DIABETES_COLUMNS).fit(ref["features"]), None),
                "value": (ValueOutput().fit(out), "output")}
    return {"text": (TextFeatures().fit(ref["text"][:, 0]), None),
            "probabilities": (ClassifierOutput().fit(out), "output")}


def _values(model, tensor, role, tensors):
    if role == "output":
        return _predict(model, tensors)
    values = tensors[tensor]
    return values[:, 0] if tensor == "text" else values


def verdicts(model: str, tensors: dict[str, np.ndarray]) -> dict[str, tuple[str, ...]]:
    ref = scenarios.reference(model)
    out = {}
    for tensor, (extractor, role) in features(model).items():
        reference = extractor.transform(_values(model, tensor, role, ref))
        out[tensor] = rejected(reference, extractor.transform(_values(model, tensor, role, tensors)))
    return out


@pytest.mark.parametrize("model", scenarios.MODELS)
def test_benign_held_out_traffic_is_not_rejected(model):
    held = scenarios.benign(model)
    assert len(next(iter(held.values()))) >= 150
    assert verdicts(model, held) == {tensor: () for tensor in features(model)}


@pytest.mark.parametrize("model, scenario", [(m, s) for m in scenarios.MODELS for s in scenarios.DRIFT[m]])
def test_each_drift_scenario_is_rejected_on_its_feature(model, scenario):
    traffic = scenarios.drift(model, scenario)
    assert all(len(array) == 1500 for array in traffic.values())
    found = verdicts(model, traffic)
    for tensor, names in scenarios.EXPECTED[model][scenario]:
        assert names & set(found[tensor]), (tensor, names, found)


def test_scenarios_are_deterministic_and_keep_the_request_layout():
    for model in scenarios.MODELS:
        benign = scenarios.benign(model)
        for name in scenarios.DRIFT[model]:
            a, b = scenarios.drift(model, name, n=50, seed=3), scenarios.drift(model, name, n=50, seed=3)
            assert list(a) == list(benign)
            for tensor in a:
                assert a[tensor].dtype == benign[tensor].dtype and a[tensor].shape[1:] == benign[tensor].shape[1:]
                assert np.array_equal(a[tensor], b[tensor], equal_nan=True) if a[tensor].dtype != object \
                    else a[tensor].tolist() == b[tensor].tolist()
    assert b"F" not in set(scenarios.reference("flare")["categorical"][:, 0])
    assert b"F" in set(scenarios.drift("flare", "new_category")["categorical"][:, 0])


def test_bad_requests_are_what_they_say():
    flare = scenarios.bad_requests("flare")
    with pytest.raises(codec.CodecError):
        codec.decode_request(oip_pb2.ModelInferRequest.FromString(flare["ragged_bytes"]))
    with pytest.raises(codec.CodecError):
        codec.decode_request(oip_pb2.ModelInferRequest.FromString(scenarios.bad_requests("topics")["ragged_bytes"]))
    decoded = codec.decode_request(oip_pb2.ModelInferRequest.FromString(flare["strings_for_numbers"]))
    assert decoded["numeric"].dtype == object
    assert list(codec.decode_request(oip_pb2.ModelInferRequest.FromString(flare["missing_input"]))) == ["numeric"]
    diabetes = scenarios.bad_requests("diabetes")
    assert np.isnan(codec.decode_request(oip_pb2.ModelInferRequest.FromString(diabetes["nan_rows"]))["features"]).all()
    assert codec.decode_request(oip_pb2.ModelInferRequest.FromString(diabetes["wrong_columns"]))["features"].shape \
        == (4, 9)

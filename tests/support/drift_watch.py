"""What the drift-watch tests share: a simulated clock, tapped copies as the tap hands them over, and the
drift flags and baseline states read back from a registry or from a scraped /metrics page."""

from __future__ import annotations

import numpy as np

from agent.dataplane.tap import TappedInference
from agent.protocol import codec, oip_pb2

START = 1_800_000_000.0


class Clock:
    """A wall clock the test moves (``clock.now += seconds``)."""

    def __init__(self, start: float = START) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def tapped(model: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], version: str = "",
           answered: str = "v1") -> TappedInference:
    """A tapped copy: the request (naming ``version``, "" for none) and the response (answered by ``answered``)
    as protos, and their decoded tensors."""
    request = oip_pb2.ModelInferRequest(model_name=model, model_version=version)
    for name, array in inputs.items():
        codec.add_input(request, name, array)
    response = oip_pb2.ModelInferResponse(model_name=model, model_version=answered)
    for name, array in outputs.items():
        codec.add_output(response, name, array)
    return TappedInference(model, version, codec.decode_request(request), codec.decode_response(response), request,
                           response, 0.0, 0.0)


def registry_flags(registry, **labels: str) -> dict[str, float]:
    """Held flags by detector (``feature="all"``) of the series matching ``labels``, from a registry."""
    return {s.labels["detector"]: s.value for family in registry.collect() if family.name == "sidewatch_drift_detected"
            for s in family.samples if s.labels["feature"] == "all"
            and all(s.labels.get(k) == v for k, v in labels.items())}


def _labels(line: str) -> dict[str, str]:
    inside = line[line.index("{") + 1:line.rindex("}")]
    return {k: v.strip('"') for k, v in (part.split("=", 1) for part in inside.split('",') if "=" in part)}


def text_flags(text: str, model: str, feature: str | None = "all") -> dict[str, float]:
    """Held flags of ``model`` in a /metrics page: by detector (``feature="all"``), or by feature (None)."""
    flags = {}
    for line in text.splitlines():
        if not line.startswith("sidewatch_drift_detected{"):
            continue
        labels = _labels(line)
        if labels.get("model") != model:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if feature is None and labels["feature"] != "all":
            flags[labels["feature"]] = value
        elif labels["feature"] == feature:
            flags[labels["detector"]] = value
    return flags


def text_state(text: str, model: str) -> str | None:
    """The baseline state of ``model`` in a /metrics page (the one at 1), or None."""
    for line in text.splitlines():
        if line.startswith("sidewatch_drift_baseline_state{") and line.endswith(" 1.0") \
                and _labels(line).get("model") == model:
            return _labels(line)["state"]
    return None

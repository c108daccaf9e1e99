"""Tap records (copies of calls) for tests of the tap and of what sits behind it."""

from __future__ import annotations

import time

import numpy as np

from agent.dataplane.tap import TapRecord
from agent.protocol import codec, oip_pb2


def tap_record(method="ModelInfer", request=None, response=None) -> TapRecord:
    """A copy of one call as the data plane hands it to the tap: by default a small valid request and response
    (input "x" [2, 3] FP32, output "y" [[0.25, 0.75]]) of model "m" version "1"; ``request`` and ``response``
    replace their bytes."""
    if request is None:
        req = oip_pb2.ModelInferRequest(model_name="m", model_version="1")
        codec.add_input(req, "x", np.arange(6, dtype=np.float32).reshape(2, 3))
        request = req.SerializeToString()
    if response is None:
        resp = oip_pb2.ModelInferResponse(model_name="m", model_version="1")
        codec.add_output(resp, "y", np.array([[0.25, 0.75]], dtype=np.float32))
        response = resp.SerializeToString()
        if method == "ModelStreamInfer":
            response = oip_pb2.ModelStreamInferResponse(infer_response=resp).SerializeToString()
    return TapRecord(method, "m", "1", request, response, time.time(), 0.001)

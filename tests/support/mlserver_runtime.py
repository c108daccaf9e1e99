"""A custom MLServer runtime for the scikit-learn pipelines of tests/support/sklearn_models.py.

Copied into each model's folder of the MLServer repository (MLServer imports it from there, in its own
virtual environment: it imports only mlserver, numpy and joblib). Why not mlserver-sklearn's runtime: it
takes one input, or a pandas DataFrame built from several only when the request carries content_type
parameters; a platform team serving a mixed table as two tensors (FP32 numbers and BYTES categories) and
text as a BYTES tensor writes a runtime like this one.

``parameters.extra`` in model-settings.json says how to read the request:
``{"inputs": [names, in the pipeline's column order], "text": bool, "method": "predict_proba"|"predict",
"output": name}``. A BYTES tensor is decoded as UTF-8 (invalid bytes are an error). Anything the pipeline
refuses (wrong shape, strings where numbers go, Inf) raises, and MLServer answers with a gRPC error.
"""

import joblib
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceResponse
from mlserver.utils import get_model_uri


class BadRequest(MLServerError):
    def __init__(self, message: str):
        super().__init__(message, status_code=400)


def _strings(tensor) -> np.ndarray:
    """A BYTES tensor as an object array of str in its declared shape. (NumpyCodec reads BYTES as fixed-width
    elements, which fails on strings of different lengths.)"""
    items = list(getattr(tensor.data, "root", tensor.data))
    if len(items) != int(np.prod(tensor.shape)):
        raise BadRequest(f"input {tensor.name!r}: {len(items)} elements for shape {list(tensor.shape)}")
    try:
        texts = [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in items]
    except UnicodeDecodeError as err:
        raise BadRequest(f"input {tensor.name!r}: not UTF-8: {err}") from None
    out = np.empty(len(texts), dtype=object)
    out[:] = texts
    return out.reshape(tensor.shape)


class SklearnTensors(MLModel):
    async def load(self) -> bool:
        self._model = joblib.load(await get_model_uri(self._settings))
        self._extra = dict(self._settings.parameters.extra or {})
        return True

    async def predict(self, payload):
        by_name = {tensor.name: tensor for tensor in payload.inputs}
        arrays = []
        for name in self._extra["inputs"]:
            if name not in by_name:
                raise BadRequest(f"missing input {name!r}")
            tensor = by_name[name]
            if tensor.datatype == "BYTES":
                values = _strings(tensor)
            else:
                values = NumpyCodec.decode_input(tensor)
            if tensor.datatype != "BYTES" and values.dtype.kind not in "fiu":
                raise BadRequest(f"input {name!r}: expected numbers, got {tensor.datatype}")
            arrays.append(values)
        try:
            if self._extra.get("text"):
                (values,) = arrays
                if values.ndim == 2 and values.shape[1] == 1:
                    values = values[:, 0]
                if values.ndim != 1:
                    raise BadRequest(f"text: expected shape [N] or [N, 1], got {list(values.shape)}")
                x = list(values)
            elif len(arrays) == 1:
                x = arrays[0]
            else:
                if any(a.ndim != 2 or len(a) != len(arrays[0]) for a in arrays):
                    raise BadRequest("inputs must be [N, F] with the same N")
                x = np.hstack([a.astype(object) for a in arrays])
            out = np.asarray(getattr(self._model, self._extra["method"])(x), dtype=np.float32)
        except BadRequest:
            raise
        except (ValueError, TypeError, IndexError) as err:
            raise BadRequest(f"{type(err).__name__}: {err}") from None
        if out.ndim == 1:
            out = out[:, None]
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(self._extra["output"], out)])

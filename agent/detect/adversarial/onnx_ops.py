"""Writing ONNX nodes in the form the model's opset wants: the fused detection graph's builder."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


class Builder:
    """Appends nodes and constants, writing each op in the form the model's opset wants."""

    def __init__(self, opset: int, prefix: str = "sidewatch/"):
        self.opset = opset
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def const(self, value, dtype, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, values: Iterable[int]) -> str:
        return self.const(list(values), np.int64, "ints")

    def op(self, op_type: str, inputs: list[str], n_outputs: int = 1, outputs: list[str] | None = None,
           **attrs) -> str | list[str]:
        outputs = outputs or [self.fresh(op_type.lower()) for _ in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.fresh(op_type), **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    # Ops whose axes moved from an attribute to an input: Unsqueeze/Squeeze/ReduceSum at 13, other Reduce* at 18.
    def unsqueeze(self, x: str, axes: list[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.ints(axes)])
        return self.op("Unsqueeze", [x], axes=axes)

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int, output: str | None = None) -> str:
        outputs = [output] if output else None
        moved_at = 13 if op_type == "ReduceSum" else 18
        if self.opset >= moved_at:
            return self.op(op_type, [x, self.ints(axes)], outputs=outputs, keepdims=keepdims)
        return self.op(op_type, [x], outputs=outputs, axes=axes, keepdims=keepdims)

    def slice(self, x: str, starts: list[int], ends: list[int], axes: list[int], steps: list[int] | None = None) -> str:
        inputs = [x, self.ints(starts), self.ints(ends), self.ints(axes)]
        if steps is not None:
            inputs.append(self.ints(steps))
        return self.op("Slice", inputs)

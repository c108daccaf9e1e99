"""Which model a call names, known before Envoy routes it: Envoy's gRPC field extraction filter.

Envoy chooses a call's route from its headers, and the model name of an Open Inference Protocol call is in
its body. The Lua filter's peek (model_peek.lua) reads the first body chunk only after the headers have
gone on (its headers can then no longer change), which is enough for metrics but too late to route. The
``envoy.filters.http.grpc_field_extraction`` filter holds the headers until the first request message is
whole, then leaves its ``model_name`` (``name`` for ModelMetadata and ModelReady) in dynamic metadata,
where the Lua filter, next in the chain, reads it while the headers can still change (pins.py).

The cost: each call of the four model-scoped methods waits for its first request message to arrive whole
before Envoy sends it upstream (the rest of a stream is not held; other methods pass at once). The filter
holds at most the call's buffer limit, the listener's 1 MiB unless its route says otherwise, and refuses a
larger first message (FAILED_PRECONDITION): :func:`hold_first_messages` gives the model-scoped methods
routes of their own whose limit is ``max_message_bytes`` and its frame header, the largest message the
sidecar accepts, as the grpc.aio relay holds one. The filter cannot be enabled per route (Envoy 1.40
refuses route-specific configuration for it, an empty one included), so it runs whether or not a model is
pinned; the Lua filter acts on its result only while one is. It is in the chain only when the config has
a route hook (plane.py, ``pins_possible``); switching its configuration through ECDS while a pin holds
would confine the cost to pins.

The filter needs the service's descriptors. sidewatch's compiled proto has its own package
(``sidewatch.oip``); the descriptor given to Envoy is the same file moved to the wire's package,
``inference``, so that Envoy finds ``inference.GRPCInferenceService``.

>>> f = field_extraction_filter()
>>> sorted(f["typed_config"]["extractions_by_method"])[0]
'inference.GRPCInferenceService.ModelInfer'
"""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf import descriptor_pb2

from agent.dataplane.envoy.bootstrap import upstream_route
from agent.dataplane.envoy.frames import HEADER_BYTES
from agent.protocol import oip_pb2, paths

FILTER = "envoy.filters.http.grpc_field_extraction"
CONFIG = "type.googleapis.com/envoy.extensions.filters.http.grpc_field_extraction.v3.GrpcFieldExtractionConfig"
WIRE_PACKAGE = "inference"
# The field that names the model, by method.
MODEL_FIELDS = {"ModelInfer": "model_name", "ModelStreamInfer": "model_name", "ModelMetadata": "name",
                "ModelReady": "name"}


def wire_descriptor_set() -> bytes:
    """A FileDescriptorSet of the Open Inference Protocol under its wire package (module docstring)."""
    file = descriptor_pb2.FileDescriptorProto()
    oip_pb2.DESCRIPTOR.CopyToProto(file)
    old, new = f".{file.package}.", f".{WIRE_PACKAGE}."

    def retype(messages) -> None:
        for message in messages:
            for field in message.field:
                if field.type_name.startswith(old):
                    field.type_name = new + field.type_name[len(old):]
            retype(message.nested_type)

    retype(file.message_type)
    for service in file.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    file.package = WIRE_PACKAGE
    file.name = "sidewatch/inference_wire.proto"
    file.options.Clear()
    return descriptor_pb2.FileDescriptorSet(file=[file]).SerializeToString()


def _config() -> dict[str, Any]:
    methods = {f"{WIRE_PACKAGE}.GRPCInferenceService.{method}": {"request_field_extractions": {field: {}}}
               for method, field in MODEL_FIELDS.items()}
    return {"@type": CONFIG, "descriptor_set": {"inline_bytes": base64.b64encode(wire_descriptor_set()).decode()},
            "extractions_by_method": methods}


def field_extraction_filter() -> dict[str, Any]:
    """The field extraction filter for the model-scoped methods (module docstring)."""
    return {"name": FILTER, "typed_config": _config()}


def hold_first_messages(routes: list[dict[str, Any]], upstream_cluster: str,
                        max_message_bytes: int) -> list[dict[str, Any]]:
    """``routes`` with every model-scoped route allowed to hold a whole message of ``max_message_bytes``
    (module docstring), and a plain route to ``upstream_cluster`` added for each model-scoped method that
    has none (after the others, so that a sampled route still picks its share first)."""
    limit = max_message_bytes + HEADER_BYTES
    # A route that matches on more than the path (a sampled share, a header) lets the other calls through.
    covered = {route["match"]["path"] for route in routes if set(route["match"]) == {"path"}}
    added = [upstream_route({"path": path}, upstream_cluster)
             for path in sorted(paths.MODEL_SCOPED_METHODS - covered)]
    return [{**route, "request_body_buffer_limit": limit} if route["match"].get("path") in paths.MODEL_SCOPED_METHODS
            else route for route in [*routes, *added]]

"""Hostile and careless traffic, one action at a time: what an attacker or a buggy client can aim at a
sidecar from the network (issue 14). The property suite (tests/integration/test_hostile_property.py) runs
every action and then checks the sidecar; the soak (bench/soak.py ``--hostile``) mixes them into good
traffic for ten minutes.

Each action takes a ``Target`` and a ``random.Random`` and returns a short outcome (a gRPC status name, an
HTTP status, or what the socket saw); none of them is expected to succeed as a good call would. Actions
on the admin API run only where the target has one (``admin_port``), and the ones that need the token
(a careless operator's, or a leaked one) only where it is given.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np

from agent.protocol import oip_pb2, paths

MNIST_SHAPE = (1, 1, 28, 28)
CALL_TIMEOUT = 10.0


@dataclass(frozen=True)
class Target:
    grpc_address: str
    metrics_port: int
    admin_port: int | None = None
    admin_token: str | None = None
    model: str = "mnist_cnn"


def model_name_field(name: bytes) -> bytes:
    """ModelInferRequest's field 1 (model_name) holding ``name``, any bytes of any length, as protobuf writes
    it (protobuf itself would refuse to write invalid UTF-8)."""
    size, length = len(name), b""
    while True:
        byte = size & 0x7F
        size >>= 7
        length += bytes([byte | (0x80 if size else 0)])
        if not size:
            return b"\x0a" + length + name


def infer_request(model: str | bytes, version: str = "", **request_fields) -> bytes:
    """A serialized ModelInferRequest of one zero MNIST image. ``model`` may be any bytes (protobuf would
    refuse to write invalid UTF-8 itself): it is written as field 1 ahead of the rest."""
    request = oip_pb2.ModelInferRequest(model_version=version, **request_fields)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(MNIST_SHAPE))
    tensor.contents.fp32_contents.extend([0.0] * int(np.prod(MNIST_SHAPE)))
    return model_name_field(model.encode() if isinstance(model, str) else model) + request.SerializeToString()


# Each action is a client of its own, on its own connection (gRPC would otherwise share one connection among
# the channels of a process), so that what one action does to its connection is seen by no other.
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


def _unary(target: Target, method: str, body: bytes, metadata=None, timeout: float = CALL_TIMEOUT) -> str:
    with grpc.insecure_channel(target.grpc_address, options=[("grpc.max_send_message_length", -1),
                                                             ("grpc.max_receive_message_length", -1),
                                                             OWN_CONNECTION]) as channel:
        try:
            channel.unary_unary(method)(body, metadata=metadata, timeout=timeout)
        except grpc.RpcError as err:
            return err.code().name
    return "OK"


def _stream(target: Target, messages: list[bytes], cancel_after: int | None = None) -> str:
    """ModelStreamInfer of ``messages``; cancelled after ``cancel_after`` answers when given."""
    with grpc.insecure_channel(target.grpc_address, options=[OWN_CONNECTION]) as channel:
        call = channel.stream_stream(paths.MODEL_STREAM_INFER)(iter(messages), timeout=CALL_TIMEOUT)
        try:
            for answered, _ in enumerate(call, 1):
                if cancel_after is not None and answered >= cancel_after:
                    call.cancel()
                    return "CANCELLED_BY_CLIENT"
        except grpc.RpcError as err:
            return err.code().name
    return "OK"


# --- the data plane -------------------------------------------------------------------------------------


def long_model_name(target: Target, rng: random.Random) -> str:
    return _unary(target, paths.MODEL_INFER, infer_request(b"m" * (1 << 20) + str(rng.random()).encode()))


def junk_model_name(target: Target, rng: random.Random) -> str:
    return _unary(target, paths.MODEL_INFER, infer_request(f"junk-{uuid.UUID(int=rng.getrandbits(128))}"))


def random_bytes_name(target: Target, rng: random.Random) -> str:
    return _unary(target, paths.MODEL_INFER, infer_request(rng.randbytes(rng.randint(1, 200))))


def long_version(target: Target, rng: random.Random) -> str:
    return _unary(target, paths.MODEL_INFER, infer_request(target.model, "9" * (256 * 1024)))


def garbage_body(target: Target, rng: random.Random) -> str:
    return _unary(target, paths.MODEL_INFER, rng.randbytes(rng.randint(1, 64 * 1024)))


def big_metadata(target: Target, rng: random.Random) -> str:
    # Near gRPC's default header list limit (8 KiB); over it the client's own library refuses the call.
    metadata = [(f"x-hostile-{index}", "v" * 1500) for index in range(4)]
    metadata.append(("x-request-id", "r" * 1500))
    return _unary(target, paths.MODEL_INFER, infer_request(target.model), metadata=metadata)


def big_parameters(target: Target, rng: random.Random) -> str:
    request = oip_pb2.ModelInferRequest()
    for index in range(2000):
        request.parameters[f"p{index}-{rng.random()}"].string_param = "x" * 200
    return _unary(target, paths.MODEL_INFER, infer_request(target.model) + request.SerializeToString())


def lying_tensor(target: Target, rng: random.Random) -> str:
    """Shapes and byte lengths that disagree, absurd shapes, unknown datatypes."""
    request = oip_pb2.ModelInferRequest(model_name=target.model)
    choice = rng.randrange(4)
    if choice == 0:
        request.inputs.add(name="input", datatype="FP32", shape=list(MNIST_SHAPE))
        request.raw_input_contents.append(b"\x00" * 10)
    elif choice == 1:
        request.inputs.add(name="input", datatype="FP32", shape=[2 ** 31, 2 ** 31, 2 ** 31])
        request.raw_input_contents.append(b"\x00" * 16)
    elif choice == 2:
        request.inputs.add(name="input", datatype="NOT_A_TYPE", shape=[-1, -5])
    else:
        for index in range(1000):
            request.inputs.add(name=f"input-{index}", datatype="FP32", shape=[1])
    return _unary(target, paths.MODEL_INFER, request.SerializeToString())


def oversized_message(target: Target, rng: random.Random) -> str:
    return _unary(target, paths.MODEL_INFER, infer_request(target.model) + b"\x00" * (5 << 20))


def unknown_method(target: Target, rng: random.Random) -> str:
    method = f"/hostile.Service{rng.randrange(1000)}/Method{rng.randrange(1000)}"
    return _unary(target, method, rng.randbytes(100))


def expired_deadline(target: Target, rng: random.Random) -> str:
    return _unary(target, paths.MODEL_INFER, infer_request(target.model), timeout=0.0005)


def stream_of_garbage(target: Target, rng: random.Random) -> str:
    messages = [infer_request(b"s" * (256 * 1024)), rng.randbytes(1000), infer_request(target.model),
                infer_request(f"junk-{rng.random()}")]
    return _stream(target, messages)


def stream_cancelled(target: Target, rng: random.Random) -> str:
    return _stream(target, [infer_request(target.model)] * 8, cancel_after=1)


def connection_dropped_mid_call(target: Target, rng: random.Random) -> str:
    """An HTTP/2 connection that opens a stream, sends half a frame and disappears."""
    host, port = target.grpc_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                     + b"\x00\x40\x00\x01" + rng.randbytes(20))
    return "DROPPED"


# --- the metrics endpoint ----------------------------------------------------------------------------------


def metrics_junk_request(target: Target, rng: random.Random) -> str:
    path = "/" + "a" * rng.randint(1, 6000) + "?" + "q=" * rng.randint(0, 200)
    return _http(target.metrics_port, "GET", path, headers={"X-Junk": "j" * 4000})


# --- the admin API ------------------------------------------------------------------------------------------


def _http(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        reply = connection.getresponse()
        reply.read()
        return str(reply.status)
    except (OSError, http.client.HTTPException) as err:
        return type(err).__name__
    finally:
        connection.close()


def _bearer(target: Target) -> dict:
    return {"Authorization": f"Bearer {target.admin_token}"}


def admin_without_token(target: Target, rng: random.Random) -> str:
    return _http(target.admin_port, rng.choice(["GET", "POST"]), rng.choice(["/status", "/alertmanager"]))


def admin_wrong_token(target: Target, rng: random.Random) -> str:
    return _http(target.admin_port, "POST", "/alertmanager", b"{}", {"Authorization": "Bearer " + "x" * 5000})


def admin_oversized_body(target: Target, rng: random.Random) -> str:
    return _http(target.admin_port, "POST", "/alertmanager", b"[" * (2 << 20), _bearer(target))


def admin_nested_body(target: Target, rng: random.Random) -> str:
    return _http(target.admin_port, "POST", rng.choice(["/alertmanager", "/routes/undo", "/baseline/reset"]),
                 b"[" * 100_000, _bearer(target))


def admin_alert_flood(target: Target, rng: random.Random) -> str:
    """One Alertmanager delivery of 3,000 distinct alert names with long labels, under the 1 MiB body bound."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    alerts = [{"status": "firing", "startsAt": now, "endsAt": "0001-01-01T00:00:00Z",
               "labels": {"alertname": f"Flood{rng.random()}-{index}", "model": "m" * 150},
               "annotations": {}} for index in range(3000)]
    body = json.dumps({"version": "4", "status": "firing", "receiver": "sidewatch", "alerts": alerts}).encode()
    return _http(target.admin_port, "POST", "/alertmanager", body, _bearer(target))


def admin_slow_head(target: Target, rng: random.Random) -> str:
    """Half a request head, trickled for a second, then gone."""
    with socket.create_connection(("127.0.0.1", target.admin_port), timeout=5) as sock:
        sock.sendall(b"POST /alertmanager HTTP/1.1\r\n")
        for _ in range(4):
            time.sleep(0.25)
            sock.sendall(b"X-Slow: 1\r\n")
    return "DROPPED"


def admin_hangs_up(target: Target, rng: random.Random) -> str:
    """A whole request whose client closes before reading the answer."""
    with socket.create_connection(("127.0.0.1", target.admin_port), timeout=5) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + (target.admin_token or "nope").encode() + b"\r\n\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    return "DROPPED"


Action = Callable[[Target, random.Random], str]

DATA_PLANE_ACTIONS: dict[str, Action] = {
    "long_model_name": long_model_name, "junk_model_name": junk_model_name,
    "random_bytes_name": random_bytes_name, "long_version": long_version, "garbage_body": garbage_body,
    "big_metadata": big_metadata, "big_parameters": big_parameters, "lying_tensor": lying_tensor,
    "oversized_message": oversized_message, "unknown_method": unknown_method,
    "expired_deadline": expired_deadline, "stream_of_garbage": stream_of_garbage,
    "stream_cancelled": stream_cancelled, "connection_dropped_mid_call": connection_dropped_mid_call,
    "metrics_junk_request": metrics_junk_request,
}
ADMIN_ACTIONS: dict[str, Action] = {
    "admin_without_token": admin_without_token, "admin_wrong_token": admin_wrong_token,
    "admin_slow_head": admin_slow_head, "admin_hangs_up": admin_hangs_up,
}
ADMIN_TOKEN_ACTIONS: dict[str, Action] = {
    "admin_oversized_body": admin_oversized_body, "admin_nested_body": admin_nested_body,
    "admin_alert_flood": admin_alert_flood,
}


def actions_for(target: Target) -> dict[str, Action]:
    """Every action that applies to ``target``."""
    actions = dict(DATA_PLANE_ACTIONS)
    if target.admin_port is not None:
        actions.update(ADMIN_ACTIONS)
        if target.admin_token is not None:
            actions.update(ADMIN_TOKEN_ACTIONS)
    return actions

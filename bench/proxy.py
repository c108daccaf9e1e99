#!/usr/bin/env python3
"""What does sidewatch cost on the wire? The same ModelInfer load through every data plane, in one run.

    direct                  client -> echo model
    nginx                   client -> nginx (grpc_pass, 1 worker, keepalive upstream) -> echo model
    envoy                   client -> Envoy with sidewatch's bootstrap and no filter but the router -> echo
    sidewatch-envoy-norepo  client -> sidewatch serve --data-plane envoy (shadow, no model repository) -> echo
    sidewatch-envoy         the same with the bundled model's detectors (shadow, tap sampling on), Envoy 1 worker
    sidewatch-envoy-c2      the same with envoy.concurrency 2
    sidewatch               client -> sidewatch serve (the grpc.aio relay, no model repository) -> echo model
    (aio-floor, sync-floor  minimal Python relays, on request with --paths)

The upstream is an "echo model": a minimal server that answers every ModelInfer with one fixed,
pre-encoded ModelInferResponse, without parsing the request, so that the model's own cost does
not hide the proxy's. By default it is a raw HTTP/2 server on uvloop (a few us of CPU per call);
``--echo grpc`` uses grpc.aio with a generic bytes handler instead (200-300 us per call, which
would hide most of nginx's cost). nginx is the reference: a C proxy doing the same job.

Figures per path:
  * sequential latency (one client, one call at a time, Python sync gRPC client, per-call
    time.perf_counter): p50, p90, p99, mean;
  * throughput (calls/s) at 1, 8 and 32 calls in flight on one HTTP/2 connection and at 8 and 32
    spread over 4 connections, driven by h2load (C), plus the CPU time the servers used per call;
  * resident memory of each proxy (sidewatch with its Envoy) at idle and at its peak under load;
and the ratios of every path to nginx of added latency (path minus direct, at p50 and p99) and of
throughput. Every round runs the paths in a rotated order, and the reported figure is the
median over rounds. Then, one at a time, the sidecar on Envoy with the bundled detectors and the tap
copying every call (tap.cpu_budget_cores null), and with sampling on: calls/s, copies scored, and
where the others were lost (sidewatch's drop counters, Envoy's ext_proc stats).

    PYTHONPATH=$PWD .venv/bin/python bench/proxy.py --out bench-results/proxy.json
    PYTHONPATH=$PWD .venv/bin/python bench/proxy.py --quick --out /tmp/proxy.json

The path aio-floor is a minimal grpc.aio relay of the same shape as the sidecar (aio
server + aio channel + generic bytes handler on uvloop, and nothing else): the floor for any
proxy built on grpc.aio, which tells the sidecar's own code apart from the framework's cost.

Internal: ``bench/proxy.py _echo {h2,grpc} ADDRESS RESPONSE_FILE`` runs one echo-model process,
``bench/proxy.py _aio_floor LISTEN UPSTREAM`` the minimal grpc.aio relay.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "inference.GRPCInferenceService"
MODEL_INFER = f"/{SERVICE}/ModelInfer"
# Answered by the echo model too, so that the sidecar's upstream health check sees a ready server.
READY_METHODS = (f"/{SERVICE}/ServerLive", f"/{SERVICE}/ServerReady", f"/{SERVICE}/ModelReady")
READY_TRUE = b"\x08\x01"  # field 1 (live/ready) = true
PATHS = ("direct", "nginx", "envoy", "sidewatch-envoy-norepo", "sidewatch-envoy", "sidewatch-envoy-c2", "sidewatch",
         "aio-floor", "sync-floor")
DEFAULT_PATHS = PATHS[:7]
# The sidecars on the Envoy data plane: (envoy.concurrency, Envoy's worker threads; with the bundled model's
# detectors, else no model repository) per path.
SIDEWATCH_ENVOY = {"sidewatch-envoy-norepo": (1, False), "sidewatch-envoy": (1, True), "sidewatch-envoy-c2": (2, True)}
# Connections the throughput load is spread over; on 4 connections, the calls in flight are split evenly
# (h2load -c 4 -m CONC/4), so 1 in flight is measured on one connection only.
CONNECTIONS = (1, 4)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the messages ---------------------------------------------------------------------------

def build_messages() -> tuple[bytes, bytes]:
    """(ModelInferRequest, ModelInferResponse), serialized: an MNIST call and its 10 scores."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from agent.protocol import oip_pb2

    rng = np.random.default_rng(0)
    image = rng.random((1, 1, 28, 28), dtype=np.float32)
    request = oip_pb2.ModelInferRequest(model_name="mnist_cnn", model_version="1", id="bench")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    request.outputs.add(name="output")
    request.raw_input_contents.append(image.tobytes())

    scores = rng.standard_normal((1, 10)).astype(np.float32)
    response = oip_pb2.ModelInferResponse(model_name="mnist_cnn", model_version="1", id="bench")
    response.outputs.add(name="output", datatype="FP32", shape=[1, 10])
    response.raw_output_contents.append(scores.tobytes())
    return request.SerializeToString(), response.SerializeToString()


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length, bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


# --- the echo model (runs in its own processes) ------------------------------------------------
#
# Two implementations of the same contract: every call is answered with gRPC status OK and the
# fixed response bytes, without parsing the request.
#   h2    a raw HTTP/2 server on asyncio/uvloop (default): a few microseconds of CPU per call, so
#         that the model's side costs next to nothing and the proxies' costs show;
#   grpc  grpc.aio with a generic bytes handler: what a Python gRPC model server costs at best
#         (about 200-300 us of CPU per call on the 2-core test machine, 5-8 times nginx's cost
#         per call, so it caps every path near 5,000 calls/s and hides the proxies' differences).

def run_event_loop(coroutine) -> None:
    try:
        import uvloop
    except ImportError:
        import asyncio
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


async def serve_until_signalled(start, stop) -> None:
    import asyncio

    await start()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    await stop()


def grpc_echo_main(address: str, response: bytes) -> None:
    """grpc.aio, generic bytes handlers; ServerLive/ServerReady/ModelReady answer true."""
    from grpc import aio

    async def infer(request: bytes, context) -> bytes:
        return response

    async def ready(request: bytes, context) -> bytes:
        return READY_TRUE

    handlers = {MODEL_INFER: grpc.unary_unary_rpc_method_handler(infer)}
    handlers.update({method: grpc.unary_unary_rpc_method_handler(ready) for method in READY_METHODS})

    class Echo(grpc.GenericRpcHandler):
        def service(self, details):
            return handlers.get(details.method)

    servers = []  # made inside the running loop

    async def start() -> None:
        server = aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", 64 << 20)])
        servers.append(server)
        server.add_generic_rpc_handlers([Echo()])
        if server.add_insecure_port(address) == 0:
            raise SystemExit(f"echo: cannot listen on {address}")
        await server.start()

    run_event_loop(serve_until_signalled(start, lambda: servers[0].stop(0)))


# HTTP/2 (RFC 9113) frame types and flags, and the few HPACK (RFC 7541) bytes the echo writes.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
SETTINGS_INITIAL_WINDOW_SIZE = 4
MAX_WINDOW = 2**31 - 1
# ":status: 200" (static index 8), then "content-type: application/grpc" as a literal without
# indexing on static name 31 (content-type); the trailers are "grpc-status: 0", literal name.
RESPONSE_HEADER_BLOCK = b"\x88" + b"\x0f\x10" + b"\x10application/grpc"
TRAILER_BLOCK = b"\x00\x0bgrpc-status\x010"


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


class H2Echo:
    """One HTTP/2 connection of the raw echo model (an asyncio Protocol).

    It never decodes header blocks: a call is a stream, answered when the stream's END_STREAM
    arrives. A call whose body is an empty message (ServerLive, ServerReady) gets {ready: true},
    any other call the fixed ModelInferResponse. Receive windows are opened to the maximum and
    topped up; the connection send window is honoured (responses wait when it is exhausted); a
    response is assumed to fit one frame and the client's per-stream window (it is 88 bytes).
    """

    def __init__(self, infer: tuple[tuple[bytes, ...], int], ready: tuple[tuple[bytes, ...], int]) -> None:
        self.infer = infer  # (frame pieces, DATA payload bytes)
        self.ready = ready
        self.transport = None
        self.buffer = bytearray()
        self.preface_seen = False
        self.body_bytes: dict[int, int] = {}  # stream -> request DATA bytes so far
        self.half_closed_headers: int | None = None  # stream whose END_STREAM HEADERS awaits CONTINUATION
        self.received_unacknowledged = 0
        self.send_window = 65535
        self.blocked: list[int] = []  # streams waiting for send window

    def connection_made(self, transport) -> None:
        self.transport = transport
        settings = SETTINGS_INITIAL_WINDOW_SIZE.to_bytes(2, "big") + MAX_WINDOW.to_bytes(4, "big")
        transport.write(h2_frame(SETTINGS, 0, 0, settings)
                        + h2_frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - 65535).to_bytes(4, "big")))

    def connection_lost(self, exc) -> None:
        self.transport = None

    def eof_received(self):
        return False

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.preface_seen:
            if len(buffer) < len(H2_PREFACE):
                return
            if not buffer.startswith(H2_PREFACE):
                self.transport.close()
                return
            del buffer[:len(H2_PREFACE)]
            self.preface_seen = True
        out = bytearray()
        pos, end = 0, len(buffer)
        while end - pos >= 9:
            length = int.from_bytes(buffer[pos:pos + 3], "big")
            if end - pos < 9 + length:
                break
            kind, flags = buffer[pos + 3], buffer[pos + 4]
            stream = int.from_bytes(buffer[pos + 5:pos + 9], "big") & MAX_WINDOW
            payload_at = pos + 9
            pos += 9 + length
            if kind == DATA:
                self.received_unacknowledged += length
                body = length - (buffer[payload_at] + 1 if flags & PADDED and length else 0)
                if stream in self.body_bytes:
                    self.body_bytes[stream] += body
                if flags & END_STREAM:
                    self.respond(stream, out)
            elif kind == HEADERS:
                self.body_bytes.setdefault(stream, 0)
                if flags & END_STREAM:
                    if flags & END_HEADERS:
                        self.respond(stream, out)
                    else:
                        self.half_closed_headers = stream
            elif kind == CONTINUATION:
                if flags & END_HEADERS and self.half_closed_headers == stream:
                    self.half_closed_headers = None
                    self.respond(stream, out)
            elif kind == SETTINGS:
                if not flags & ACK:
                    out += h2_frame(SETTINGS, ACK, 0)
            elif kind == PING:
                if not flags & ACK:
                    out += h2_frame(PING, ACK, 0, bytes(buffer[payload_at:payload_at + 8]))
            elif kind == WINDOW_UPDATE:
                if stream == 0:
                    self.send_window += int.from_bytes(buffer[payload_at:payload_at + 4], "big") & MAX_WINDOW
                    self.unblock(out)
            elif kind == RST_STREAM:
                self.body_bytes.pop(stream, None)
            elif kind == GOAWAY:
                self.transport.write(bytes(out))
                self.transport.close()
                return
        del buffer[:pos]
        if self.received_unacknowledged >= 1 << 24:
            out += h2_frame(WINDOW_UPDATE, 0, 0, self.received_unacknowledged.to_bytes(4, "big"))
            self.received_unacknowledged = 0
        if out:
            self.transport.write(bytes(out))

    def respond(self, stream: int, out: bytearray) -> None:
        if self.blocked or not self.send(stream, out):
            self.blocked.append(stream)

    def send(self, stream: int, out: bytearray) -> bool:
        body = self.body_bytes.pop(stream, 0)
        pieces, size = self.ready if body <= 5 else self.infer
        if size > self.send_window:
            self.body_bytes[stream] = body
            return False
        self.send_window -= size
        sid = stream.to_bytes(4, "big")
        out += sid.join(pieces)
        return True

    def unblock(self, out: bytearray) -> None:
        while self.blocked and self.send(self.blocked[0], out):
            self.blocked.pop(0)


def h2_response_frames(message: bytes) -> tuple[tuple[bytes, ...], int]:
    """HEADERS, DATA, trailers HEADERS of one response, cut where the three stream ids go
    (``stream_id.join(pieces)`` is the response), and the DATA payload size."""
    frames = [h2_frame(HEADERS, END_HEADERS, 0, RESPONSE_HEADER_BLOCK),
              h2_frame(DATA, 0, 0, grpc_frame(message)),
              h2_frame(HEADERS, END_HEADERS | END_STREAM, 0, TRAILER_BLOCK)]
    pieces = [frames[0][:5], frames[0][9:] + frames[1][:5], frames[1][9:] + frames[2][:5], frames[2][9:]]
    return tuple(pieces), len(frames[1]) - 9


def h2_echo_main(address: str, response: bytes) -> None:
    import asyncio

    host, port = address.rsplit(":", 1)
    infer, ready = h2_response_frames(response), h2_response_frames(READY_TRUE)
    servers = []

    async def start() -> None:
        loop = asyncio.get_running_loop()
        servers.append(await loop.create_server(lambda: H2Echo(infer, ready), host, int(port),
                                                reuse_port=True, backlog=1024))

    async def stop() -> None:
        servers[0].close()

    run_event_loop(serve_until_signalled(start, stop))


def echo_main(kind: str, address: str, response_file: str) -> None:
    """One echo-model process of the given kind (h2 or grpc)."""
    response = Path(response_file).read_bytes()
    {"h2": h2_echo_main, "grpc": grpc_echo_main}[kind](address, response)


# --- the grpc.aio floor (runs in its own process) ----------------------------------------------

class CachingRelay(grpc.GenericRpcHandler):
    """A generic handler that builds one relay handler per method path, on first use."""

    def __init__(self, make_handler) -> None:
        self._make_handler = make_handler
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details):
        if details.method not in self._handlers:
            self._handlers[details.method] = self._make_handler(details.method)
        return self._handlers[details.method]


def aio_floor_main(listen: str, upstream: str) -> None:
    """The least a grpc.aio proxy can do: the sidecar's shape (aio server, one aio channel, generic
    bytes handler, uvloop) with nothing else: no metrics, no tap, no metadata copy, no peek."""
    from grpc import aio

    opened = []  # the server and the channel, made inside the running loop

    async def start() -> None:
        server = aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        channel = aio.insecure_channel(upstream, options=[("grpc.max_receive_message_length", 64 << 20)])
        opened.extend((server, channel))

        def handler(method: str) -> grpc.RpcMethodHandler:
            stub = channel.unary_unary(method)

            async def relay(request: bytes, context) -> bytes:
                return await stub(request)

            return grpc.unary_unary_rpc_method_handler(relay)

        server.add_generic_rpc_handlers([CachingRelay(handler)])
        if server.add_insecure_port(listen) == 0:
            raise SystemExit(f"aio-floor: cannot listen on {listen}")
        await server.start()

    async def stop() -> None:
        server, channel = opened
        await server.stop(0)
        await channel.close()

    run_event_loop(serve_until_signalled(start, stop))


def sync_floor_main(listen: str, upstream: str) -> None:
    """The least a sync grpc proxy can do: grpc's thread-pool server and one sync channel, bytes in and
    out, nothing else. It answers the question "grpc.aio or sync?" for the data plane."""
    import signal as signals
    import threading
    from concurrent import futures

    options = [("grpc.max_receive_message_length", 64 << 20)]
    channel = grpc.insecure_channel(upstream, options=options)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=options)
    def handler(method: str) -> grpc.RpcMethodHandler:
        stub = channel.unary_unary(method)
        return grpc.unary_unary_rpc_method_handler(lambda request, context: stub(request))

    server.add_generic_rpc_handlers([CachingRelay(handler)])
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"sync-floor: cannot listen on {listen}")
    server.start()
    stopped = threading.Event()
    for sig in (signals.SIGTERM, signals.SIGINT):
        signals.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    server.stop(0)
    channel.close()


# --- child processes ----------------------------------------------------------------------------

@dataclass
class Children:
    """Every process the benchmark started, stopped in reverse order, whatever happens."""

    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=ROOT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        while self.procs:
            _, proc = self.procs.pop()
            stop_process(proc)


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's own process group (start_new_session), then SIGKILL after grace seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_answers(address: str, request: bytes, expected: bytes, proc: subprocess.Popen,
                       log: Path, timeout: float = 30.0) -> None:
    """Poll with real ModelInfer calls until one comes back OK with the expected bytes."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{shlex.join(proc.args)} exited with {proc.returncode} before answering; "
                               f"its log ({log}):\n{tail(log)}")
        try:
            check_call(address, request, expected)
            return
        except (grpc.RpcError, WrongAnswer) as err:
            last = err
            time.sleep(0.2)
    raise RuntimeError(f"nothing answered ModelInfer on {address} within {timeout:.0f} s ({last}); "
                       f"log ({log}):\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_echo_upstream(children: Children, tmp: Path, response: bytes, request: bytes,
                        kind: str, processes: int) -> tuple[str, list[subprocess.Popen]]:
    """N echo-model processes sharing one port (SO_REUSEPORT spreads connections over them)."""
    response_file = tmp / "response.bin"
    response_file.write_bytes(response)
    address = f"127.0.0.1:{free_port()}"
    log = tmp / "echo.log"
    procs = [children.start(f"echo-{i}", [sys.executable, str(Path(__file__).resolve()), "_echo", kind, address,
                                          str(response_file)], log)
             for i in range(processes)]
    for proc in procs:
        wait_until_answers(address, request, response, proc, log)
    return address, procs


def start_sidewatch(children: Children, tmp: Path, upstream: str, request: bytes, response: bytes,
                    extra_args: list[str], extra_env: dict[str, str], name: str = "sidewatch",
                    metrics: str | None = None) -> tuple[str, subprocess.Popen]:
    address = f"127.0.0.1:{free_port()}"
    metrics = metrics or f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "agent.cli", "serve", "--listen", address, "--upstream", upstream,
            "--metrics-listen", metrics, *extra_args]
    env = {**os.environ, **extra_env}
    log = tmp / f"{name}.log"
    proc = children.start(name, argv, log, env)
    wait_until_answers(address, request, response, proc, log, timeout=60.0)
    return address, proc


@dataclass
class EnvoySidecar:
    """``sidewatch serve --data-plane envoy``: its address, process, metrics address and Envoy's admin port."""

    address: str
    proc: subprocess.Popen
    metrics: str
    admin_port: int

    def metrics_text(self) -> str:
        return urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5).read().decode()

    def envoy_stats(self, prefix: str) -> dict[str, int]:
        """Envoy's counters and gauges whose names contain ``prefix``."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats?filter={prefix}",
                                      timeout=5).read().decode()
        stats = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                stats[name] = int(value)
        return stats


def start_sidewatch_envoy(children: Children, tmp: Path, upstream: str, request: bytes, response: bytes,
                          name: str, concurrency: int, tap: dict, extra_args: list[str],
                          extra_env: dict[str, str], detectors: bool = True) -> EnvoySidecar:
    """The sidecar on the Envoy data plane with the bundled model's detectors (shadow mode; without
    ``detectors``, no model repository), Envoy with ``concurrency`` workers, ``tap`` settings
    (tap.cpu_budget_cores None: every call copied)."""
    from agent.modelserver.repository import BUNDLED_REPOSITORY

    admin_port, metrics = free_port(), f"127.0.0.1:{free_port()}"
    config = tmp / f"{name}.yml"
    config.write_text(json.dumps({"envoy": {"concurrency": concurrency, "admin_port": admin_port}, "tap": tap}))
    repository = ["--model-repository", str(BUNDLED_REPOSITORY)] if detectors else []
    args = ["--data-plane", "envoy", *repository, "--config", str(config), *extra_args]
    address, proc = start_sidewatch(children, tmp, upstream, request, response, args, extra_env, name, metrics)
    return EnvoySidecar(address, proc, metrics, admin_port)


def start_plain_envoy(tmp: Path, upstream: str, request: bytes, response: bytes, concurrency: int):
    """Envoy alone with sidewatch's bootstrap and no HTTP filter but the router (no Lua, no access log, no
    ext_proc); its health route points at a closed port, and the benchmark never calls it."""
    from agent.config import load_config
    from agent.dataplane.envoy.binary import find_envoy
    from agent.dataplane.envoy.bootstrap import Loopback, build_bootstrap
    from agent.dataplane.envoy.supervisor import EnvoyProcess

    port = free_port()
    config = load_config(overrides={"listen": f"127.0.0.1:{port}", "upstream.address": upstream})
    work = tmp / "envoy"
    work.mkdir()
    bootstrap = work / "envoy.json"
    bootstrap.write_text(json.dumps(build_bootstrap(config, Loopback(admin_port=0, health_port=free_port()))))
    envoy = EnvoyProcess(find_envoy(None), bootstrap, work, concurrency=concurrency, log_level="warning")
    envoy.start()
    address = f"127.0.0.1:{port}"
    wait_until_answers(address, request, response, envoy.process, work / "envoy.json")
    return address, envoy


def start_floor(kind: str, children: Children, tmp: Path, upstream: str, request: bytes,
                response: bytes) -> tuple[str, subprocess.Popen]:
    """A minimal relay of ``kind`` "aio-floor" or "sync-floor", in its own process."""
    address = f"127.0.0.1:{free_port()}"
    log = tmp / f"{kind}.log"
    mode = "_" + kind.replace("-", "_")
    proc = children.start(kind, [sys.executable, str(Path(__file__).resolve()), mode, address, upstream], log)
    wait_until_answers(address, request, response, proc, log)
    return address, proc


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 64m;
    # One client connection carries the whole run: never close it for its request count.
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    http2_max_concurrent_streams 256;

    upstream echo {{
        server {upstream};
        # grpc_pass runs one call per upstream connection at a time: keep enough of them open.
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {listen} http2;
        location / {{
            grpc_pass grpc://echo;
            grpc_socket_keepalive on;
        }}
    }}
}}
"""


def start_nginx(children: Children, tmp: Path, upstream: str, request: bytes, response: bytes,
                workers: int, nginx: str) -> tuple[str, subprocess.Popen]:
    """nginx in the foreground with a generated config, its pid, logs and temp files under tmp."""
    address = f"127.0.0.1:{free_port()}"
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, tmp=tmp, upstream=upstream, listen=address))
    log = tmp / "nginx-error.log"
    proc = children.start("nginx", [nginx, "-p", str(tmp), "-e", str(log), "-c", str(conf)], tmp / "nginx.out")
    wait_until_answers(address, request, response, proc, log)
    return address, proc


# --- measurements -----------------------------------------------------------------------------

class WrongAnswer(Exception):
    """A path answered, but not with gRPC status OK and the echo's exact bytes."""


def check_call(address: str, request: bytes, expected: bytes) -> None:
    """One Python gRPC call: it must end with grpc-status OK and carry exactly the echo's bytes."""
    with grpc.insecure_channel(address) as channel:
        reply, call = channel.unary_unary(MODEL_INFER).with_call(request, timeout=5.0)
    if call.code() != grpc.StatusCode.OK:
        raise WrongAnswer(f"{address}: status {call.code()}")
    if reply != expected:
        raise WrongAnswer(f"{address}: a reply of {len(reply)} bytes, not the echo's {len(expected)}")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def measure_latency(address: str, request: bytes, expected: bytes, calls: int, warmup: int) -> dict:
    """Sequential calls on one channel, one at a time; per-call wall time in microseconds."""
    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary(MODEL_INFER)
        for _ in range(warmup):
            infer(request, timeout=5.0)
        times = []
        gc.disable()
        try:
            for _ in range(calls):
                started = time.perf_counter()
                reply = infer(request, timeout=5.0)
                times.append((time.perf_counter() - started) * 1e6)
        finally:
            gc.enable()
    if reply != expected:
        raise WrongAnswer(f"{address}: a reply of {len(reply)} bytes, not the echo's {len(expected)}")
    times.sort()
    return {
        "calls": calls,
        "p50_us": percentile(times, 50),
        "p90_us": percentile(times, 90),
        "p99_us": percentile(times, 99),
        "mean_us": statistics.fmean(times),
        "min_us": times[0],
        "max_us": times[-1],
    }


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (nginx: master and workers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, ()))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def memory_kib(pids: list[int], field: str) -> int:
    """A /proc/PID/status memory field (VmRSS: resident now; VmHWM: the most resident so far), summed, KiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
    return total


H2LOAD_NUMBERS = {
    "finished": re.compile(r"finished in ([\d.]+[mu]?s), ([\d.]+) req/s"),
    "requests": re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                           r"(\d+) errored, (\d+) timeout"),
    "status": re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx"),
    "traffic": re.compile(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?, .*?\((\d+)\) data"),
    "time_for_request": re.compile(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)"),
}


def duration_us(text: str) -> float:
    value = float(re.match(r"[\d.]+", text).group())
    unit = text[len(re.match(r"[\d.]+", text).group()):]
    return value * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


def run_h2load(h2load: str, address: str, data_file: Path, concurrency: int, duration: float,
               connections: int = 1) -> dict:
    """One h2load run (one thread) over ``connections`` connections with ``concurrency`` calls in flight on
    each; returns its figures and its own CPU time."""
    argv = [h2load, "-c", str(connections), "-t", "1", "-m", str(concurrency), "-D", f"{round(duration * 1000)}ms",
            "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(data_file),
            f"http://{address}{MODEL_INFER}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: h2load's own CPU time comes back with it
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if proc.returncode is None:  # interrupted: do not leave it running
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"h2load failed ({proc.returncode}): {' '.join(argv)}\n{out}")
    found = {key: pattern.search(out) for key, pattern in H2LOAD_NUMBERS.items()}
    missing = [key for key, match in found.items() if match is None]
    if missing:
        raise RuntimeError(f"cannot read {missing} in h2load's output:\n{out}")
    _, _, done, succeeded, failed, errored, timeout = map(int, found["requests"].groups())
    _, req_max, req_mean, _ = found["time_for_request"].groups()
    return {
        "seconds": duration_us(found["finished"].group(1)) / 1e6,
        "calls_per_s": float(found["finished"].group(2)),
        "done": done, "succeeded": succeeded, "failed": failed, "errored": errored, "timeout": timeout,
        "status_2xx": int(found["status"].group(1)),
        "data_bytes": int(found["traffic"].group(3)),
        "request_time_mean_us": duration_us(req_mean),
        "request_time_max_us": duration_us(req_max),
        "h2load_cpu_s": usage.ru_utime + usage.ru_stime,
    }


def measure_throughput(h2load: str, address: str, data_file: Path, concurrency: int, duration: float,
                       warmup: float, servers: dict[str, list[int]], response_frame_bytes: int,
                       connections: int = 1) -> dict:
    """Calls/s at a fixed number of calls in flight per connection; also the servers' CPU time per call.

    h2load counts HTTP 200 as success, and a gRPC error is an HTTP 200 too; but an error carries
    no DATA, so every succeeded call must have brought at least one framed echo response.
    """
    if warmup > 0:
        run_h2load(h2load, address, data_file, concurrency, warmup, connections)
    before = {name: cpu_seconds(pids) for name, pids in servers.items()}
    result = run_h2load(h2load, address, data_file, concurrency, duration, connections)
    after = {name: cpu_seconds(pids) for name, pids in servers.items()}
    calls = max(result["done"], 1)
    result["cpu_us_per_call"] = {name: round((after[name] - before[name]) / calls * 1e6, 1) for name in servers}
    result["cpu_cores_busy"] = {name: round((after[name] - before[name]) / result["seconds"], 2) for name in servers}
    result["grpc_bodies_ok"] = (result["failed"] == 0 and result["errored"] == 0 and result["succeeded"] > 0
                                and result["data_bytes"] >= result["succeeded"] * response_frame_bytes)
    return result


def profile_sidewatch(py_spy: str, h2load: str, address: str, pid: int, data_file: Path, concurrency: int,
                      seconds: float, out: Path) -> dict:
    """py-spy on the sidecar while h2load loads it; raw collapsed stacks to ``out``, the top frames back."""
    argv = [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "200",
            "--format", "raw", "--threads", "--nonblocking", "--output", str(out)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        load = run_h2load(h2load, address, data_file, concurrency, seconds + 1.5)
        _, err = spy.communicate(timeout=seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {err}")
    threads: dict[str, int] = {}
    leaves: dict[str, int] = {}
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        threads[thread] = threads.get(thread, 0) + int(count)
        leaf = f"{thread}: {frames[-1] if len(frames) > 1 else '(no Python frame)'}"
        leaves[leaf] = leaves.get(leaf, 0) + int(count)
    possible = 200 * max(1, round(seconds))
    return {
        "file": str(out), "concurrency": concurrency, "calls_per_s_while_profiled": load["calls_per_s"],
        "note": "active (non-idle) samples at 200 Hz; native code (uvloop, grpc's Cython and C core) is "
                "counted in the innermost Python frame that called it",
        "thread_busy_fraction": {t: round(n / possible, 2) for t, n in sorted(threads.items(), key=lambda x: -x[1])},
        "top_self_frames": [{"frame": f, "fraction": round(n / possible, 3)}
                            for f, n in sorted(leaves.items(), key=lambda x: -x[1])[:20]],
    }


# --- the run ----------------------------------------------------------------------------------

def machine_info(nginx: str, h2load: str) -> dict:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    import google.protobuf

    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop
        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = None
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "uvloop": uvloop_version,
        "nginx": first_line([nginx, "-v"]),
        "h2load": first_line([h2load, "--version"]),
        "loadavg_at_end": os.getloadavg(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="write the results here (JSON)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (one round, small counts)")
    parser.add_argument("--rounds", type=int, help="rounds over all paths (default 3, quick 1)")
    parser.add_argument("--latency-calls", type=int, help="sequential calls per path and round (default 2000)")
    parser.add_argument("--latency-warmup", type=int, help="calls before timing (default 200)")
    parser.add_argument("--concurrency", default="1,8,32", help="calls in flight for throughput (default 1,8,32)")
    parser.add_argument("--duration", type=float, help="seconds per throughput measurement (default 3)")
    parser.add_argument("--warmup", type=float, help="h2load warm-up seconds before each (default 1)")
    parser.add_argument("--connections", default="1,4",
                        help="connections the calls in flight are spread over (default 1,4)")
    parser.add_argument("--envoy-concurrency", type=int, default=1,
                        help="Envoy worker threads for the plain envoy path and the tap runs (default 1)")
    parser.add_argument("--tap-seconds", type=float,
                        help="seconds of load for each tap measurement, 0: none (default 8, quick 2)")
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                        help=f"which paths, direct required (default: {','.join(DEFAULT_PATHS)}; known: "
                             f"{','.join(PATHS)})")
    parser.add_argument("--echo", choices=["h2", "grpc"], default="h2",
                        help="echo model: raw HTTP/2 on uvloop (default, a few us per call) or grpc.aio")
    parser.add_argument("--echo-procs", type=int, default=1,
                        help="echo-model processes sharing the port with SO_REUSEPORT (default 1)")
    parser.add_argument("--nginx-workers", type=int, default=1,
                        help="nginx worker processes (default 1: one client connection is one worker anyway)")
    parser.add_argument("--sidewatch-args", default="",
                        help='extra flags for "sidewatch serve", one string: --sidewatch-args="--flag value"')
    parser.add_argument("--sidewatch-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the sidecar (repeatable; SIDEWATCH_* are inherited anyway)")
    parser.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    parser.add_argument("--h2load", default=shutil.which("h2load") or "/usr/bin/h2load")
    parser.add_argument("--py-spy", type=Path, metavar="FILE",
                        help="after the measurements, profile the sidecar with py-spy under the highest "
                             "concurrency; raw collapsed stacks to FILE, the top frames into the JSON")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"rounds": (3, 1), "latency_calls": (2000, 300), "latency_warmup": (200, 50),
                "duration": (3.0, 1.0), "warmup": (1.0, 0.3), "tap_seconds": (8.0, 2.0)}
    for name, (full, short) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.connections = [int(c) for c in args.connections.split(",")]
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(args.paths) - set(PATHS)
    if unknown or "direct" not in args.paths:
        parser.error(f"--paths: direct is required, known paths are {PATHS}; got {args.paths}")
    args.sidewatch_env = dict(item.split("=", 1) for item in args.sidewatch_env)
    return args


def median_of(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def summarize(results: dict, points: list[str], load_seconds: float) -> dict:
    """Medians over rounds per path, added latency over direct, then the ratios to nginx."""
    summary = {}
    for path, data in results.items():
        lat = data["latency_rounds"]
        entry = {"latency_p50_us": median_of(lat, "p50_us"), "latency_p99_us": median_of(lat, "p99_us"),
                 "latency_mean_us": median_of(lat, "mean_us"), "throughput": {}}
        for point in points:
            runs = data["throughput_rounds"][point]
            entry["throughput"][point] = {
                "calls_per_s": median_of(runs, "calls_per_s"),
                "request_time_mean_us": median_of(runs, "request_time_mean_us"),
                "cpu_us_per_call": {name: statistics.median(r["cpu_us_per_call"][name] for r in runs)
                                    for name in runs[0]["cpu_us_per_call"]},
                "h2load_cpu_busy": round(statistics.median(r["h2load_cpu_s"] for r in runs) / load_seconds, 2),
                "all_grpc_bodies_ok": all(r["grpc_bodies_ok"] for r in runs),
            }
        summary[path] = entry
    direct = summary["direct"]
    for entry in summary.values():
        entry["added_p50_us"] = entry["latency_p50_us"] - direct["latency_p50_us"]
        entry["added_p99_us"] = entry["latency_p99_us"] - direct["latency_p99_us"]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 2) if b > 0 else None  # the reference within noise of direct: no meaningful ratio

    ratios = {}
    for reference in ("nginx", "aio-floor"):
        if reference not in summary:
            continue
        ref = summary[reference]
        for path, entry in summary.items():
            if path in ("direct", reference):
                continue
            ratios[f"{path}_over_{reference}"] = {
                "added_p50": ratio(entry["added_p50_us"], ref["added_p50_us"]),
                "added_p99": ratio(entry["added_p99_us"], ref["added_p99_us"]),
                "throughput": {p: ratio(entry["throughput"][p]["calls_per_s"], ref["throughput"][p]["calls_per_s"])
                               for p in points}}
    # The load generator is not the bottleneck when direct, through the same h2load, goes far faster.
    top = points[-1]
    proxies = [e["throughput"][top]["calls_per_s"] for p, e in summary.items() if p != "direct"]
    if proxies:
        ratios["load_generator_headroom_at_top_concurrency"] = ratio(direct["throughput"][top]["calls_per_s"],
                                                                     max(proxies))
    return {"paths": summary, "ratios": ratios}


def print_table(report: dict) -> None:
    paths = report["paths"]
    points = report["parameters"]["load_points"]
    head = f"{'path':<19} {'p50 us':>7} {'p99 us':>7} {'+p50':>6} {'+p99':>6}"
    head += "".join(f" {point:>7}" for point in points) + "  rss idle/load MiB"
    print(head)
    print("-" * len(head))
    for path, e in paths.items():
        line = (f"{path:<19} {e['latency_p50_us']:>7.0f} {e['latency_p99_us']:>7.0f} "
                f"{e['added_p50_us']:>6.0f} {e['added_p99_us']:>6.0f}")
        line += "".join(f" {e['throughput'][p]['calls_per_s']:>7.0f}" for p in points)
        memory = report["memory"].get(path)
        if memory:
            line += f"  {memory['rss_idle_kib'] / 1024:.0f}/{memory['rss_under_load_peak_kib'] / 1024:.0f}"
        print(line)
    print("(+p50, +p99: added over direct; CxM: calls/s on C connections with M calls in flight on each)")
    for name, values in report["ratios"].items():
        if isinstance(values, dict) and name.endswith("_over_nginx"):
            print(f"{name}: added p50 x{values['added_p50']}, p99 x{values['added_p99']}; calls/s "
                  + ", ".join(f"{p} x{r}" for p, r in values["throughput"].items()))
    for name, tap in report.get("tap", {}).items():
        print(f"tap {name}: {tap['calls_per_s']:.0f} calls/s, {tap['copies_scored']} of {tap['calls']} calls "
              f"scored ({tap['share_scored']}); envoy ext_proc streams failed {tap['envoy_ext_proc']['streams_failed']}"
              f", sidewatch drops {tap['dropped_by_sidewatch']}, sampled ratio at end {tap['sampled_ratio_at_end']}")


class PeakRss:
    """The most resident memory (VmRSS, KiB) of some processes while the block runs, sampled every 0.1 s."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak_kib = max(self.peak_kib, memory_kib(self.pids, "VmRSS"))
            if self._stop.wait(0.1):
                return

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` (exactly) whose labels include ``labels``; 0 when there are none."""
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if line.startswith("#") or metric != name:
            continue
        if all(f'{key}="{wanted}"' in label_text for key, wanted in labels.items()):
            total += float(value)
    return total


TAP_EXT_PROC = "http.ingress.ext_proc.sidewatch_tap."


def measure_tap(args: argparse.Namespace, children: Children, tmp: Path, echo: str, request: bytes,
                response: bytes, data_file: Path, name: str, tap: dict) -> dict:
    """The sidecar on Envoy with the bundled model's detectors, loaded by h2load at the top concurrency on
    one connection: calls/s, and how many copies reached the tap, were scored, or were lost, and where."""
    concurrency, seconds = args.concurrency[-1], args.tap_seconds
    sidecar = start_sidewatch_envoy(children, tmp, echo, request, response, name, args.envoy_concurrency,
                                    tap, shlex.split(args.sidewatch_args), args.sidewatch_env)
    try:
        run_h2load(args.h2load, sidecar.address, data_file, concurrency, 1.0)  # warm-up
        time.sleep(3)  # the warm-up's copies are scored
        metrics_before, stats_before = sidecar.metrics_text(), sidecar.envoy_stats("sidewatch_tap")
        load = run_h2load(args.h2load, sidecar.address, data_file, concurrency, seconds)
        time.sleep(3)  # the detectors finish what was queued
        metrics_after, stats_after = sidecar.metrics_text(), sidecar.envoy_stats("sidewatch_tap")
    finally:
        stop_process(sidecar.proc)

    def delta(metric: str, **labels: str) -> int:
        return round(metric_sum(metrics_after, metric, **labels) - metric_sum(metrics_before, metric, **labels))

    def envoy_delta(stat: str) -> int:
        return stats_after.get(stat, 0) - stats_before.get(stat, 0)

    calls = load["done"]
    scored = delta("sidewatch_adversarial_inputs_total", model="mnist_cnn")
    return {
        "tap": tap, "concurrency": concurrency, "seconds": seconds, "calls": calls,
        "calls_per_s": load["calls_per_s"],
        "copies_received": delta("sidewatch_tap_copies_received_total"),
        "copies_scored": scored,
        "share_scored": round(scored / max(calls, 1), 3),
        "dropped_by_sidewatch": {
            "queue_full": delta("sidewatch_tap_dropped_total"),
            **{reason: delta("sidewatch_tap_copies_dropped_total", reason=reason)
               for reason in ("too_large", "buffer", "compressed", "unpaired", "envoy", "closed")}},
        "envoy_ext_proc": {stat: envoy_delta(TAP_EXT_PROC + stat)
                           for stat in ("streams_started", "streams_failed", "streams_closed",
                                        "failure_mode_allowed", "stream_msgs_sent")},
        "envoy_tap_cluster_overflow": envoy_delta("cluster.sidewatch_tap.upstream_rq_active_overflow"),
        "sampled_ratio_at_end": metric_sum(metrics_after, "sidewatch_tap_sampled_ratio"),
    }


def load_points(concurrency: list[int], connections: list[int]) -> list[tuple[int, int]]:
    """(connections, calls in flight per connection) for every total in flight that splits evenly."""
    return [(conns, total // conns) for conns in connections for total in concurrency
            if total % conns == 0 and total >= conns]


def point_key(conns: int, per_connection: int) -> str:
    return f"{conns}x{per_connection}"


def run(args: argparse.Namespace) -> dict:
    request, response = build_messages()
    loadavg_at_start = os.getloadavg()
    children = Children()
    envoys = []
    tmp = Path(tempfile.mkdtemp(prefix="sidewatch-bench-"))
    os.chmod(tmp, 0o755)  # nginx workers may run as another user
    try:
        data_file = tmp / "request.grpc"
        data_file.write_bytes(grpc_frame(request))
        echo_address, echo_procs = start_echo_upstream(children, tmp, response, request, args.echo,
                                                         args.echo_procs)
        addresses = {"direct": echo_address}
        echo_pids = [p.pid for p in echo_procs]
        proxies: dict[str, list[int]] = {}
        sidecar_args = shlex.split(args.sidewatch_args)
        if "sidewatch" in args.paths:
            addresses["sidewatch"], proc = start_sidewatch(children, tmp, echo_address, request, response,
                                                           ["--data-plane", "python", *sidecar_args],
                                                           args.sidewatch_env)
            proxies["sidewatch"] = [proc.pid]
        for path, (concurrency, detectors) in SIDEWATCH_ENVOY.items():
            if path in args.paths:
                # Shadow mode; tap sampling on (its default CPU budget).
                sidecar = start_sidewatch_envoy(children, tmp, echo_address, request, response, path, concurrency,
                                                {}, sidecar_args, args.sidewatch_env, detectors)
                addresses[path] = sidecar.address
                proxies[path] = process_tree(sidecar.proc.pid)  # sidewatch and its Envoy
        if "envoy" in args.paths:
            addresses["envoy"], envoy = start_plain_envoy(tmp, echo_address, request, response,
                                                          args.envoy_concurrency)
            envoys.append(envoy)
            proxies["envoy"] = [envoy.process.pid]
        if "nginx" in args.paths:
            addresses["nginx"], proc = start_nginx(children, tmp, echo_address, request, response,
                                                   args.nginx_workers, args.nginx)
            proxies["nginx"] = process_tree(proc.pid)
        for floor in ("aio-floor", "sync-floor"):
            if floor in args.paths:
                addresses[floor], proc = start_floor(floor, children, tmp, echo_address, request, response)
                proxies[floor] = [proc.pid]
        time.sleep(3)  # the sidecars settle (detectors loaded, first health checks done)
        memory = {path: {"rss_idle_kib": memory_kib(pids, "VmRSS"), "rss_under_load_peak_kib": 0}
                  for path, pids in proxies.items()}
        paths = [p for p in PATHS if p in args.paths]
        points = load_points(args.concurrency, args.connections)
        top = (1, args.concurrency[-1])
        results = {p: {"address": addresses[p], "latency_rounds": [], "throughput_rounds": {}} for p in paths}
        for rnd in range(args.rounds):
            order = paths[rnd % len(paths):] + paths[:rnd % len(paths)]
            for path in order:
                print(f"round {rnd + 1}/{args.rounds}: {path} latency", file=sys.stderr, flush=True)
                results[path]["latency_rounds"].append(
                    measure_latency(addresses[path], request, response, args.latency_calls, args.latency_warmup))
            for conns, per_connection in points:
                key = point_key(conns, per_connection)
                for path in order:
                    print(f"round {rnd + 1}/{args.rounds}: {path} throughput {key}", file=sys.stderr, flush=True)
                    servers = {"echo": echo_pids, **({path: proxies[path]} if path in proxies else {})}
                    with PeakRss(proxies.get(path, [])) as rss:
                        result = measure_throughput(args.h2load, addresses[path], data_file, per_connection,
                                                    args.duration, args.warmup, servers, len(grpc_frame(response)),
                                                    conns)
                    results[path]["throughput_rounds"].setdefault(key, []).append(result)
                    if path in memory and (conns, per_connection) == top:
                        memory[path]["rss_under_load_peak_kib"] = max(memory[path]["rss_under_load_peak_kib"],
                                                                      rss.peak_kib)
        profile = None
        if args.py_spy and "sidewatch" in proxies:
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            print("profiling sidewatch with py-spy", file=sys.stderr, flush=True)
            args.py_spy.parent.mkdir(parents=True, exist_ok=True)
            profile = profile_sidewatch(py_spy, args.h2load, addresses["sidewatch"], proxies["sidewatch"][0],
                                        data_file, args.concurrency[-1], max(5.0, args.duration * 2), args.py_spy)
        # After all the load: each path still answers a real gRPC call with status OK and the right bytes.
        for path in paths:
            check_call(addresses[path], request, response)
        for name, proc in children.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} died during the run (exit {proc.returncode})")
        tap = {}
        if args.tap_seconds > 0:
            # Every call copied (sampling off), then sampling on; one at a time, the other sidecars idle.
            for name, settings in (("every_call", {"cpu_budget_cores": None}), ("sampling_on", {})):
                print(f"tap: {name}", file=sys.stderr, flush=True)
                tap[name] = measure_tap(args, children, tmp, echo_address, request, response, data_file,
                                        f"tap-{name}", settings)
        report = {
            "benchmark": "bench/proxy.py",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {**machine_info(args.nginx, args.h2load), "loadavg_at_start": loadavg_at_start},
            "parameters": {
                "quick": args.quick, "rounds": args.rounds, "latency_calls": args.latency_calls,
                "latency_warmup": args.latency_warmup, "concurrency": args.concurrency,
                "connections": args.connections, "load_points": [point_key(*p) for p in points],
                "envoy_concurrency": args.envoy_concurrency, "sidewatch_envoy": SIDEWATCH_ENVOY,
                "throughput_duration_s": args.duration, "throughput_warmup_s": args.warmup,
                "nginx_config": NGINX_CONF.format(workers=args.nginx_workers, tmp="TMP", upstream="ECHO",
                                                  listen="LISTEN") if "nginx" in args.paths else None,
                "echo": args.echo, "echo_procs": args.echo_procs, "nginx_workers": args.nginx_workers,
                "sidewatch_args": args.sidewatch_args, "sidewatch_env": args.sidewatch_env,
                "latency_client": f"Python grpcio {grpc.__version__} sync client, one channel, one call at a time",
                "throughput_client": "h2load -c CONNECTIONS -t 1 -m PER_CONNECTION -D DURATION",
                "request": {"model": "mnist_cnn", "input": "input FP32 [1,1,28,28] in raw_input_contents",
                            "message_bytes": len(request), "framed_bytes": len(grpc_frame(request))},
                "response": {"output": "output FP32 [1,10] in raw_output_contents",
                             "message_bytes": len(response), "framed_bytes": len(grpc_frame(response))},
            },
            "checks": {"grpc_ok_after_load": True,
                       "h2load_all_bodies_ok": all(r["grpc_bodies_ok"] for p in results.values()
                                                   for runs in p["throughput_rounds"].values() for r in runs)},
            "raw": results,
            "memory": memory,
            "tap": tap,
        }
        report.update(summarize(results, [point_key(*p) for p in points], args.duration))
        if profile is not None:
            report["sidewatch_profile"] = profile
        if args.keep_tmp:
            report["tmp_dir"] = str(tmp)
        return report
    finally:
        for envoy in envoys:
            envoy.stop()
        children.stop_all()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_echo"]:
        echo_main(argv[1], argv[2], argv[3])
        return 0
    if argv[:1] == ["_sync_floor"]:
        sync_floor_main(argv[1], argv[2])
        return 0
    if argv[:1] == ["_aio_floor"]:
        aio_floor_main(argv[1], argv[2])
        return 0
    args = parse_args(argv)

    def terminate(signum, frame):
        print(f"bench: {signal.Signals(signum).name}, stopping the servers", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)  # unwinds through run()'s finally, which stops the children

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {args.out}")
    return 0 if report["checks"]["h2load_all_bodies_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

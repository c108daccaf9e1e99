"""Channels to the upstream model server (and to fallback upstreams), with the configured TLS and sizes."""

from __future__ import annotations

from typing import Callable

from grpc import aio

from agent import tls
from agent.config import ServeConfig

# gRPC's reconnect backoff grows to 120 s while the upstream is down, so a model server that comes
# back would wait for the next attempt. A retry every half second at most (a refused connection
# costs next to nothing) resumes service within a second of its return.
_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]


def message_size_options(config: ServeConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]


def transport_options(config: ServeConfig) -> list[tuple[str, int]]:
    """The message sizes, and a fixed HTTP/2 window per stream (``stream_window_bytes``), for the listener
    and the channels to upstreams.

    gRPC sizes its receive windows from the bandwidth-delay product it measures (BDP probes): 4 MiB a
    stream at least. On the relay's two sides that let a stream's writer run 4 to 10 MiB ahead into the
    sidecar of a reader that does not read (a client's requests, when the model server is busy; a model
    server's responses, when the client never reads them), where the other end alone would have stopped
    it after its own window. With the probes off, ``grpc.http2.lookahead_bytes`` is the window. (Measured
    on loopback: no change in the relay's throughput of 200 KB and 4 MB messages, unary or streamed.)
    """
    return message_size_options(config) + [
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", config.stream_window_bytes),
    ]


def open_upstream_channel(config: ServeConfig, address: str | None = None) -> aio.Channel:
    """A channel to the upstream (or to ``address``, a fallback upstream, with the upstream's settings)."""
    options = transport_options(config) + _RECONNECT_OPTIONS
    upstream = config.upstream
    address = address or upstream.address
    if upstream.tls is None:
        return aio.insecure_channel(address, options=options)
    if upstream.tls.server_name:
        options.append(("grpc.ssl_target_name_override", upstream.tls.server_name))
    return aio.secure_channel(address, tls.channel_credentials(upstream.tls), options=options)


def channel_opener(config: ServeConfig) -> Callable[[str], aio.Channel]:
    """Opens channels to fallback upstreams with the main upstream's message sizes and TLS settings."""

    def open_channel(address: str) -> aio.Channel:
        return open_upstream_channel(config, address)

    return open_channel

"""Who a client is, as the grpc.aio relay tells it (``detection.queries.identity``): the key of the query
detector's per-client history. (Under Envoy the Lua filter tells it the same way: envoy/model_peek.lua.)

- ``peer``: the address of the connection's other end, without its port (every connection of a client has a
  port of its own);
- ``certificate``: the subject of the client's TLS certificate (mutual TLS on the listener);
- ``metadata``: the value of one request metadata key (``detection.queries.identity_key``), which the client
  sets itself: only worth trusting where a gateway in front sets it and removes the client's own.

A call without a certificate, or without the key, is its peer address. Each identity is prefixed with its kind
(``peer:``, ``certificate:``, ``metadata:``), so that a client cannot take another kind's identity by setting a
key to an address.

>>> peer_address("ipv4:10.0.0.7:51234"), peer_address("ipv6:%5B::1%5D:50051"), peer_address("unix:/run/s.sock")
('10.0.0.7', '[::1]', 'unix:/run/s.sock')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    from grpc import aio

PEER, CERTIFICATE, METADATA = "peer:", "certificate:", "metadata:"
# The properties of gRPC's auth context that name a TLS peer, most specific first.
SUBJECT_PROPERTIES = ("x509_subject", "x509_common_name")


def peer_address(peer: str) -> str:
    """A gRPC peer string (``ipv4:HOST:PORT``, ``ipv6:[HOST]:PORT``, possibly percent-encoded) without its port."""
    kind, _, address = unquote(peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, port = address.rpartition(":")
        return host if host and port.isdigit() else address
    return unquote(peer)


def _peer(context: "aio.ServicerContext") -> str:
    return PEER + peer_address(context.peer() or "")


def _certificate(context: "aio.ServicerContext") -> str:
    properties = context.auth_context() or {}
    for name in SUBJECT_PROPERTIES:
        values = properties.get(name)
        if values:
            return CERTIFICATE + values[0].decode("utf-8", "replace")
    return _peer(context)


def _metadata(key: str) -> Callable[["aio.ServicerContext"], str]:
    def identity(context: "aio.ServicerContext") -> str:
        for name, value in context.invocation_metadata() or ():
            if name == key and value:
                return METADATA + (value.hex() if isinstance(value, bytes) else value)
        return _peer(context)

    return identity


def relay_identity(kind: str, key: str) -> Callable[["aio.ServicerContext"], str]:
    """The identity of a call's client from its server context, for ``kind`` (peer, certificate or metadata)."""
    if kind == "certificate":
        return _certificate
    if kind == "metadata":
        return _metadata(key)
    return _peer

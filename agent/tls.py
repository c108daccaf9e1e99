"""TLS set-up, in one place, for every listener and for the channel to the upstream.

- gRPC listener and upstream channel: :func:`server_credentials`, :func:`channel_credentials`;
- HTTP listeners (``/metrics`` and the admin API, agent/httpd): :func:`server_context`.

A listener's settings have a certificate and key, and optionally a client CA with
``require_client_cert`` for mutual TLS (the ``ListenerTLS`` section of the configuration; this module
reads those fields and imports nothing of sidewatch).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Protocol

import grpc


class ListenerSettings(Protocol):
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    require_client_cert: bool


class UpstreamSettings(Protocol):
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _check_listener(tls: ListenerSettings) -> None:
    if tls.require_client_cert and tls.client_ca_file is None:
        raise ValueError("sidewatch: tls.require_client_cert needs tls.client_ca_file")


def server_credentials(tls: ListenerSettings) -> grpc.ServerCredentials:
    """TLS on the gRPC listener; mutual TLS when a client CA is given and client certificates are required."""
    _check_listener(tls)
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file), _read(tls.cert_file))],
        root_certificates=_read(tls.client_ca_file),
        require_client_auth=tls.require_client_cert,
    )


def channel_credentials(tls: UpstreamSettings) -> grpc.ChannelCredentials:
    """TLS toward the upstream; mutual TLS when a client certificate and key are given."""
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ValueError("sidewatch: upstream.tls.cert_file and upstream.tls.key_file go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )


def server_context(tls: ListenerSettings) -> ssl.SSLContext:
    """An HTTPS listener's context: client certificates verified against the client CA when one is given,
    and required with ``require_client_cert``."""
    _check_listener(tls)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file is not None:
        context.load_verify_locations(tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context

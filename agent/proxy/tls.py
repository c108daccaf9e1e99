"""TLS credentials for the listener and for the channel to the upstream."""

from __future__ import annotations

from pathlib import Path

import grpc

from agent.config import ListenerTLS, UpstreamTLS


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def server_credentials(tls: ListenerTLS) -> grpc.ServerCredentials:
    """TLS on the listener; mutual TLS when a client CA is given and client certificates are required."""
    if tls.require_client_cert and tls.client_ca_file is None:
        raise ValueError("sidewatch: tls.require_client_cert needs tls.client_ca_file")
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file), _read(tls.cert_file))],
        root_certificates=_read(tls.client_ca_file),
        require_client_auth=tls.require_client_cert,
    )


def channel_credentials(tls: UpstreamTLS) -> grpc.ChannelCredentials:
    """TLS toward the upstream; mutual TLS when a client certificate and key are given."""
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ValueError("sidewatch: upstream.tls.cert_file and upstream.tls.key_file go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )

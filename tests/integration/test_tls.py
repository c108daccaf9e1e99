"""TLS and mutual TLS on the listener and toward the upstream, with certificates made here. The gRPC tests run
on both data planes (``data_plane``: the grpc.aio relay and Envoy); the HTTP listeners are sidewatch's own."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import grpc
import pytest

from tests.support.certs import CertificateAuthority
from tests.support.harness import free_port, start_sidecar
from tests.support.upstream import ECHO_UNARY, RecordingUpstream


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory)
    return {
        "ca": ca,
        "sidecar": ca.issue("sidecar", server=True),
        "upstream": ca.issue("upstream", server=True),
        "client": ca.issue("client", server=False),
        "sidecar-client": ca.issue("sidecar-client", server=False),
        "stranger": CertificateAuthority(directory, "stranger CA").issue("stranger", server=False),
    }


@pytest.fixture(params=["python", "envoy"])
def data_plane(request):
    return request.param


def _config(tmp_path, **sections) -> object:
    path = tmp_path / "sidewatch.yaml"
    path.write_text(json.dumps(sections, default=str))
    return path


def _credentials(pki, client: str | None = "client") -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=pki["ca"].cert_file.read_bytes())
    return grpc.ssl_channel_credentials(root_certificates=pki["ca"].cert_file.read_bytes(),
                                        private_key=pki[client].key.read_bytes(),
                                        certificate_chain=pki[client].cert.read_bytes())


def _echo(port: int, credentials: grpc.ChannelCredentials | None) -> bytes:
    address = f"localhost:{port}"
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return channel.unary_unary(ECHO_UNARY)(b"secret", timeout=5)


def test_tls_listener(pki, tmp_path, data_plane):
    with RecordingUpstream() as upstream:
        config = _config(tmp_path, tls={"cert_file": pki["sidecar"].cert, "key_file": pki["sidecar"].key})
        process, port, _ = start_sidecar(tmp_path, upstream.port, "--data-plane", data_plane, config=config)
        try:
            assert _echo(port, _credentials(pki, client=None)) == b"terces"
            with pytest.raises(grpc.RpcError) as raised:
                _echo(port, None)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            process.stop()


def test_mutual_tls_listener_requires_a_client_certificate_from_the_ca(pki, tmp_path, data_plane):
    with RecordingUpstream() as upstream:
        config = _config(tmp_path, tls={"cert_file": pki["sidecar"].cert, "key_file": pki["sidecar"].key,
                                        "client_ca_file": pki["ca"].cert_file, "require_client_cert": True})
        process, port, _ = start_sidecar(tmp_path, upstream.port, "--data-plane", data_plane, config=config)
        try:
            assert _echo(port, _credentials(pki, "client")) == b"terces"
            for credentials in (_credentials(pki, client=None), _credentials(pki, "stranger")):
                with pytest.raises(grpc.RpcError) as raised:
                    _echo(port, credentials)
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            process.stop()


def test_mutual_tls_toward_the_upstream(pki, tmp_path, data_plane):
    upstream_credentials = grpc.ssl_server_credentials(
        [(pki["upstream"].key.read_bytes(), pki["upstream"].cert.read_bytes())],
        root_certificates=pki["ca"].cert_file.read_bytes(), require_client_auth=True)
    with RecordingUpstream(credentials=upstream_credentials) as upstream:
        config = _config(tmp_path, upstream={"tls": {
            "ca_file": pki["ca"].cert_file, "cert_file": pki["sidecar-client"].cert,
            "key_file": pki["sidecar-client"].key, "server_name": "localhost"}})
        process, port, _ = start_sidecar(tmp_path, upstream.port, "--data-plane", data_plane, config=config,
                                          upstream_host="localhost")
        try:
            assert _echo(port, None) == b"terces"
        finally:
            process.stop()

        # Without a client certificate the upstream refuses the sidecar, and the client sees UNAVAILABLE.
        config = _config(tmp_path, upstream={"tls": {"ca_file": pki["ca"].cert_file}})
        process, port, _ = start_sidecar(tmp_path, upstream.port, "--data-plane", data_plane, config=config,
                                          upstream_host="localhost")
        try:
            with pytest.raises(grpc.RpcError) as raised:
                _echo(port, None)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            process.stop()


def _https_get(url: str, pki, client: str | None) -> str:
    context = ssl.create_default_context(cafile=str(pki["ca"].cert_file))
    if client is not None:
        context.load_cert_chain(pki[client].cert, pki[client].key)
    request = urllib.request.Request(url, headers={"Authorization": "Bearer " + "t" * 32})
    with urllib.request.urlopen(request, timeout=5, context=context) as reply:
        return reply.read().decode()


def test_metrics_and_admin_listeners_take_mutual_tls(pki, tmp_path):
    mutual = {"cert_file": pki["sidecar"].cert, "key_file": pki["sidecar"].key,
              "client_ca_file": pki["ca"].cert_file, "require_client_cert": True}
    token = tmp_path / "admin-token"
    token.write_text("t" * 32)
    admin_port = free_port()
    with RecordingUpstream() as upstream:
        config = _config(tmp_path, metrics={"tls": mutual},
                         admin={"listen": f"127.0.0.1:{admin_port}", "token_file": token, "tls": mutual})
        process, _, metrics_port = start_sidecar(tmp_path, upstream.port, config=config)
        try:
            assert "sidewatch_requests_in_flight" in _https_get(f"https://localhost:{metrics_port}/metrics", pki, "client")
            assert '"alerts"' in _https_get(f"https://localhost:{admin_port}/status", pki, "client")
            for port, path in ((metrics_port, "/metrics"), (admin_port, "/status")):
                # No client certificate, or one from another CA: the handshake fails.
                for client in (None, "stranger"):
                    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                        _https_get(f"https://localhost:{port}{path}", pki, client)
                # Plain HTTP gets nothing either.
                with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
                    urllib.request.urlopen(f"http://localhost:{port}{path}", timeout=5).read()
        finally:
            process.stop()

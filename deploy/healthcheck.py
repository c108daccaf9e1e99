"""Ask a sidewatch sidecar's gRPC health service (grpc.health.v1) whether it is serving; exit 0 if so, 1 if not.

Used where the kubelet's native gRPC probe cannot be: the kubelet probes in plaintext only, so a listener
with TLS (and client certificates) is probed by an exec probe running this script inside the pod. Docker's
HEALTHCHECK uses it too. It reads the sidecar's own configuration for the port and the TLS settings:

    python /opt/sidewatch/healthcheck.py --config /etc/sidewatch/sidewatch.yaml [--service NAME]

The overall service ("", the default) is SERVING while the sidecar runs (liveness);
"inference.GRPCInferenceService" is SERVING while the model server is ready (readiness).
With TLS on the listener, the server's certificate is verified with --ca-file (default: the listener's
client_ca_file, usually the same CA) against --server-name (default: the host connected to); when the
listener requires client certificates, the sidecar's own certificate and key are presented (default:
the listener's cert_file and key_file, which must then allow client authentication).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.config import ConfigError, load_config, split_address


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def _channel(args, config) -> grpc.Channel:
    _, port = split_address(config.listen)
    address = args.address or f"127.0.0.1:{port}"
    tls = config.tls
    if tls is None:
        return grpc.insecure_channel(address)
    ca_file = args.ca_file or tls.client_ca_file
    cert_file = args.cert_file or (tls.cert_file if tls.require_client_cert else None)
    key_file = args.key_file or (tls.key_file if tls.require_client_cert else None)
    credentials = grpc.ssl_channel_credentials(_read(ca_file), _read(key_file), _read(cert_file))
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="the sidecar's YAML configuration (default: built-in defaults)")
    parser.add_argument("--service", default="", help='service to ask about (default "", the sidecar itself)')
    parser.add_argument("--address", help="HOST:PORT to ask (default 127.0.0.1 and the port of the config's listen)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    parser.add_argument("--ca-file", type=Path, help="CA certificate that signed the listener's certificate")
    parser.add_argument("--cert-file", type=Path, help="client certificate, for a listener that requires one")
    parser.add_argument("--key-file", type=Path, help="its private key")
    parser.add_argument("--server-name", help="name to verify in the listener's certificate")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        channel = _channel(args, config)
    except (ConfigError, OSError, ValueError) as err:
        print(f"sidewatch health: {err}", file=sys.stderr)
        return 1
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as err:
        print(f"sidewatch health: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"sidewatch health: {args.service or '(overall)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())

"""The ExternalProcessor servers sidewatch runs for Envoy on loopback (the tap, version pins, verdicts).

Each is a grpc.aio server on a free 127.0.0.1 port serving one ExternalProcessor servicer, with a bound on
the streams it serves at once (a stream beyond it waits or is refused: Envoy then goes on as the filter's
failure mode says) and on the size of one message from Envoy.
"""

from __future__ import annotations

from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc import aio


def ext_proc_server(servicer, max_streams: int, max_message_bytes: int, what: str) -> tuple[aio.Server, int]:
    """``servicer`` on a loopback port; returns the (not yet started) server and its port."""
    server = aio.server(maximum_concurrent_rpcs=max_streams,
                        options=[("grpc.max_receive_message_length", max_message_bytes)])
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        raise OSError(f"sidewatch: cannot bind {what} on 127.0.0.1")
    return server, port

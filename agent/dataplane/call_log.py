"""Log lines about forwarded calls: never their payloads, always their request id.

A failed call (any status but OK: the upstream's error, an enforce-mode rejection, a deadline) is
logged as a warning, at most once a minute per (model, version, method, status) with a count of
those left out, so that an outage or an attack does not flood the log; the metrics count every one.
A cancelled call is logged the same way at INFO: its caller gave up, or the shutdown grace cut it.
With ``log_requests`` every call gets an INFO line (and failures are not thinned out): an access log,
for debugging or for audits, at a cost per call.
"""

from __future__ import annotations

import logging

import grpc

from agent import logs
from agent.logs import ThrottledLog

log = logging.getLogger("sidewatch.calls")


class CallLog:
    def __init__(self, log_requests: bool = False) -> None:
        self.every_call = log_requests
        self._failures = ThrottledLog(log)

    def record(self, metadata, labels: tuple[str, str, str], code: grpc.StatusCode, duration: float) -> None:
        """One call's outcome; ``labels`` are its bounded (model, version, method) labels."""
        model, version, method = labels
        extra = {"request_id": logs.request_id(metadata), "model": model, "version": version, "method": method,
                 "code": code.name, "duration_seconds": round(duration, 6)}
        if code is grpc.StatusCode.OK:
            log.info("sidewatch: %s %s version %s OK", method, model, version or "-", extra=extra)
            return
        # A cancelled call is an ordinary end (its caller gave up, or the shutdown grace ran out): INFO.
        level = logging.INFO if code is grpc.StatusCode.CANCELLED else logging.WARNING
        if self.every_call:
            log.log(level, "sidewatch: %s %s version %s failed: %s", method, model, version or "-", code.name,
                    extra=extra)
        else:
            self._failures.log(level, (labels, code), "sidewatch: %s %s version %s failed: %s", method, model,
                               version or "-", code.name, extra=extra)

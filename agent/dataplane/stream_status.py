"""The status an upstream stream ended with, kept before grpc.aio can overwrite it.

When an upstream ends a bidirectional call while the sidecar is still writing the caller's requests to
it, grpc.aio lets the failed write replace the status the upstream sent with INTERNAL "Internal error
from Core" (grpc/grpc#36066; the fix, grpc/grpc#43486, is not in a release). Measured through the sidecar
against an upstream that aborts: 5% of such calls with one request, 25% with twenty. The upstream's
status arrives first, and the call's done callbacks run exactly then: the callback keeps that status, and
the relay passes it on instead of the overwritten one.
"""

from __future__ import annotations

import grpc
from grpc import aio

OVERWRITTEN = "Internal error from Core"
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class FirstStatus:
    """Watches one upstream call; :meth:`of` turns its error into what the upstream really said."""

    def __init__(self, call: aio.Call) -> None:
        self._status = None
        call.add_done_callback(self._keep)

    def _keep(self, call: aio.Call) -> None:
        # grpc.aio has no synchronous accessor for a call's status; its Cython call holds it (read-only).
        self._status = getattr(getattr(call, "_cython_call", None), "_status", None)

    def of(self, err: aio.AioRpcError) -> tuple[grpc.StatusCode, str, tuple]:
        """(code, details, trailing metadata) of the call that raised ``err``."""
        status = self._status
        if err.code() is grpc.StatusCode.INTERNAL and err.details() == OVERWRITTEN and status is not None:
            code = _CODES.get(status.code())
            if code is not None and code is not grpc.StatusCode.OK and status.details() != OVERWRITTEN:
                return code, status.details(), tuple(status.trailing_metadata() or ())
        return err.code(), err.details() or "", tuple(err.trailing_metadata() or ())

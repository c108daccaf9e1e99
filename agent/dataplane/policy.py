"""The policy: everything the relay asks of the rest of sidewatch, behind one object.

The relay knows bytes, the upstream call and its status. What else happens to a call reaches it
through a :class:`Policy`, in two steps:

- **before** the upstream call (:meth:`Policy.before`, :meth:`Policy.stream_upstream`,
  :meth:`Policy.stream_request`): where the call goes (a route pin rewrites a ModelInfer request's
  version or sends the model's calls to a fallback upstream), whether the client is refused (query
  detection in enforce mode: a client whose queries look like a black-box attack's) and whether the
  adversarial verdict is on the hot path (flag mode: scored beside the upstream call, the verdict goes
  into the trailers; enforce mode: scored first, and an input over the threshold is refused);
- **after** it (:meth:`Policy.completed`, :meth:`Policy.finished`): a copy of each successful
  inference for the tap, and the call's outcome for the call log.

The types the policy deals in are declared here, on the data plane's side: the data plane imports no
detector. An inline detector is anything with :class:`InlineVerdicts`' two methods; the adversarial
watch (agent/detect/adversarial/watch.py) is one. A query detector is anything with :class:`QueryChecks`'
two; the query watch (agent/detect/queries/watch.py) is one. A second data plane (Envoy, steered by sidewatch)
would take the same policy.

:class:`Policy` itself relays everything unchanged and keeps nothing; :class:`SidecarPolicy` is the
sidecar's, built by the composition root (agent/app.py) from the route table, the tap, the call log
and the inline detector.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

import grpc

from agent.dataplane.identity import relay_identity
from agent.dataplane.routes import RouteTable, rewrite_version
from agent.dataplane.tap import Tap, TapRecord
from agent.protocol.peek import peek_model

if TYPE_CHECKING:
    from grpc import aio

    from agent.dataplane.call_log import CallLog


class Verdict(Protocol):
    """An inline detector's answer on one request."""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata for the caller: the score and verdict, or why there is none."""

    def rejection(self) -> str | None:
        """Why the request is refused in enforce mode; None: it goes on."""


class InlineVerdicts(Protocol):
    """A detector that can put its verdict on the hot path of a ModelInfer call."""

    def mode(self, model: str) -> str:
        """``shadow`` (off the hot path), ``flag`` (verdict in the trailers) or ``enforce`` (refuse)."""

    async def score_request(self, model: str, version: str, request: bytes) -> Verdict:
        """The verdict on a serialized ModelInferRequest; never raises (a failure is a verdict too)."""


class QueryChecks(Protocol):
    """A detector that sees every ModelInfer request of a client before the upstream call, and may refuse it."""

    def watches(self, model: str) -> bool:
        """Whether the model's requests are checked (its query-detection mode is not off)."""

    def check(self, model: str, client: str, request: bytes) -> str | None:
        """Take a serialized ModelInferRequest of ``client`` (its identity): None, the call goes on; else why
        the client is refused (answered PERMISSION_DENIED). Never raises."""


@dataclass(slots=True)
class Before:
    """What the before step decided for one unary call: the request to send, and where."""

    request: bytes
    version: str
    # A fallback upstream's channel, or None for the main upstream.
    upstream: "aio.Channel | None" = None
    # Flag and enforce modes: the verdict being scored (started beside the upstream call).
    verdict: "Awaitable[Verdict] | None" = None
    # Enforce mode: the relay waits for the verdict and refuses the call when it says so.
    enforce: bool = False
    # Query detection in enforce mode: why the client is refused (PERMISSION_DENIED, before anything else).
    refusal: str | None = None


class Policy:
    """The plain relay's policy: every call goes to the main upstream unchanged; nothing is kept."""

    # Whether :meth:`completed` wants copies of inferences (the relay then keeps streamed requests
    # until their responses arrive).
    keeps_copies = False
    # The inline detector (flag and enforce modes), for a data plane that asks for verdicts itself
    # (Envoy's verdict server, agent/dataplane/envoy/verdicts.py); None: every model is in shadow mode.
    verdicts: InlineVerdicts | None = None
    # The route table, for a data plane that applies pins itself (Envoy); None: nothing is pinned.
    routes: RouteTable | None = None
    # The query detector, for a data plane that asks it itself (Envoy's verdict server); None: no model is watched.
    queries: QueryChecks | None = None

    def before(self, model: str, version: str, request: bytes, inference: bool,
               context: "aio.ServicerContext | None" = None) -> Before | None:
        """The before step of a unary call that names a model (``context``: its server context, which says
        who the client is); None: forward it unchanged."""
        return None

    def stream_upstream(self, first_request: bytes) -> "aio.Channel | None":
        """A fallback upstream for a ModelStreamInfer stream whose first message names a pinned model."""
        return None

    @property
    def steers_streams(self) -> bool:
        """Whether :meth:`stream_upstream` can answer anything but None now (the relay then reads a
        stream's first message before it chooses a channel)."""
        return False

    def stream_refusal(self, message: bytes, context: "aio.ServicerContext") -> str | None:
        """Why a message of a ModelStreamInfer stream is refused (query detection, enforce mode: the
        client is refused), checked before it goes upstream; None: it goes on."""
        return None

    def stream_request(self, message: bytes) -> bytes:
        """A message of a ModelStreamInfer stream, as it goes upstream."""
        return message

    def completed(self, record: TapRecord) -> None:
        """The after step of an inference answered OK: its request and response, as bytes."""

    def tap_load(self) -> float:
        """How full the tap's queue is, 0 to 1 (0 without a tap): a data plane that samples copies slows
        down before the queue drops them."""
        return 0.0

    def finished(self, context: "aio.ServicerContext", labels: tuple[str, str, str], code: grpc.StatusCode,
                 duration: float) -> None:
        """The after step of every call: its bounded (model, version, method) labels, status and duration."""

    async def close(self) -> None:
        """Release what the policy opened (fallback upstream channels), after the relay has stopped."""


class SidecarPolicy(Policy):
    """Route pins, query checks, inline verdicts, the tap and the call log: the sidecar's before and after
    steps. ``identity`` tells the query checks who a call's client is (agent/dataplane/identity.py)."""

    def __init__(self, routes: RouteTable | None = None, tap: Tap | None = None, call_log: "CallLog | None" = None,
                 verdicts: InlineVerdicts | None = None, queries: QueryChecks | None = None,
                 identity: "Callable[[aio.ServicerContext], str] | None" = None) -> None:
        self._routes = self.routes = routes
        self._tap = tap
        self._call_log = call_log
        self._verdicts = self.verdicts = verdicts
        self._queries = self.queries = queries
        self._identity = identity or relay_identity("peer", "")
        self.keeps_copies = tap is not None

    def before(self, model: str, version: str, request: bytes, inference: bool,
               context: "aio.ServicerContext | None" = None) -> Before | None:
        routes = self._routes
        # With nothing pinned and no inline detector, this is all a call costs: a few attribute reads.
        pin = routes.pins.get(model) if routes is not None and routes.active else None
        queries = self._queries if inference else None
        if queries is not None and context is not None and queries.watches(model):
            # Every request of a watched model, before the upstream call and before the adversarial verdict:
            # a refused client costs no model run.
            refusal = queries.check(model, self._identity(context), request)
            if refusal is not None:
                return Before(request, version, refusal=refusal)
        verdicts = self._verdicts if inference else None
        mode = verdicts.mode(model) if verdicts is not None else "shadow"
        if pin is None and mode == "shadow":
            return None
        upstream = None
        if pin is not None:
            if pin.upstream is not None:
                upstream = routes.channel(pin.upstream)
            elif inference:
                request, version = rewrite_version(request, pin.version), pin.version
        verdict = None
        if mode != "shadow":
            verdict = asyncio.ensure_future(verdicts.score_request(model, version, request))
        return Before(request, version, upstream, verdict, mode == "enforce")

    def stream_upstream(self, first_request: bytes) -> "aio.Channel | None":
        pin = self._routes.pins.get(peek_model(first_request)[0]) if self._routes is not None else None
        return self._routes.channel(pin.upstream) if pin is not None and pin.upstream is not None else None

    @property
    def steers_streams(self) -> bool:
        return self._routes is not None and self._routes.upstream_pins

    def stream_refusal(self, message: bytes, context: "aio.ServicerContext") -> str | None:
        # Each message of a stream is a query of its own, checked as a ModelInfer request is (before()).
        queries = self._queries
        if queries is None:
            return None
        model = peek_model(message)[0]
        return queries.check(model, self._identity(context), message) if queries.watches(model) else None

    def stream_request(self, message: bytes) -> bytes:
        routes = self._routes
        return routes.rewrite_request(message) if routes is not None and routes.active else message

    def completed(self, record: TapRecord) -> None:
        self._tap.offer(record)

    def tap_load(self) -> float:
        return self._tap.load() if self._tap is not None else 0.0

    def finished(self, context: "aio.ServicerContext", labels: tuple[str, str, str], code: grpc.StatusCode,
                 duration: float) -> None:
        call_log = self._call_log
        if call_log is not None and (code is not grpc.StatusCode.OK or call_log.every_call):
            call_log.record(context.invocation_metadata(), labels, code, duration)

    async def close(self) -> None:
        if self._routes is not None:
            await self._routes.close()

"""The route table: which models the forwarder must steer away from the version they would reach.

A route hook pins a model either to a version (ModelInfer requests get their ``model_version``
rewritten) or to a fallback upstream (the model's calls go to a second channel). The forwarder reads
:attr:`RouteTable.active` on every model call; with nothing pinned that plain attribute read is all
the table costs. Pins are replaced as a whole dict (copy on write), so the event loop never sees a
dict that another thread is changing.

The table also remembers which versions of each model served traffic recently (fed from the tap,
off the hot path), for route hooks that pin to the last known-good version.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from google.protobuf.message import DecodeError

from agent.protocol import oip_pb2
from agent.protocol.peek import peek_model

if TYPE_CHECKING:
    from grpc import aio

    from agent.dataplane.tap import TappedInference


@dataclass(frozen=True)
class Pin:
    model: str
    version: str | None         # pinned version, or None when pinned to an upstream
    upstream: str | None        # fallback upstream HOST:PORT, or None
    incident: str = ""
    hook: str = ""
    pinned_at: float = 0.0

    @property
    def target(self) -> str:
        """The pin as the sidewatch_route_pinned ``version`` label: the version, or ``upstream:HOST:PORT``."""
        return self.version if self.version is not None else f"upstream:{self.upstream}"

    def to_dict(self) -> dict:
        return {"model": self.model, "version": self.version, "upstream": self.upstream,
                "incident": self.incident, "hook": self.hook, "pinned_at": self.pinned_at}


class RouteTable:
    """Pins per model, read by the forwarder; written by the rollback dispatcher's thread."""

    def __init__(self, open_channel: "Callable[[str], aio.Channel] | None" = None,
                 max_models: int = 64, max_versions: int = 16) -> None:
        # Read without a lock on the hot path: always replaced whole, never mutated.
        self.pins: dict[str, Pin] = {}
        self.active = False
        # True while some pin names an upstream: streams then read their first message before choosing
        # a channel.
        self.upstream_pins = False
        # Opens a channel to a fallback upstream with the main upstream's options and TLS (see
        # channel_opener); without it, pins to an upstream are refused.
        self.open_channel = open_channel
        # Fallback channels, opened on the event loop by the first call that needs one.
        self._channels: dict[str, aio.Channel] = {}
        self._lock = threading.Lock()
        # model -> {version: unix time last seen serving}; bounded, since names come from traffic.
        self._served: dict[str, dict[str, float]] = {}
        self._max_models = max_models
        self._max_versions = max_versions
        # Called (from the writer's thread, with the lock held) after each change of the pins: a data plane
        # that does not read the table per call (Envoy) learns of changes here. Callbacks must be quick.
        self._listeners: list[Callable[[], None]] = []

    # --- pins ------------------------------------------------------------------------------

    def pin(self, pin: Pin) -> Pin | None:
        """Pin ``pin.model`` (replacing any pin it had); returns the replaced pin."""
        if pin.upstream is not None and self.open_channel is None:
            raise ValueError("this sidecar cannot open channels to a fallback upstream (no channel opener)")
        with self._lock:
            previous = self.pins.get(pin.model)
            self._publish({**self.pins, pin.model: pin})
        return previous

    def unpin(self, model: str) -> Pin | None:
        """Remove the model's pin; returns it, or None when it had none."""
        with self._lock:
            previous = self.pins.get(model)
            if previous is not None:
                self._publish({name: pin for name, pin in self.pins.items() if name != model})
        return previous

    def on_change(self, callback: "Callable[[], None]") -> None:
        """Call ``callback`` after every change of the pins (module docstring of agent/dataplane/envoy/pins.py)."""
        self._listeners.append(callback)

    def get(self, model: str) -> Pin | None:
        return self.pins.get(model)

    def rewrite_request(self, message: bytes) -> bytes:
        """A streamed ModelInferRequest with its version rewritten when its model is pinned to a version."""
        pin = self.pins.get(peek_model(message)[0])
        if pin is None or pin.version is None:
            return message
        return rewrite_version(message, pin.version)

    def channel(self, address: str) -> "aio.Channel":
        """The channel to a fallback upstream (called on the event loop)."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self.open_channel(address)
        return channel

    async def close(self) -> None:
        """Close the fallback channels (at shutdown, after the server has stopped)."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    def _publish(self, pins: dict[str, Pin]) -> None:
        # The new dict is complete before it is visible; the flags follow it.
        self.pins = pins
        self.upstream_pins = any(pin.upstream is not None for pin in pins.values())
        self.active = bool(pins)
        for callback in self._listeners:
            callback()

    # --- versions seen serving ---------------------------------------------------------------

    def observe(self, model: str, version: str, at: float | None = None) -> None:
        """Record that ``version`` of ``model`` answered a request."""
        if not model or not version:
            return
        now = time.time() if at is None else at
        with self._lock:
            versions = self._served.get(model)
            if versions is None:
                if len(self._served) >= self._max_models:
                    return
                versions = self._served[model] = {}
            if version not in versions and len(versions) >= self._max_versions:
                del versions[min(versions, key=versions.__getitem__)]
            versions[version] = now

    def observe_inference(self, inference: "TappedInference") -> None:
        """A tap sink: the version that served is in the response (the request may name none)."""
        response = inference.response
        version = response.model_version if response is not None and response.model_version else inference.version
        self.observe(inference.model, version, inference.received_at)

    def served_versions(self, model: str) -> dict[str, float]:
        with self._lock:
            return dict(self._served.get(model, {}))

    def last_known_good(self, model: str, bad_version: str) -> str | None:
        """The most recent version of ``model`` seen serving, other than ``bad_version``."""
        candidates = {v: t for v, t in self.served_versions(model).items() if v != bad_version}
        if not candidates:
            return None
        return max(candidates, key=candidates.__getitem__)

    def status(self) -> dict:
        return {"pins": {model: pin.to_dict() for model, pin in self.pins.items()}}


def rewrite_version(request: bytes, version: str) -> bytes:
    """A serialized ModelInferRequest with ``model_version`` set to ``version``.

    A message that does not parse goes on unchanged: the upstream rejects it with its own error,
    as it would without the pin.
    """
    message = oip_pb2.ModelInferRequest()
    try:
        message.ParseFromString(request)
    except DecodeError:
        return request
    message.model_version = version
    return message.SerializeToString()

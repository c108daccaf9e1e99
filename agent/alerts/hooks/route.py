"""The ``route`` hook: inside the sidecar, stop sending the model's traffic to the bad version.

It pins the model in the sidecar's :class:`~agent.dataplane.routes.RouteTable`: to a version (ModelInfer
requests get their ``model_version`` rewritten) or to a fallback upstream. It takes effect on the next
request, needs no cluster, and stays until it is undone explicitly (``undo_route``: the admin API or
``sidewatch route undo``); pins survive restarts (replayed from the audit log).

Without ``version`` and ``upstream`` the version is the last known-good one: the most recent version
of the model seen serving traffic, other than the alert's ``version`` label.

Its plan carries the pin as an audit record: the dispatcher writes the pin to the audit log and then
applies it, so a crash can never leave a pin in effect that the log does not know about.
"""

from __future__ import annotations

import time

from agent.alerts.hooks import Hook, HookCall, HookFailed, Plan
from agent.config.rollback import RouteHook
from agent.dataplane.routes import Pin, RouteTable


def _model(hook: RouteHook, call: HookCall) -> str:
    model = hook.model or call.incident.alert.labels.get("model", "")
    if not model:
        raise HookFailed("the hook names no model and the alert has no model label")
    return model


def plan(hook: RouteHook, call: HookCall, routes: RouteTable) -> Pin:
    """The pin this attempt would set; raises HookFailed when there is none to set."""
    model = _model(hook, call)
    pin = dict(model=model, incident=call.incident.id, hook=call.hook, pinned_at=round(time.time(), 3))
    if hook.upstream is not None:
        if routes.open_channel is None:
            raise HookFailed("this sidecar cannot open channels to a fallback upstream (no channel opener)")
        return Pin(version=None, upstream=hook.upstream, **pin)
    if hook.version is not None:
        return Pin(version=hook.version, upstream=None, **pin)
    bad = call.incident.alert.labels.get("version", "")
    if not bad:
        raise HookFailed(f"no version to pin {model} to: the hook names none and the alert has no version "
                         "label to tell the bad version from a good one")
    good = routes.last_known_good(model, bad)
    if good is None:
        seen = ", ".join(sorted(routes.served_versions(model))) or "none"
        raise HookFailed(f"no known-good version of {model}: no version other than {bad} has served traffic "
                         f"since the sidecar started (seen: {seen})")
    return Pin(version=good, upstream=None, **pin)


def describe(hook: RouteHook, call: HookCall, routes: RouteTable) -> str:
    try:
        pin = plan(hook, call, routes)
    except HookFailed as err:
        return f"pin nothing: {err}"
    return f"pin {pin.model} to {pin.target}"


class Route(Hook):
    """Pins the model in the sidecar's route table; its effect is its audit record (``route_pinned``)."""

    effect_is_recorded = True

    def plan(self, call: HookCall) -> Plan:
        pin = plan(self.config, call, self.context.routes)
        return Plan(f"pin {pin.model} to {pin.target}", "route_pinned", pin.to_dict(), pin)

    def apply(self, plan: Plan, call: HookCall) -> str:
        pin = plan.target
        previous = self.context.apply_pin(pin)
        replaced = f" (was {previous.target})" if previous is not None and previous.target != pin.target else ""
        return f"{pin.model} pinned to {pin.target}{replaced}"

    def describe(self, call: HookCall) -> str:
        return describe(self.config, call, self.context.routes)

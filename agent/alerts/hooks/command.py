"""The ``command`` hook: run a program given as an argument list (no shell); exit status 0 is success.

The program gets a small environment: PATH, HOME, LANG, LC_ALL and TZ from the sidecar's (the rest
may hold tokens), the hook's ``env``, and the incident:

* SIDEWATCH_INCIDENT_ID, SIDEWATCH_ALERT, SIDEWATCH_ALERT_KEY, SIDEWATCH_SEVERITY, SIDEWATCH_SOURCE,
  SIDEWATCH_HOOK, SIDEWATCH_ATTEMPT, SIDEWATCH_INSTANCE, SIDEWATCH_MODEL and SIDEWATCH_VERSION
  (the alert's model and version labels, empty when it has none);
* SIDEWATCH_INCIDENT_JSON: the same JSON a webhook receives.

It runs in a session of its own, and at the timeout the whole process group is killed, so a script's
children do not outlive it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

from agent.alerts.hooks import Hook, HookCall, HookFailed, Plan
from agent.config.rollback import CommandHook

_PASSED_ON = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
# Characters of the program's output kept in the audit log.
_OUTPUT_TAIL = 500


def environment(hook: CommandHook, call: HookCall) -> dict[str, str]:
    alert = call.incident.alert
    env = {name: os.environ[name] for name in _PASSED_ON if name in os.environ}
    env.update(hook.env)
    env.update({
        "SIDEWATCH_INCIDENT_ID": call.incident.id,
        "SIDEWATCH_ALERT": alert.name,
        "SIDEWATCH_ALERT_KEY": alert.key,
        "SIDEWATCH_SEVERITY": alert.severity,
        "SIDEWATCH_SOURCE": alert.source,
        "SIDEWATCH_HOOK": call.hook,
        "SIDEWATCH_ATTEMPT": str(call.attempt),
        "SIDEWATCH_INSTANCE": call.instance,
        "SIDEWATCH_MODEL": alert.labels.get("model", ""),
        "SIDEWATCH_VERSION": alert.labels.get("version", ""),
        "SIDEWATCH_INCIDENT_JSON": json.dumps(call.payload(), sort_keys=True),
    })
    return env


def describe(hook: CommandHook, call: HookCall) -> str:
    return f"run {hook.argv!r}"


def run(hook: CommandHook, call: HookCall) -> str:
    try:
        process = subprocess.Popen(hook.argv, env=environment(hook, call), cwd=hook.cwd, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as err:
        raise HookFailed(f"cannot run {hook.argv[0]}: {err.strerror or err}") from None
    try:
        output, _ = process.communicate(timeout=hook.timeout_seconds)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        try:
            output, _ = process.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a descendant that left the group still holds the pipe
            output = b""
        process.wait()
        raise HookFailed(f"{hook.argv[0]} did not finish within {hook.timeout_seconds} s; killed"
                         + _tail(output)) from None
    if process.returncode != 0:
        how = (f"killed by signal {-process.returncode}" if process.returncode < 0
               else f"exited with status {process.returncode}")
        raise HookFailed(f"{hook.argv[0]} {how}" + _tail(output))
    return f"{hook.argv[0]} exited with status 0" + _tail(output)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(output: bytes | None) -> str:
    text = (output or b"").decode("utf-8", "replace").strip()
    if not text:
        return ""
    return ": " + (text if len(text) <= _OUTPUT_TAIL else "..." + text[-_OUTPUT_TAIL:])


class Command(Hook):
    def plan(self, call: HookCall) -> Plan:
        return Plan(describe(self.config, call))

    def apply(self, plan: Plan, call: HookCall) -> str:
        return run(self.config, call)

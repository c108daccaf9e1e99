"""The command hook runs a real program: argument list, incident in the environment, exit status, timeout."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from agent.alerts.hooks import HookCall, HookFailed, command
from agent.config.rollback import CommandHook
from tests.support.webhook import make_incident

# Writes its arguments and environment as JSON to the file named by its first argument.
RECORDER = """
import json, os, sys
with open(sys.argv[1], "w") as out:
    json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, out)
"""


def test_program_gets_its_arguments_and_the_incident_without_the_sidecars_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDEWATCH_ADMIN_TOKEN", "must-not-leak")
    out = tmp_path / "seen.json"
    hook = CommandHook(type="command", argv=[sys.executable, "-c", RECORDER, str(out), "--now", "a b; rm -rf /"],
                       env={"ROLLBACK_TARGET": "mnist"})
    message = command.run(hook, HookCall(make_incident(), "script", 1, "edge-7"))
    assert "exited with status 0" in message
    seen = json.loads(out.read_text())
    # No shell: the argument with a space and a semicolon arrives as one argument.
    assert seen["argv"] == [str(out), "--now", "a b; rm -rf /"]
    env = seen["env"]
    assert "SIDEWATCH_ADMIN_TOKEN" not in env
    assert env["ROLLBACK_TARGET"] == "mnist"
    assert env["PATH"] == os.environ["PATH"]
    assert env["SIDEWATCH_INCIDENT_ID"] == "inc-test-1"
    assert env["SIDEWATCH_ALERT"] == "AdversarialRateHigh"
    assert env["SIDEWATCH_ALERT_KEY"] == "AdversarialRateHigh{model=mnist_cnn,version=2}"
    assert env["SIDEWATCH_MODEL"] == "mnist_cnn" and env["SIDEWATCH_VERSION"] == "2"
    assert env["SIDEWATCH_HOOK"] == "script" and env["SIDEWATCH_ATTEMPT"] == "1"
    assert env["SIDEWATCH_INSTANCE"] == "edge-7"
    incident = json.loads(env["SIDEWATCH_INCIDENT_JSON"])
    assert incident["incident"] == "inc-test-1" and incident["value"] == 0.12


def test_non_zero_exit_is_a_failure_with_the_programs_output(tmp_path):
    hook = CommandHook(type="command", argv=[sys.executable, "-c", "print('kubectl: forbidden'); raise SystemExit(3)"])
    with pytest.raises(HookFailed, match="exited with status 3: kubectl: forbidden"):
        command.run(hook, HookCall(make_incident(), "script", 1, "edge"))


def test_timeout_kills_the_program_and_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    # The program starts a child that would outlive it, then hangs.
    script = (f"import subprocess, sys, time\n"
              f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              f"time.sleep(60)\n")
    hook = CommandHook(type="command", argv=[sys.executable, "-c", script], timeout_seconds=1)
    with pytest.raises(HookFailed, match="did not finish within 1.0 s; killed"):
        command.run(hook, HookCall(make_incident(), "script", 1, "edge"))
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"   # a zombie is dead, waiting for its parent
    except FileNotFoundError:
        return False


def test_missing_program_is_a_failure(tmp_path):
    hook = CommandHook(type="command", argv=[str(tmp_path / "no-such-program")])
    with pytest.raises(HookFailed, match="cannot run"):
        command.run(hook, HookCall(make_incident(), "script", 1, "edge"))

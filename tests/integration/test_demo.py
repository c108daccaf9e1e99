"""The one-command demo end to end: traffic flows through the sidecar, the tap decodes it, nothing alarms
on the benign traffic, the drift is flagged, the attack is seen, its alert fires and the route hook moves
the traffic from version 2 to version 1."""

from __future__ import annotations

import re
import subprocess

from tests.support.harness import sidewatch


def test_demo_runs_and_shows_traffic():
    # 36 s: benign for 14.4 s, drift for 10.8 s (drift looks every 5 s: two whole looks), the attack for
    # the last 10.8 s (flagged-share looks every 2 s).
    done = subprocess.run(sidewatch("demo", "--duration", "36", "--rate", "40"), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    frames = done.stdout.strip().split("\n\n")
    last = frames[-1]
    benign = [frame for frame in frames if "traffic: benign" in frame]
    assert len(benign) >= 10
    for frame in benign:  # the benign phase: no drift flag, no flagged-share alarm, no alert
        assert "DRIFT" not in frame.split("traffic:", 1)[1] and "flagged share ok" in frame, frame
        assert "alerts firing: none" in frame, frame
    assert any(re.search(r"drift .*DRIFT", frame) for frame in frames if "traffic: DRIFT" in frame)
    assert "budget 1/30d" in last
    sent = int(re.search(r"sent\s+(\d+)", last).group(1))
    errors = int(re.search(r"errors\s+(\d+)", last).group(1))
    forwarded = float(re.search(r"forwarded\s+(\d+)", last).group(1))
    decoded = float(re.search(r"decoded\s+(\d+)", last).group(1))
    accuracy = float(re.search(r"benign accuracy\s+([\d.]+)%", last).group(1))
    assert sent >= 100 and errors == 0
    assert forwarded == sent
    assert decoded >= sent - 5  # the last copies may still be in the tap when the display closes
    assert accuracy > 90
    # The last 40% of the demo is adversarial traffic: the detector flags a good share of it.
    scored = float(re.search(r"scored\s+(\d+)", last).group(1))
    detections = float(re.search(r"adversarial detections\s+(\d+)", last).group(1))
    assert scored >= sent - 5
    assert detections >= 0.25 * sent
    # The loop closed: the alert fired, the route hook pinned version 1, and answers came from it.
    assert "alerts firing: AdversarialRateHigh" in last
    assert "route pinned: mnist_cnn -> version 1" in last
    moved = re.search(r"ROLLED BACK 2 -> 1 ([\d.]+) s after the first attack request", last)
    assert moved is not None, last  # how soon is bench/alert_rollback.py's figure, not a test's

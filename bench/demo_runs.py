"""Does the demo tell the truth, run after run? ``sidewatch demo`` N times in a row, each frame read back.

Per run: whether any frame of the benign phase showed a drift flag (``DRIFT``), the flagged-share alarm
(``flagged share ALARM``) or a firing alert; when the drift phase was first flagged (seconds after it
began); when the attack phase's flagged-share alarm rose and when the rollback came. The goal (issue 11):
no flag and no alert in the benign phase in every run; the drift phase flagged in every run.

    .venv/bin/python bench/demo_runs.py --runs 10 --out bench-results/demo_runs.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAME_TIME = re.compile(r"\]\s+([\d.]+) / ([\d.]+) s\s+traffic: (.*)")


def read_frames(stdout: str) -> list[dict]:
    frames = []
    for text in stdout.strip().split("\n\n"):
        match = FRAME_TIME.search(text)
        if match is None:
            continue
        traffic = match.group(3)
        frames.append({
            "t": float(match.group(1)),
            "phase": "attack" if traffic.startswith("ATTACK") else "drift" if traffic.startswith("DRIFT") else "benign",
            "drift_flag": bool(re.search(r"drift .*DRIFT", text)),
            "share_alarm": "flagged share ALARM" in text,
            "alerts": re.search(r"alerts firing: ([^ ]+(?:, [^ ]+)*)", text).group(1),
            "rolled_back": "ROLLED BACK" in text,
        })
    return frames


def summarise(frames: list[dict], duration: float, drift_starts: float, attack_starts: float) -> dict:
    benign = [f for f in frames if f["phase"] == "benign"]

    def first(phase: str, key: str, since: float) -> float | None:
        hits = [f["t"] for f in frames if f["phase"] == phase and f[key]]
        return round(min(hits) - since, 1) if hits else None

    return {
        "frames": len(frames), "benign_frames": len(benign),
        "benign_drift_flag": any(f["drift_flag"] for f in benign),
        "benign_share_alarm": any(f["share_alarm"] for f in benign),
        "benign_alert": any(f["alerts"] != "none" for f in benign),
        "drift_flagged_after_s": first("drift", "drift_flag", drift_starts * duration),
        "attack_share_alarm_after_s": first("attack", "share_alarm", attack_starts * duration),
        "attack_rolled_back_after_s": first("attack", "rolled_back", attack_starts * duration),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "demo_runs.json")
    args = parser.parse_args()
    from agent.demo.run import ATTACK_STARTS, DRIFT_STARTS

    runs = []
    for run in range(args.runs):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--duration", str(args.duration),
                               "--rate", str(args.rate)], capture_output=True, text=True, cwd=ROOT, timeout=600)
        summary = {"run": run, "returncode": done.returncode, "wall_s": round(time.monotonic() - started, 1),
                   **summarise(read_frames(done.stdout), args.duration, DRIFT_STARTS, ATTACK_STARTS)}
        runs.append(summary)
        print(json.dumps(summary), flush=True)
    quiet = sum(not (r["benign_drift_flag"] or r["benign_share_alarm"] or r["benign_alert"]) and r["returncode"] == 0
                for r in runs)
    flagged = sum(r["drift_flagged_after_s"] is not None for r in runs)
    result = {"machine": {"python": platform.python_version(), "machine": platform.machine()},
              "parameters": vars(args) | {"out": str(args.out)}, "runs": runs,
              "benign_phase_quiet": f"{quiet}/{len(runs)}", "drift_phase_flagged": f"{flagged}/{len(runs)}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"benign phase quiet in {quiet}/{len(runs)} runs; drift phase flagged in {flagged}/{len(runs)}")
    return 0 if quiet == len(runs) and flagged == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())

"""``sidewatch demo``: the bundled model server, the sidecar in front of it, and a client streaming MNIST.

Everything runs on loopback as separate processes, exactly as it would be deployed: the client
talks gRPC to the sidecar, the sidecar forwards to the model server. The display shows what
passes: requests, latency, and the tap's activity read from the sidecar's own /metrics.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from agent.demo.data import BENIGN_STREAM, load_adversarial, load_images
from agent.demo.display import LiveDisplay, bar
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol.client import InferenceClient

MODEL = "mnist_cnn"
# Unversioned requests are answered by the latest version.
DEMO_VERSION = "2"
# The demo's alert rule and rollback hook: adversarial traffic pins the model to version 1.
DEMO_CONFIG = Path(__file__).with_name("sidewatch-demo.yaml")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The drift detectors the display follows (agent/detect/drift/budgeted.py names them).
SHOWN_DETECTORS = ("inputs_mean", "inputs_shape", "confidence", "class_mix")
# Per-version series the display reads, for the demo's version.
SHOWN_SERIES = ("sidewatch_drift_statistic{", "sidewatch_drift_threshold{", "sidewatch_drift_detected{",
                "sidewatch_drift_false_alarm_budget_seconds{", "sidewatch_adversarial_rate_detected{")


def _scrape(url: str) -> dict[str, float]:
    """Sum each sidewatch metric over its labels (inference calls only, where a method is named); and, for
    the demo's version, each shown drift detector's evidence, threshold and flag ("statistic:NAME",
    "threshold:NAME", "detected:NAME"), the drift budget and the flagged-share flag."""
    totals: dict[str, float] = {}
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            text = reply.read().decode()
    except OSError:
        return totals
    for line in text.splitlines():
        if line.startswith(SHOWN_SERIES):
            if f'version="{DEMO_VERSION}"' in line:
                name = line.split("{", 1)[0].removeprefix("sidewatch_")
                value = float(line.rsplit(" ", 1)[1])
                if 'detector="' in line:
                    detector = line.split('detector="', 1)[1].split('"', 1)[0]
                    if detector in SHOWN_DETECTORS and 'feature="all"' in line:
                        totals[f"{name.removeprefix('drift_')}:{detector}"] = value
                else:
                    totals[name] = value
            continue
        if line.startswith(("sidewatch_alert_active{", "sidewatch_route_pinned{")):
            totals[line.rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
            continue
        if not line.startswith("sidewatch_") or ("method=" in line and 'method="ModelInfer"' not in line):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def _wait_ready(client: InferenceClient, processes: "_Processes", what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        processes.check()
        try:
            client.wait_ready(timeout=1)
            return
        except (grpc.RpcError, grpc.FutureTimeoutError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"sidewatch demo: the {what} did not become ready in 60 s")
            time.sleep(0.2)


class _Processes:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        child = subprocess.Popen([sys.executable, "-m", "agent.cli", *args], stdout=log, stderr=subprocess.STDOUT)
        self.children.append((name, child))
        return child

    def check(self) -> None:
        for name, child in self.children:
            if child.poll() is not None:
                raise RuntimeError(f"sidewatch demo: {name} exited ({child.returncode}); see {self.log_dir}/{name}.log")

    def stop(self) -> None:
        for _, child in reversed(self.children):
            child.terminate()
        for _, child in self.children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


# Benign traffic first, so the display shows a baseline; then a drifted stream; then an attack.
DRIFT_STARTS, ATTACK_STARTS = 0.4, 0.7


def drifted(images: np.ndarray) -> np.ndarray:
    """Brighter, thicker strokes: what a new camera or a changed preprocessing step might send."""
    return np.clip(images * 1.6 + 0.25, 0.0, 1.0).astype(np.float32)


def run_demo(duration: float = 60.0, rate: float = 50.0) -> int:
    images, labels = load_images(BENIGN_STREAM)
    attack = load_adversarial()
    model_port, sidecar_port, metrics_port = _free_port(), _free_port(), _free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="sidewatch-demo-"))
    processes = _Processes(log_dir)
    display = LiveDisplay()
    print(f"sidewatch demo: model server on 127.0.0.1:{model_port}, sidecar on 127.0.0.1:{sidecar_port}, "
          f"metrics on http://127.0.0.1:{metrics_port}/metrics, logs in {log_dir}")
    try:
        processes.start("model-server", "model-server", "--listen", f"127.0.0.1:{model_port}")
        model_client = InferenceClient(f"127.0.0.1:{model_port}")
        _wait_ready(model_client, processes, "model server")
        model_client.close()
        processes.start("sidecar", "serve", "--config", str(DEMO_CONFIG), "--listen", f"127.0.0.1:{sidecar_port}",
                        "--upstream", f"127.0.0.1:{model_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
                        "--model-repository", str(BUNDLED_REPOSITORY))
        client = InferenceClient(f"127.0.0.1:{sidecar_port}")
        _wait_ready(client, processes, "sidecar")
        _stream(client, (images, labels), attack, duration, rate, display,
                f"http://127.0.0.1:{metrics_port}/metrics", processes)
        client.close()
    except KeyboardInterrupt:
        pass
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    finally:
        processes.stop()
    return 0


class _Detections:
    """Detections per scored input since the previous frame: the display's "now" rate."""

    def __init__(self) -> None:
        self.last = (0.0, 0.0)
        self.rate = 0.0

    def update(self, metrics: dict[str, float]) -> float:
        scored = metrics.get("sidewatch_adversarial_inputs_total", 0.0)
        detected = metrics.get("sidewatch_adversarial_detections_total", 0.0)
        if scored > self.last[0]:
            self.rate = (detected - self.last[1]) / (scored - self.last[0])
        self.last = (scored, detected)
        return self.rate


def _stream(client: InferenceClient, benign: tuple[np.ndarray, np.ndarray],
            attack: tuple[np.ndarray, np.ndarray, str], duration: float, rate: float, display: LiveDisplay,
            metrics_url: str, processes: _Processes) -> None:
    sent = correct = errors = benign_answered = 0
    rollback = _Rollback()
    shifted = drifted(benign[0])
    latencies: list[float] = []
    detections = _Detections()
    started = time.monotonic()
    next_send = started
    next_draw = started
    interval = 1.0 / rate
    while (now := time.monotonic()) - started < duration:
        if now < next_send:
            time.sleep(min(next_send - now, 0.01))
            continue
        next_send += interval
        phase = (now - started) / duration
        attacking = phase >= ATTACK_STARTS
        drifting = DRIFT_STARTS <= phase < ATTACK_STARTS
        images, labels = attack[:2] if attacking else benign
        if drifting:
            images = shifted
        index = sent % len(images)
        call_started = time.perf_counter()
        if attacking or drifting:
            rollback.first_bad.setdefault("attack" if attacking else "drift", time.monotonic())
        try:
            outputs, response, _ = client.infer(MODEL, {"input": images[index:index + 1]}, timeout=5)
            latencies.append(time.perf_counter() - call_started)
            rollback.answered_by(response.model_version)
            if not attacking and not drifting:
                benign_answered += 1
                correct += int(np.argmax(outputs["probabilities"][0]) == labels[index])
        except grpc.RpcError:
            errors += 1
        sent += 1
        if now >= next_draw:
            next_draw = now + 0.5
            processes.check()
            metrics = _scrape(metrics_url)
            traffic = f"ATTACK: {attack[2]}" if attacking else "DRIFT: brightened digits" if drifting else ""
            display.draw(_frame(now - started, duration, traffic, sent, correct,
                                benign_answered, errors, latencies, metrics, detections.update(metrics), rollback))
    # The last calls' metrics may still be on their way (under Envoy, its access log reaches sidewatch every
    # 0.5 s): the final frame waits for them, a little.
    settle_until = time.monotonic() + 2.0
    metrics = _scrape(metrics_url)
    while metrics.get("sidewatch_requests_total", 0) < sent - errors and time.monotonic() < settle_until:
        time.sleep(0.1)
        metrics = _scrape(metrics_url)
    display.draw(_frame(time.monotonic() - started, duration, f"ATTACK: {attack[2]}", sent, correct, benign_answered, errors,
                        latencies, metrics, detections.update(metrics), rollback))


def _label(series: str, name: str) -> str:
    """The value of label ``name`` in a series written as ``metric{a="x",b="y"}``."""
    return series.split(f'{name}="', 1)[1].split('"', 1)[0]


class _Rollback:
    """When the traffic turned bad, and when the answers started coming from another version."""

    def __init__(self) -> None:
        self.first_bad: dict[str, float] = {}  # "drift" / "attack" -> when its first request was sent
        self.versions: list[str] = []
        self.moved: tuple[str, str, float, str] | None = None  # (from, to, seconds after, the bad traffic's kind)

    def answered_by(self, version: str) -> None:
        if self.versions and version != self.versions[-1] and self.moved is None and self.first_bad:
            # Timed from the latest kind of bad traffic to start: the one that was running when it moved.
            kind, since = max(self.first_bad.items(), key=lambda item: item[1])
            self.moved = (self.versions[-1], version, time.monotonic() - since, kind)
        if not self.versions or version != self.versions[-1]:
            self.versions.append(version)

    def describe(self, metrics: dict[str, float]) -> str:
        firing = [_label(key, "alert") for key, value in metrics.items()
                  if key.startswith("sidewatch_alert_active{") and value > 0]
        pins = [f"{_label(key, 'model')} -> version {_label(key, 'version')}"
                for key, value in metrics.items() if key.startswith("sidewatch_route_pinned{") and value > 0]
        answered = self.versions[-1] if self.versions else "-"
        text = f"answered by version {answered}   alerts firing: {', '.join(firing) or 'none'}"
        if pins:
            text += f"   route pinned: {', '.join(pins)}"
        if self.moved is not None:
            text += (f"   ROLLED BACK {self.moved[0]} -> {self.moved[1]} {self.moved[2]:.1f} s after the first "
                     f"{self.moved[3]} request")
        return text


def _frame(elapsed: float, duration: float, traffic: str, sent: int, correct: int, benign_answered: int, errors: int,
           latencies: list[float], metrics: dict[str, float], detection_rate: float, rollback: _Rollback) -> list[str]:
    recent = np.array(latencies[-500:]) * 1000 if latencies else np.zeros(1)
    phase = traffic or "benign MNIST digits"
    return [
        f"  time      [{bar(elapsed / duration)}] {elapsed:5.1f} / {duration:.0f} s   traffic: {phase}",
        f"  client    sent {sent:6d}   errors {errors:4d}   benign accuracy {correct / max(benign_answered, 1):6.1%}   "
        f"latency p50 {np.percentile(recent, 50):6.2f} ms  p99 {np.percentile(recent, 99):6.2f} ms",
        f"  sidecar   ModelInfer forwarded {metrics.get('sidewatch_requests_total', 0):6.0f}   "
        f"in flight {metrics.get('sidewatch_requests_in_flight', 0):3.0f}   "
        f"upstream errors {metrics.get('sidewatch_upstream_errors_total', 0):4.0f}",
        f"  tap       enqueued {metrics.get('sidewatch_tap_enqueued_total', 0):6.0f}   "
        f"decoded {metrics.get('sidewatch_tap_processed_total', 0):6.0f}   "
        f"dropped {metrics.get('sidewatch_tap_dropped_total', 0):4.0f}   "
        f"queue {metrics.get('sidewatch_tap_queue_depth', 0):4.0f}   "
        f"decode errors {metrics.get('sidewatch_decode_errors_total', 0):3.0f}",
        f"  squeeze   scored {metrics.get('sidewatch_adversarial_inputs_total', 0):6.0f}   "
        f"adversarial detections {metrics.get('sidewatch_adversarial_detections_total', 0):6.0f}   "
        f"now [{bar(detection_rate, 20)}] {detection_rate:6.1%} of inputs flagged",
        f"  alarms    false-alarm budget {_budget(metrics)} per model version   "
        f"flagged share {'ALARM' if metrics.get('adversarial_rate_detected') else 'ok'}",
        "  drift     " + "   ".join(_drift_cell(metrics, name) for name in SHOWN_DETECTORS)
        + f"   anomalies {metrics.get('sidewatch_anomalies_total', 0):5.0f}",
        "  rollback  " + rollback.describe(metrics),
    ]


def _budget(metrics: dict[str, float]) -> str:
    seconds = metrics.get("drift_false_alarm_budget_seconds")
    if not seconds:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"1/{seconds / size:g}{unit}"
    return f"1/{seconds:g}s"


def _drift_cell(metrics: dict[str, float], name: str) -> str:
    """The detector's evidence against its threshold at the last tested look, and its held flag."""
    statistic, threshold = metrics.get(f"statistic:{name}"), metrics.get(f"threshold:{name}")
    mark = "DRIFT" if metrics.get(f"detected:{name}") else "ok"
    if statistic is None or threshold is None or statistic != statistic:  # no tested look yet
        return f"{name} waiting {mark}"
    return f"{name} {statistic:.3g}/{threshold:.3g} {mark}"

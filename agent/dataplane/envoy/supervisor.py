"""The Envoy process: started from a bootstrap file, watched, restarted, drained, stopped.

``start`` runs ``envoy -c BOOTSTRAP`` (hot restart off, so that several can run on one host) and waits until
its admin API answers ``/ready``; its log lines are forwarded to sidewatch's log (JSON lines), one record per
line, with Envoy's level. A watcher thread restarts Envoy when it exits on its own (backing off from 0.5 s to
10 s between tries, reset after a minute up), counted in ``restarts``. ``drain`` asks Envoy to stop taking
new connections and lets calls in flight finish; ``stop`` then ends it (SIGTERM, SIGKILL after a timeout).
Envoy is started by the supervisor thread with Linux's parent-death signal (through util-linux's
``setpriv``), so that a sidewatch that dies without stopping it takes its Envoy along. With ``metrics``
(EnvoyMetrics), restarts are counted in ``sidewatch_envoy_restarts_total`` and readiness is
``sidewatch_envoy_ready`` (1 from ready until exit or drain).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from agent.metrics import EnvoyMetrics

log = logging.getLogger(__name__)

LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}
MAX_LOG_LINE = 4096


# Envoy dies with the thread that started it (the supervisor's, which lives until stop), so that a sidewatch
# killed with -9 or by the OOM killer leaves no Envoy behind holding the listener's port: util-linux's setpriv
# sets Linux's parent-death signal and execs Envoy. (Setting it from Python would need preexec_fn, whose
# fork() runs gRPC's fork handlers in a process full of gRPC threads.) Without setpriv there is no such signal.
SETPRIV = shutil.which("setpriv")


def _die_with_parent(command: list[str]) -> list[str]:
    return [SETPRIV, "--pdeathsig", "KILL", "--", *command] if SETPRIV else command


class EnvoyError(RuntimeError):
    """Envoy did not start (or stopped and could not be restarted)."""


class EnvoyProcess:
    """One supervised Envoy (module docstring)."""

    def __init__(self, binary: Path, bootstrap: Path, work_dir: Path, concurrency: int = 1,
                 log_level: str = "warning", drain_seconds: float = 10.0,
                 metrics: EnvoyMetrics | None = None) -> None:
        self.metrics = metrics
        self.binary = binary
        self.drain_seconds = drain_seconds
        self.bootstrap = bootstrap
        self.work_dir = work_dir
        self.concurrency = concurrency
        self.log_level = log_level
        self.admin_path = work_dir / "admin-address"
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._launch_error: OSError | None = None
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- the process ------------------------------------------------------------------------------

    def _launch(self) -> subprocess.Popen:
        self.admin_path.unlink(missing_ok=True)
        command = [str(self.binary), "-c", str(self.bootstrap), "--concurrency", str(self.concurrency),
                   "--log-level", self.log_level, "--disable-hot-restart", "--admin-address-path",
                   str(self.admin_path), "--log-format", "%l|%n|%v",
                   # A drain tells every client at once (GOAWAY) and lasts at most the grace period.
                   "--drain-strategy", "immediate", "--drain-time-s", str(max(1, round(self.drain_seconds)))]
        # A session of its own: a signal to sidewatch's process group (a terminal's Ctrl-C or hangup) reaches
        # sidewatch alone, which then drains Envoy in order; Envoy would otherwise stop at once, failing the
        # calls in flight. It still dies with sidewatch (pdeathsig).
        process = subprocess.Popen(_die_with_parent(command), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, cwd=self.work_dir, start_new_session=True)
        threading.Thread(target=self._forward_logs, args=(process,), name="envoy-logs", daemon=True).start()
        return process

    def _forward_logs(self, process: subprocess.Popen) -> None:
        for raw in process.stderr:
            line = raw.decode("utf-8", "replace").rstrip()[:MAX_LOG_LINE]
            level, _, rest = line.partition("|")
            logger, _, message = rest.partition("|")
            if not message:
                level, logger, message = "info", "", line
            log.log(LEVELS.get(level.strip(), logging.INFO), "envoy: %s", message,
                    extra={"envoy_logger": logger.strip()} if logger else None)

    def start(self, timeout: float = 30.0) -> None:
        """Start Envoy and wait until it is ready; raises EnvoyError if it exits or times out first.

        Envoy is started, and restarted, by the supervisor thread, which lives until ``stop``: the child is
        told to die with that thread (Linux's parent-death signal), so a sidewatch that is killed (kill -9, the
        OOM killer) does not leave an Envoy behind holding the listener's port."""
        launched = threading.Event()
        self._watcher = threading.Thread(target=self._supervise, args=(launched,), name="envoy-supervisor",
                                         daemon=True)
        self._watcher.start()
        launched.wait()
        if self.process is None:
            raise EnvoyError(f"sidewatch: cannot start envoy ({self._launch_error})")
        try:
            self.wait_ready(timeout)
        except EnvoyError:
            self._stopping.set()   # a failed start is not restarted
            self._started.set()
            raise
        self._set_ready(True)
        self._started.set()

    def _supervise(self, launched: threading.Event) -> None:
        try:
            with self._lock:
                self.process = self._launch()
        except OSError as err:
            self._launch_error = err
            launched.set()
            return
        launched.set()
        self._started.wait()
        self._watch()

    def _set_ready(self, ready: bool) -> None:
        if self.metrics is not None:
            self.metrics.ready.set(1 if ready else 0)

    def admin_url(self) -> str | None:
        try:
            address = self.admin_path.read_text().strip()
        except OSError:
            return None
        return f"http://{address}" if address else None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.process
            if process is not None and process.poll() is not None:
                raise EnvoyError(f"sidewatch: envoy exited with code {process.returncode} while starting "
                                 "(its log lines above say why)")
            url = self.admin_url()
            if url is not None:
                try:
                    with urllib.request.urlopen(f"{url}/ready", timeout=1.0) as reply:
                        if reply.status == 200:
                            return
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.05)
        raise EnvoyError(f"sidewatch: envoy not ready after {timeout:.0f} s")

    def _watch(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            process = self.process
            if process is None:
                return
            started = time.monotonic()
            code = process.wait()
            self._set_ready(False)
            if self._stopping.is_set():
                return
            log.error("sidewatch: envoy exited with code %s; restarting it in %.1f s", code, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = 0.5 if time.monotonic() - started > 60 else min(10.0, backoff * 2)
            with self._lock:
                if self._stopping.is_set():
                    return
                self.process = self._launch()
                self.restarts += 1
                if self.metrics is not None:
                    self.metrics.restarts.inc()
            try:
                self.wait_ready(30.0)
                self._set_ready(True)
                log.info("sidewatch: envoy restarted and ready")
            except EnvoyError as err:
                log.error("%s", err)

    # --- the admin API ----------------------------------------------------------------------------

    def admin(self, path: str, method: str = "GET", timeout: float = 2.0) -> bytes:
        url = self.admin_url()
        if url is None:
            raise EnvoyError("sidewatch: envoy's admin address is not known (not started)")
        request = urllib.request.Request(f"{url}{path}", method=method)
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.read()

    def listener_port(self, name: str = "ingress") -> int:
        """The port Envoy's listener ``name`` is bound to (for a configured port 0)."""
        statuses = json.loads(self.admin("/listeners?format=json"))["listener_statuses"]
        for status in statuses:
            if status["name"] == name:
                return int(status["local_address"]["socket_address"]["port_value"])
        raise EnvoyError(f"sidewatch: envoy has no listener {name!r}")

    # --- stopping ---------------------------------------------------------------------------------

    def drain(self) -> None:
        """Stop accepting connections; calls in flight go on (Envoy closes connections as they go idle)."""
        self._set_ready(False)
        try:
            # The graceful drain tells clients on open connections to go away (GOAWAY once their calls
            # end), but its listener still accepts; the plain drain then closes the listening socket, so
            # new connections are refused at once, as the grpc.aio data plane refuses them.
            self.admin("/drain_listeners?graceful", method="POST")
            self.admin("/drain_listeners", method="POST")
        except (EnvoyError, urllib.error.URLError, OSError) as err:
            log.warning("sidewatch: cannot drain envoy's listeners: %s", err)

    def active_requests(self) -> int:
        """Calls in flight on the listener (Envoy's ``http.ingress.downstream_rq_active``)."""
        text = self.admin("/stats?filter=^http\\.ingress\\.downstream_rq_active$").decode()
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if name == "http.ingress.downstream_rq_active":
                return int(value)
        return 0

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with self._lock:
            process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("sidewatch: envoy did not stop within %.0f s; killing it", timeout)
            process.kill()
            process.wait()

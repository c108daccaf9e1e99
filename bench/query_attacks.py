#!/usr/bin/env python3
"""Does the query detector catch black-box attacks before they succeed, and leave benign clients alone? End to end.

    PYTHONPATH=$PWD .venv/bin/python bench/query_attacks.py --out bench-results/query_attacks.json \\
        [--data-plane python|envoy] [--images 10] [--boundary] [--quick]

The bundled model server and ``sidewatch serve`` run as subprocesses, the sidecar with query detection in flag mode
for ``mnist_cnn`` (``models.mnist_cnn.query_mode: flag``, every other setting at its default) and clients told
apart by the ``x-client-id`` metadata key (``detection.queries.identity: metadata``), so that one process can play
many clients. Flag mode lets an attack run to its end, so that the query where it would have succeeded is known;
in enforce mode the client is refused from the query that flags it (tests/integration/test_query_detection_sidecar.py).

1. **Benign traffic**: 10,000 ModelInfer calls (``--benign``) from 50 simulated clients, before any attack, on
   held-out MNIST test images. Client volumes are skewed (client i sends in proportion to 1/(i+1)^0.8), each
   client sends in bursts (a geometric number of calls, mean 10, up to 40, back to back), bursts of all clients
   interleaved at random. In a burst each call is: with probability 0.25 one of 20 popular images (Zipf
   popularity: image k with weight 1/k), as that client got it (each client has its own copy, re-encoded with
   +-1/255 noise: the copies of different clients are near-duplicates of each other, a client's own repeats are
   exact); with probability 0.02 a re-submission of the client's previous image with small edits (noise of 0.02
   on every pixel: a benign near-duplicate); otherwise a fresh image from the held-out pool. After a call, with
   probability 0.05 a retry of the same bytes, and with 0.01 a second one. The figures: clients flagged (goal: 0),
   and the near-duplicate and repeat counts the sidecar exported.

2. **Attacks**, ART as a CLIENT of the sidecar: each prediction the attack asks for is one ModelInfer call (batch
   1) through the sidecar, one client id per attack run, on the first ``--images`` test images (from 5,000, held
   out from calibration) that the model classifies correctly:

   * ``hopskipjump``: HopSkipJump (Chen, Jordan and Wainwright 2020), untargeted, L2, ``max_iter`` 20,
     ``max_eval`` 1000, ``init_eval`` 100;
   * ``square``: Square Attack (Andriushchenko et al. 2020), untargeted, L-infinity, eps 0.3, up to 1,000
     iterations (ART stops at the first success);
   * ``boundary`` (``--boundary``): the boundary attack (Brendel et al. 2018), untargeted, 200 iterations.

   After each call the bench reads ``sidewatch_query_flags_total`` from /metrics until it moves: the number of
   that call is the query that flagged the client. An attack **succeeds** at its first query that the model
   misclassifies within the attack's budget: L-infinity <= 0.3 for square; L2 <= 2.0 (and, reported too, <= 3.0)
   for hopskipjump and boundary, whose first adversarial queries are random noise far from the image. Goal: the
   flag comes before the success, within 100 queries.

Needs the ``train`` extra (torch, onnx) for the MNIST test set (bench/mnist_torch.py) and
adversarial-robustness-toolbox.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import mnist_torch  # noqa: E402
from adversarial import free_port, machine_info, start, wait_ready  # noqa: E402
from proxy import stop_process  # noqa: E402

MODEL = "mnist_cnn"
VERSION = "1"
MODEL_REPOSITORY = ROOT / "agent" / "demo" / "models"
SEED = 20261207
CLIENT_KEY = "x-client-id"
HELD_OUT = 5000  # attack seeds and benign images from the test images calibration never saw
BUDGETS = {"hopskipjump": ("l2", (2.0, 3.0)), "boundary": ("l2", (2.0, 3.0)), "square": ("linf", (0.3,))}
GOALS = {"benign_clients_flagged": 0, "max_queries_to_flag": 100}


def log(message: str) -> None:
    print(f"[query_attacks] {message}", file=sys.stderr, flush=True)


def sidecar_config(directory: Path) -> Path:
    path = directory / "sidewatch.yaml"
    path.write_text(json.dumps({"detection": {"queries": {"identity": "metadata", "identity_key": CLIENT_KEY}},
                                "models": {MODEL: {"query_mode": "flag"}}}))
    return path


def metric(metrics_port: int, pattern: re.Pattern) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        found = pattern.search(reply.read().decode())
    return float(found.group(1)) if found else 0.0


def counter(metrics_port: int, name: str) -> float:
    return metric(metrics_port, re.compile(rf'^{name}\{{model="mnist_cnn"\}} ([0-9.e+]+)$', re.MULTILINE))


# --- benign traffic ---------------------------------------------------------------------------------------------

def benign_calls(pool: np.ndarray, total: int, clients: int = 50, popular: int = 20) -> list[tuple[str, np.ndarray]]:
    """(client id, image) for ``total`` calls from ``clients`` simulated clients (module docstring)."""
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(pool))
    popular_images, fresh = pool[order[:popular]], pool[order[popular:]]
    popularity = 1.0 / np.arange(1, popular + 1)
    popularity /= popularity.sum()
    volume = 1.0 / np.arange(1, clients + 1) ** 0.8
    remaining = np.floor(volume / volume.sum() * total).astype(int)
    remaining[: total - remaining.sum()] += 1
    copies: dict[tuple[int, int], np.ndarray] = {}
    last: dict[int, np.ndarray] = {}
    calls: list[tuple[str, np.ndarray]] = []
    while remaining.sum() > 0:
        client = int(rng.choice(clients, p=remaining / remaining.sum()))
        for _ in range(min(int(rng.geometric(0.1)), 40)):
            if remaining[client] <= 0:
                break
            draw = rng.random()
            if draw < 0.25:
                k = int(rng.choice(popular, p=popularity))
                if (client, k) not in copies:  # this client's copy of the popular image, re-encoded
                    noisy = popular_images[k] + rng.integers(-1, 2, popular_images[k].shape) / 255.0
                    copies[(client, k)] = np.clip(noisy, 0, 1).astype(np.float32)
                image = copies[(client, k)]
            elif draw < 0.27 and client in last:
                image = np.clip(last[client] + rng.normal(0, 0.02, last[client].shape), 0, 1).astype(np.float32)
            else:
                image = fresh[int(rng.integers(len(fresh)))]
            last[client] = image
            tries = 1 + (rng.random() < 0.05) + (rng.random() < 0.01)
            for _ in range(int(tries)):
                if remaining[client] <= 0:
                    break
                calls.append((f"benign-{client}", image))
                remaining[client] -= 1
    return calls


def run_benign(client, metrics_port: int, pool: np.ndarray, total: int) -> dict:
    calls = benign_calls(pool, total)
    started = time.perf_counter()
    for who, image in calls:
        client.infer(MODEL, {"input": image[None]}, version=VERSION, timeout=30, metadata=((CLIENT_KEY, who),))
    seconds = time.perf_counter() - started
    per_client = np.bincount([int(who.split("-")[1]) for who, _ in calls])
    return {"calls": len(calls), "clients": len(per_client), "calls_per_client_max": int(per_client.max()),
            "calls_per_client_min": int(per_client.min()), "seconds": round(seconds, 1),
            "clients_flagged": counter(metrics_port, "sidewatch_query_flags_total"),
            "rows": counter(metrics_port, "sidewatch_query_rows_total"),
            "repeats": counter(metrics_port, "sidewatch_query_repeats_total"),
            "near_duplicates": counter(metrics_port, "sidewatch_query_near_duplicates_total")}


# --- attacks through the sidecar --------------------------------------------------------------------------------

class SidecarModel:
    """The predictions an ART attack asks for, as ModelInfer calls through the sidecar, one per row, with the
    attack's client id; every query recorded (its distances to the original and whether it is misclassified), and
    the query after which the sidecar's flag counter moved."""

    def __init__(self, client, metrics_port: int, who: str, original: np.ndarray, label: int) -> None:
        self.client, self.metrics_port, self.who = client, metrics_port, who
        self.original, self.label = original, label
        self.flags_before = counter(metrics_port, "sidewatch_query_flags_total")
        self.flagged_at: int | None = None
        self.misclassified: list[bool] = []
        self.l2: list[float] = []
        self.linf: list[float] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        rows = []
        for row in np.asarray(x, dtype=np.float32):
            outputs, _, _ = self.client.infer(MODEL, {"input": row[None]}, version=VERSION, timeout=30,
                                              metadata=((CLIENT_KEY, self.who),))
            probabilities = outputs["probabilities"][0]
            delta = (row - self.original).ravel()
            self.misclassified.append(int(probabilities.argmax()) != self.label)
            self.l2.append(float(np.linalg.norm(delta)))
            self.linf.append(float(np.abs(delta).max()))
            if self.flagged_at is None and counter(self.metrics_port, "sidewatch_query_flags_total") > self.flags_before:
                self.flagged_at = len(self.misclassified)
            rows.append(probabilities)
        return np.stack(rows)

    def first_success(self, norm: str, budget: float) -> int | None:
        distances = self.l2 if norm == "l2" else self.linf
        for number, (wrong, distance) in enumerate(zip(self.misclassified, distances), 1):
            if wrong and distance <= budget + 1e-5:
                return number
        return None

    def best_before(self, norm: str, queries: int | None) -> float | None:
        """The smallest distance of a misclassified query among the first ``queries``."""
        distances = self.l2 if norm == "l2" else self.linf
        found = [d for wrong, d in zip(self.misclassified[:queries], distances[:queries]) if wrong]
        return round(min(found), 3) if found else None


def build_attack(name: str, classifier):
    from art.attacks.evasion import BoundaryAttack, HopSkipJump, SquareAttack

    if name == "hopskipjump":
        return HopSkipJump(classifier, targeted=False, norm=2, max_iter=20, max_eval=1000, init_eval=100,
                           init_size=100, verbose=False)
    if name == "square":
        return SquareAttack(classifier, norm=np.inf, eps=0.3, max_iter=1000, p_init=0.8, nb_restarts=1, verbose=False)
    return BoundaryAttack(classifier, targeted=False, max_iter=200, delta=0.01, epsilon=0.01, verbose=False)


def run_attack(name: str, client, metrics_port: int, image: np.ndarray, label: int, index: int) -> dict:
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    model = SidecarModel(client, metrics_port, f"attacker-{name}-{index}", image, label)
    classifier = BlackBoxClassifierNeuralNetwork(model, (1, 28, 28), 10, clip_values=(0.0, 1.0))
    started = time.perf_counter()
    build_attack(name, classifier).generate(image[None])
    norm, budgets = BUDGETS[name]
    success = {f"{norm}<={budget:g}": model.first_success(norm, budget) for budget in budgets}
    first = success[f"{norm}<={budgets[0]:g}"]
    return {"image": index, "queries": len(model.misclassified), "seconds": round(time.perf_counter() - started, 1),
            "queries_to_flag": model.flagged_at, "queries_to_success": success,
            "flagged_before_success": model.flagged_at is not None and (first is None or model.flagged_at < first),
            f"best_{norm}_at_flag": model.best_before(norm, model.flagged_at),
            f"best_{norm}_at_end": model.best_before(norm, None)}


def attack_summary(runs: list[dict]) -> dict:
    flagged = [run["queries_to_flag"] for run in runs if run["queries_to_flag"] is not None]
    return {"runs": len(runs), "flagged": len(flagged),
            "flagged_before_success": sum(run["flagged_before_success"] for run in runs),
            "flagged_within_100_queries": sum(q <= GOALS["max_queries_to_flag"] for q in flagged),
            "queries_to_flag_median": float(np.median(flagged)) if flagged else None,
            "queries_to_flag_max": max(flagged) if flagged else None,
            "attack_queries_median": float(np.median([run["queries"] for run in runs]))}


# --- the run ----------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    x, y = mnist_torch.mnist_test()
    x = np.ascontiguousarray(x)
    pool = x[HELD_OUT:]
    candidates = np.arange(HELD_OUT, HELD_OUT + 4 * args.images)
    correct = mnist_torch.onnx_probabilities(VERSION, x[candidates]).argmax(axis=1) == y[candidates]
    seeds = candidates[correct][:args.images]
    attacks = ["hopskipjump", "square"] + (["boundary"] if args.boundary else [])
    result = {"benchmark": "query_attacks", "machine": machine_info(), "data_plane": args.data_plane,
              "settings": {"mode": "flag", "identity": "metadata", "detection.queries": "defaults"},
              "goals": GOALS, "budgets": {name: {"norm": norm, "budgets": list(b)} for name, (norm, b) in BUDGETS.items()}}
    with tempfile.TemporaryDirectory(prefix="sidewatch-query-attacks-") as directory:
        workdir = Path(directory)
        model_port, port, metrics_port = free_port(), free_port(), free_port()
        server_log, sidecar_log = workdir / "model-server.log", workdir / "sidecar.log"
        python = sys.executable
        procs = []
        try:
            procs.append(start([python, "-m", "agent.cli", "model-server", "--listen", f"127.0.0.1:{model_port}",
                                "--model-repository", str(MODEL_REPOSITORY), "--device", "cpu"], server_log))
            procs.append(start([python, "-m", "agent.cli", "serve", "--listen", f"127.0.0.1:{port}",
                                "--upstream", f"127.0.0.1:{model_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
                                "--data-plane", args.data_plane, "--config", str(sidecar_config(workdir))], sidecar_log))
            client = wait_ready(f"127.0.0.1:{port}", procs[-1], sidecar_log, VERSION)
            try:
                log(f"benign: {args.benign} calls from 50 clients ({args.data_plane} data plane)")
                result["benign"] = run_benign(client, metrics_port, pool, args.benign)
                log(f"benign: {result['benign']}")
                flags_after_benign = counter(metrics_port, "sidewatch_query_flags_total")
                result["attacks"] = {}
                for name in attacks:
                    runs = []
                    for number, index in enumerate(seeds):
                        runs.append(run_attack(name, client, metrics_port, x[index], int(y[index]), int(index)))
                        log(f"{name} {number + 1}/{len(seeds)}: {runs[-1]}")
                    result["attacks"][name] = {"summary": attack_summary(runs), "runs": runs}
                result["flags_after_benign"] = flags_after_benign
            finally:
                client.close()
            result["flag_log_lines"] = sum("flagged on model" in line for line in sidecar_log.read_text().splitlines())
        finally:
            for proc in reversed(procs):
                stop_process(proc)
    return result


def print_table(result: dict) -> None:
    benign = result["benign"]
    print(f"\n{result['data_plane']} data plane: benign {benign['calls']} calls from {benign['clients']} clients: "
          f"{benign['clients_flagged']:.0f} flagged, {benign['near_duplicates']:.0f} near-duplicates, "
          f"{benign['repeats']:.0f} repeats")
    print(f"{'attack':12} {'runs':>5} {'flagged':>8} {'before success':>15} {'<=100 q':>8} {'median q':>9} {'max q':>6}")
    for name, entry in result["attacks"].items():
        s = entry["summary"]
        print(f"{name:12} {s['runs']:>5} {s['flagged']:>8} {s['flagged_before_success']:>15} "
              f"{s['flagged_within_100_queries']:>8} {s['queries_to_flag_median']!s:>9} {s['queries_to_flag_max']!s:>6}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="write the results here (JSON)")
    parser.add_argument("--data-plane", choices=["python", "envoy"], default="python")
    parser.add_argument("--images", type=int, default=10, help="attack seed images (default 10)")
    parser.add_argument("--benign", type=int, default=10_000, help="benign calls (default 10,000)")
    parser.add_argument("--boundary", action="store_true", help="the boundary attack too (about 6,000 queries each)")
    parser.add_argument("--quick", action="store_true", help="2 images, 1,000 benign calls")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.benign = 2, 1000
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda number, frame: sys.exit(128 + number))
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

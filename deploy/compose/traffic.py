"""Traffic for the docker-compose demonstration: MNIST digits through sidewatch, in phases, in a loop.

    python deploy/compose/traffic.py --target sidewatch:9000 [--rate 20] [--cycles 0]

Each cycle sends benign digits (held-out validation images), then brightened ones (input drift), then
adversarial examples made against version 2 of the demo model (an attack), to model mnist_cnn with no
version (the latest). One line per phase goes to stdout; calls that fail are counted, not fatal, so the
generator rides out sidewatch or the model server restarting.
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from agent.protocol.client import InferenceClient
from agent.demo.data import BENIGN_STREAM, load_adversarial, load_images
from agent.demo.run import drifted

MODEL = "mnist_cnn"


def _phases(args) -> list[tuple[str, float]]:
    return [(name, seconds) for name, seconds in
            (("benign", args.benign_seconds), ("drift", args.drift_seconds), ("attack", args.attack_seconds))
            if seconds > 0]


def _send_phase(client: InferenceClient, images, seconds: float, rate: float) -> tuple[int, int]:
    """Send ``images`` in turn at ``rate`` per second for ``seconds``; (answered, failed)."""
    answered = failed = 0
    interval = 1.0 / rate
    started = next_send = time.monotonic()
    while (now := time.monotonic()) - started < seconds:
        if now < next_send:
            time.sleep(min(next_send - now, 0.05))
            continue
        next_send += interval
        index = (answered + failed) % len(images)
        try:
            client.infer(MODEL, {"input": images[index:index + 1]}, timeout=5)
            answered += 1
        except grpc.RpcError:
            failed += 1
    return answered, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:9000", help="sidewatch's listener, HOST:PORT")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second (default 20)")
    parser.add_argument("--benign-seconds", type=float, default=120.0)
    parser.add_argument("--drift-seconds", type=float, default=60.0)
    parser.add_argument("--attack-seconds", type=float, default=60.0)
    parser.add_argument("--cycles", type=int, default=0, help="how many cycles (default 0: until stopped)")
    parser.add_argument("--wait-seconds", type=float, default=120.0, help="how long to wait for the target to be ready")
    args = parser.parse_args(argv)
    if args.rate <= 0 or not _phases(args):
        parser.error("--rate and at least one phase's seconds must be positive")
    benign, _ = load_images(BENIGN_STREAM)
    traffic = {"benign": benign, "drift": drifted(benign), "attack": load_adversarial()[0]}
    client = InferenceClient(args.target)
    try:
        client.wait_ready(timeout=args.wait_seconds)
    except grpc.FutureTimeoutError:
        print(f"traffic: {args.target} not ready after {args.wait_seconds:.0f} s", file=sys.stderr)
        return 1
    except grpc.RpcError as err:
        print(f"traffic: {args.target} not ready: {err.code().name}", file=sys.stderr)
        return 1
    cycle = 0
    try:
        while args.cycles == 0 or cycle < args.cycles:
            cycle += 1
            for name, seconds in _phases(args):
                answered, failed = _send_phase(client, traffic[name], seconds, args.rate)
                print(f"traffic: cycle {cycle} {name}: {answered} answered, {failed} failed", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

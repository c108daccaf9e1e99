"""Canary against stable, end to end: client -> sidewatch serve (no model repository) -> MLServer serving three
versions of a scikit-learn regressor side by side (tests/support/sklearn_models.py: ``ridge`` 1 and 2 the same
model, 3 one built with its feature columns reversed). The client splits its requests between two versions, as
a router sending a canary a share of the traffic does. A canary that answers as the stable version does raises
no flag; once version 3 takes the canary's place, it is compared with version 1 and flagged on its outputs
(``canary.value.*``) long before it could have a baseline of its own. Short looks, the default budget."""

from __future__ import annotations

import numpy as np
import yaml

from agent.protocol.client import InferenceClient
from tests.support import scenarios
from tests.support.harness import http_get, start_sidecar
from tests.support.pacing import send_paced
from tests.support.sklearn_models import CANARY_MODEL

RATE = 50.0          # requests per second, 30% to the canary


def _canary(text: str) -> tuple[dict[str, float], dict[str, str]]:
    """Held canary flags by (version, detector), and each comparison's state by version, from /metrics."""
    flags, states = {}, {}
    for line in text.splitlines():
        if f'model="{CANARY_MODEL}"' not in line:
            continue
        labels = dict(part.split("=", 1) for part in line[line.index("{") + 1:line.index("}")].split(",") if "=" in part)
        labels = {k: v.strip('"') for k, v in labels.items()}
        if line.startswith("sidewatch_drift_detected{") and labels["detector"].startswith("canary.") \
                and labels["feature"] == "all":
            flags[(labels["version"], labels["detector"])] = float(line.rsplit(" ", 1)[1])
        if line.startswith("sidewatch_drift_canary_state{") and line.endswith(" 1.0"):
            states[labels["version"]] = f'{labels["state"]} against {labels["stable_version"]}'
    return flags, states


def test_a_canary_whose_predictions_diverge_is_flagged_and_one_that_agrees_is_not(tmp_path, sklearn_mlserver):
    config = tmp_path / "sidewatch.yaml"
    config.write_text(yaml.safe_dump({"drift": {
        "look_interval_seconds": 5, "slot_seconds": 0.25, "cluster_rows": 10, "min_clusters": 20,
        "export_interval_seconds": 0.5, "canary": {"fit_rows": 200, "active_seconds": 3}}}))
    sidecar, port, metrics_port = start_sidecar(tmp_path, sklearn_mlserver.grpc_port, config=config)
    client = InferenceClient(f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    rows = scenarios.resample(scenarios.reference("diabetes"), 4000, seed=1)["features"]
    rng = np.random.default_rng(0)

    def split(canary: str):
        def one(i: int) -> None:
            version = canary if rng.random() < 0.3 else "1"
            client.infer(CANARY_MODEL, {"features": rows[i % len(rows):i % len(rows) + 1]}, version=version)
        return one

    try:
        send_paced(split("2"), RATE, 35)
        text = http_get(url)
        flags, states = _canary(text)
        assert states == {"2": "watching against 1"}, states
        assert flags and not any(flags.values()), flags
        tested = [line for line in text.splitlines() if line.startswith("sidewatch_drift_statistic{")
                  and 'detector="canary.value.value"' in line and 'version="2"' in line]
        assert tested, "the comparison of version 2 was never tested"

        def flagged() -> bool:
            flags, _ = _canary(http_get(url))
            return flags.get(("3", "canary.value.value")) == 1.0

        send_paced(split("3"), RATE, 60, until=flagged)
        flags, states = _canary(http_get(url))
        assert states == {"3": "watching against 1"}, states
        assert flagged(), flags
        # The inputs were split at random: only the outputs differ, and version 2's comparison is gone.
        assert not any(up for (version, detector), up in flags.items()
                       if detector.startswith(("canary.inputs", "canary.features"))), flags
        assert not any(version == "2" for version, _ in flags), flags
    finally:
        client.close()
        sidecar.stop()

"""Drift of models sidewatch has no file for, end to end: client -> sidewatch serve (no model repository) ->
MLServer serving scikit-learn models trained here (tests/support/sklearn_models.py). Each model's baseline is
learned from its first requests; benign traffic from the same source then keeps every flag down, and a
realistic change is flagged on what changed: a Zurich class never seen before on the tabular classifier (its
BYTES [N, 3] input declared categorical in the config, as an operator would), Cyrillic text on the text
classifier (the text's character mix and out-of-vocabulary rate). Short looks, so that it takes seconds; the
budget is the default (1/30d)."""

from __future__ import annotations

import numpy as np
import yaml

from agent.protocol.client import InferenceClient
from tests.support import scenarios
from tests.support.drift_watch import text_flags, text_state
from tests.support.harness import http_get, metric_value, start_sidecar
from tests.support.pacing import send_paced

RATE = 60.0  # iterations per second, one request to each model in each: 600 rows of each per 10-s look


def test_baselines_learned_from_traffic_stay_quiet_on_benign_and_flag_what_changed(tmp_path, sklearn_mlserver):
    config = tmp_path / "sidewatch.yaml"
    config.write_text(yaml.safe_dump({"drift": {
        "look_interval_seconds": 10, "slot_seconds": 0.25, "cluster_rows": 10, "min_clusters": 20,
        "export_interval_seconds": 0.5, "baseline": {"rows": 600}},
        "models": {"flare": {"tensors": {"categorical": {
            "kind": "categorical", "columns": ["zurich", "spot_size", "distribution"]}}}}}))
    sidecar, port, metrics_port = start_sidecar(tmp_path, sklearn_mlserver.grpc_port, config=config)
    client = InferenceClient(f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{metrics_port}/metrics"

    def send(flare: dict, topics: dict):
        def one(i: int) -> None:
            client.infer("flare", {name: a[i % len(a):i % len(a) + 1] for name, a in flare.items()})
            client.infer("topics", {name: a[i % len(a):i % len(a) + 1] for name, a in topics.items()})
        return one

    try:
        send_paced(send(scenarios.resample(scenarios.reference("flare"), 2000, seed=1),
                        scenarios.resample(scenarios.reference("topics"), 2000, seed=1)), RATE, 11)
        text = http_get(url)
        assert text_state(text, "flare") == "watching" and text_state(text, "topics") == "watching"
        send_paced(send(scenarios.resample(scenarios.benign("flare"), 2000, seed=2),
                        scenarios.resample(scenarios.benign("topics"), 2000, seed=2)), RATE, 21)
        text = http_get(url)
        for model in ("flare", "topics"):
            flags = text_flags(text, model)
            assert flags and not any(flags.values()), (model, flags)

        def flagged() -> bool:
            text = http_get(url)
            return text_flags(text, "flare", None).get("categorical.zurich=<unseen>") == 1 and \
                any(text_flags(text, "topics", None).get(f) == 1 for f in ("text.non_ascii", "text.oov", "text.letters"))

        send_paced(send(scenarios.drift("flare", "new_category"), scenarios.drift("topics", "foreign")), RATE, 45,
                   until=flagged)
        text = http_get(url)
        assert flagged(), (text_flags(text, "flare"), text_flags(text, "flare", None), text_flags(text, "topics", None))
    finally:
        client.close()
        sidecar.stop()


def test_the_kinds_of_a_live_baseline_come_from_mlservers_model_metadata(tmp_path, sklearn_mlserver):
    """MLServer declares diabetes's tensors in model-settings.json (features FP32 [-1, 10], value FP32 [-1, 1]).
    The client also sends a request id the model ignores: from the traffic alone it would be watched (a column
    that only grows, an alarm waiting to happen); from the metadata it is not the model's, and not watched."""
    config = tmp_path / "sidewatch.yaml"
    config.write_text(yaml.safe_dump({"drift": {"export_interval_seconds": 0.5, "baseline": {"rows": 60}}}))
    sidecar, port, metrics_port = start_sidecar(tmp_path, sklearn_mlserver.grpc_port, config=config)
    client = InferenceClient(f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    rows = scenarios.resample(scenarios.reference("diabetes"), 200, seed=3)["features"]
    try:
        def one(i: int) -> None:
            client.infer("diabetes", {"features": rows[i % len(rows):i % len(rows) + 1],
                                      "request_id": np.array([[i]], dtype=np.int64)})

        send_paced(one, RATE, 10, until=lambda: text_state(http_get(url), "diabetes") == "watching")
        text = http_get(url)
        assert text_state(text, "diabetes") == "watching"
        assert metric_value(text, "sidewatch_drift_specs_total", model="diabetes", source="metadata",
                            reason="answered") == 1
        assert not [line for line in text.splitlines() if line.startswith("sidewatch_drift_specs_total{")
                    and 'model="diabetes"' in line and 'source="traffic"' in line]
        detectors = set(text_flags(text, "diabetes"))
        assert {"inputs_mean", "features.missing", "features.out_of_range", "outputs_mean"} <= detectors, detectors
        assert not any(name.startswith("request_id") for name in detectors), detectors
        log = sidecar.log()
        assert "drift kinds of diabetes version v1 chosen from its metadata" in log, log[-3000:]
        assert "not in its ModelMetadata are not watched: request_id" in log, log[-3000:]
    finally:
        client.close()
        sidecar.stop()

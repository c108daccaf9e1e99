"""Metric labels stay bounded whatever model names and versions clients send."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from agent.metrics import OTHER, ProxyMetrics


def test_client_supplied_models_and_versions_are_bounded():
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, max_models=3)
    for index in range(100):
        metrics.call_series(f"model-{index}", str(index), "ModelInfer").ok.inc()
    samples = [s for m in registry.collect() if m.name == "sidewatch_requests" for s in m.samples
               if s.name == "sidewatch_requests_total"]
    labels = {(s.labels["model"], s.labels["version"]) for s in samples}
    assert labels == {("model-0", "0"), ("model-1", "1"), ("model-2", "2"), (OTHER, OTHER)}
    assert registry.get_sample_value("sidewatch_requests_total", {
        "model": OTHER, "version": OTHER, "method": "ModelInfer", "code": "OK"}) == 97


def test_known_pairs_keep_their_labels():
    metrics = ProxyMetrics(CollectorRegistry(), max_models=2)
    first = metrics.call_series("a", "1", "ModelInfer")
    assert metrics.call_series("a", "1", "ModelInfer") is first
    assert metrics.call_series("a", "1", "ModelMetadata").labels == ("a", "1", "ModelMetadata")
    assert metrics.call_series("b", "", "ModelInfer").labels == ("b", "", "ModelInfer")
    assert metrics.call_series("c", "", "ModelInfer").labels == (OTHER, OTHER, "ModelInfer")

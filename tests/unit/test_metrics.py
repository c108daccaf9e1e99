"""Metric labels stay bounded whatever model names and versions clients send."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from agent.dataplane.envoy import lua
from agent.metrics import MAX_LABEL_BYTES, OTHER, AlertMetrics, ProxyMetrics, bound_label, label_bytes


def test_client_supplied_models_and_versions_are_bounded():
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, max_models=3)
    for index in range(100):
        metrics.call_series(f"model-{index}", str(index), "ModelInfer", answered=True).ok.inc()
    samples = [s for m in registry.collect() if m.name == "sidewatch_requests" for s in m.samples
               if s.name == "sidewatch_requests_total"]
    labels = {(s.labels["model"], s.labels["version"]) for s in samples}
    assert labels == {("model-0", "0"), ("model-1", "1"), ("model-2", "2"), (OTHER, OTHER)}
    assert registry.get_sample_value("sidewatch_requests_total", {
        "model": OTHER, "version": OTHER, "method": "ModelInfer", "code": "OK"}) == 97


def test_known_pairs_keep_their_labels():
    metrics = ProxyMetrics(CollectorRegistry(), max_models=2)
    first = metrics.call_series("a", "1", "ModelInfer", answered=True)
    assert metrics.call_series("a", "1", "ModelInfer") is first
    assert metrics.call_series("a", "1", "ModelMetadata").labels == ("a", "1", "ModelMetadata")
    assert metrics.call_series("b", "", "ModelInfer", answered=True).labels == ("b", "", "ModelInfer")
    assert metrics.call_series("c", "", "ModelInfer", answered=True).labels == (OTHER, OTHER, "ModelInfer")


def test_unanswered_names_never_take_a_label_and_known_models_always_have_theirs():
    metrics = ProxyMetrics(CollectorRegistry(), max_models=3, known_models=[("mnist_cnn", ""), ("mnist_cnn", "1")])
    for index in range(100):  # junk the upstream refused: looked up, never admitted
        assert metrics.call_series(f"junk-{index}", "", "ModelInfer").labels == (OTHER, OTHER, "ModelInfer")
    assert metrics.call_series("\ufffd\x00garbage", "", "ModelInfer").labels[0] == OTHER
    assert metrics.call_series("real", "2", "ModelInfer", answered=True).labels == ("real", "2", "ModelInfer")
    assert metrics.call_series("late", "", "ModelInfer", answered=True).labels == (OTHER, OTHER, "ModelInfer")
    for version in ("", "1"):  # unanswered, after every slot is taken: still its own
        assert metrics.call_series("mnist_cnn", version, "ModelInfer").labels == ("mnist_cnn", version, "ModelInfer")
    assert metrics.bounded("mnist_cnn", "7") == (OTHER, OTHER)  # an unknown version of a known model: a pair


def test_label_values_are_cut_to_128_bytes_as_the_envoy_plane_cuts_them():
    metrics = ProxyMetrics(CollectorRegistry(), max_models=4)
    long = "m" * 4_000_000
    labels = metrics.call_series(long, "v" * 1000, "ModelInfer", answered=True).labels
    assert labels == ("m" * MAX_LABEL_BYTES, "v" * MAX_LABEL_BYTES, "ModelInfer")
    assert metrics.call_series(long + "x", "v" * 999, "ModelInfer").labels == labels  # the same pair, cut
    assert bound_label("é" * 100) == "é" * 64  # 2 bytes each: cut on a character boundary
    assert label_bytes("é".encode() * 64 + b"\xc3") == "é" * 64  # a cut character's byte goes
    assert MAX_LABEL_BYTES == lua.MAX_LABEL_BYTES


def test_alert_names_from_alertmanager_are_bounded_and_the_configured_ones_keep_theirs():
    registry = CollectorRegistry()
    metrics = AlertMetrics(registry, known_alerts=["ModelBroken", "Rule"], max_alert_names=2)
    for index in range(3000):
        metrics.incidents.labels(metrics.alert_label(f"Junk{index}"), "alertmanager").inc()
    metrics.incidents.labels(metrics.alert_label("ModelBroken"), "alertmanager").inc()
    metrics.incidents.labels(metrics.alert_label("J" * 10_000), "alertmanager").inc()
    labels = {s.labels["alert"] for m in registry.collect() if m.name == "sidewatch_incidents" for s in m.samples}
    assert labels == {"Junk0", "Junk1", OTHER, "ModelBroken"}
    assert registry.get_sample_value("sidewatch_incidents_total", {"alert": OTHER, "source": "alertmanager"}) == 2999
    assert metrics.alert_label("Rule" + "x" * 1000) == OTHER  # cut to 128 bytes, and not a known name
    assert AlertMetrics(CollectorRegistry(), max_alert_names=1).alert_label("é" * 100) == "é" * 64

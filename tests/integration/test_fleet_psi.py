"""The fleet PSI recording rule, evaluated by a real Prometheus over two replicas' bin counters."""

from __future__ import annotations

import time

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server

from agent.detect.drift.fleet import FleetBins, reference_bins
from agent.metrics import DriftMetrics
from tests.support.harness import REPO, free_port, prometheus_query, start_prometheus
from tests.support.reference_math import psi

RULES = REPO / "deploy" / "prometheus" / "recording-rules.yml"


def test_reference_bins_and_psi_by_hand():
    reference = np.arange(100, dtype=float)
    bins = reference_bins(reference)
    assert len(bins["edges"]) == 9 and np.allclose(bins["ratios"], 0.1)
    # A feature that is mostly 0 gets fewer bins, with measured shares: below 0, [0, 0.2), [0.2, 10.1), above.
    zeros = np.concatenate([np.zeros(80), np.arange(1, 21)])
    assert np.allclose(reference_bins(zeros)["ratios"], [0.0, 0.8, 0.1, 0.1])
    assert psi([10] * 10, [0.1] * 10) == 0.0
    expected = (0.2 - 0.1) * np.log(2) + (0.0001 - 0.1) * np.log(0.0001 / 0.1)
    assert np.isclose(psi([2, 0] + [1] * 8, [0.1] * 10), expected)


def test_prometheus_computes_the_fleet_psi_across_replicas(tmp_path):
    rng = np.random.default_rng(7)
    spec = {"confidence": reference_bins(rng.normal(size=5000))}
    replicas, ports, servers = [], [], []
    for _ in range(2):
        registry = CollectorRegistry()
        replicas.append(FleetBins(spec, DriftMetrics(registry), "m", "1"))
        port = free_port()
        servers.append(start_http_server(port, addr="127.0.0.1", registry=registry)[0])
        ports.append(port)
    # The shipped rules, evaluated every second instead of every 15 s so the test need not wait.
    import yaml

    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    fast_rules = tmp_path / "rules.yml"
    fast_rules.write_text(yaml.safe_dump(rules))
    prometheus, prometheus_port = start_prometheus(tmp_path, [f"127.0.0.1:{p}" for p in ports], [fast_rules],
                                                   interval="1s")
    try:
        # Prometheus must hold every bin of both replicas at 0 before traffic, or rate() misses counts.
        n_bins = len(spec["confidence"]["ratios"])
        deadline = time.monotonic() + 30
        while len(prometheus_query(prometheus_port, "sidewatch_drift_bin_total")) < 2 * n_bins:
            assert time.monotonic() < deadline, "Prometheus did not scrape both replicas"
            time.sleep(0.5)
        time.sleep(1.5)
        # Replica 0 sees reference-like traffic, replica 1 a shifted stream: only the fleet sees both.
        totals = np.zeros(n_bins)
        for _ in range(5):
            for replica, shift in zip(replicas, (0.0, 1.0)):
                values = rng.normal(loc=shift, size=400)
                replica.observe("confidence", values)
                totals += np.bincount(np.searchsorted(spec["confidence"]["edges"], values, side="right"),
                                      minlength=n_bins)
            time.sleep(0.5)
        # Then wait until the rule has seen the final counts of both replicas (it stops changing).
        value, previous = None, None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(3)
            result = prometheus_query(prometheus_port, 'sidewatch:drift_psi:rate5m{feature="confidence"}')
            value = float(result[0]["value"][1]) if result else None
            if value is not None and previous is not None and abs(value - previous) < 1e-3 * value:
                break
            previous = value
        assert value is not None, "the recording rule produced nothing"
        # Over a window holding all the traffic, the fleet's bin shares are the totals' shares.
        expected = psi(totals, spec["confidence"]["ratios"])
        assert 0.15 < expected
        assert abs(value - expected) < 0.05 * expected + 0.02
    finally:
        prometheus.stop()
        for server in servers:
            server.shutdown()

"""The fleet PSI recording rule, evaluated by a real Prometheus over two replicas' bin counters."""

from __future__ import annotations

import time

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server

from agent.detect.drift.fleet import FleetBins, psi, reference_bins
from agent.metrics import DriftMetrics
from tests.harness import REPO, free_port, prometheus_query, start_prometheus

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
    prometheus, prometheus_port = start_prometheus(tmp_path, [f"127.0.0.1:{p}" for p in ports], [RULES],
                                                   interval="1s")
    try:
        # Replica 0 sees reference-like traffic, replica 1 a shifted stream: only the fleet sees both.
        totals = np.zeros(len(spec["confidence"]["ratios"]))
        deadline = time.monotonic() + 40
        value = None
        while time.monotonic() < deadline:
            for replica, shift in zip(replicas, (0.0, 1.0)):
                values = rng.normal(loc=shift, size=200)
                replica.observe("confidence", values)
                totals += np.bincount(np.searchsorted(spec["confidence"]["edges"], values, side="right"),
                                      minlength=len(totals))
            result = prometheus_query(prometheus_port, 'sidewatch:drift_psi:rate5m{feature="confidence"}')
            if result:
                value = float(result[0]["value"][1])
                if time.monotonic() > deadline - 30:  # let rates settle over several scrapes
                    break
            time.sleep(1)
        assert value is not None, "the recording rule produced nothing"
        # The rate over a window sees (almost) the same mixture as the totals: both replicas at equal rates.
        expected = psi(totals, spec["confidence"]["ratios"])
        assert 0.15 < expected
        assert abs(value - expected) < 0.05 * expected + 0.02
    finally:
        prometheus.stop()
        for server in servers:
            server.shutdown()

"""Drift detectors: one small module per method, all reporting a :class:`~agent.detect.drift.result.DriftResult`.

``result``      the DriftResult dataclass every drift detector returns
``ert``         thresholds calibrated by bootstrap to a target expected run time (ERT) without drift
``univariate``  per-feature windowed Cramér-von Mises (ERT-calibrated) and binned PSI / Jensen-Shannon
"""

"""Drift detectors: one small module per method, all reporting a :class:`~agent.detect.drift.result.DriftResult`.

``base``        DriftDetector: the alarm state every drift detector keeps, and its save/restore (river's shape)
``result``      the DriftResult dataclass every drift detector returns
``ert``         thresholds calibrated by simulation to a target expected run time (ERT) without drift
``univariate``  WindowedCVM: per-feature windowed Cramér-von Mises, ERT-calibrated
``mmd``         OnlineMMD: a kernel two-sample test (MMD) over a sliding window, ERT-calibrated
``prediction``  ClassMixDrift and ScalarWindowDrift: windowed chi-square of predicted classes or binned scalars
``change``      PageHinkleyChange and AdwinChange: river's change detectors on scalar streams
``window``      TimeWindowPSI: PSI and Jensen-Shannon divergence over the last T seconds
``fleet``       FleetBins: per-feature counts in reference-decile bins, for the fleet PSI in Prometheus
``budget``      AlarmBudget ("1/30d": a false-alarm rate in time, alpha per test per look) and LookClock (wall-clock looks)
``moments``     MomentTest (per-feature cluster-robust mean tests at looks, effect gate, held flag) and MomentFeatures
``calibrate``   calibrate_drift (every detector fitted on the reference, for the artifact) and rebuilding them
``watch``       DriftWatch: the tap sink feeding each model version's detectors, exporting and checkpointing them
"""

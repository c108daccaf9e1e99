"""Drift detection: what the sidecar runs, and the detectors it no longer runs but keeps for comparison.

What the sidecar runs, per model version, under one false-alarm budget in time:

``budget``      LookClock (wall-clock looks) and AlarmBudget ("1/30d", from agent.config.budget): alpha per test per look
``moments``     MomentTest (per-feature cluster-robust mean tests at looks, effect gate, held flag) and MomentFeatures
``budgeted``    BudgetedDrift: a version's tests (inputs, outputs, score) sharing the budget; a held flag per detector
``calibrate``   calibrate_drift (the moment features fitted on the reference, for the artifact) and rebuilding them
``watch``       DriftWatch: the tap sink feeding each model version's tests, looking, exporting and checkpointing
``fleet``       FleetBins: per-feature counts in reference-decile bins, for the fleet PSI in Prometheus
``window``      TimeWindowPSI: PSI and Jensen-Shannon divergence over the last T seconds (optional)

Streaming detectors calibrated to an expected run time (ERT) in requests, which the sidecar ran before the
budget (a false alarm every ERT requests whatever the time; bench/drift.py and bench/false_alarms.py
compare them with the budgeted tests):

``base``        DriftDetector: the alarm state every drift detector keeps, and its save/restore (river's shape)
``result``      the DriftResult dataclass every drift detector returns
``ert``         thresholds calibrated by simulation to a target ERT without drift
``univariate``  WindowedCVM: per-feature windowed Cramér-von Mises, ERT-calibrated
``mmd``         OnlineMMD: a kernel two-sample test (MMD) over a sliding window, ERT-calibrated
``prediction``  ClassMixDrift and ScalarWindowDrift: windowed chi-square of predicted classes or binned scalars
``change``      PageHinkleyChange and AdwinChange: river's change detectors on scalar streams
"""

"""Calibration: the feature-squeezing threshold, set on benign data alone, the reference summary and
the drift detectors' calibration, kept in a versioned JSON artifact beside the model.

``threshold``  threshold_at_fpr: the threshold at a target false-positive rate, and the rule's text
``reference``  reference_summary (summary statistics of the benign reference) and load_reference (.npz/.npy)
``artifact``   CalibrationArtifact, its JSON file (ARTIFACT_FILE), save/load and the model's sha256 check
``calibrate``  calibrate(): scores the reference, sets the threshold, calibrates the drift detectors

The ``sidewatch calibrate`` command that prints around it lives in agent.cli.
"""


class CalibrationError(ValueError):
    """A calibration that cannot be made, or an artifact that cannot be used."""

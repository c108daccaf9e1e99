"""sidewatch: a sidecar that watches model-server traffic for adversarial inputs, drift and anomalies."""

__version__ = "0.1.0"

"""Detectors that watch a copy of the inference traffic: adversarial inputs, drift and anomalies.

``features/``     features by tensor kind (numeric, categorical, image, text, outputs, embedding), chosen from metadata
``anomaly``       AnomalyScorer: isolation-forest anomaly scores of feature vectors, flagged at a target FPR
``registry``      DetectorRegistry: the calibrated squeezing detector of every model version in a repository
``adversarial/``  feature squeezing: numpy squeezers, the fused ONNX graph, the live watch (shadow/flag/enforce)
``queries/``      black-box query detection per client: fingerprints of recent inputs, near-duplicates
``calibration/``  the threshold, the reference summary and the JSON artifact beside each model, and calibrate()
``drift/``        drift detectors (one module per method, one base class), their calibration, the live watch

Imports run one way: this package uses agent.config, agent.metrics, agent.logs, agent.durable,
agent.execution, agent.repository, agent.protocol and agent.dataplane, never the alerts, the admin
API, the app, the CLI, the model server or the demo.
"""

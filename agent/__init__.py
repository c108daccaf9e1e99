"""sidewatch: a sidecar that watches model-server traffic for adversarial inputs, drift and anomalies.

The package's layers, lowest first (imports run downward only; tests/unit/test_layers.py keeps it so):

- the bottom, importing nothing else of sidewatch: ``config/``, ``metrics``, ``logs``, ``durable``,
  ``tls``, ``execution`` (ONNX Runtime sessions), ``repository`` (model repository layout), ``eventloop``;
- ``protocol/``: the Open Inference Protocol;
- ``dataplane/``: carries the bytes; the policy interface is how the rest reaches it;
- ``detect/`` and ``alerts/``: detectors, features and calibration | alert engine, dispatcher, hooks;
- ``admin/`` and ``modelserver/``; then ``demo/``;
- ``app``: the composition root, the only module that knows every subsystem;
- ``cli``: parses arguments and calls the app.
"""

__version__ = "0.1.0"

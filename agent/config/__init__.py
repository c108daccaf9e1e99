"""The typed configuration: one pydantic model, read from YAML and overridden by flags.

It sits at the bottom of the package: it imports nothing else of sidewatch, and everything above reads it.

``base``      strict sections, ``HOST:PORT`` addresses, ConfigError
``serve``     ServeConfig, the whole configuration of ``sidewatch serve``, and load_config
``alerts``    the ``alerts:`` section (rules of the in-sidecar alert engine)
``rollback``  the ``rollback:`` section (safety limits and the named hooks)
``budget``    AlarmBudget, a false-alarm budget in time (``1/30d``)
``files``     the files and programs the configuration names, checked before start (check_files)
``queries``   the ``detection.queries`` section (black-box query detection per client)
"""

from agent.config.base import ConfigError, Strict, split_address
from agent.config.budget import AlarmBudget
from agent.config.files import check_files, file_problems
from agent.config.queries import QueryDetection, QueryMode
from agent.config.serve import (
    Admin,
    AdversarialMode,
    Detection,
    Drift,
    ListenerTLS,
    Metrics,
    ModelSettings,
    RateAlarm,
    ServeConfig,
    Tap,
    Upstream,
    UpstreamTLS,
    load_config,
)

__all__ = ["Admin", "AdversarialMode", "AlarmBudget", "ConfigError", "Detection", "Drift", "ListenerTLS", "Metrics",
           "ModelSettings", "QueryDetection", "QueryMode", "RateAlarm", "ServeConfig", "Strict", "Tap", "Upstream",
           "UpstreamTLS", "check_files", "file_problems", "load_config", "split_address"]

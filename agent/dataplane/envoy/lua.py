"""The Lua HTTP filter that reads each model-scoped call's model name and version (model_peek.lua).

The script reads the first request body chunk of ModelInfer, ModelStreamInfer, ModelMetadata and
ModelReady calls without buffering the body and leaves the names in dynamic metadata (namespace
``sidewatch``), where the gRPC access log (access_log.py) carries them to sidewatch's metrics.

>>> script = model_peek_filter()["typed_config"]["default_source_code"]["inline_string"]
>>> "bodyChunks" in script and "__MAX_LABEL__" not in script
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
SCRIPT = Path(__file__).with_name("model_peek.lua")
METADATA_NAMESPACE = "sidewatch"
# Model names and versions become metric labels: longer values are cut to this many bytes.
MAX_LABEL_BYTES = 128


def model_peek_filter(max_label_bytes: int = MAX_LABEL_BYTES) -> dict[str, Any]:
    """The envoy.filters.http.lua filter running model_peek.lua, values cut to ``max_label_bytes``."""
    script = SCRIPT.read_text().replace("__MAX_LABEL__", str(int(max_label_bytes)))
    return {"name": "envoy.filters.http.lua",
            "typed_config": {"@type": LUA, "default_source_code": {"inline_string": script}}}

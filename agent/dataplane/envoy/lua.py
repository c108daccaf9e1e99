r"""The Lua HTTP filter that reads each model-scoped call's model name and version (model_peek.lua).

The script reads the first request body chunk of ModelInfer, ModelStreamInfer, ModelMetadata and
ModelReady calls without buffering the body and leaves the names in dynamic metadata (namespace
``sidewatch``), where the gRPC access log (access_log.py) carries them to sidewatch's metrics.
With ``inline`` (flag and enforce modes, and query detection: verdicts.py), ModelInfer calls wait for their
whole body and those of the models routed inline get the header that routes them through the verdict filter,
and with query detection the client's identity in dynamic metadata (``client``, or ``client_hex``).

>>> script = model_peek_filter()["typed_config"]["default_source_code"]["inline_string"]
>>> "bodyChunks" in script and "__MAX_LABEL__" not in script
True
>>> print(lua_modes({"m": "flag"}))
{["\109"] = "\102\108\97\103"}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import metrics

LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
LUA_FILTER = "envoy.filters.http.lua"
SCRIPT = Path(__file__).with_name("model_peek.lua")
METADATA_NAMESPACE = "sidewatch"
# Model names and versions become metric labels: longer values are cut to this many bytes, the python
# plane's bound too (agent.metrics, agent.protocol.peek).
MAX_LABEL_BYTES = metrics.MAX_LABEL_BYTES


@dataclass(frozen=True)
class InlineRouting:
    """What the script needs to route calls to the verdict filter: the default mode, each model's own
    mode ("shadow": not routed), and the header it sets (verdicts.py); for query detection, how a client is
    told (``identity``: peer, certificate or metadata, with ``identity_key``; "": no model is watched)."""

    default_mode: str
    modes: Mapping[str, str]
    header: str
    identity: str = ""
    identity_key: str = ""


def lua_string(value: str) -> str:
    """``value`` as a Lua string literal, every byte escaped: model names come from the config file."""
    return '"' + "".join(f"\\{byte}" for byte in value.encode()) + '"'


def lua_modes(modes: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"[{lua_string(name)}] = {lua_string(mode)}" for name, mode in sorted(modes.items())) + "}"


def model_peek_filter(max_label_bytes: int = MAX_LABEL_BYTES, inline: InlineRouting | None = None) -> dict[str, Any]:
    """The envoy.filters.http.lua filter running model_peek.lua, values cut to ``max_label_bytes``; with
    ``inline``, routing ModelInfer calls of the models in flag and enforce modes to the verdict filter."""
    script = (SCRIPT.read_text().replace("__MAX_LABEL__", str(int(max_label_bytes)))
              .replace("__INLINE__", "true" if inline is not None else "false")
              .replace("__INLINE_HEADER__", inline.header if inline is not None else "")
              .replace("__DEFAULT_MODE__", lua_string(inline.default_mode if inline is not None else "shadow"))
              .replace("__MODES__", lua_modes(inline.modes if inline is not None else {}))
              .replace("__IDENTITY__", lua_string(inline.identity if inline is not None else ""))
              .replace("__IDENTITY_KEY__", lua_string(inline.identity_key if inline is not None else "")))
    return {"name": LUA_FILTER,
            "typed_config": {"@type": LUA, "default_source_code": {"inline_string": script}}}

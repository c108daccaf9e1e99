"""What every section of the configuration shares: strict models, addresses, and the error type."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration that sidewatch refuses to start with."""


class Strict(BaseModel):
    """A configuration section: an unknown key is an error (a typo must not be ignored silently)."""

    model_config = ConfigDict(extra="forbid")


def split_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6) and check the port."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def check_address(value: str) -> str:
    """A field validator: ``value`` must be ``HOST:PORT``."""
    split_address(value)
    return value

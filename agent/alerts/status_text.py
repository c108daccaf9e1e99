"""The admin API's /status as text, for ``sidewatch alerts status``."""

from __future__ import annotations

import time


def _when(stamp) -> str:
    if not stamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _value(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _labels(labels: dict) -> str:
    return ",".join(f"{key}={labels[key]}" for key in sorted(labels)) or "-"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def format_status(status: dict) -> str:
    lines = ["ALERTS"]
    rows = []
    for rule in status.get("alerts", []):
        if not rule["series"]:
            rows.append([rule["name"], "inactive", "-", "-", "-", ",".join(rule["hooks"]) or "-"])
        for series in rule["series"]:
            state = series["state"] + (" (clearing)" if series.get("clearing") else "")
            rows.append([rule["name"], state, _when(series["since"]), _value(series["value"]),
                         _labels(series["labels"]), ",".join(rule["hooks"]) or "-"])
    lines += _table(["RULE", "STATE", "SINCE", "VALUE", "LABELS", "HOOKS"], rows) if rows else ["  (no rules)"]

    rollback = status.get("rollback", {})
    incidents = rollback.get("incidents", [])
    if isinstance(incidents, dict):
        incidents = list(incidents.values())
    lines += ["", "INCIDENTS"]
    if incidents:
        rows = []
        for incident in incidents:
            hooks = ", ".join(f"{name}:{hook.get('result', '?')}" for name, hook in incident.get("hooks", {}).items())
            rows.append([incident.get("id", "?"), incident.get("key", incident.get("alert", "?")),
                         incident.get("source", "-"), incident.get("state", "-"), incident.get("decision", "-"),
                         _when(incident.get("opened_at")), hooks or "-"])
        lines += _table(["ID", "ALERT", "SOURCE", "STATE", "DECISION", "OPENED", "HOOKS"], rows)
    else:
        lines.append("  (none)")

    pins = rollback.get("pins", rollback.get("routes", {}).get("pins", {}) if isinstance(rollback.get("routes"), dict) else {})
    if isinstance(pins, dict):
        pins = list(pins.values())
    lines += ["", "ROUTE PINS"]
    if pins:
        rows = [[pin.get("model", "?"), pin.get("version") or f"upstream {pin.get('upstream')}", pin.get("incident") or "-",
                 _when(pin.get("pinned_at"))] for pin in pins]
        lines += _table(["MODEL", "PINNED TO", "INCIDENT", "SINCE"], rows)
    else:
        lines.append("  (none)")
    extra = [f"{key}: {rollback[key]}" for key in ("dry_run", "cooldown", "rollbacks_last_hour") if key in rollback]
    if extra:
        lines += ["", *extra]
    return "\n".join(lines)

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
    lines += ["", "INCIDENTS"]
    if incidents:
        rows = []
        for incident in incidents:
            hooks = ", ".join(f"{name}:{hook['result']}" for name, hook in incident["hooks"].items())
            rows.append([incident["id"], incident["key"], incident["source"], incident["state"], incident["decision"],
                         _when(incident["opened_at"]), hooks or "-"])
        lines += _table(["ID", "ALERT", "SOURCE", "STATE", "DECISION", "OPENED", "HOOKS"], rows)
    else:
        lines.append("  (none)")

    pins = list(rollback.get("routes", {}).values())
    lines += ["", "ROUTE PINS"]
    if pins:
        rows = [[pin["model"], pin["version"] or f"upstream {pin['upstream']}", pin["incident"] or "-",
                 _when(pin["pinned_at"])] for pin in pins]
        lines += _table(["MODEL", "PINNED TO", "INCIDENT", "SINCE"], rows)
    else:
        lines.append("  (none)")
    if rollback:
        cooldown = f"until {_when(rollback['cooldown_until'])}" if rollback.get("cooldown_until") else "no"
        lines += ["", f"dry run: {'yes' if rollback.get('dry_run') else 'no'}   cooldown: {cooldown}   "
                      f"rollbacks in the last hour: {rollback.get('rollbacks_last_hour', 0)} "
                      f"(limit {rollback.get('max_per_hour', '?')})   audit log: {rollback.get('audit_log') or 'memory only'}"]
    return "\n".join(lines)

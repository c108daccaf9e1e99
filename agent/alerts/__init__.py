"""Alerts and rollback: the alert engine, the Alertmanager receiver, rollback hooks and their safety.

``engine``      the alert engine: rules over the sidecar's own metrics, evaluated on a thread of their own
``incident``    Alert and Incident, and incident ids
``dispatcher``  the rollback dispatcher: one rollback per incident, cooldown, max per hour, replay
``audit``       the append-only, fsync'd JSON-lines audit log
``receiver``    Alertmanager's webhook payload (version 4) -> alerts for the dispatcher
``hooks/``      one module per hook type (route, webhook, command, kubernetes, argo_rollouts), one interface

Their configuration (``alerts:``, ``rollback:``) lives with the rest in agent/config.
"""

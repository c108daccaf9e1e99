"""Alerts and rollback: the alert engine, the Alertmanager receiver, rollback hooks and their safety.

Modules: ``incident`` (Alert, Incident), ``hook_config`` (the ``rollback:`` configuration),
``audit`` (the append-only audit log), ``rollback`` (the dispatcher and its safety rules) and
``hooks/`` (one module per hook type).
"""

"""Rollback hooks, one module per type. Each exposes ``run(hook, incident, context) -> str`` that returns
a short description of what it did and raises :class:`HookFailed` when it did not succeed."""

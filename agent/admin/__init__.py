"""The admin API and its client: alert and rollback status, route undo, Alertmanager's webhook.

``server``       the HTTP server (bearer token, bounded bodies and connections, optional TLS)
``client``       the client behind ``sidewatch alerts status`` and ``sidewatch route undo``
``token``        the admin token, read the same way by both
``status_text``  the status as text for the terminal
"""

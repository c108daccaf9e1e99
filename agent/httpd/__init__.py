"""The sidecar's HTTP listeners, built so that a slow or hostile client cannot pin them.

``guard``    GuardedServer and GuardedHandler: a slot per connection, a deadline per request, and the
             eviction of connections that have not shown they may use the listener (the admin API uses it)
``metrics``  the ``/metrics`` listener on the same mechanism

It sits at the bottom of the package: it imports nothing else of sidewatch (its bounds arrive as any
object with ``max_connections`` and ``request_timeout_seconds``, the ``admin:`` and ``metrics:`` sections).
"""

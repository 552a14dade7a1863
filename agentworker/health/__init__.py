"""Health, readiness, status and metrics over HTTP (the supervisor's one port).

:mod:`~agentworker.health.app` is the aiohttp app, :mod:`~agentworker.health.checks` the
``application/health+json`` checks, :mod:`~agentworker.health.status_table` the ``agentworker status``
command's rendering.
"""

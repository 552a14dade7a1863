"""The webhook ingress: ``agentworker webhooks``, the one process that faces the internet.

A provider's signed call is checked here, before it is answered — route, rate, size, content type,
signature, timestamp, delivery id — and only then is ``handle_webhook`` enqueued for the tenant's
workers. So a bad signature gets its 401 while the provider is still waiting, and unsigned junk never
spends a tenant's ``max_pending`` or ``rate_limit``.

* :mod:`~agentworker.ingress.app` — the aiohttp app: ``POST /webhooks/{tenant_id}/{source}`` and the
  probes and metrics of the port;
* :mod:`~agentworker.ingress.buckets` — the per-source token buckets (bounded memory);
* :mod:`~agentworker.ingress.sources` — the sources' settings read from PostgreSQL, cached briefly;
* :mod:`~agentworker.ingress.server` — the process: connections, the quota file, signals.

It is its own process and port because the supervisor's port (``/status``, ``/admin/*``) must never be
reachable from outside the cluster, while this one must be.
"""

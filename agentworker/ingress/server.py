"""The ``agentworker webhooks`` process: the ingress app on its own port, until SIGTERM.

* **Start.** The quota file is read first (a bad one: exit 2 before anything listens); then the port is
  bound (in use: exit 1). Redis and PostgreSQL are not needed to start: until they answer, deliveries get
  503 and ``/ready`` fails, and the PostgreSQL pool is made on the first delivery that finds it up.
* **Quota file.** Routing and tenant limits come from it (the submitter routes the jobs). Its content is
  checked every ``AGENTWORKER_CONFIG_POLL_INTERVAL`` seconds, and on SIGHUP; a bad new file is logged
  and the running one stays.
* **SIGTERM / SIGINT** only set a flag; the main coroutine then marks the ingress draining (``/ready``
  fails, a new delivery on a kept-alive connection is answered 503), stops listening, lets the
  deliveries in flight finish (each is bounded: the body deadline, then at most three queries of
  :data:`~agentworker.ingress.app.DEPENDENCY_TIMEOUT_S`; aiohttp's own ceiling is 60 s), closes Redis
  and PostgreSQL and exits 0. Kubernetes gives the endpoint's removal a few seconds first (the
  Deployment's ``preStop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

from redis.asyncio import Redis

from agentworker.config import ConfigError, QuotaConfig, QuotaFileWatch
from agentworker.db import LazyDatabase
from agentworker.errors import AgentWorkerError
from agentworker.health.server import HttpServer
from agentworker.ingress.app import WebhookIngress
from agentworker.logs import get_logger
from agentworker.settings import Settings, SettingsError
from agentworker.submit import JobSubmitter

#: PostgreSQL connections of one ingress process
DATABASE_POOL_SIZE = 10
#: JSON string escaping may double a body (every byte a quote or a backslash), plus room for the headers
_PAYLOAD_OVERHEAD = 2

log = get_logger("agentworker.ingress")


class StartupError(AgentWorkerError):
    """The ingress cannot start (bad settings, port in use); one sentence."""


def check_settings(settings: Settings) -> None:
    """Refuse (:class:`~agentworker.settings.SettingsError`) a body limit whose jobs could not be enqueued:
    they must fit the payload limit."""
    if settings.webhook_max_body_bytes * _PAYLOAD_OVERHEAD > settings.max_payload_bytes:
        raise SettingsError(f"AGENTWORKER_WEBHOOK_MAX_BODY_BYTES={settings.webhook_max_body_bytes} must be at most "
                           f"half of AGENTWORKER_MAX_PAYLOAD_BYTES={settings.max_payload_bytes}: a body is "
                           "enqueued as a JSON string, which may be twice its size")


async def serve(settings: Settings, config_path: Path, *, host: str | None = None, port: int | None = None) -> int:
    """Run the ingress until SIGTERM or SIGINT; return the exit code (0). Raises :class:`StartupError`
    (port in use, bad quota file) or :class:`~agentworker.settings.SettingsError`."""
    check_settings(settings)
    watch = QuotaFileWatch(config_path, limits=settings.limits)
    try:
        config = await asyncio.to_thread(watch.load)
    except ConfigError as exc:
        raise StartupError(f"bad quota file {exc}") from None
    host = settings.webhook_host if host is None else host
    port = settings.webhook_port if port is None else port
    if not host.strip():  # aiohttp would bind every interface: say so instead of guessing
        raise SettingsError("the webhook ingress's host (--host, AGENTWORKER_WEBHOOK_HOST) is empty: give an "
                            "address, e.g. 0.0.0.0 for every interface or 127.0.0.1 for this machine only")
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=settings.ready_timeout, socket_timeout=5)
    database = LazyDatabase(settings.database_url, max_size=DATABASE_POOL_SIZE)
    submitter = JobSubmitter(redis, config, max_payload_bytes=settings.max_payload_bytes)
    ingress = WebhookIngress(settings, redis, database, submitter)
    http = HttpServer(ingress.make_app(), host, port)
    stop, reload = asyncio.Event(), asyncio.Event()
    watcher: asyncio.Task[None] | None = None
    try:
        try:
            await http.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload.set)
        watcher = asyncio.create_task(_watch_config(watch, submitter, settings.config_poll_interval, reload),
                                      name="ingress-config-watch")
        log.info("webhook ingress started", host=host, port=http.bound_port, config=str(config_path))
        await stop.wait()
        log.info("webhook ingress stopping: finishing the deliveries in flight")
        ingress.draining = True
        return 0
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await http.close()  # stops listening, then waits for the handlers still running
        with contextlib.suppress(Exception):
            await database.close()
        with contextlib.suppress(Exception):
            await redis.aclose()
        log.info("webhook ingress stopped")


async def _watch_config(watch: QuotaFileWatch, submitter: JobSubmitter, interval: float,
                        reload: asyncio.Event) -> None:
    """Swap the submitter's quota file when its content changes (checked every ``interval`` seconds, 0:
    only on SIGHUP); a bad file is logged once and the running one stays."""
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval if interval > 0 else None):
                await reload.wait()
        reload.clear()
        try:
            loaded: QuotaConfig | None = await asyncio.to_thread(watch.poll)
        except ConfigError as exc:
            log.error("quota file refused; the running one stays", error=str(exc))
            continue
        except Exception as exc:  # the watch must outlive whatever the file holds
            log.error("quota file cannot be loaded; the running one stays", error=f"{type(exc).__name__}: {exc}")
            continue
        if loaded is not None:
            submitter.config = loaded
            log.info("quota file reloaded", tenants=len(loaded.tenants), pools=sorted(loaded.pools))

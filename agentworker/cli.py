"""The ``agentworker`` command (also ``python -m agentworker``).

Every command takes ``--config FILE`` (default: ``AGENTWORKER_CONFIG``, else the packaged quota file),
before or after the command name: one option, so ``agentworker --config F route acme`` and
``agentworker route acme --config F`` read the same file, and two different files are refused.
User mistakes print one line on stderr and exit non-zero (2 for bad input or configuration, 1 for an
operation that failed, such as an unreachable Redis); never a traceback. The texts of ``--help`` are
plain text (DESCRIPTION and EPILOG below), not this docstring's markup.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from agentworker import __version__
from agentworker.config import TENANT_KEYS, ConfigError, QuotaConfig, load_config, resolve_config_path
from agentworker.jobs import InvalidJob
from agentworker.routing import InvalidTenantId, route_tenant
from agentworker.settings import Settings, SettingsError, check_database_url

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from redis.asyncio import Redis

    from agentworker.client import AgentWorkerClient
    from agentworker.tenants import TenantView

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit code attached."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        self.code = code
        super().__init__(message)


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(config=args.config)


def _config(args: argparse.Namespace) -> QuotaConfig:
    return load_config(_settings(args).config)


# -- check-config ------------------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    path = resolve_config_path(settings.config)
    try:
        config = load_config(path, limits=settings.limits)
    except ConfigError as exc:
        if len(exc.errors) == 1:  # unreadable, too big, not UTF-8, not YAML, too deep...: one line
            print(f"{exc.source}: {exc.errors[0]}", file=sys.stderr)
            return EXIT_USAGE
        print(f"{exc.source}: {len(exc.errors)} error(s)", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{path}: OK")
    print(f"default pool: {config.default_pool}")
    print(f"{'pool':<16} {'shards':>6} {'procs':>5} {'conc':>5} {'timeout':>8} {'tries':>5} {'mem MB':>7} "
          f"{'recycle':>8} {'hang':>5}")
    for name, pool in sorted(config.pools.items()):
        print(f"{name:<16} {pool.shards:>6} {pool.processes:>5} {pool.concurrency:>5} {pool.job_timeout:>7g}s "
              f"{pool.max_tries:>5} {pool.memory_limit_mb:>7} {pool.max_jobs_per_process:>8} "
              f"{pool.hang_timeout:>4g}s")
    for name, plan in sorted(config.plans.items()):
        print(f"plan {name}: {_limits_text(plan.model_dump())}")
    default_plan = f" (plan {config.tenant_defaults.plan})" if config.tenant_defaults.plan else ""
    print(f"{len(config.tenants)} tenant(s) named; others use pool {config.default_tenant_pool!r} and "
          f"tenant_defaults{default_plan} {_limits_text(config.default_limits.model_dump())}")
    if config.tenants:
        print("effective limits of each named tenant (its own keys over its plan's, over tenant_defaults; "
              "job_timeout: the tighter of the tenant's and its pool's; the tenant store may override them: "
              "agentworker tenants get ID):")
    for tenant_id in sorted(config.tenants):
        route = route_tenant(config, tenant_id)
        limits = {**config.limits_of(tenant_id).model_dump(), "job_timeout": config.job_timeout_for(tenant_id)}
        print(f"  {tenant_id:<24} pool={route.pool:<12} shard={route.shard:<4} {_limits_text(limits)}")
    return EXIT_OK


def _limits_text(limits: dict[str, Any]) -> str:
    shown = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in limits.items() if v is not None]
    return " ".join(shown) or "(no limits)"


# -- route -------------------------------------------------------------------------------------------


def cmd_route(args: argparse.Namespace) -> int:
    route = route_tenant(_config(args), args.tenant)
    if args.json:
        print(json.dumps({"tenant_id": route.tenant_id, "pool": route.pool, "shard": route.shard,
                          "queue": route.queue}))
    else:
        print(f"tenant {route.tenant_id}: pool {route.pool}, shard {route.shard}, queue {route.queue}")
    return EXIT_OK


# -- enqueue -----------------------------------------------------------------------------------------


def cmd_enqueue(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise CommandError(f"--payload is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise CommandError("--payload must be a JSON object")
    return asyncio.run(_enqueue(args, payload))


async def _enqueue(args: argparse.Namespace, payload: dict[str, Any]) -> int:
    from agentworker.client import AgentWorkerClient, JobFailed, QuotaExceeded, ResultTimeout
    from agentworker.events import stream_position
    from agentworker.routing import validate_tenant_id

    settings = _settings(args)
    validate_tenant_id(args.tenant)
    async with AgentWorkerClient.from_settings(settings) as client:
        # Where the tenant's stream is now, before the job can publish anything: --wait follows from here.
        since = await stream_position(client.redis, args.tenant) if args.wait else "$"
        try:
            job = await client.enqueue(args.task, tenant_id=args.tenant, payload=payload,
                                       idempotency_key=args.key, defer=args.defer)
        except QuotaExceeded as exc:
            raise CommandError(f"quota exceeded: {exc}", EXIT_FAILED) from None
        state = "enqueued" if job.created else "already exists (same idempotency key): not enqueued again"
        print(f"job {job.job_id} {state} on {job.route.queue}", flush=True)
        if not args.wait:
            return EXIT_OK
        finished = asyncio.Event()
        progress = asyncio.create_task(_print_progress(client.redis, args.tenant, job.job_id, since, finished))
        try:
            result = await job.result(timeout=args.timeout)
        except JobFailed as exc:
            await _stop_progress(progress, finished)
            print(f"failed: {exc.error}: {exc.message}", file=sys.stderr)
            return EXIT_FAILED
        except ResultTimeout as exc:
            await _stop_progress(progress, finished)
            print(str(exc), file=sys.stderr)
            return EXIT_FAILED
        await _stop_progress(progress, finished)
        print(json.dumps(result))
        return EXIT_OK


#: the events of a job --wait shows (to stderr, as they happen), and whether each ends the job
_PROGRESS_EVENTS = {"job_started": False, "job_retrying": False, "job_deferred": False, "job_timed_out": False,
                    "job_completed": True, "job_failed": True, "job_cancelled": True, "job_rejected": False}


def progress_line(job_id: str, event: str, data: dict[str, Any]) -> str:
    """One line of ``enqueue --wait``'s progress for one of the job's events."""
    tries = f" (try {data['try']})" if data.get("try") else ""
    error = f"{data.get('error')}: {data.get('message')}" if data.get("error") else ""
    if event == "job_started":
        text = f"started{tries}"
    elif event == "job_retrying":
        text = f"retrying{tries}" + (f" after {error}" if error else "") + f", again in {data.get('defer', 0):g}s"
    elif event == "job_deferred":
        text = f"deferred ({data.get('reason')}): {data.get('message')}; again in {data.get('defer', 0):g}s"
    elif event == "job_timed_out":
        text = f"timed out after {data.get('timeout', 0):g}s{tries}"
    elif event == "job_completed":
        text = f"finished{tries}"
    elif event == "job_cancelled":
        text = "cancelled" + (f" by {data['by']}" if data.get("by") else "") + tries
    elif event == "job_rejected":
        text = f"rejected: {data.get('reason')}"
    else:
        text = f"failed{tries} ({data.get('reason')}): {error}"
    return f"job {job_id}: {text}"


async def _print_progress(redis: Redis, tenant_id: str, job_id: str, since: str, finished: asyncio.Event) -> None:
    """Print the job's lifecycle events to stderr as they arrive (until cancelled); set ``finished`` at
    the one that ends it. A Redis error ends the progress lines, not the wait."""
    from agentworker.events import read_events

    try:
        async for event in read_events(redis, tenant_id, since=since, block_ms=1000):
            if event.data.get("job_id") != job_id or event.event not in _PROGRESS_EVENTS:
                continue
            print(progress_line(job_id, event.event, event.data), file=sys.stderr, flush=True)
            if _PROGRESS_EVENTS[event.event]:
                finished.set()
    except (RedisError, OSError):
        return


async def _stop_progress(progress: asyncio.Task[None], finished: asyncio.Event) -> None:
    """Let the progress lines catch up with the result (its last event is published just before it, a
    moment at most), then stop them."""
    import contextlib

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(finished.wait(), 2.0)
    progress.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await progress


# -- job control -------------------------------------------------------------------------------------


def cmd_job(args: argparse.Namespace) -> int:
    """``agentworker job ID``: the job's view; exit 1 when nothing is known of it."""
    return asyncio.run(_job_command(args))


async def _job_command(args: argparse.Namespace) -> int:
    from agentworker.client import AgentWorkerClient, JobNotCancellable, JobNotFound, JobNotRetryable, QuotaExceeded
    from agentworker.job_control import describe, parse_job_id

    parse_job_id(args.id)  # a bad id is refused before anything is reached
    by = args.by if getattr(args, "by", None) is not None else _default_by()
    async with AgentWorkerClient.from_settings(_settings(args)) as client:
        try:
            if args.command == "cancel":
                view = await client.cancel(args.id, by=by)
            elif args.command == "retry":
                view = await client.retry(args.id, by=by)
            else:
                view = await client.get_job(args.id)
        except (JobNotFound, JobNotCancellable, JobNotRetryable) as exc:
            raise CommandError(str(exc), EXIT_FAILED) from None
        except QuotaExceeded as exc:
            raise CommandError(f"quota exceeded: {exc}", EXIT_FAILED) from None
    if args.json:
        print(json.dumps(view.as_json(), default=str))
    else:
        print(describe(view))
    return EXIT_FAILED if view.status == "not_found" else EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    """``agentworker events TENANT``: a live tail of the tenant's events, one JSON line each; Ctrl-C ends it
    (exit 0), as do ``--count`` and ``--timeout``."""
    from agentworker.routing import validate_tenant_id

    validate_tenant_id(args.tenant)
    if args.since is not None and args.since not in ("0", "$") and not _is_stream_id(args.since):
        raise CommandError(f"--since {args.since!r} is not a stream id (0, $, or MS-SEQ as printed in stream_id)")
    if args.count is not None and args.count < 1:
        raise CommandError(f"--count must be at least 1, got {args.count}")
    if args.timeout is not None and not args.timeout > 0:
        raise CommandError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    try:
        return asyncio.run(_events(args))
    except KeyboardInterrupt:
        return EXIT_OK


def _is_stream_id(text: str) -> bool:
    ms, _, seq = text.partition("-")
    return len(text) <= 41 and ms.isdigit() and (seq == "" or seq.isdigit())


async def _events(args: argparse.Namespace) -> int:
    from redis.asyncio import Redis

    from agentworker.events import read_events

    redis = Redis.from_url(_settings(args).redis_url)
    printed = 0
    try:
        async with asyncio.timeout(args.timeout):
            async for event in read_events(redis, args.tenant, since=args.since or "$", block_ms=1000):
                print(json.dumps({"stream_id": event.id, "event": event.event, "id": event.event_id,
                                  "tenant_id": event.tenant_id, "ts": event.ts, "data": event.data},
                                 default=str), flush=True)
                printed += 1
                if args.count is not None and printed >= args.count:
                    break
    except TimeoutError:
        pass
    finally:
        await redis.aclose()
    return EXIT_OK


# -- run -------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agentworker.logs import configure_logging
    from agentworker.supervisor.runner import StartupError, serve

    settings = Settings.from_env(config=args.config, port=args.port)
    # abspath, not resolve(): a ConfigMap is a symlink swapped on update; workers must follow the link.
    path = Path(os.path.abspath(resolve_config_path(settings.config)))
    load_config(path)  # a bad file: one line and exit 2 before anything starts
    configure_logging(settings.log_level, settings.log_format, role="supervisor")
    try:
        return asyncio.run(serve(settings, path))
    except StartupError as exc:
        raise CommandError(str(exc), EXIT_FAILED) from None


# -- webhooks ----------------------------------------------------------------------------------------


def cmd_webhooks(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agentworker.ingress import server
    from agentworker.logs import configure_logging

    settings = Settings.from_env(config=args.config, webhook_port=args.port, webhook_host=args.host)
    server.check_settings(settings)
    path = Path(os.path.abspath(resolve_config_path(settings.config)))  # abspath: see cmd_run
    load_config(path)  # a bad file: one line and exit 2 before anything listens
    configure_logging(settings.log_level, settings.log_format, role="webhooks")
    try:
        return asyncio.run(server.serve(settings, path))
    except server.StartupError as exc:
        raise CommandError(str(exc), EXIT_FAILED) from None


# -- status ------------------------------------------------------------------------------------------


#: bounds of ``status --watch --interval``: faster only loads the supervisor, slower is not watching
WATCH_INTERVAL_MIN_S, WATCH_INTERVAL_MAX_S = 0.5, 3600.0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the status once, or with ``--watch`` again every ``--interval`` seconds until Ctrl-C (exit 0).

    The bearer sent is ``AGENTWORKER_STATUS_TOKEN``, else ``AGENTWORKER_ADMIN_TOKEN`` (the supervisor
    takes either). While watching, a supervisor that does not answer is one line in place of the table
    and the watch goes on: it is how an operator sees a restart through."""
    import time

    from agentworker.health.status_table import StatusUnavailable, fetch_status, render_status

    settings = Settings.from_env()
    url = _status_url(args.url) if args.url else f"http://127.0.0.1:{settings.port}"
    token = settings.status_token or settings.admin_token
    if args.interval is not None and not args.watch:
        raise CommandError("--interval is only used with --watch")
    interval = 2.0 if args.interval is None else args.interval
    if not WATCH_INTERVAL_MIN_S <= interval <= WATCH_INTERVAL_MAX_S:
        raise CommandError(f"--interval {interval:g} is out of range: give {WATCH_INTERVAL_MIN_S:g} to "
                           f"{WATCH_INTERVAL_MAX_S:g} seconds")

    def render() -> str:
        document = fetch_status(url, timeout=args.timeout, token=token)
        return json.dumps(document, indent=2) if args.json else render_status(document)

    if not args.watch:
        try:
            print(render())
        except StatusUnavailable as exc:
            raise CommandError(str(exc), EXIT_FAILED) from None
        return EXIT_OK
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            try:
                text = render()
            except StatusUnavailable as exc:
                text = f"error: {exc}"
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"{clear}{stamp}  every {interval:g}s (Ctrl-C to stop)\n{text}\n", flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _status_url(url: str) -> str:
    """``--url`` if it is an http(s) URL with a host and a usable port, else a :class:`CommandError`."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise CommandError(f"--url {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CommandError(f"--url {url!r} is not an http:// or https:// URL with a host, "
                           "e.g. http://127.0.0.1:8000")
    return url


# -- migrate -----------------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    from asyncpg.exceptions import ClientConfigurationError

    from agentworker.db.migrate import MigrationError, migrate
    from agentworker.db.urls import redact_url

    if args.database_url is not None:
        check_database_url(args.database_url, "--database-url")
    url = args.database_url or _settings(args).database_url
    try:
        report = asyncio.run(migrate(url))
    except MigrationError as exc:
        raise CommandError(str(exc), EXIT_FAILED) from None
    except ClientConfigurationError as exc:  # a URL option check_database_url does not know
        where = "--database-url" if args.database_url is not None else "AGENTWORKER_DATABASE_URL"
        raise CommandError(f"{where} cannot be used: {exc}") from None
    for label in report.applied:
        print(f"applied {label}")
    state = f"{len(report.applied)} migration(s) applied" if report.applied else "already up to date"
    checkpoints = "LangGraph checkpoint tables ready" if report.checkpoint_tables else "LangGraph not installed"
    print(f"{redact_url(url)}: {state}; {checkpoints}")
    return EXIT_OK


# -- dead-letters ------------------------------------------------------------------------------------

DETAIL_WIDTH = 60


def cmd_dead_letters(args: argparse.Namespace) -> int:
    return asyncio.run(_dead_letters(args))


async def _dead_letters(args: argparse.Namespace) -> int:
    from redis.asyncio import Redis

    from agentworker.dead_letters import DeadLetterError

    settings = _settings(args)
    config = load_config(settings.config)
    if args.pool is not None and args.pool not in config.pools:
        raise CommandError(f"unknown pool {args.pool!r}: the quota file has {', '.join(sorted(config.pools))}")
    pools = [args.pool] if args.pool is not None else sorted(config.pools)
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=15)
    try:
        if args.action == "list":
            return await _list_dead_letters(redis, pools, args)
        return await _act_on_dead_letter(redis, config, pools, args)
    except DeadLetterError as exc:
        raise CommandError(str(exc), EXIT_FAILED) from None
    finally:
        await redis.aclose()


async def _list_dead_letters(redis: Redis, pools: list[str], args: argparse.Namespace) -> int:
    from agentworker.dead_letters import list_dead_letters

    if args.limit < 1:
        raise CommandError(f"--limit must be at least 1, not {args.limit}")
    found = [await list_dead_letters(redis, pool, limit=args.limit) for pool in pools]
    if args.json:
        print(json.dumps({"dead_letters": [letter.as_dict() for listing in found for letter in listing.letters],
                          "total": {listing.pool: listing.total for listing in found}}))
        return EXIT_OK
    rows = [[letter.pool, letter.id, letter.reason, _age(letter.age_s()), _truncate(letter.detail, DETAIL_WIDTH)]
            for listing in found for letter in listing.letters]
    if rows:
        headers = ["POOL", "ID", "REASON", "AGE", "DETAIL"]
        widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
        for line in [headers, *rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    totals = ", ".join(f"{listing.total} in pool {listing.pool}" for listing in found)
    print(f"{sum(listing.total for listing in found)} dead letter(s): {totals}")
    for listing in found:
        if listing.more:
            print(f"pool {listing.pool}: {listing.more} more not shown (--limit {args.limit})")
    return EXIT_OK


async def _act_on_dead_letter(redis: Redis, config: QuotaConfig, pools: list[str], args: argparse.Namespace) -> int:
    from agentworker.dead_letters import delete, find_pools, parse_id, requeue

    raw = parse_id(args.id)
    if len(pools) > 1:
        holding = await find_pools(redis, pools, raw)
        if not holding:
            raise CommandError(f"job {args.id} is not among the dead letters of any pool "
                               f"({', '.join(pools)})", EXIT_FAILED)
        if len(holding) > 1:
            raise CommandError(f"job {args.id} is among the dead letters of pools {', '.join(holding)}; "
                               f"say which with --pool")
        pools = holding
    pool = pools[0]
    if args.action == "requeue":
        letter = await requeue(redis, pool, raw, config=config)
        print(f"job {letter.id} requeued on {letter.queue} (pool {pool}), dead-lettered {_age(letter.age_s())} "
              f"ago as {letter.reason}")
    else:
        letter = await delete(redis, pool, raw)
        print(f"job {letter.id} deleted from the dead letters of pool {pool}, with its job record "
              f"({letter.reason}, dead-lettered {_age(letter.age_s())} ago)")
    return EXIT_OK


def _age(seconds: float) -> str:
    for unit, size, below in (("s", 1, 120), ("m", 60, 7200), ("h", 3600, 172800)):
        if seconds < below:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds // 86400)}d"


def _truncate(text: str, width: int) -> str:
    text = " ".join(text.split())  # one line per row, whatever the detail holds
    return text if len(text) <= width else text[:width - 1] + "…"


# -- tenants -----------------------------------------------------------------------------------------

#: argparse types of the override options (any other key of TENANT_KEYS is a string, e.g. rate_limit)
_OVERRIDE_TYPES: dict[str, Callable[[str], Any]] = {
    "max_concurrency": int, "max_pending": int, "job_timeout": float, "weight": float, "llm_concurrency": int}
_OVERRIDE_HELP: dict[str, tuple[str, str]] = {
    "pool": ("P", "route the tenant to this pool of the quota file"),
    "max_concurrency": ("N", "jobs of the tenant running at once (>= 1)"),
    "max_pending": ("N", "jobs of the tenant queued at most (>= 0)"),
    "job_timeout": ("S", "seconds a job may run (at most its pool's job_timeout)"),
    "rate_limit": ("R", "job starts per period, e.g. 50/s, 600/m, 1000/h"),
    "weight": ("W", "fair-share weight inside its shard (0-1000, default 1)"),
    "llm_tokens": ("T", "model tokens per sliding window, e.g. 200000/h"),
    "llm_concurrency": ("N", "model calls of the tenant in flight at once (>= 1)"),
}
BY_HELP = ("who makes the change, recorded in the tenant's history (default: cli:USER@HOST, the login "
           "name and host name of this shell)")


def _default_by() -> str:
    """``cli:{user}@{host}``, made printable ASCII (the store refuses anything else)."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (a container's arbitrary uid)
        user = f"uid{os.getuid()}"
    by = f"cli:{user}@{socket.gethostname()}"
    return "".join(c if " " <= c <= "~" else "?" for c in by)[:200]


def cmd_tenants(args: argparse.Namespace) -> int:
    from agentworker.routing import validate_tenant_id

    if getattr(args, "tenant", None) is not None:
        validate_tenant_id(args.tenant)  # a bad id is refused before anything is reached
    if getattr(args, "by", "") is None:
        args.by = _default_by()
    _quiet_library_logs()
    return asyncio.run(_tenants(args))


def _quiet_library_logs() -> None:
    """The store logs each change at INFO (for services' logs); here the command's output says it. Its
    warnings (a change saved but not copied to Redis yet) go to stderr, one line each."""
    import logging

    import structlog

    structlog.configure(processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer(colors=False)],
                        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr), cache_logger_on_first_use=False)


async def _tenants(args: argparse.Namespace) -> int:
    from asyncpg import PostgresError
    from asyncpg.exceptions import ClientConfigurationError

    from agentworker.client import AgentWorkerClient
    from agentworker.db import DatabaseError
    from agentworker.tenants import InvalidTenantChange

    settings = _settings(args)
    async with AgentWorkerClient.from_settings(settings) as client:
        try:
            return await TENANT_ACTIONS[args.action](client, args)
        except InvalidTenantChange as exc:
            label = f"tenant {args.tenant}" if getattr(args, "tenant", None) is not None else exc.source
            print(f"{label}: {len(exc.errors)} error(s)", file=sys.stderr)
            for error in exc.errors:
                print(f"  {error}", file=sys.stderr)
            return EXIT_USAGE
        except DatabaseError as exc:  # unreachable, not migrated, login refused
            raise CommandError(str(exc), EXIT_FAILED) from None
        except ClientConfigurationError as exc:  # a URL option check_database_url does not know
            raise CommandError(f"AGENTWORKER_DATABASE_URL cannot be used: {exc}") from None
        except PostgresError as exc:  # e.g. the URL's database does not exist
            raise CommandError(f"PostgreSQL refused: {exc}", EXIT_FAILED) from None


async def _tenant_get(client: AgentWorkerClient, args: argparse.Namespace) -> int:
    _print_view(await client.get_tenant(args.tenant), args.json)
    return EXIT_OK


async def _tenant_set(client: AgentWorkerClient, args: argparse.Namespace) -> int:
    from agentworker.tenants import UNSET

    overrides = {key: getattr(args, f"override_{key}") for key in TENANT_KEYS
                 if getattr(args, f"override_{key}", None) is not None}
    plan = None if args.no_plan else args.plan if args.plan is not None else UNSET
    if plan is UNSET and not overrides:
        raise CommandError("nothing to set: give --plan NAME, --no-plan or an override option "
                           "(see agentworker tenants set --help)")
    before = await client.get_tenant(args.tenant)
    view = await client.set_tenant(args.tenant, by=args.by, plan=plan, overrides=overrides)
    if not args.json:
        print(f"tenant {args.tenant}: saved as version {view.version}" if view.version != before.version
              else f"tenant {args.tenant}: nothing changed (the entry already says so)")
    _print_view(view, args.json)
    return EXIT_OK


async def _tenant_unset(client: AgentWorkerClient, args: argparse.Namespace) -> int:
    keys_ = [key.replace("-", "_") for key in args.keys]
    known = all(key == "plan" or key in TENANT_KEYS for key in keys_)  # unknown ones: the store refuses them
    if keys_ and known and not (await client.get_tenant(args.tenant)).stored:
        changed = False  # the store would record an empty entry
    else:
        changed = await client.unset_tenant(args.tenant, *keys_, by=args.by)
    view = await client.get_tenant(args.tenant)
    if not args.json:
        if not keys_ or not view.stored:
            print(f"tenant {args.tenant}: entry removed; the quota file's limits apply" if changed
                  else f"tenant {args.tenant}: no stored entry; nothing to remove")
        else:
            print(f"tenant {args.tenant}: {', '.join(keys_)} unset, saved as version {view.version}" if changed
                  else f"tenant {args.tenant}: nothing changed ({', '.join(keys_)} not set)")
    _print_view(view, args.json)
    return EXIT_OK


async def _tenant_list(client: AgentWorkerClient, args: argparse.Namespace) -> int:
    views = await client.list_tenants(after=args.after, limit=args.limit)
    if args.json:
        print(json.dumps([view.as_json() for view in views]))
        return EXIT_OK
    rows = [[v.tenant_id, v.plan or "-", v.pool, str(v.shard), str(v.version), _when(v.updated_at),
             v.updated_by or "-", _entry_text({"overrides": v.overrides}) or "-"] for v in views]
    _print_table(["TENANT", "PLAN", "POOL", "SHARD", "VERSION", "UPDATED", "BY", "OVERRIDES"], rows)
    more = f"; more may follow: --after {views[-1].tenant_id}" if len(views) == args.limit else ""
    print(f"{len(views)} stored tenant(s){' after ' + repr(args.after) if args.after else ''}{more}")
    return EXIT_OK


async def _tenant_history(client: AgentWorkerClient, args: argparse.Namespace) -> int:
    changes = await client.tenant_history(args.tenant, limit=args.limit)
    if args.json:
        print(json.dumps([change.as_json() for change in changes]))
        return EXIT_OK
    rows = [[str(c.version), _when(c.changed_at), c.changed_by, _change_text(c.old, c.new)] for c in changes]
    _print_table(["VERSION", "CHANGED", "BY", "CHANGE"], rows)
    more = f" (the newest {args.limit}: --limit shows more)" if len(changes) == args.limit else ""
    print(f"tenant {args.tenant}: {len(changes)} change(s){more}")
    return EXIT_OK


TENANT_ACTIONS: dict[str, Callable[[AgentWorkerClient, argparse.Namespace], Awaitable[int]]] = {
    "get": _tenant_get, "set": _tenant_set, "unset": _tenant_unset, "list": _tenant_list,
    "history": _tenant_history}


def _print_view(view: TenantView, as_json: bool) -> None:
    """A :class:`~agentworker.tenants.TenantView`: its stored entry, route and effective limits."""
    if as_json:
        print(json.dumps(view.as_json()))
        return
    if view.stored:
        print(f"tenant {view.tenant_id}: stored entry version {view.version}, updated {_when(view.updated_at)} "
              f"by {view.updated_by}")
    else:
        print(f"tenant {view.tenant_id}: no stored entry (the quota file's limits apply)")
    print(f"plan: {view.plan or '(none stored)'}")
    print(f"overrides: {_entry_text({'overrides': view.overrides}) or '(none)'}")
    print(f"route: pool {view.pool}, shard {view.shard}, queue {view.queue}")
    print("effective limits (value, where it comes from):")
    rows = [["pool", view.pool, view.sources.get("pool", "-")]]
    for key, value in view.limits.items():
        rows.append([key, _value_text(value), view.sources.get(key, "-") if value is not None else "(no limit)"])
    width = max(len(row[0]) for row in rows), max(len(row[1]) for row in rows)
    for key, value, source in rows:
        print(f"  {key:<{width[0]}}  {value:<{width[1]}}  {source}")


def _value_text(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _entry_text(entry: dict[str, Any] | None) -> str:
    """``plan=pro max_concurrency=4`` for a stored entry (as the history records it)."""
    if not entry:
        return ""
    shown = [f"plan={entry['plan']}"] if entry.get("plan") else []
    shown += [f"{key}={_value_text(value)}" for key, value in sorted((entry.get("overrides") or {}).items())]
    return " ".join(shown)


def _change_text(old: dict[str, Any] | None, new: dict[str, Any] | None) -> str:
    if new is None:
        return f"entry removed (was: {_entry_text(old) or 'empty'})"
    if old is None:
        return f"entry created: {_entry_text(new) or 'empty'}"
    parts = []
    if old.get("plan") != new.get("plan"):
        parts.append(f"plan {old.get('plan') or '-'} -> {new.get('plan') or '-'}")
    before, after = old.get("overrides") or {}, new.get("overrides") or {}
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            parts.append(f"{key} {_value_text(before.get(key))} -> {_value_text(after.get(key))}")
    return "; ".join(parts) or "no change"


def _when(moment: Any) -> str:
    return moment.isoformat(timespec="seconds") if moment is not None else "-"


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    if not rows:
        return
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


# -- wiring ------------------------------------------------------------------------------------------


DESCRIPTION = "The agentworker command (also python -m agentworker): run the worker service and operate it."
EPILOG = ("--config FILE may be given before or after the command name: it is one option, and naming two "
          "different files is refused. Errors are one line on stderr; exit codes: 0 done, 1 the operation "
          "failed (e.g. Redis unreachable, port in use), 2 bad input or configuration.")
CONFIG_HELP = "the quota file (default: $AGENTWORKER_CONFIG, else the quota file shipped in the package)"
#: the --config of each parser level has its own destination, merged by _config_option: argparse copies a
#: subcommand's defaults over what the levels above it parsed, so one shared destination loses values
CONFIG_DESTS = ("config_top", "config_command", "config_action")


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error shape: one line on stderr and exit 2, no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _add_config_option(parser: argparse.ArgumentParser, dest: str) -> None:
    more = "; may also be given after the command" if dest == "config_top" else \
        "; the same option as agentworker --config FILE (two different files are refused)"
    parser.add_argument("--config", metavar="FILE", dest=dest, help=CONFIG_HELP + more)


def _config_option(args: argparse.Namespace) -> str | None:
    """The one --config of the command line, wherever it was given; two different files are refused."""
    given = [value for value in (getattr(args, dest, None) for dest in CONFIG_DESTS) if value is not None]
    if any(not value for value in given):
        raise CommandError("--config needs a file name (it was given an empty one)")
    files = {os.path.realpath(value): value for value in given}
    if len(files) > 1:
        raise CommandError(f"--config names two different files, {' and '.join(files.values())}: give it once")
    return given[0] if given else None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number from 0 to 65535")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agentworker", description=DESCRIPTION, epilog=EPILOG)
    _add_config_option(parser, "config_top")
    parser.add_argument("--version", action="version", version=f"agentworker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    command = _Parser(add_help=False)
    _add_config_option(command, "config_command")

    p = sub.add_parser("check-config", parents=[command], help="validate the quota file and print it")
    p.set_defaults(handler=cmd_check_config)

    p = sub.add_parser("route", parents=[command], help="print the pool, shard and queue of a tenant")
    p.add_argument("tenant", help="tenant id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_route)

    p = sub.add_parser("enqueue", parents=[command], help="route and enqueue one job")
    p.add_argument("task", help="task name, e.g. echo or execute_workflow")
    p.add_argument("--tenant", required=True, help="tenant id")
    p.add_argument("--payload", default="{}", help="the task's keyword arguments as a JSON object")
    p.add_argument("--key", help="idempotency key (default: a random one)")
    p.add_argument("--defer", type=float, help="seconds to wait before the job may start")
    p.add_argument("--wait", action="store_true", help="wait for the result and print it")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait with --wait (default 60)")
    p.set_defaults(handler=cmd_enqueue)

    job_help = "the job id, tenant:task:key (as enqueue prints it)"
    p = sub.add_parser("job", parents=[command], help="print a job: status, tries, times, result or error")
    p.add_argument("id", help=job_help)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_job)
    p = sub.add_parser("cancel", parents=[command],
                       help="cancel a job: a queued one is removed, a running one is cancelled by its worker")
    p.add_argument("id", help=job_help)
    p.add_argument("--by", metavar="WHO", help="who cancels, in the job_cancelled event (default: cli:USER@HOST)")
    p.add_argument("--json", action="store_true", help="print the job's view as JSON")
    p.set_defaults(handler=cmd_job)
    p = sub.add_parser("retry", parents=[command], help="run a failed or cancelled job again (same id and payload)")
    p.add_argument("id", help=job_help)
    p.add_argument("--by", metavar="WHO", help="who retries, in the job_retried event (default: cli:USER@HOST)")
    p.add_argument("--json", action="store_true", help="print the job's view as JSON")
    p.set_defaults(handler=cmd_job)
    p = sub.add_parser("events", parents=[command],
                       help="follow a tenant's events live, one JSON line each (Ctrl-C to stop)")
    p.add_argument("tenant", help="tenant id")
    p.add_argument("--since", metavar="ID",
                   help="start after this stream id (0: every event still kept; default: only new events)")
    p.add_argument("--count", type=int, metavar="N", help="stop after N events")
    p.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds")
    p.set_defaults(handler=cmd_events)

    p = sub.add_parser("run", parents=[command], help="run the supervisor: worker processes and the HTTP port")
    p.add_argument("--port", type=_port, help="HTTP port (default: $AGENTWORKER_PORT, else 8000)")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("webhooks", parents=[command], help="run the webhook ingress: verify signed webhook calls "
                       "and enqueue them, on its own port (the one that faces the internet)")
    p.add_argument("--port", type=_port, help="HTTP port (default: $AGENTWORKER_WEBHOOK_PORT, else 8001)")
    p.add_argument("--host", help="address to bind (default: $AGENTWORKER_WEBHOOK_HOST, else 0.0.0.0)")
    p.set_defaults(handler=cmd_webhooks)

    p = sub.add_parser("status", parents=[command], help="print the status of a running supervisor")
    p.add_argument("--url", help="the supervisor's base URL (default: http://127.0.0.1:$AGENTWORKER_PORT)")
    p.add_argument("--json", action="store_true", help="print the raw JSON document")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")
    p.add_argument("--watch", action="store_true", help="print the status again every --interval seconds "
                   "until Ctrl-C")
    p.add_argument("--interval", type=float, help="seconds between two prints with --watch (default 2)")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("migrate", parents=[command], help="create or upgrade the PostgreSQL schema (safe to re-run)")
    p.add_argument("--database-url", help="PostgreSQL URL (default: $AGENTWORKER_DATABASE_URL)")
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser("dead-letters", parents=[command], help="list, requeue or delete the jobs no worker could read")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    action = _Parser(add_help=False)
    _add_config_option(action, "config_action")
    pool_help = "the pool (default: every pool of the quota file)"
    id_help = "the job id as listed (a non-UTF-8 id as hex:<hex of its bytes>)"
    q = actions.add_parser("list", parents=[action], help="list the dead letters, oldest first")
    q.add_argument("--pool", help=pool_help)
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--limit", type=int, default=1000, help="at most this many per pool (default 1000)")
    q = actions.add_parser("requeue", parents=[action],
                           help="put a dead letter back in its queue (repair its job record first)")
    q.add_argument("id", help=id_help)
    q.add_argument("--pool", help=pool_help)
    q = actions.add_parser("delete", parents=[action], help="drop a dead letter and its job record for good")
    q.add_argument("id", help=id_help)
    q.add_argument("--pool", help=pool_help)
    p.set_defaults(handler=cmd_dead_letters)

    p = sub.add_parser("tenants", parents=[command],
                       help="show and change tenants' stored plans and limit overrides (the tenant store)",
                       description="The tenant store (PostgreSQL, run `agentworker migrate` first): each "
                       "tenant's plan and limit overrides, over the quota file's limits, applied by every "
                       "process within a second. Uses $AGENTWORKER_DATABASE_URL and $AGENTWORKER_REDIS_URL.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    tenant_help = "tenant id"
    q = actions.add_parser("get", parents=[action],
                           help="print a tenant's stored entry and effective limits, with each one's source")
    q.add_argument("tenant", help=tenant_help)
    q.add_argument("--json", action="store_true", help="print JSON")
    q = actions.add_parser("set", parents=[action],
                           help="set a tenant's plan and overrides (merged over its stored ones); print the result",
                           epilog="Values are validated with the quota file's rules; a refused change changes "
                           "nothing. Unset keys with agentworker tenants unset.")
    q.add_argument("tenant", help=tenant_help)
    plans = q.add_mutually_exclusive_group()
    plans.add_argument("--plan", metavar="NAME", help="the plan (one of the quota file's plans:)")
    plans.add_argument("--no-plan", action="store_true", help="remove the stored plan")
    for key in TENANT_KEYS:
        metavar, text = _OVERRIDE_HELP.get(key, ("VALUE", f"the tenant's {key}"))
        q.add_argument("--" + key.replace("_", "-"), dest=f"override_{key}", metavar=metavar,
                       type=_OVERRIDE_TYPES.get(key, str), help=text)
    q.add_argument("--by", metavar="WHO", help=BY_HELP)
    q.add_argument("--json", action="store_true", help="print the resulting entry as JSON")
    q = actions.add_parser("unset", parents=[action],
                           help="remove override keys (or plan) of a tenant's entry, or with no KEY the whole entry")
    q.add_argument("tenant", help=tenant_help)
    q.add_argument("keys", nargs="*", metavar="KEY",
                   help=f"plan or an override key ({', '.join(k.replace('_', '-') for k in TENANT_KEYS)}; "
                   "dashes or underscores); none: remove the entry (exit 0 even if there was none)")
    q.add_argument("--by", metavar="WHO", help=BY_HELP)
    q.add_argument("--json", action="store_true", help="print the resulting entry as JSON")
    q = actions.add_parser("list", parents=[action], help="list the tenants with a stored entry, by id")
    q.add_argument("--after", default="", metavar="ID", help="start after this tenant id (paging)")
    q.add_argument("--limit", type=int, default=100, metavar="N", help="at most this many, 1-5000 (default 100)")
    q.add_argument("--json", action="store_true", help="print a JSON list")
    q = actions.add_parser("history", parents=[action], help="print the changes of a tenant's entry, newest first")
    q.add_argument("tenant", help=tenant_help)
    q.add_argument("--limit", type=int, default=100, metavar="N", help="at most this many, 1-5000 (default 100)")
    q.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(handler=cmd_tenants)
    return parser


Handler = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        args.config = _config_option(args)
        return handler(args)
    except CommandError as exc:
        print(f"agentworker: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"agentworker: bad quota file {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SettingsError, InvalidTenantId, InvalidJob) as exc:
        print(f"agentworker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RedisError, OSError) as exc:
        print(f"agentworker: cannot reach Redis: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130

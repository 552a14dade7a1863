"""What the chaos scenario counts: the side effects a receiver saw, where each run ended, its notify events.

* :class:`EffectReceiver`: the local HTTP peer the workflows' ``http`` step POSTs to; it records every
  request's ``Idempotency-Key`` with the run and step named in its JSON body.
* :func:`tally_runs`: each enqueued run's fate, from PostgreSQL (its run row, read as the superuser, so
  under no tenant's row-level security) and Redis (its job, queued or with a result).
* :func:`count_notifications`: ``workflow_notification`` events per run id in every tenant's stream.
* :func:`scan_logs`: the warnings and errors of the service's JSON logs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentworker import jobs, keys
from bench.redis_server import free_port

#: a run with neither a run row nor a job this long (while Redis answers) is lost, not just between the two
LOST_AFTER_S = 15.0


@dataclass(frozen=True, slots=True)
class Delivery:
    run: str
    step: str
    key: str
    at: float


class EffectReceiver:
    """``POST /effect`` on a free loopback port: records the delivery, waits ``delay_s`` (a worker killed in
    that window has delivered the effect without hearing back), answers ``{"ok": true}``."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.delay_s = delay_s
        self.port = free_port()
        self.deliveries: list[Delivery] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/effect"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/effect", self._effect)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _effect(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        self.deliveries.append(Delivery(run=str(body.get("run")), step=str(body.get("step")),
                                        key=request.headers.get("Idempotency-Key", ""), at=time.time()))
        await asyncio.sleep(self.delay_s)
        return web.json_response({"ok": True})

    def findings(self, completed_inputs: set[str]) -> dict[str, Any]:
        """Duplicate effects (one run and step delivered under different keys), same-key redeliveries, and
        completed runs whose effect never arrived."""
        keys_of: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        per_key = collections.Counter(d.key for d in self.deliveries)
        for d in self.deliveries:
            keys_of[(d.run, d.step)].add(d.key)
        duplicates = sorted(f"{run}/{step}" for (run, step), found in keys_of.items() if len(found) > 1)
        redelivered = {k: n for k, n in per_key.items() if n > 1}
        delivered_runs = {run for run, _step in keys_of}
        return {"deliveries": len(self.deliveries), "duplicate_effects": len(duplicates),
                "duplicate_examples": duplicates[:10], "same_key_redeliveries": len(redelivered),
                "extra_deliveries": sum(n - 1 for n in redelivered.values()),
                "without_key": per_key.get("", 0),
                "completed_without_effect": len(completed_inputs - delivered_runs)}


@dataclass(frozen=True, slots=True)
class Enqueued:
    job_id: str
    tenant_id: str
    input_id: str


@dataclass
class RunTally:
    """Where the enqueued runs are. ``settled`` counts those that will not change any more."""

    completed: list[str] = field(default_factory=list)  # job ids
    failed: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)    # a run row still ``running`` (or waiting)
    queued: list[str] = field(default_factory=list)     # no run row yet, the job is in Redis
    missing: list[str] = field(default_factory=list)    # neither, for now
    lost: list[str] = field(default_factory=list)       # neither, for LOST_AFTER_S
    run_ids: dict[str, str] = field(default_factory=dict)  # job id -> run id (the UUID), where a row exists
    errors: collections.Counter[str] = field(default_factory=collections.Counter)  # failed runs by error
    at: float = 0.0

    @property
    def settled(self) -> int:
        return len(self.completed) + len(self.failed) + len(self.lost)

    def line(self, total: int) -> str:
        missing = f", {len(self.missing)} missing" if self.missing else ""
        return (f"{len(self.completed)}/{total} completed, {len(self.failed)} failed, {len(self.running)} running, "
                f"{len(self.queued)} queued{missing}, {len(self.lost)} lost")


class RunWatcher:
    """Tallies the runs again on each call; remembers since when each run has been missing."""

    def __init__(self, database_url: str, redis: Redis, enqueued: list[Enqueued]) -> None:
        self.database_url = database_url
        self.redis = redis
        self.enqueued = enqueued
        self._missing_since: dict[str, float] = {}
        self.last = RunTally()

    async def _rows(self) -> dict[str, asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url, timeout=5)
        try:
            rows = await conn.fetch("SELECT idempotency_key, run_id, status, error FROM agentworker.workflow_runs",
                                    timeout=10)
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
        return {row["idempotency_key"]: row for row in rows}

    async def tally(self) -> RunTally | None:
        """The runs now, or None when PostgreSQL or Redis does not answer (a fault under way)."""
        try:
            rows = await self._rows()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError,
                TimeoutError):  # (a connection caught by the server's restart mid-query: client-state errors)
            return None
        found = RunTally(at=time.monotonic())
        no_row: list[Enqueued] = []
        for run in self.enqueued:
            row = rows.get(run.job_id)
            if row is None:
                no_row.append(run)
                continue
            found.run_ids[run.job_id] = str(row["run_id"])
            if row["status"] == "completed":
                found.completed.append(run.job_id)
            elif row["status"] in ("failed", "rejected"):
                found.failed.append(run.job_id)
                found.errors[_error_name(row["error"])] += 1
            else:
                found.running.append(run.job_id)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for run in no_row:
                    pipe.exists(jobs.job_key(run.job_id))
                    pipe.get(jobs.result_key(run.job_id))
                replies = await pipe.execute()
        except (RedisError, OSError):
            return None
        for i, run in enumerate(no_row):
            has_job, result = replies[2 * i], replies[2 * i + 1]
            if result is not None:  # finished with no run row: failed before it made one
                record = jobs.loads(result)
                found.failed.append(run.job_id)
                found.errors[f"{_error_name(record.get('r'))} (no run row)"] += 1
                self._missing_since.pop(run.job_id, None)
            elif has_job:
                found.queued.append(run.job_id)
                self._missing_since.pop(run.job_id, None)
            elif found.at - self._missing_since.setdefault(run.job_id, found.at) >= LOST_AFTER_S:
                found.lost.append(run.job_id)
            else:
                found.missing.append(run.job_id)
        self.last = found
        return found


def _error_name(error: Any) -> str:
    if isinstance(error, str):
        with contextlib.suppress(ValueError):
            error = json.loads(error)
    if isinstance(error, dict):
        return str(error.get("error") or error.get("reason") or "?")
    return str(error)


async def count_notifications(redis: Redis, tenants: list[str]) -> tuple[collections.Counter[str],
                                                                          collections.Counter[str]]:
    """``workflow_notification`` events per run id over every tenant's stream, and every event by name."""
    per_run: collections.Counter[str] = collections.Counter()
    by_name: collections.Counter[str] = collections.Counter()
    for tenant in tenants:
        stream, start = keys.event_stream(tenant), "-"
        while True:
            entries = await redis.xrange(stream, min=start, count=1000)
            for _entry_id, fields in entries:
                body = json.loads(fields.get(b"event", b"{}"))
                by_name[str(body.get("event"))] += 1
                if body.get("event") == "workflow_notification":
                    per_run[str((body.get("data") or {}).get("run_id"))] += 1
            if len(entries) < 1000:
                break
            last = entries[-1][0].decode()
            start = "(" + last
    return per_run, by_name


async def jobs_without_result(redis: Redis, job_ids: list[str]) -> list[str]:
    """Those of ``job_ids`` with no result record: their ``job.result()`` would never return."""
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.exists(jobs.result_key(job_id))
        found = await pipe.execute()
    return [job_id for job_id, exists in zip(job_ids, found, strict=True) if not exists]


def notify_histogram(per_run: collections.Counter[str], completed_run_ids: list[str]) -> dict[str, int]:
    """How many completed runs published no, one, or more than one ``workflow_notification``."""
    counts = [per_run.get(run_id, 0) for run_id in completed_run_ids]
    return {"0": sum(c == 0 for c in counts), "1": sum(c == 1 for c in counts), ">1": sum(c > 1 for c in counts)}


def scan_logs(paths: list[Any]) -> dict[str, Any]:
    """Error and warning lines of the service's JSON logs, by event text (the commonest few)."""
    levels: collections.Counter[str] = collections.Counter()
    events: collections.Counter[str] = collections.Counter()
    for path in paths:
        with contextlib.suppress(OSError), open(path, errors="replace") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    if "Traceback" in line:
                        levels["traceback"] += 1
                    continue
                if not isinstance(record, dict):
                    continue
                level = str(record.get("level", ""))
                if level in ("warning", "error", "critical"):
                    levels[level] += 1
                    events[f"{level}: {str(record.get('event'))[:100]}"] += 1
    return {"levels": dict(levels), "top": events.most_common(8)}

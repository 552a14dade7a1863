"""Job control without a worker: looking at, cancelling and retrying queued and deferred jobs, bad ids,
the CLI's ``job``/``cancel``/``retry``/``events`` commands (real subprocesses), against real Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.cli import progress_line
from agentworker.client import JobFailed, JobNotCancellable, JobNotFound, JobNotRetryable, JobStatus, QuotaExceeded
from agentworker.job_control import (
    CANCEL_REQUESTS,
    MAX_JOB_ID_CHARS,
    STALE_REQUEST_S,
    cancel_job,
    get_job,
    parse_job_id,
    prune_cancel_requests,
    retry_job,
)
from agentworker.jobs import InvalidJob
from agentworker.routing import route_tenant
from tests.conftest import ROOT, make_client, new_tenant, worker_env


async def _stream(redis: Redis, tenant: str) -> list[dict[str, Any]]:
    entries = await redis.xrange(keys.event_stream(tenant))
    return [json.loads(fields[b"event"]) for _id, fields in entries]


@pytest.mark.parametrize("bad", ["", "acme", "acme:task", "Acme:echo:k", "acme:Bad-Task:k", "acme:echo:has space",
                                 "acme:echo:" + "k" * 400, "acme:echo:caf\u00e9"])
async def test_bad_job_ids_are_refused_before_redis_is_reached(bad: str) -> None:
    unreachable = Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.2)
    try:
        for call in (get_job(unreachable, bad), cancel_job(unreachable, bad)):
            with pytest.raises(InvalidJob) as info:
                await call
            message = str(info.value)
            assert message and "\n" not in message and len(message) < 300  # one bounded sentence
    finally:
        await unreachable.aclose()
    assert len("x" * MAX_JOB_ID_CHARS) == 329


def test_parse_job_id_accepts_the_ids_enqueue_makes() -> None:
    made = jobs.make_job_id("acme", "execute_workflow", "order-1:retry")
    assert parse_job_id(str(made)) == made


async def test_cancel_a_queued_job_removes_it_and_records_a_cancelled_result(redis_url: str, quota_file: Path,
                                                                           redis: Redis) -> None:
    tenant = new_tenant("cq")
    async with make_client(redis_url, quota_file) as client:
        job = await client.enqueue("probe_count", tenant_id=tenant, idempotency_key="q1")
        route = route_tenant(client.config, tenant)
        assert (await client.get_job(job.job_id)).status == "queued"
        assert await client.pending_count(tenant) == 1

        view = await client.cancel(job.job_id, by="test:alice")
        assert view.status == "cancelled" and view.error is not None
        assert view.error["error"] == "JobCancelled" and "test:alice" in view.error["message"]
        assert await client.pending_count(tenant) == 0  # its tenant's max_pending no longer counts it
        assert await redis.zscore(keys.tenant_queue(route.pool, route.shard, tenant), job.job_id) is None
        assert not await redis.exists(jobs.job_key(job.job_id))
        assert await job.status() is JobStatus.CANCELLED
        with pytest.raises(JobFailed) as failed:
            await job.result(timeout=5)
        assert failed.value.error == "JobCancelled"
        events = [e for e in await _stream(redis, tenant) if e["event"] == "job_cancelled"]
        assert len(events) == 1 and events[0]["data"]["job_id"] == job.job_id
        assert events[0]["data"]["by"] == "test:alice"

        with pytest.raises(JobNotCancellable, match="already finished"):
            await client.cancel(job.job_id)
        with pytest.raises(JobNotFound):
            await client.cancel(f"{tenant}:probe_count:never")


async def test_a_deferred_job_shows_deferred_and_is_cancelled_too(redis_url: str, quota_file: Path) -> None:
    tenant = new_tenant("cd")
    async with make_client(redis_url, quota_file) as client:
        job = await client.enqueue("probe_count", tenant_id=tenant, defer=3600)
        view = await client.get_job(job.job_id)
        assert view.status == "deferred" and view.queue == route_tenant(client.config, tenant).queue
        assert view.enqueued_at is not None and view.started_at is None
        assert (await job.cancel()).status == "cancelled"


async def test_get_job_finds_the_queue_without_a_config(redis_url: str, quota_file: Path, redis: Redis) -> None:
    """No config given, no routing table published: the tenant's queues are looked up by name."""
    tenant = new_tenant("nc")
    async with make_client(redis_url, quota_file) as client:
        job = await client.enqueue("probe_count", tenant_id=tenant, defer=3600)
        queue = route_tenant(client.config, tenant).queue
    assert not await redis.exists(keys.ROUTING)
    view = await get_job(redis, job.job_id)
    assert (view.status, view.queue) == ("deferred", queue)
    assert (await cancel_job(redis, job.job_id)).status == "cancelled"
    assert (await get_job(redis, f"{tenant}:probe_count:other")).status == "not_found"


async def test_retry_a_cancelled_job_queues_it_again_with_its_arguments(redis_url: str, quota_file: Path,
                                                                       redis: Redis) -> None:
    tenant = new_tenant("rq")
    async with make_client(redis_url, quota_file) as client:
        job = await client.enqueue("probe_count", tenant_id=tenant, idempotency_key="r1", payload={"message": "hi"})
        await client.cancel(job.job_id)
        with pytest.raises(JobNotFound):
            await client.retry(f"{tenant}:probe_count:unknown")

        view = await client.retry(job.job_id, by="test:bob")
        assert view.status == "queued" and view.error is None and view.tries == 0
        assert await client.pending_count(tenant) == 1
        record = jobs.loads(await redis.get(jobs.job_key(job.job_id)))
        assert record["f"] == "probe_count" and record["k"] == {"message": "hi", "tenant_id": tenant}
        assert not await redis.exists(jobs.result_key(job.job_id))
        retried = [e for e in await _stream(redis, tenant) if e["event"] == "job_retried"]
        assert [e["data"]["by"] for e in retried] == ["test:bob"]
        with pytest.raises(JobNotRetryable, match="only a failed or cancelled job"):
            await client.retry(job.job_id)


async def test_a_retry_refused_by_admission_keeps_the_old_result(redis_url: str, write_quotas: Any,
                                                                 redis: Redis) -> None:
    tenant = new_tenant("ra")
    path = write_quotas({"default_pool": "standard", "pools": {"standard": {"shards": 2, "processes": 1}},
                         "tenants": {tenant: {"max_pending": 1}}})
    async with make_client(redis_url, path) as client:
        first = await client.enqueue("probe_count", tenant_id=tenant, idempotency_key="a")
        await client.cancel(first.job_id)
        await client.enqueue("probe_count", tenant_id=tenant, idempotency_key="b")  # takes the one pending slot
        with pytest.raises(QuotaExceeded):
            await client.retry(first.job_id)
        view = await client.get_job(first.job_id)
        assert view.status == "cancelled"
        assert await redis.pttl(jobs.result_key(first.job_id)) > 0  # its time left, as before
        assert not await redis.exists(f"{keys.PREFIX}:retrying:{first.job_id}")


async def test_a_job_with_a_cancel_request_but_in_no_queue_gets_the_request(redis_url: str, quota_file: Path,
                                                                           redis: Redis) -> None:
    """A lapsed lease not yet put back: no queue holds the job, so the next claim finishes it."""
    tenant = new_tenant("lq")
    async with make_client(redis_url, quota_file) as client:
        job = await client.enqueue("probe_count", tenant_id=tenant)
        route = route_tenant(client.config, tenant)
        await redis.zrem(keys.tenant_queue(route.pool, route.shard, tenant), job.job_id)
        view = await client.cancel(job.job_id)
        assert view.cancel_requested and view.status == "queued"
        assert await redis.zscore(CANCEL_REQUESTS, job.job_id) is not None


async def test_stale_cancel_requests_are_pruned_and_a_new_job_of_the_id_drops_the_old_one(
        redis_url: str, quota_file: Path, redis: Redis) -> None:
    tenant = new_tenant("pr")
    # Older than any request another test of this session can have left (the sweep below looks only at those).
    old_ms, older_than_s = int((time.time() - 4 * STALE_REQUEST_S) * 1000), 3 * STALE_REQUEST_S
    gone, waiting, recent = (f"{tenant}:probe_count:{name}" for name in ("gone", "waiting", "recent"))
    await redis.set(jobs.job_key(waiting), b"{}", px=60_000)  # its job still exists (e.g. deferred)
    await redis.zadd(CANCEL_REQUESTS, {gone: old_ms, waiting: old_ms, recent: int(time.time() * 1000)})
    removed, seen = await prune_cancel_requests(redis, older_than_s=older_than_s)
    assert (removed, seen) == (1, 2)  # the recent one is not looked at; the waiting one is kept
    assert await redis.zscore(CANCEL_REQUESTS, gone) is None
    assert await redis.zscore(CANCEL_REQUESTS, waiting) is not None
    # Paging: from offset 1 (past the kept one) there is nothing old left.
    assert await prune_cancel_requests(redis, offset=1, older_than_s=older_than_s) == (0, 0)

    # A request left behind for an id is not inherited by the next job enqueued under it.
    async with make_client(redis_url, quota_file) as client:
        await redis.zadd(CANCEL_REQUESTS, {f"{tenant}:probe_count:again": old_ms})
        job = await client.enqueue("probe_count", tenant_id=tenant, idempotency_key="again")
        assert job.created and await redis.zscore(CANCEL_REQUESTS, job.job_id) is None
        assert not (await client.get_job(job.job_id)).cancel_requested
    await redis.delete(jobs.job_key(waiting))
    await redis.zrem(CANCEL_REQUESTS, waiting, recent)


async def test_retry_needs_the_arguments(redis_url: str, quota_file: Path, redis: Redis) -> None:
    tenant = new_tenant("rn")
    job_id = f"{tenant}:probe_count:refused"
    refused = jobs.dumps({"t": 1, "f": "unknown", "a": [], "k": {}, "et": 0, "s": False,
                          "r": {"error": "JobRejected", "message": "refused"}, "st": 0, "ft": 0, "q": "", "id": job_id})
    await redis.set(jobs.result_key(job_id), refused, px=60_000)
    async with make_client(redis_url, quota_file) as client:
        assert (await client.get_job(job_id)).status == "failed"
        with pytest.raises(JobNotRetryable, match="arguments are no longer known"):
            await retry_job(redis, client.config, job_id)
    assert await redis.exists(jobs.result_key(job_id))


def test_progress_lines() -> None:
    assert progress_line("j", "job_started", {"try": 1}) == "job j: started (try 1)"
    line = progress_line("j", "job_retrying", {"try": 1, "defer": 2, "error": "ConnectionError", "message": "x"})
    assert line == "job j: retrying (try 1) after ConnectionError: x, again in 2s"
    assert progress_line("j", "job_failed", {"try": 2, "reason": "error", "error": "E", "message": "m"}) == \
        "job j: failed (try 2) (error): E: m"
    assert progress_line("j", "job_cancelled", {"by": "cli:x"}) == "job j: cancelled by cli:x"


# -- the CLI ----------------------------------------------------------------------------------------------


def _cli(redis_url: str, config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentworker", *args, "--config", str(config)],
                          env=worker_env(redis_url), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


async def test_cli_job_cancel_and_retry_a_queued_job(redis_url: str, quota_file: Path) -> None:
    tenant = new_tenant("cli")
    async with make_client(redis_url, quota_file) as client:
        job = await client.enqueue("probe_count", tenant_id=tenant, idempotency_key="c1")

    shown = await asyncio.to_thread(_cli, redis_url, quota_file, "job", job.job_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "queued"
    human = await asyncio.to_thread(_cli, redis_url, quota_file, "job", job.job_id)
    assert human.returncode == 0 and human.stdout.startswith(f"job {job.job_id}: queued")

    cancelled = await asyncio.to_thread(_cli, redis_url, quota_file, "cancel", job.job_id, "--by", "ops:carol",
                                        "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    view = json.loads(cancelled.stdout)
    assert view["status"] == "cancelled" and view["error"]["error"] == "JobCancelled"
    again = await asyncio.to_thread(_cli, redis_url, quota_file, "cancel", job.job_id)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "already finished" in again.stderr

    retried = await asyncio.to_thread(_cli, redis_url, quota_file, "retry", job.job_id, "--json")
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["status"] == "queued"

    missing = await asyncio.to_thread(_cli, redis_url, quota_file, "job", f"{tenant}:probe_count:nope")
    assert missing.returncode == 1 and "not_found" in missing.stdout
    bad = await asyncio.to_thread(_cli, redis_url, quota_file, "cancel", "not-a-job-id")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


async def test_cli_events_prints_one_json_line_per_event(redis_url: str, quota_file: Path) -> None:
    tenant = new_tenant("ev")
    async with make_client(redis_url, quota_file) as client:
        first = await client.enqueue("probe_count", tenant_id=tenant, idempotency_key="e1")
        second = await client.enqueue("probe_count", tenant_id=tenant, idempotency_key="e2")
        await client.cancel(first.job_id)
        await client.cancel(second.job_id)

    tail = await asyncio.to_thread(_cli, redis_url, quota_file, "events", tenant, "--since", "0", "--count", "2")
    assert tail.returncode == 0, tail.stderr
    lines = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [(e["event"], e["data"]["job_id"]) for e in lines] == [("job_cancelled", first.job_id),
                                                                  ("job_cancelled", second.job_id)]
    assert all(e["tenant_id"] == tenant and e["stream_id"] and e["id"] for e in lines)

    after = await asyncio.to_thread(_cli, redis_url, quota_file, "events", tenant, "--since", lines[0]["stream_id"],
                                    "--timeout", "1")
    assert after.returncode == 0 and [json.loads(x)["data"]["job_id"] for x in after.stdout.splitlines()] == \
        [second.job_id]
    only_new = await asyncio.to_thread(_cli, redis_url, quota_file, "events", tenant, "--timeout", "1")
    assert only_new.returncode == 0 and only_new.stdout == ""
    bad = await asyncio.to_thread(_cli, redis_url, quota_file, "events", tenant, "--since", "yesterday")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1

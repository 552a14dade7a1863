"""End-to-end: real worker subprocesses against a real Redis, driven only through the client and Redis."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.admission import Enqueuer
from agentworker.client import JobFailed, JobStatus
from agentworker.config import load_config
from agentworker.routing import route_tenant, shard_of
from tests.conftest import BASIC_QUOTAS, make_client, wait_for

pytestmark = pytest.mark.slow


def tenants_on_each_shard(shards: int, prefix: str = "t") -> list[str]:
    """One tenant id per shard, in shard order."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < shards:
        tenant = f"{prefix}{i}"
        found.setdefault(shard_of(tenant, shards), tenant)
        i += 1
    return [found[s] for s in range(shards)]


async def test_200_jobs_for_20_tenants_over_two_pools_run_once_on_their_queue(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], spawn_worker: Any) -> None:
    tenants = [f"tenant-{i:02d}" for i in range(20)]
    quotas = {**BASIC_QUOTAS, "tenants": {t: {"pool": "premium"} for t in tenants[:8]}}
    path = write_quotas(quotas)
    workers = [spawn_worker(path, "standard", 0), spawn_worker(path, "premium", 0),
               spawn_worker(path, "standard", 1)]
    for w in workers:
        await w.wait_serving()
    config = load_config(path)
    async with make_client(redis_url, path) as client:
        handles = []
        for n in range(10):
            for tenant in tenants:
                handles.append(await client.enqueue("probe_count", tenant_id=tenant, payload={"message": f"{n}"}))
        assert len(handles) == 200
        results = await asyncio.gather(*(h.result(timeout=120) for h in handles))
        infos = [await h.info() for h in handles]
    runs = {k.decode(): int(v) for k, v in (await redis.hgetall("probe:runs")).items()}
    assert len(runs) == 200
    assert set(runs.values()) == {1}, "every job ran exactly once"
    pids_by_pool: dict[str, set[int]] = {"standard": set(), "premium": set()}
    for handle, result, info in zip(handles, results, infos, strict=True):
        route = route_tenant(config, handle.job_id.split(":")[0])
        assert result["queue"] == route.queue, handle.job_id
        assert info is not None and info.queue == route.queue
        pids_by_pool[route.pool].add(result["pid"])
    assert pids_by_pool["premium"] == {workers[1].pid}
    assert pids_by_pool["standard"] <= {workers[0].pid, workers[2].pid}
    assert len({r["queue"] for r in results}) == 6  # 4 standard shards + 2 premium shards all used


async def test_process_wide_cap_and_round_robin_between_flooded_shards(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], spawn_worker: Any) -> None:
    concurrency = 3
    path = write_quotas({"pools": {"standard": {"shards": 4, "concurrency": concurrency, "job_timeout": 30}}})
    tenants = tenants_on_each_shard(4)
    worker = spawn_worker(path, "standard")
    await worker.wait_serving()
    async with make_client(redis_url, path) as client:
        handles = []
        # Shard 0 is flooded first, then the other shards get their (also plentiful) jobs.
        for tenant, count in zip(tenants, (40, 12, 12, 12), strict=True):
            for _ in range(count):
                handles.append(await client.enqueue("probe_sleep", tenant_id=tenant,
                                                    payload={"seconds": 0.05, "group": "cap"}))
        await asyncio.gather(*(h.result(timeout=60) for h in handles))
    assert int(await redis.get("probe:cap:max")) == concurrency, "the cap was reached and never exceeded"
    starts = [int(s) for s in await redis.lrange("probe:cap:starts", 0, -1)]
    assert len(starts) == 76
    # While shard 0 was flooded, every other shard had jobs running: all four shards start within the first
    # two rounds, and shard 0 gets no more than its turn while the others still have work.
    assert set(starts[: 2 * concurrency + 4]) == {0, 1, 2, 3}, starts
    for shard in (1, 2, 3):
        assert int(await redis.get(f"probe:shard:{shard}:max")) >= 1
    first_36 = Counter(starts[:36])
    assert first_36[0] <= 36 // 4 + concurrency + 1, first_36


async def test_tenant_cap_holds_across_two_processes(redis: Redis, redis_url: str,
                                                     write_quotas: Callable[..., Path], spawn_worker: Any) -> None:
    path = write_quotas({"pools": {"standard": {"shards": 2, "concurrency": 10, "job_timeout": 30}},
                         "tenants": {"capped": {"max_concurrency": 3}}})
    workers = [spawn_worker(path, slot=0), spawn_worker(path, slot=1)]
    for w in workers:
        await w.wait_serving()
    async with make_client(redis_url, path) as client:
        capped = [await client.enqueue("probe_sleep", tenant_id="capped", payload={"seconds": 0.3, "group": "c"})
                  for _ in range(12)]
        free = [await client.enqueue("probe_sleep", tenant_id="free", payload={"seconds": 0.3, "group": "f"})
                for _ in range(8)]
        await asyncio.gather(*(h.result(timeout=60) for h in capped + free))
        tries = {(await h.info()).job_try for h in capped}  # type: ignore[union-attr]
        assert tries == {1}, "a deferred job spends no try"
    assert int(await redis.get("probe:tenant:capped:max")) == 3
    assert int(await redis.get("probe:tenant:free:max")) > 3
    log = workers[0].log() + workers[1].log()
    assert '"job started"' in workers[0].log() and '"job started"' in workers[1].log(), "both processes served"
    assert "tenant_id" in log
    assert await redis.zcard(keys.tenant_leases("capped")) == 0, "leases are released"


async def test_a_killed_holder_loses_its_lease_after_the_ttl(redis: Redis, redis_url: str,
                                                             write_quotas: Callable[..., Path],
                                                             spawn_worker: Any) -> None:
    path = write_quotas({"pools": {"standard": {"shards": 2, "concurrency": 10, "job_timeout": 300}},
                         "tenants": {"capped": {"max_concurrency": 3}}})
    env = {"AGENTWORKER_TENANT_LEASE_TTL": "2"}
    holder = spawn_worker(path, slot=0, **env)
    await holder.wait_serving()
    async with make_client(redis_url, path) as client:
        long_jobs = [await client.enqueue("probe_sleep", tenant_id="capped", payload={"seconds": 300, "group": "l"})
                     for _ in range(3)]
        await wait_for(lambda: _running(redis, "probe:tenant:capped:running", 3), 20, what="3 jobs running")
        other = spawn_worker(path, slot=1, **env)
        await other.wait_serving()
        fresh = await client.enqueue("probe_effect", tenant_id="capped", payload={"name": "after-kill"})
        # While the holder lives and renews its leases, the fresh job is deferred (by either process): a
        # claim found the tenant at its cap and parked it among the shard's capped tenants.
        capped = keys.capped_tenants("standard", route_tenant(load_config(path), "capped").shard)
        await wait_for(lambda: _is_member(redis, capped, "capped"), 20, what="the fresh job to be deferred")
        assert await fresh.status() == JobStatus.QUEUED
        assert await redis.zcard(keys.tenant_leases("capped")) == 3
        holder.signal(signal.SIGKILL)
        await holder.wait_exit()
        # Nobody releases the dead holder's leases: they lapse after their TTL and the tenant gets its slot.
        assert await fresh.result(timeout=30) == 1
        # The killed jobs keep ARQ's in-progress keys (job_timeout + 11 s), so they do not run again here.
        assert all([await h.status() == JobStatus.IN_PROGRESS for h in long_jobs])
        assert await redis.zrange(keys.tenant_leases("capped"), 0, -1) == []


async def _is_member(redis: Redis, key: str, member: str) -> bool:
    return await redis.zscore(key, member) is not None


async def _running(redis: Redis, key: str, n: int) -> bool:
    value = await redis.get(key)
    return value is not None and int(value) >= n


async def test_malformed_jobs_fail_with_a_reason_and_the_worker_goes_on(
        redis: Redis, redis_url: str, quota_file: Path, spawn_worker: Any) -> None:
    worker = spawn_worker(quota_file, AGENTWORKER_MAX_PAYLOAD_BYTES="2048")
    await worker.wait_serving()
    config = load_config(quota_file)
    route = route_tenant(config, "acme")
    wrong_shard = (route.shard + 1) % 4
    enqueuer = Enqueuer(redis)
    now = int(time.time() * 1000)

    async def raw_job(job_id: str, body: bytes, queue: str = route.queue) -> None:
        await redis.set(jobs.job_key(job_id), body, px=60_000)
        await redis.zadd(queue, {job_id: now})

    # Misrouted: a valid job placed on another shard's queue.
    await enqueuer.enqueue(job_id="acme:echo:misrouted", tenant_id="acme", pool="standard", shard=wrong_shard,
                           job_bytes=jobs.encode_job("echo", {"tenant_id": "acme", "message": "x"}, now),
                           score_ms=now, expires_ms=60_000, max_pending=None, rate=None)
    await raw_job("acme:nope:unknown", jobs.encode_job("nope", {"tenant_id": "acme"}, now))
    await raw_job("acme:echo:notjson", b"\x80not json{")
    await raw_job("acme:echo:notenant", jobs.encode_job("echo", {"message": "x"}, now))
    await raw_job("acme:echo:huge", jobs.encode_job("echo", {"tenant_id": "acme", "message": "y" * 5000}, now))
    await raw_job("acme:echo:mismatch", jobs.encode_job("echo", {"tenant_id": "globex", "message": "x"}, now))
    await raw_job("acme:echo:badargs", jobs.encode_job("echo", {"tenant_id": "acme", "nope": 1}, now))
    expected = {
        "acme:echo:misrouted": "routes to agentworker:queue:standard:",
        "acme:nope:unknown": "unknown task 'nope'",
        "acme:echo:notenant": "payload has no tenant_id",
        "acme:echo:huge": "over the 2048-byte payload limit",
        "acme:echo:mismatch": "job id names tenant 'acme' but the payload's tenant_id is 'globex'",
        "acme:echo:badargs": "payload does not fit task 'echo'",
    }
    async with make_client(redis_url, quota_file) as client:
        for job_id, reason in expected.items():
            with pytest.raises(JobFailed) as info:
                await client.job(job_id).result(timeout=20)
            assert info.value.error == "JobRejected", job_id
            assert reason in info.value.message, (job_id, info.value.message)
        # Not a job at all: moved to the dead letters, and its result says why.
        with pytest.raises(JobFailed) as info:
            await client.job("acme:echo:notjson").result(timeout=20)
        assert info.value.error == "JobUnreadable"
        assert "bad_record" in info.value.message and "not valid JSON" in info.value.message
        assert await redis.hexists(keys.dead_letters("standard"), "acme:echo:notjson")
        good = await client.enqueue("echo", tenant_id="acme", payload={"message": "still serving"})
        assert await good.result(timeout=20) == "still serving"
        rejected = []
        async for event in client.events("acme", since="0", block_ms=200):
            if event.event == "job_rejected":
                rejected.append(event.data["job_id"])
            if event.event == "job_completed":
                break
        assert set(rejected) == set(expected)
    assert worker.proc.poll() is None
    log = worker.log()
    assert '"job rejected"' in log and '"job_id": "acme:echo:misrouted"' in log


async def test_a_job_past_its_timeout_is_cancelled_and_reported(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], spawn_worker: Any) -> None:
    path = write_quotas({"pools": {"standard": {"shards": 1, "job_timeout": 30}},
                         "tenants": {"slow": {"job_timeout": 1}}})
    worker = spawn_worker(path)
    await worker.wait_serving()
    async with make_client(redis_url, path) as client:
        job = await client.enqueue("probe_effect", tenant_id="slow", payload={"name": "late", "seconds": 20})
        with pytest.raises(JobFailed) as info:
            await job.result(timeout=20)
        assert info.value.error == "JobTimedOut"
        assert "timed out after 1s" in info.value.message
        kinds = []
        async for event in client.events("slow", since="0", block_ms=200):
            kinds.append(event.event)
            if event.event == "job_timed_out":
                assert event.data["timeout"] == 1
                break
        assert kinds == ["job_started", "job_timed_out"]
        # The pool's timeout still applies to other tenants.
        ok = await client.enqueue("probe_effect", tenant_id="quick", payload={"name": "fine", "seconds": 1.5})
        assert await ok.result(timeout=20) == 1
    assert await redis.hget("probe:effects", "late") is None
    assert '"job timed out"' in worker.log()


async def test_events_are_published_live_on_the_tenant_channel(redis: Redis, redis_url: str, quota_file: Path,
                                                               spawn_worker: Any) -> None:
    worker = spawn_worker(quota_file)
    await worker.wait_serving()
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.event_channel("acme"))
    async with make_client(redis_url, quota_file) as client:
        job = await client.enqueue("echo", tenant_id="acme", payload={"message": "m"})
        await job.result(timeout=10)
    received: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while len(received) < 2 and time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if message:
            received.append(json.loads(message["data"]))
    await pubsub.aclose()
    assert [e["event"] for e in received] == ["job_started", "job_completed"]
    assert received[1]["tenant_id"] == "acme"
    assert received[1]["data"] == {"job_id": job.job_id, "task": "echo", "try": 1, "result": "m"}


async def test_failures_are_reported_and_do_not_stop_the_worker(redis_url: str, quota_file: Path,
                                                                spawn_worker: Any) -> None:
    worker = spawn_worker(quota_file)
    await worker.wait_serving()
    async with make_client(redis_url, quota_file) as client:
        bad = await client.enqueue("probe_fail", tenant_id="acme", payload={"message": "kaput"})
        with pytest.raises(JobFailed) as info:
            await bad.result(timeout=10)
        assert (info.value.error, info.value.message) == ("RuntimeError", "kaput")
        good = await client.enqueue("echo", tenant_id="acme", payload={"message": "next"})
        assert await good.result(timeout=10) == "next"


async def test_sigterm_finishes_short_jobs_and_requeues_long_ones(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], spawn_worker: Any) -> None:
    path = write_quotas({"pools": {"standard": {"shards": 2, "job_timeout": 60}}})
    first = spawn_worker(path, AGENTWORKER_SHUTDOWN_GRACE="2")
    await first.wait_serving()
    async with make_client(redis_url, path) as client:
        short = await client.enqueue("probe_effect", tenant_id="acme", payload={"name": "short", "seconds": 0.5})
        long = await client.enqueue("probe_effect", tenant_id="acme", payload={"name": "long", "seconds": 3.5})
        await wait_for(lambda: _both_in_progress(short.status(), long.status()), 20, what="both jobs running")
        first.signal(signal.SIGTERM)
        assert await first.wait_exit(30) == 0
        assert await short.result(timeout=1) == 1, "the short job finished within the grace period"
        # The long one was cancelled at the end of the grace period and re-queued at once (no in-progress key).
        assert await long.status() == JobStatus.QUEUED
        assert await redis.hget("probe:effects", "long") is None
        second = spawn_worker(path, slot=1)
        await second.wait_serving()
        assert await long.result(timeout=30) == 1
        info = await long.info()
        assert info is not None and info.job_try == 1, "a re-run after a drain spends no try"
    log = first.log()
    assert '"draining"' in log and '"worker stopped"' in log


async def _both_in_progress(*statuses: Any) -> bool:
    return all([await s == JobStatus.IN_PROGRESS for s in statuses])


async def test_sighup_applies_a_lower_tenant_cap(redis: Redis, redis_url: str, write_quotas: Callable[..., Path],
                                                 spawn_worker: Any) -> None:
    data: dict[str, Any] = {"pools": {"standard": {"shards": 1, "concurrency": 10, "job_timeout": 30}},
                            "tenants": {"acme": {"max_concurrency": 5}}}
    path = write_quotas(data)
    worker = spawn_worker(path)
    await worker.wait_serving()
    data["tenants"]["acme"]["max_concurrency"] = 1
    path.write_text(json.dumps(data))  # JSON is YAML
    worker.signal(signal.SIGHUP)
    await wait_for(lambda: _limits_are(redis, "acme", b"1 1 -1"), 10, what="the new cap to be published")
    async with make_client(redis_url, path) as client:
        handles = [await client.enqueue("probe_sleep", tenant_id="acme", payload={"seconds": 0.1, "group": "h"})
                   for _ in range(5)]
        await asyncio.gather(*(h.result(timeout=30) for h in handles))
    assert int(await redis.get("probe:tenant:acme:max")) == 1
    # A broken file is refused and the running config stays.
    path.write_text("pools: {standard: {concurrency: 0}}")
    worker.signal(signal.SIGHUP)
    await wait_for(lambda: '"quota file reload refused; keeping the running config"' in worker.log(), 10,
                   what="refusal")
    assert worker.proc.poll() is None


async def _limits_are(redis: Redis, tenant: str, value: bytes) -> bool:
    """The tenant's limits as the worker published them for the claim script (max_concurrency weight max_pending)."""
    return await redis.hget(keys.tenant_limits("standard"), tenant) == value


def test_worker_refuses_bad_arguments_in_one_line(quota_file: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT, worker_env

    env = worker_env("redis://127.0.0.1:1/0")
    proc = subprocess.run([sys.executable, "-m", "agentworker.pools.worker", "--config", str(quota_file),
                           "--pool", "gold"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "pool 'gold' is not in the quota file" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: {standard: {shards: 0}}")
    proc = subprocess.run([sys.executable, "-m", "agentworker.pools.worker", "--config", str(bad),
                           "--pool", "standard"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "pools.standard.shards: must be >= 1" in proc.stderr


async def test_an_idle_worker_starts_a_new_job_without_waiting_for_a_poll(
        redis: Redis, redis_url: str, quota_file: Path, spawn_worker: Any) -> None:
    # The fallback poll is 30 s: only the wake-up published by the enqueue script can start the job sooner.
    worker = spawn_worker(quota_file, AGENTWORKER_POLL_INTERVAL="30")
    await worker.wait_serving()
    await asyncio.sleep(1.0)  # let the first polls pass so the worker is idle in its 30 s wait
    async with make_client(redis_url, quota_file) as client:
        for i in range(3):
            enqueued = time.time()
            job = await client.enqueue("echo", tenant_id=f"idle-{i}", payload={"message": "now"})
            assert await job.result(timeout=20) == "now"
            info = await job.info()
            assert info is not None
            assert info.start_time_ms / 1000 - enqueued < 10, "started by the wake-up, not the 30 s poll"

"""The worker loop in process, against the session's real Redis: the process's wiring
(``agentworker.pools.worker.WorkerProcess``, served on the test's event loop) and the shard loop itself
(``agentworker.pools.arq_internals.ShardWorker``, built with our own functions where a test needs a job
to crash, hang or ask for a retry).

What needs a real process (signals, kill -9, the zygote, the whole service) stays in the end-to-end tests
(``test_worker.py``, ``test_crash_recovery.py``...); here every test runs in well under a second or two,
and asserts what Redis, the client and the process's own state say.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from arq.connections import ArqRedis
from arq.worker import Function, Retry, func
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.client import JobFailed, JobStatus
from agentworker.config import PoolQuota, QuotaConfig, load_config
from agentworker.job_leases import publish_limits, release_holder
from agentworker.pools.arq_internals import ShardWorker
from agentworker.pools.gate import ConcurrencyGate
from agentworker.pools.leases import Leases
from agentworker.pools.worker import EXIT_OK, WorkerProcess
from agentworker.routing import route_tenant, shard_of
from agentworker.settings import Settings
from agentworker.tasks.envelope import FinalFailure
from agentworker.tasks.registry import load_task_modules
from bench.redis_server import free_port
from tests.conftest import RedisServer, make_client, wait_for

POOL = "standard"
_serial = itertools.count()


class LiveWorker:
    """One worker process's object graph, serving on the test's event loop."""

    def __init__(self, process: WorkerProcess, task: asyncio.Task[int]) -> None:
        self.process = process
        self.task = task

    @property
    def status_file(self) -> Path:
        assert self.process.status_file is not None
        return self.process.status_file

    async def stop(self, timeout: float = 10) -> int:
        """What SIGTERM does (the handler only sets this flag); the exit code."""
        self.process.request_stop()
        return await asyncio.wait_for(self.task, timeout)


StartWorker = Callable[..., Awaitable[LiveWorker]]


#: The job loop needs no PostgreSQL: the process makes its database pool on first use, which only the
#: event relay and the run sweeper would do, seconds after a start (and asyncpg >= 0.31 can crash under a
#: coverage tracer: MagicStack/asyncpg#1292). Nothing listens here; were they to try, they log and go on.
NO_DATABASE = f"postgresql://postgres@127.0.0.1:{free_port()}/none"


@pytest.fixture
async def start_worker(redis_url: str, tmp_path: Path) -> AsyncIterator[StartWorker]:
    started: list[LiveWorker] = []

    async def start(config: Path, *, slot: int = 0, **settings: Any) -> LiveWorker:
        values: dict[str, Any] = {"redis_url": redis_url, "database_url": NO_DATABASE, "config": str(config),
                                  "poll_interval": 0.2, "scheduler": "off", "task_modules": ("tests.probe_tasks",),
                                  **settings}
        worker_settings = Settings.from_env({}, **values)
        process = WorkerProcess(settings=worker_settings, config=load_config(config), pool=POOL, slot=slot,
                                registry=load_task_modules(worker_settings.task_modules),
                                status_file=tmp_path / f"status-{slot}-{next(_serial)}.json")
        live = LiveWorker(process, asyncio.create_task(process.serve()))
        started.append(live)
        await wait_for(lambda: process.state == "serving" or live.task.done(), 10, what="the worker to serve")
        if live.task.done():
            raise AssertionError(f"the worker stopped at once: {live.task.result()}")
        return live

    yield start
    for live in started:
        if not live.task.done():
            await live.stop(30)


def quotas(write_quotas: Callable[..., Path], tenants: dict[str, Any] | None = None, **pool: Any) -> Path:
    settings = {"shards": 1, "concurrency": 10, "job_timeout": 30, **pool}
    return write_quotas({"default_pool": POOL, "pools": {POOL: settings}, "tenants": tenants or {}})


def tenants_on_each_shard(shards: int) -> list[str]:
    found: dict[int, str] = {}
    for i in itertools.count():
        found.setdefault(shard_of(f"t{i}", shards), f"t{i}")
        if len(found) == shards:
            return [found[s] for s in range(shards)]
    raise AssertionError("unreachable")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _int(redis: Redis, key: str) -> int:
    return int(await redis.get(key) or 0)


# -- the process's job loop, through the client --------------------------------------------------------------


async def test_the_process_cap_holds_and_freed_slots_go_round_robin_between_shards(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], start_worker: StartWorker) -> None:
    concurrency = 3
    path = quotas(write_quotas, shards=4, concurrency=concurrency)
    tenants = tenants_on_each_shard(4)
    async with make_client(redis_url, path) as client:
        # Queued before the worker starts: shard 0 has a flood, every shard has more work than one round.
        handles = [await client.enqueue("probe_sleep", tenant_id=tenant, payload={"seconds": 0.02, "group": "cap"})
                   for tenant, count in zip(tenants, (24, 8, 8, 8), strict=True) for _ in range(count)]
        await start_worker(path)
        await asyncio.gather(*(h.result(timeout=30) for h in handles))
    assert await _int(redis, "probe:cap:max") == concurrency, "the cap was reached and never exceeded"
    starts = [int(s) for s in await redis.lrange("probe:cap:starts", 0, -1)]
    assert len(starts) == 48
    # One batch fills the free slots at once; every freed slot then goes to the next shard in line: the
    # four shards start within the first round, and while all have work none gets more than its turn.
    assert set(starts[:concurrency + 4]) == {0, 1, 2, 3}, starts
    per_shard = Counter(starts[:28])
    assert all(7 - concurrency <= per_shard[s] <= 7 + concurrency for s in range(4)), (per_shard, starts)


async def test_a_tenant_beside_a_flood_on_its_shard_starts_without_waiting_for_the_backlog(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], start_worker: StartWorker) -> None:
    path = quotas(write_quotas, concurrency=2)
    await start_worker(path)
    async with make_client(redis_url, path) as client:
        flood = [await client.enqueue("probe_started", tenant_id="flood", payload={"seconds": 0.02})
                 for _ in range(60)]
        await wait_for(lambda: _started(redis, 4), 10, what="the flood to be running")
        quiet = [await client.enqueue("probe_started", tenant_id="quiet", payload={}) for _ in range(5)]
        await asyncio.gather(*(h.result(timeout=30) for h in quiet))
        starts = [s.decode() for s in await redis.lrange("probe:starts", 0, -1)]
        first, last = starts.index("quiet"), max(i for i, tenant in enumerate(starts) if tenant == "quiet")
        # Alternating with the flood (two slots): five quiet jobs within ~ten starts, not after ~50.
        assert last - first <= 2 * len(quiet) + 2, starts[first:last + 1]
        assert starts.count("flood") < 30, "the quiet jobs were done while most of the flood still waited"
        await asyncio.gather(*(h.result(timeout=30) for h in flood))


async def _started(redis: Redis, n: int) -> bool:
    return int(await redis.llen("probe:starts")) >= n


async def test_weights_share_the_slots_between_saturating_tenants(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], start_worker: StartWorker) -> None:
    weights = {"light": 1, "medium": 2, "heavy": 4}
    path = quotas(write_quotas, {name: {"weight": w} for name, w in weights.items()}, concurrency=4)
    async with make_client(redis_url, path) as client:
        for tenant in weights:  # all saturating from the first claim
            for _ in range(150):
                await client.enqueue("probe_started", tenant_id=tenant, payload={})
        await start_worker(path)
        await wait_for(lambda: _started(redis, 210), 20, what="210 starts")
    starts = Counter(s.decode() for s in await redis.lrange("probe:starts", 0, 209))
    for tenant, weight in weights.items():
        assert abs(starts[tenant] / 210 - weight / 7) <= 0.1 * weight / 7, starts


async def test_a_tenant_at_its_max_concurrency_is_deferred_without_spending_a_try(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], start_worker: StartWorker) -> None:
    path = quotas(write_quotas, {"capped": {"max_concurrency": 3}}, shards=2)
    deferred_before = sample("agentworker_jobs_deferred_total", pool=POOL, tenant="capped")
    await start_worker(path)
    async with make_client(redis_url, path) as client:
        capped = [await client.enqueue("probe_sleep", tenant_id="capped", payload={"seconds": 0.05, "group": "c"})
                  for _ in range(12)]
        free = [await client.enqueue("probe_sleep", tenant_id="free", payload={"seconds": 0.05, "group": "f"})
                for _ in range(8)]
        await asyncio.gather(*(h.result(timeout=30) for h in capped + free))
        infos = [await h.info() for h in capped]
    assert {info.job_try for info in infos if info is not None} == {1}, "a deferred job spends no try"
    assert await _int(redis, "probe:tenant:capped:max") == 3
    assert await _int(redis, "probe:tenant:free:max") > 3, "the cap is the tenant's, not the pool's"
    assert sample("agentworker_jobs_deferred_total", pool=POOL, tenant="capped") > deferred_before
    assert await redis.zcard(keys.tenant_leases("capped")) == 0, "every tenant lease was released"


async def test_malformed_jobs_fail_with_a_reason_and_the_loop_goes_on(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], start_worker: StartWorker) -> None:
    path = quotas(write_quotas, shards=4)
    config = load_config(path)
    route = route_tenant(config, "acme")
    now = int(time.time() * 1000)

    async def raw_job(job_id: str | bytes, body: bytes | None, queue: str = route.queue) -> None:
        """What a plain ARQ producer (or a bug) writes: a record and the shard's inbox."""
        if body is not None:
            await redis.set(jobs.job_key("").encode() + (job_id if isinstance(job_id, bytes) else job_id.encode()),
                            body, px=60_000)
        await redis.zadd(queue, {job_id: now})

    wrong_shard = keys.queue(POOL, (route.shard + 1) % 4)
    await raw_job("acme:echo:misrouted", jobs.encode_job("echo", {"tenant_id": "acme", "message": "x"}, now),
                  queue=wrong_shard)
    await raw_job("acme:nope:unknown", jobs.encode_job("nope", {"tenant_id": "acme"}, now))
    await raw_job("acme:echo:notenant", jobs.encode_job("echo", {"message": "x"}, now))
    await raw_job("acme:echo:huge", jobs.encode_job("echo", {"tenant_id": "acme", "message": "y" * 5000}, now))
    await raw_job("acme:echo:mismatch", jobs.encode_job("echo", {"tenant_id": "globex", "message": "x"}, now))
    await raw_job("acme:echo:badargs", jobs.encode_job("echo", {"tenant_id": "acme", "nope": 1}, now))
    await raw_job("acme:echo:notjson", b"\x80not json{")
    await raw_job("acme:echo:norecord", None)
    await redis.hset(jobs.job_key("acme:echo:ahash"), "f", "echo")  # a record of the wrong Redis type
    await raw_job("acme:echo:ahash", None)
    await raw_job(b"acme:echo:\xff\xfe", jobs.encode_job("echo", {"tenant_id": "acme", "message": "x"}, now))

    rejected = {
        "acme:echo:misrouted": "routes to agentworker:queue:standard:",
        "acme:nope:unknown": "unknown task 'nope'",
        "acme:echo:notenant": "payload has no tenant_id",
        "acme:echo:huge": "over the 2048-byte payload limit",
        "acme:echo:mismatch": "job id names tenant 'acme' but the payload's tenant_id is 'globex'",
        "acme:echo:badargs": "payload does not fit task 'echo'",
    }
    dead = {"acme:echo:notjson": "bad_record", "acme:echo:norecord": "missing_record",
            "acme:echo:ahash": "wrong_type"}
    await start_worker(path, max_payload_bytes=2048)
    async with make_client(redis_url, path) as client:
        for job_id, reason in rejected.items():
            with pytest.raises(JobFailed) as info:
                await client.job(job_id).result(timeout=10)
            assert info.value.error == "JobRejected", job_id
            assert reason in info.value.message, (job_id, info.value.message)
        for job_id, reason in dead.items():
            with pytest.raises(JobFailed) as info:
                await client.job(job_id).result(timeout=10)
            assert info.value.error == "JobUnreadable" and reason in info.value.message, (job_id, info.value.message)
        good = await client.enqueue("echo", tenant_id="acme", payload={"message": "still serving"})
        assert await good.result(timeout=10) == "still serving"
        events: list[tuple[str, str]] = []
        async for event in client.events("acme", since="0", block_ms=200):
            events.append((event.event, event.data.get("job_id", "")))
            if event.event == "job_completed":
                break
    letters = {k.decode(errors="backslashreplace"): json.loads(v)["reason"]
               for k, v in (await redis.hgetall(keys.dead_letters(POOL))).items()}
    assert letters == {**dead, "acme:echo:\\xff\\xfe": "non_utf8_id"}
    acme_rejected = {job_id for kind, job_id in events if kind == "job_rejected"}
    assert acme_rejected == set(rejected)
    assert {job_id for kind, job_id in events if kind == "job_failed"} >= set(dead)
    assert await redis.zcard(keys.queue(POOL, route.shard)) == 0, "nothing is left to trip over again"


async def test_a_job_past_its_tenants_timeout_is_cancelled_and_reported(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], start_worker: StartWorker) -> None:
    path = quotas(write_quotas, {"slow": {"job_timeout": 0.3}})
    await start_worker(path)
    async with make_client(redis_url, path) as client:
        job = await client.enqueue("probe_effect", tenant_id="slow", payload={"name": "late", "seconds": 20})
        ok = await client.enqueue("probe_effect", tenant_id="quick", payload={"name": "fine", "seconds": 0.5})
        with pytest.raises(JobFailed) as info:
            await job.result(timeout=10)
        assert (info.value.error, info.value.message) == ("JobTimedOut", "probe_effect timed out after 0.3s")
        events = []
        async for event in client.events("slow", since="0", block_ms=200):
            events.append((event.event, event.data.get("reason")))
            if event.event == "job_failed":
                break
        assert events == [("job_started", None), ("job_timed_out", None), ("job_failed", "timeout")]
        assert await ok.result(timeout=10) == 1, "the pool's timeout still applies to other tenants"
    assert await redis.hget("probe:effects", "late") is None


async def test_a_failed_task_is_reported_and_the_next_job_runs(
        redis_url: str, write_quotas: Callable[..., Path], start_worker: StartWorker) -> None:
    path = quotas(write_quotas)
    await start_worker(path)
    async with make_client(redis_url, path) as client:
        bad = await client.enqueue("probe_fail", tenant_id="acme", payload={"message": "kaput"})
        with pytest.raises(JobFailed) as info:
            await bad.result(timeout=10)
        assert (info.value.error, info.value.message) == ("RuntimeError", "kaput")
        good = await client.enqueue("echo", tenant_id="acme", payload={"message": "next"})
        assert await good.result(timeout=10) == "next"


async def test_a_stop_finishes_short_jobs_and_requeues_long_ones_without_spending_a_try(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], start_worker: StartWorker) -> None:
    path = quotas(write_quotas, shards=2)
    first = await start_worker(path, shutdown_grace=0.5)
    async with make_client(redis_url, path) as client:
        short = await client.enqueue("probe_effect", tenant_id="acme", payload={"name": "short", "seconds": 0.2})
        long = await client.enqueue("probe_lifespan", tenant_id="acme", payload={"durations": [30, 0]})
        await wait_for(lambda: first.process.status()["running"] == 2, 10, what="both jobs running")
        assert first.process.status()["state"] == "serving"
        assert await first.stop() == EXIT_OK
        stopped = json.loads(first.status_file.read_text())
        assert stopped["state"] == "stopped" and stopped["jobs_served"] == 2 and stopped["running"] == 0
        assert await short.result(timeout=1) == 1, "the short job finished within the grace period"
        # The long one was cancelled when the grace ran out and re-queued at once (no in-progress key).
        assert await long.status() == JobStatus.QUEUED
        runs = [json.loads(e) for e in await redis.lrange(f"probe:life:{long.job_id}", 0, -1)]
        assert [(e["event"], e.get("how")) for e in runs] == [("start", None), ("end", "cancelled")]
        await start_worker(path, slot=1)
        await long.result(timeout=10)
        info = await long.info()
        assert info is not None and info.job_try == 1, "a re-run after a drain spends no try"


async def test_a_reload_applies_a_lower_tenant_cap_and_a_refused_file_changes_nothing(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], start_worker: StartWorker) -> None:
    data: dict[str, Any] = {"pools": {POOL: {"shards": 1, "concurrency": 10, "job_timeout": 30}},
                            "tenants": {"acme": {"max_concurrency": 5}}}
    path = write_quotas(data)
    worker = await start_worker(path)
    assert await redis.hget(keys.tenant_limits(POOL), "acme") == b"5 1 -1"
    data["tenants"]["acme"]["max_concurrency"] = 1
    path.write_text(json.dumps(data))  # JSON is YAML
    worker.process.request_reload()  # what SIGHUP does
    await wait_for(lambda: _limits_are(redis, "acme", b"1 1 -1"), 10, what="the new limits to be published")
    async with make_client(redis_url, path) as client:
        handles = [await client.enqueue("probe_sleep", tenant_id="acme", payload={"seconds": 0.02, "group": "h"})
                   for _ in range(5)]
        await asyncio.gather(*(h.result(timeout=10) for h in handles))
    assert await _int(redis, "probe:tenant:acme:max") == 1
    taken = worker.process.config
    path.write_text("pools: {standard: {concurrency: 0}}")
    with structlog.testing.capture_logs() as logs:
        worker.process.request_reload()
        await wait_for(lambda: any(e["event"].startswith("quota file reload refused") for e in logs), 10,
                       what="the refusal")
    assert worker.process.config is taken and not worker.task.done()
    assert await redis.hget(keys.tenant_limits(POOL), "acme") == b"1 1 -1"


async def _limits_are(redis: Redis, tenant: str, value: bytes) -> bool:
    return await redis.hget(keys.tenant_limits(POOL), tenant) == value


async def test_a_job_whose_lease_another_holder_took_is_stopped_here_and_left_to_it(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], start_worker: StartWorker) -> None:
    path = quotas(write_quotas)
    lost_before = sample("agentworker_job_leases_lost_total", pool=POOL)
    worker = await start_worker(path, job_lease_ttl=1)  # renewed every 1/3 s
    async with make_client(redis_url, path) as client:
        job = await client.enqueue("probe_lifespan", tenant_id="acme", payload={"durations": [30]})
        await wait_for(lambda: _in_progress(job), 10, what="the job to run")
        # Another worker took the job over (as after a lapse): the next renewal tells this one it lost it.
        await redis.set(jobs.in_progress_key(job.job_id), "elsewhere:1", px=30_000)
        await wait_for(lambda: worker.process.status()["running"] == 0, 10, what="the job to be stopped here")
        runs = [json.loads(e) for e in await redis.lrange(f"probe:life:{job.job_id}", 0, -1)]
        assert [(e["event"], e.get("how")) for e in runs] == [("start", None), ("end", "cancelled")]
        # Its finish found the lease gone: it wrote nothing, the new holder's run stands.
        assert await redis.get(jobs.in_progress_key(job.job_id)) == b"elsewhere:1"
        assert await job.info() is None and await job.status() == JobStatus.IN_PROGRESS
    assert sample("agentworker_job_leases_lost_total", pool=POOL) == lost_before + 1


async def _in_progress(job: Any) -> bool:
    return bool(await job.status() == JobStatus.IN_PROGRESS)


async def test_the_loop_rides_out_a_redis_outage(write_quotas: Callable[..., Path],
                                                 start_worker: StartWorker) -> None:
    server = RedisServer()
    server.start()
    try:
        path = quotas(write_quotas)
        worker = await start_worker(path, redis_url=server.url)
        async with make_client(server.url, path) as client:
            job = await client.enqueue("echo", tenant_id="acme", payload={"message": "before"})
            assert await job.result(timeout=10) == "before"
        server.stop()
        await wait_for(lambda: not worker.process.status()["redis_ok"], 10, what="the loop to see Redis down")
        server.start()
        async with make_client(server.url, path) as client:
            job = await client.enqueue("echo", tenant_id="acme", payload={"message": "after"})
            assert await job.result(timeout=15) == "after"
        assert worker.process.status()["redis_ok"] and not worker.task.done()
        await worker.stop()
    finally:
        server.cleanup()


# -- one shard loop with jobs that crash, hang or retry -----------------------------------------------------


class Shard:
    """A :class:`ShardWorker` of shard 0 with its own lease holder, reporting final failures to a list."""

    def __init__(self, redis: ArqRedis, functions: list[Function], *, holder: str,
                 quota: PoolQuota | None = None) -> None:
        self.failures: list[FinalFailure] = []
        self.done: list[str] = []
        quota = quota or PoolQuota(shards=1)

        async def report(failure: FinalFailure) -> None:
            self.failures.append(failure)

        self.worker = ShardWorker(
            functions=functions, queue_name=keys.queue(POOL, 0), pool_name=POOL, shard=0, redis=redis,
            gate=ConcurrencyGate(4), leases=Leases(redis, holder=holder), pool_quota=lambda: quota,
            on_deferred=lambda tenant: None, on_done=self.done.append, on_final_failure=report,
            on_dead_letter=lambda reason, job_id: None, keep_result=60, poll_delay=0.05,
            job_serializer=jobs.dumps, job_deserializer=jobs.WorkerJobDecoder({f.name for f in functions}),
            ctx={})
        self.main = asyncio.create_task(self.worker.main())

    async def abandon(self) -> None:
        """Stop the loop as a killed process would: nothing it runs is finished or handed back."""
        self.worker.stop_picking()
        await self.main

    async def close(self) -> None:
        self.worker.stop_picking()
        self.worker.cancel_running()
        await self.main
        await self.worker.wait_idle()


@pytest.fixture
async def shards(arq_redis: ArqRedis) -> AsyncIterator[Callable[..., Shard]]:
    made: list[Shard] = []

    def make(functions: list[Function], *, holder: str, quota: PoolQuota | None = None) -> Shard:
        made.append(Shard(arq_redis, functions, holder=holder, quota=quota))
        return made[-1]

    yield make
    for shard in made:
        await shard.close()


async def put_job(redis: ArqRedis, job_id: str, task: str, job_try: int | None = None) -> None:
    """A job on shard 0's inbox, as any ARQ producer writes it."""
    now = int(time.time() * 1000)
    await redis.set(jobs.job_key(job_id), jobs.encode_job(task, {"tenant_id": job_id.split(":")[0]}, now, job_try))
    await redis.zadd(keys.queue(POOL, 0), {job_id: now})


async def result_of(redis: ArqRedis, job_id: str, timeout: float = 10) -> dict[str, Any]:
    await wait_for(lambda: redis.exists(jobs.result_key(job_id)), timeout, what=f"the result of {job_id}")
    record: dict[str, Any] = jobs.loads(await redis.get(jobs.result_key(job_id)))
    return record


async def test_a_job_whose_workers_keep_dying_runs_again_as_a_crash_then_is_poisoned(
        arq_redis: ArqRedis, shards: Callable[..., Shard]) -> None:
    hang = asyncio.Event()
    runs: list[tuple[int, int]] = []

    async def stuck(ctx: dict[str, Any], tenant_id: str) -> None:
        runs.append((ctx["job_try"], ctx["crashes"]))
        await hang.wait()

    functions = [func(stuck, name="stuck", timeout=60)]
    quota = PoolQuota(shards=1, max_crash_retries=1)
    reruns_before = sample("agentworker_job_crash_reruns_total", pool=POOL)
    await put_job(arq_redis, "acme:stuck:1", "stuck")
    for n, holder in enumerate(("host:1", "host:2"), start=1):
        dying = shards(functions, holder=holder, quota=quota)
        await wait_for(lambda n=n: len(runs) == n, 10, what=f"{holder} to run the job")
        await dying.abandon()
        # What the supervisor does when it reaps a dead worker: its leases go at once.
        assert await release_holder(arq_redis, holder, POOL) == 1
    assert runs == [(1, 0), (1, 1)], "a crash gives its try back"
    assert sample("agentworker_job_crash_reruns_total", pool=POOL) == reruns_before + 1
    last = shards(functions, holder="host:3", quota=quota)
    record = await result_of(arq_redis, "acme:stuck:1")
    assert record["s"] is False and record["r"]["error"] == "JobPoisoned"
    assert "each of the 2 times its worker died" in record["r"]["message"]
    assert len(runs) == 2, "a poisoned job does not run a third time"
    assert [(f.reason, f.job_id, f.task) for f in last.failures] == [("poisoned", "acme:stuck:1", "stuck")]


async def test_a_job_asking_for_a_try_past_max_tries_fails_for_good(
        arq_redis: ArqRedis, shards: Callable[..., Shard]) -> None:
    ran: list[int] = []

    async def work(ctx: dict[str, Any], tenant_id: str) -> None:
        ran.append(ctx["job_try"])

    shard = shards([func(work, name="work", timeout=5, max_tries=2)], holder="host:1")
    await put_job(arq_redis, "acme:work:late", "work", job_try=3)
    await put_job(arq_redis, "acme:work:last", "work", job_try=2)
    late = await result_of(arq_redis, "acme:work:late")
    assert late["r"]["error"] == "JobTriesExhausted" and "try 3 of at most 2" in late["r"]["message"]
    assert (await result_of(arq_redis, "acme:work:last"))["s"] is True
    assert ran == [2], "a producer may start a job at a later try, but not past the last"
    assert [f.reason for f in shard.failures] == ["tries_exhausted"]


async def test_a_retry_puts_the_job_back_with_its_delay_and_counts_the_try(
        arq_redis: ArqRedis, shards: Callable[..., Shard]) -> None:
    tries: list[tuple[int, float]] = []

    async def flaky(ctx: dict[str, Any], tenant_id: str) -> int:
        tries.append((ctx["job_try"], time.monotonic()))
        if ctx["job_try"] < 3:
            raise Retry(defer=0.2)
        return int(ctx["job_try"])

    shard = shards([func(flaky, name="flaky", timeout=5)], holder="host:1")
    await put_job(arq_redis, "acme:flaky:1", "flaky")
    record = await result_of(arq_redis, "acme:flaky:1")
    assert record["s"] is True and record["r"] == 3 and record["t"] == 3
    assert [t for t, _ in tries] == [1, 2, 3]
    assert all(later - earlier >= 0.15 for (_, earlier), (_, later) in itertools.pairwise(tries)), tries
    assert shard.failures == [] and shard.done == ["acme:flaky:1"] * 3


async def test_a_plain_arq_job_over_its_tenants_max_pending_is_refused_with_a_result(
        arq_redis: ArqRedis, shards: Callable[..., Shard]) -> None:
    async def work(ctx: dict[str, Any], tenant_id: str) -> str:
        return "ran"

    config = QuotaConfig.model_validate({"pools": {POOL: {"shards": 1}}, "tenants": {"acme": {"max_pending": 1}}})
    await publish_limits(arq_redis, config, POOL, int(time.time() * 1000))
    for key in ("a", "b"):  # adopted from the inbox in one claim: the second is one over max_pending
        await put_job(arq_redis, f"acme:work:{key}", "work")
    shard = shards([func(work, name="work", timeout=5)], holder="host:1")
    assert (await result_of(arq_redis, "acme:work:a"))["r"] == "ran"
    refused = await result_of(arq_redis, "acme:work:b")
    assert refused["s"] is False and refused["r"]["error"] == "JobRejected" and "max_pending" in refused["r"]["message"]
    assert await arq_redis.exists(jobs.job_key("acme:work:b")) == 0
    assert [(f.reason, f.job_id) for f in shard.failures] == [("rejected", "acme:work:b")]


async def test_a_job_longer_than_its_functions_timeout_is_finished_as_failed(
        arq_redis: ArqRedis, shards: Callable[..., Shard]) -> None:
    # The backstop under the envelope's deadline: ARQ's Function.timeout (the pool's job_timeout + 1 s).
    async def sleepy(ctx: dict[str, Any], tenant_id: str) -> None:
        await asyncio.sleep(30)

    shards([func(sleepy, name="sleepy", timeout=0.2)], holder="host:1")
    await put_job(arq_redis, "acme:sleepy:1", "sleepy")
    record = await result_of(arq_redis, "acme:sleepy:1")
    assert record["s"] is False and record["r"]["error"] == "TimeoutError"
    assert await arq_redis.exists(jobs.in_progress_key("acme:sleepy:1")) == 0, "its lease was dropped"


async def test_a_finish_waits_for_redis_while_the_lease_may_still_be_ours() -> None:
    server = RedisServer()
    server.start()
    redis = ArqRedis.from_url(server.url, socket_timeout=2)
    release = asyncio.Event()
    shard: Shard | None = None
    try:
        async def work(ctx: dict[str, Any], tenant_id: str) -> str:
            await release.wait()
            return "done"

        shard = Shard(redis, [func(work, name="work", timeout=30)], holder="host:1")
        await put_job(redis, "acme:work:1", "work")
        await wait_for(lambda: shard is not None and shard.worker.running == 1, 10, what="the job to run")
        server.stop()
        release.set()  # it finishes while Redis is down: the finish is tried again, not given up
        await asyncio.sleep(0.5)
        server.start()
        record = await result_of(redis, "acme:work:1")
        assert record["s"] is True and record["r"] == "done" and record["t"] == 1
        assert shard.done == ["acme:work:1"]
    finally:
        if shard is not None:
            await shard.close()
        await redis.aclose()
        server.cleanup()

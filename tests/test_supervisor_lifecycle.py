"""End-to-end: stopping, reloading, scaling out and surviving Redis, with no job lost.

Like tests/test_supervisor.py, every test runs the real ``agentworker run`` and only looks at it from
outside. "No job lost" is checked with the probe tasks: each job counts its completed executions in the
``probe:runs`` hash, and a cancelled run does not count, so every job must end with exactly 1.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis

from agentworker import keys
from agentworker.client import AgentWorkerClient
from tests.conftest import RedisServer, make_client, wait_for
from tests.supervisor_helpers import SupervisorProcess, live_workers, serving_pids, slot_rows, supervisor_factory

pytestmark = pytest.mark.slow

Quotas = Callable[..., Path]
TOKEN = "test-admin-token"


@pytest.fixture
def supervisors(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


async def probe_runs(redis: Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in (await redis.hgetall("probe:runs")).items()}


async def enqueue_sleeps(client: AgentWorkerClient, count: int, seconds: float, group: str,
                         tenants: int = 4) -> list[str]:
    ids = []
    for i in range(count):
        job = await client.enqueue("probe_sleep", tenant_id=f"{group}{i % tenants}",
                                   payload={"seconds": seconds, "group": group})
        ids.append(job.job_id)
    return ids


async def counter(redis: Redis, key: str) -> int:
    return int(await redis.get(key) or 0)


@pytest.mark.timeout(180)
async def test_sigterm_drains_running_jobs_requeues_the_rest_and_exits_0(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis: Redis, redis_url: str) -> None:
    config = write_quotas({"default_pool": "standard", "pools": {
        "standard": {"shards": 2, "processes": 2, "concurrency": 4, "job_timeout": 60}}})
    sup = supervisors(config, AGENTWORKER_SHUTDOWN_GRACE="2")
    status = await sup.wait_ready()
    workers = set(serving_pids(status, "standard"))

    async with make_client(redis_url, config) as client:
        long_ids = await enqueue_sleeps(client, 4, 3, "long")  # longer than the 2 s grace
        await wait_for(lambda: _at_least(counter(redis, "probe:long:running"), 4), 20, what="long jobs running")
        short_ids = await enqueue_sleeps(client, 4, 0.5, "short")
        await wait_for(lambda: _at_least(counter(redis, "probe:short:running"), 4), 20, what="short jobs running")

        sup.signal(signal.SIGTERM)
        assert await sup.wait_exit(40) == 0
        assert not live_workers(workers), "a worker outlived its supervisor"

        # The short jobs finished within the grace period; the long ones were cancelled and re-queued.
        for job_id in short_ids:
            assert await client.job(job_id).result(timeout=1) is not None
        runs = await probe_runs(redis)
        assert all(runs.get(job_id) == 1 for job_id in short_ids)
        assert not any(job_id in runs for job_id in long_ids)
        queued = [await redis.zcard(key) for key in await redis.keys(f"{keys.PREFIX}:tq:standard:*")]
        assert sum(queued) == 4

        # A supervisor started later runs them; nothing is lost and nothing ran twice.
        later = supervisors(config, name="later")
        await later.wait_ready()
        for job_id in long_ids:
            await client.job(job_id).result(timeout=60)
    runs = await probe_runs(redis)
    assert runs == dict.fromkeys(short_ids + long_ids, 1)


async def _at_least(value: Any, wanted: int) -> bool:
    return bool(await value >= wanted)


@pytest.mark.timeout(150)
async def test_reload_adds_a_pool_resizes_another_and_lowers_a_tenant_cap_without_losing_jobs(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis: Redis, redis_url: str) -> None:
    before = {"default_pool": "standard",
              "pools": {"standard": {"shards": 2, "processes": 1, "concurrency": 4, "job_timeout": 30}},
              "tenants": {"acme": {"max_concurrency": 4}}}
    config = write_quotas(before)
    sup = supervisors(config, AGENTWORKER_ADMIN_TOKEN=TOKEN)
    await sup.wait_ready()

    # Jobs flow through the whole reload.
    flowing: list[str] = []
    stop_flow = asyncio.Event()

    async def flow() -> None:
        async with make_client(redis_url, config) as client:
            i = 0
            while not stop_flow.is_set():
                job = await client.enqueue("probe_sleep", tenant_id=("acme", "beta")[i % 2],
                                           payload={"seconds": 0.2, "group": "flow"})
                flowing.append(job.job_id)
                i += 1
                await asyncio.sleep(0.05)

    flow_task = asyncio.create_task(flow())
    try:
        await wait_for(lambda: len(flowing) >= 10, 20, what="jobs flowing")

        code, _headers, _body = await sup.request("/admin/reload", "POST", token="wrong")
        assert code == 401
        # A broken file is refused, with its errors, and the running config stays.
        config.write_text("pools: {standard: {processes: 0}}\n")
        code, body = await sup.get_json("/admin/reload", "POST", token=TOKEN)
        assert code == 422 and body["ok"] is False
        assert any("processes" in error for error in body["errors"])
        status = await sup.status()
        assert status["supervisor"]["config_version"] == 1 and status["pools"]["standard"]["status"] == "ok"

        after = {"default_pool": "standard",
                 "pools": {"standard": {"shards": 2, "processes": 2, "concurrency": 5, "job_timeout": 30},
                           "premium": {"shards": 1, "processes": 1, "concurrency": 4, "job_timeout": 30}},
                 "tenants": {"acme": {"max_concurrency": 1}, "vip": {"pool": "premium"}}}
        config.write_text(yaml.safe_dump(after))  # picked up by the file watcher
        # (slot 0's replacement starts once the queued jobs follow the new routing: a moment after the reload)
        status = await sup.wait_status(
            lambda s: s["supervisor"]["config_version"] >= 2 and len(serving_pids(s, "standard")) == 2
            and len(serving_pids(s, "premium")) == 1 and not any(r["role"] != "current" for r in s["processes"])
            and s["restarts"].get("standard/reload", 0) >= 1,
            60, what="the new pools serving")
        assert status["supervisor"]["last_reload"]["changes"]["added_pools"] == ["premium"]
        assert status["supervisor"]["last_reload"]["changes"]["resized_pools"] == {"standard": [1, 2]}
        # Slot 0 ran with the old concurrency: replaced (start new, then drain old) as a reload restart.
        assert await sup.restarts("standard", "reload") == 1
        assert await sup.restarts("standard", "crash") == 0
        # The admin endpoint reloads too; the same file again changes nothing.
        code, body = await sup.get_json("/admin/reload", "POST", token=TOKEN)
        assert code == 200 and body["ok"] is True
        assert body["changes"] == {"added_pools": [], "removed_pools": [], "resized_pools": {},
                                   "replaced_pools": [], "tenants_changed": False}
        # From now on every worker runs with acme's lowered cap of 1.
        await redis.set("probe:tenant:acme:max", 0)
        enough = len(flowing) + 30
        await wait_for(lambda: len(flowing) >= enough, 30, what="more jobs after the reload")
    finally:
        stop_flow.set()
        await flow_task

    async with make_client(redis_url, config) as client:
        for job_id in flowing:
            await client.job(job_id).result(timeout=30)
        assert await probe_runs(redis) == dict.fromkeys(flowing, 1)

    assert int(await redis.get("probe:tenant:acme:max") or 0) == 1  # the lowered cap held

    new_config = write_quotas(after, name="after.yaml")
    async with make_client(redis_url, new_config) as client:
        vip = await client.enqueue("probe_count", tenant_id="vip")
        assert (await vip.result(timeout=15))["queue"] == keys.queue("premium", 0)


@pytest.mark.timeout(120)
async def test_lowered_tenant_cap_applies_at_once_and_sighup_removes_a_pool(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis: Redis, redis_url: str) -> None:
    before = {"default_pool": "standard",
              "pools": {"standard": {"shards": 1, "processes": 2, "concurrency": 4, "job_timeout": 30},
                        "extra": {"shards": 1, "processes": 1, "concurrency": 4, "job_timeout": 30}},
              "tenants": {"acme": {"max_concurrency": 4}}}
    config = write_quotas(before)
    sup = supervisors(config, AGENTWORKER_CONFIG_POLL_INTERVAL="0")  # only SIGHUP reloads
    status = await sup.wait_ready()
    extra_pid = serving_pids(status, "extra")
    code, _headers, _body = await sup.request("/admin/reload", "POST", token=TOKEN)
    assert code == 404  # no admin token configured: the admin endpoints do not exist

    after = {"default_pool": "standard",
             "pools": {"standard": {"shards": 1, "processes": 2, "concurrency": 4, "job_timeout": 30}},
             "tenants": {"acme": {"max_concurrency": 1}}}
    config.write_text(yaml.safe_dump(after))
    sup.signal(signal.SIGHUP)
    await sup.wait_status(lambda s: "extra" not in s["pools"] and not any(r["pool"] == "extra" for r in s["processes"]),
                          30, what="the removed pool to stop")
    assert not live_workers(set(extra_pid))
    status = await sup.status()
    assert len(serving_pids(status, "standard")) == 2 and await sup.restarts("standard", "reload") == 0

    async with make_client(redis_url, config) as client:
        ids = []
        for i in range(10):
            job = await client.enqueue("probe_sleep", tenant_id="acme", payload={"seconds": 0.5, "group": f"a{i}"})
            ids.append(job.job_id)
        # /status shows the named tenant's running (leased) and waiting jobs.
        await sup.wait_status(lambda s: s["tenants"]["acme"]["in_flight"] == 1 and s["tenants"]["acme"]["pending"] > 0,
                              10, what="acme's in-flight and pending counts")
        for job_id in ids:
            await client.job(job_id).result(timeout=30)
    assert int(await redis.get("probe:tenant:acme:max") or 0) == 1


@pytest.mark.timeout(300)
async def test_metrics_survive_20_restarts_with_a_bounded_directory(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis_url: str) -> None:
    slots = 4
    config = write_quotas({"default_pool": "standard", "pools": {"standard": {
        "shards": 2, "processes": slots, "concurrency": 2, "job_timeout": 30, "max_jobs_per_process": 1}}})
    sup = supervisors(config, AGENTWORKER_SHUTDOWN_GRACE="1")
    await sup.wait_ready()
    ran = 0
    async with make_client(redis_url, config) as client:
        recycled = 0.0
        while recycled < 20:  # five lifetimes of each of the 4 slots: unbounded files would be 24 pids' worth
            batch = [await client.enqueue("echo", tenant_id=f"t{i}", payload={"message": "m"}) for i in range(slots)]
            for job in batch:
                assert await job.result(timeout=30) == "m"
            ran += len(batch)
            # Each worker is recycled after one job: wait for recycles before sending more work.
            before = recycled

            async def more_recycles(before: float = before) -> bool:
                nonlocal recycled
                recycled = await sup.restarts("standard", "recycle")
                return recycled > before

            await wait_for(more_recycles, 30, what="workers to be recycled", interval=0.1)
    await sup.wait_status(lambda s: all(r["role"] == "current" and r["state"] == "serving" for r in s["processes"])
                          and len(s["processes"]) == slots, 60, what="every slot settled")
    samples = await sup.metrics()
    succeeded = sum(v for (name, labels), v in samples.items()
                    if name == "agentworker_jobs_total" and ("outcome", "success") in labels)
    assert succeeded == ran
    per_process_files = {p.name.rsplit("_", 1)[0] for p in sup.metrics_dir.glob("*.db")}
    db_files = list(sup.metrics_dir.glob("*.db"))
    archive = [p for p in db_files if p.name.endswith("_archive.db")]
    live = [p for p in db_files if not p.name.endswith("_archive.db")]
    pids = {int(p.name.rsplit("_", 1)[1].removesuffix(".db")) for p in live}
    # every serving worker has its files from its start (its job counters at 0), and the zygote one
    # (the unlabelled counters it creates when it imports the worker stack): slots + 1 live pids at most
    assert len(pids) <= slots + 1, sorted(p.name for p in live)
    assert len(archive) <= len(per_process_files)
    assert len(db_files) <= (slots + 1) * len(per_process_files) + len(archive)


@pytest.mark.timeout(150)
async def test_two_supervisors_share_the_work_and_one_can_leave_without_losing_jobs(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis: Redis, redis_url: str) -> None:
    config = write_quotas({"default_pool": "standard", "pools": {
        "standard": {"shards": 2, "processes": 1, "concurrency": 2, "job_timeout": 30}}})
    first = supervisors(config, name="first", AGENTWORKER_SHUTDOWN_GRACE="1")
    second = supervisors(config, name="second", AGENTWORKER_SHUTDOWN_GRACE="1")
    await first.wait_ready()
    await second.wait_ready()

    async with make_client(redis_url, config) as client:
        # What is promised is that both serve the shared queues, not how a given batch splits between
        # them: keep work queued (16 jobs of 0.5 s is 4 s for one alone) until each has served some, read
        # from its status (worker heartbeats, which lag a second), within a bounded wait.
        ids = await enqueue_sleeps(client, 16, 0.5, "share", tenants=8)

        async def both_served() -> bool:
            served = [sum(r["jobs_served"] for r in slot_rows(await sup.status(), "standard"))
                      for sup in (first, second)]
            if all(served):
                return True
            if len(await probe_runs(redis)) == len(ids):  # all done, and one has served nothing yet: more
                ids.extend(await enqueue_sleeps(client, 8, 0.5, f"share{len(ids)}", tenants=8))
            return False

        await wait_for(both_served, 60, what="both supervisors to serve jobs of the shared queues", interval=0.25)
        for job_id in ids:
            await client.job(job_id).result(timeout=30)

        workers = set(serving_pids(await first.status(), "standard"))
        more = await enqueue_sleeps(client, 8, 1.5, "leave", tenants=8)
        # 3 of 4 slots busy: both supervisors are running jobs, so the first leaves with jobs in hand.
        await wait_for(lambda: _at_least(counter(redis, "probe:leave:running"), 3), 30, what="jobs running")
        first.signal(signal.SIGTERM)
        assert await first.wait_exit(30) == 0
        assert not live_workers(workers)
        for job_id in more:
            await client.job(job_id).result(timeout=60)
    assert await probe_runs(redis) == dict.fromkeys(ids + more, 1)


@pytest.mark.timeout(150)
async def test_a_redis_outage_fails_readiness_not_liveness_and_nothing_restarts(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, tmp_path: Path) -> None:
    server = RedisServer()
    server.start()
    try:
        # A short hang_timeout: a worker whose loop stalled on the outage would be replaced while Redis is down.
        config = write_quotas({"default_pool": "standard", "pools": {
            "standard": {"shards": 2, "processes": 2, "concurrency": 2, "job_timeout": 30, "hang_timeout": 3}}})
        sup = supervisors(config, name="outage", redis=server.url)
        status = await sup.wait_ready()
        pids = serving_pids(status, "standard")

        server.stop()
        health_codes: list[int] = []

        async def not_ready() -> bool:
            health_codes.append((await sup.request("/health"))[0])
            return (await sup.request("/ready"))[0] == 503

        await wait_for(not_ready, 20, what="/ready to fail without Redis", interval=0.2)
        code, ready = await sup.get_json("/ready")
        assert code == 503 and ready["checks"]["redis:ping"][0]["status"] == "fail"
        # Keep Redis down 5 s (past the hang_timeout); liveness must hold all along.
        loop = asyncio.get_running_loop()
        down_until = loop.time() + 5
        while loop.time() < down_until:
            health_codes.append((await sup.request("/health"))[0])
            await asyncio.sleep(0.5)
        assert set(health_codes) == {200}
        # the queue series stay (with their last values) while Redis is down: dashboards keep a line,
        # and agentworker_redis_up says why nothing moves
        during = await sup.metrics()
        assert ("agentworker_queue_depth", frozenset({("pool", "standard"), ("shard", "0")})) in during
        assert during[("agentworker_redis_up", frozenset())] == 0

        server.start()
        await wait_for(lambda: _ready(sup), 30, what="/ready to pass again", interval=0.2)
        status = await sup.status()
        assert serving_pids(status, "standard") == pids  # workers reconnected; none was restarted
        samples = await sup.metrics()
        assert sum(v for (name, _l), v in samples.items() if name == "agentworker_worker_restarts_total") == 0

        async with make_client(server.url, config) as client:
            jobs = [await client.enqueue("echo", tenant_id=f"t{i}", payload={"message": "back"}) for i in range(4)]
            assert [await job.result(timeout=20) for job in jobs] == ["back"] * 4
        restored = Redis.from_url(server.url)
        try:
            await wait_for(lambda: restored.exists(keys.ROUTING), 15, what="routing table re-published")
        finally:
            await restored.aclose()
    finally:
        server.cleanup()


async def _ready(sup: SupervisorProcess) -> bool:
    return (await sup.request("/ready"))[0] == 200

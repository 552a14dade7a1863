"""A producer in another language, written from docs/protocol.md alone, against the real service.

``tests/producers/enqueue.mjs`` is Node.js with no packages: it reads ``agentworker:routing``, routes the
tenant itself (BLAKE2b-512 + jump hash in BigInt), runs ``agentworker/lua/enqueue.lua`` over its own RESP
client and polls the result. These tests check that what it does by the document is what the service
does: its jobs run under the real supervisor, its routing is Python's, its jobs count in ``max_pending``
(the third over a limit of 2 is refused and writes nothing), and a repeated key is a no-op.

CI (``.ci/run``) sets ``AGENTWORKER_TEST_REQUIRE_NODE=1`` so a machine without ``node`` fails here rather
than skipping silently.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.client import QuotaExceeded
from agentworker.config import load_config
from agentworker.routing import route_tenant, routing_table, routing_table_json, tenant_hash_key
from tests.conftest import ROOT, WorkerProcess, make_client, wait_for
from tests.supervisor_helpers import SupervisorProcess, serving_pids, supervisor_factory

pytestmark = pytest.mark.slow

PRODUCER = ROOT / "tests" / "producers" / "enqueue.mjs"
VECTORS = ROOT / "tests" / "data" / "routing_vectors.json"

QUOTAS: dict[str, Any] = {
    "default_pool": "standard",
    "pools": {
        "standard": {"shards": 4, "processes": 1, "concurrency": 4, "job_timeout": 30},
        "premium": {"shards": 2, "processes": 1, "concurrency": 4, "job_timeout": 30},
    },
    "tenant_defaults": {"max_pending": 500},
    "tenants": {
        "acme": {"pool": "premium", "max_pending": 50, "rate_limit": "100/s"},
        "small-co": {"max_pending": 2},
    },
}


@pytest.fixture
def node() -> str:
    found = shutil.which("node")
    if found is None:
        message = "node (Node.js 20) is not on PATH: the protocol's reference producer is a Node.js program"
        if os.environ.get("AGENTWORKER_TEST_REQUIRE_NODE"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture
def supervisors(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


class NodeProducer:
    def __init__(self, node: str, redis_url: str) -> None:
        self.node = node
        self.redis_url = redis_url

    async def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, [self.node, str(PRODUCER), *args], capture_output=True, text=True, timeout=60,
            cwd=ROOT)

    async def enqueue(self, tenant: str, task: str, key: str, payload: dict[str, Any] | None = None,
                      *extra: str, expect_rc: int = 0) -> list[dict[str, Any]]:
        """Enqueue; return the JSON lines printed (the outcome, then with --wait the result record)."""
        done = await self.run("--redis", self.redis_url, "--tenant", tenant, "--task", task, "--key", key,
                              "--payload", json.dumps(payload or {}), *extra)
        assert done.returncode == expect_rc, (done.returncode, done.stdout, done.stderr)
        return [json.loads(line) for line in done.stdout.splitlines()]

    async def route(self, tenant: str) -> dict[str, Any]:
        done = await self.run("--redis", self.redis_url, "--tenant", tenant, "--route-only")
        assert done.returncode == 0, done.stderr
        route: dict[str, Any] = json.loads(done.stdout)
        return route


@pytest.fixture
def producer(node: str, redis_url: str) -> NodeProducer:
    return NodeProducer(node, redis_url)


async def test_node_producers_job_runs_under_the_supervisor_and_its_result_is_read(
        producer: NodeProducer, supervisors: Callable[..., SupervisorProcess],
        write_quotas: Callable[[dict[str, Any]], Path], redis: Redis, redis_url: str) -> None:
    config_path = write_quotas(QUOTAS)
    config = load_config(config_path)
    sup = supervisors(config_path)
    await sup.wait_up()
    await wait_for(lambda: redis.exists(keys.ROUTING), 15, what="the routing table")
    await sup.wait_status(lambda s: bool(serving_pids(s, "standard") and serving_pids(s, "premium")), 30,
                          what="both pools serving")

    outcome, result = await producer.enqueue("acme", "echo", "k1", {"message": "hi from node"}, "--wait", "20")
    route = route_tenant(config, "acme")
    assert outcome == {"job_id": "acme:echo:k1", "code": 1, "outcome": "enqueued", "detail": None,
                       "pool": "premium", "shard": route.shard, "queue": route.queue}
    # The result record as Node read it, and the task's return value as the Python client reads it.
    assert result["s"] is True and result["r"] == "hi from node"
    assert result["id"] == "acme:echo:k1" and result["q"] == route.queue
    async with make_client(redis_url, config_path) as client:
        assert await client.job("acme:echo:k1").result(timeout=5) == "hi from node"
    # Its events are in the tenant's stream, as any job's.
    entries = await redis.xrange(keys.event_stream("acme"))
    names = [json.loads(fields[b"event"])["event"] for _id, fields in entries
             if json.loads(fields[b"event"])["data"].get("job_id") == "acme:echo:k1"]
    assert names == ["job_started", "job_completed"]

    # The same key again is a no-op while the result is kept: code 0, nothing queued, nothing re-run.
    [again] = await producer.enqueue("acme", "echo", "k1", {"message": "other"})
    assert (again["code"], again["outcome"]) == (0, "duplicate")
    assert not await redis.exists(jobs.job_key("acme:echo:k1"))
    assert jobs.loads(await redis.get(jobs.result_key("acme:echo:k1")))["ft"] == result["ft"]

    # With workers serving, deferred jobs stay pending: small-co's max_pending of 2 (from the table the
    # supervisor published) refuses a third job.
    for key in ("later-1", "later-2"):
        [deferred] = await producer.enqueue("small-co", "echo", key, {}, "--defer", "60")
        assert deferred["code"] == 1
    [refused] = await producer.enqueue("small-co", "echo", "now", {}, expect_rc=3)
    assert (refused["code"], refused["outcome"], refused["detail"]) == (-1, "over_max_pending", 2)
    assert not await redis.exists(jobs.job_key("small-co:echo:now"))
    assert set(await redis.zrange(keys.pending("small-co"), 0, -1)) == {b"small-co:echo:later-1",
                                                                        b"small-co:echo:later-2"}


async def test_node_routing_is_pythons(producer: NodeProducer, write_quotas: Callable[[dict[str, Any]], Path],
                                       redis: Redis) -> None:
    config = load_config(write_quotas({**QUOTAS, "pools": {"standard": {"shards": 8}, "premium": {"shards": 3}}}))
    await redis.set(keys.ROUTING, routing_table_json(config))  # what the supervisor publishes
    table = routing_table(config)
    # ("constructor" is a valid tenant id that a JavaScript object lookup must not find on the prototype.)
    for tenant in ("acme", "small-co", "globex", "0", "t_1-x", "z" * 63, "initech", "constructor"):
        expected = route_tenant(config, tenant)
        got = await producer.route(tenant)
        assert (got["pool"], got["shard"], got["queue"]) == (expected.pool, expected.shard, expected.queue), tenant
        assert int(got["key"]) == tenant_hash_key(tenant)
        limits = table["tenant_limits"].get(tenant, table["tenant_defaults"])
        assert got["limits"] == {"max_pending": limits["max_pending"], "rate_limit": limits["rate_limit"]}
    # ... and every published test vector (BLAKE2b prefixes, jump hash reference values).
    done = await producer.run("--check-vectors", str(VECTORS))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["mismatches"] == [] and report["checked"] > 100


async def test_node_jobs_count_in_max_pending_and_the_third_is_refused_with_nothing_written(
        producer: NodeProducer, write_quotas: Callable[[dict[str, Any]], Path], redis: Redis, redis_url: str,
        spawn_worker: Callable[..., WorkerProcess]) -> None:
    config_path = write_quotas(QUOTAS)
    config = load_config(config_path)
    # No worker serves yet: the table as the supervisor publishes it, so nothing is claimed meanwhile.
    await redis.set(keys.ROUTING, routing_table_json(config))
    route = route_tenant(config, "small-co")

    for key in ("k1", "k2"):
        [outcome] = await producer.enqueue("small-co", "echo", key, {"message": key})
        assert (outcome["code"], outcome["queue"]) == (1, route.queue)
    # A repeated key is a no-op: code 0, and it does not count again.
    [again] = await producer.enqueue("small-co", "echo", "k1", {"message": "again"})
    assert again["code"] == 0
    pending = {b"small-co:echo:k1", b"small-co:echo:k2"}
    assert set(await redis.zrange(keys.pending("small-co"), 0, -1)) == pending

    before = sorted(await redis.keys("*"))
    [refused] = await producer.enqueue("small-co", "echo", "k3", {"message": "k3"}, expect_rc=3)
    assert (refused["code"], refused["outcome"], refused["detail"]) == (-1, "over_max_pending", 2)
    # nothing of the job is written; the one write is the refusal counter the supervisor exports
    assert sorted(await redis.keys("*")) == sorted({*before, keys.admission_refusals().encode()})
    assert await redis.hget(keys.admission_refusals(), f"{route.pool} max_pending") == b"1"
    assert not await redis.exists(jobs.job_key("small-co:echo:k3"))
    assert set(await redis.zrange(route.tenant_queue, 0, -1)) == pending
    assert jobs.loads(await redis.get(jobs.job_key("small-co:echo:k1")))["k"] == {"message": "k1",
                                                                                  "tenant_id": "small-co"}

    # The Python client sees the same count: Node's jobs and its own share one max_pending.
    async with make_client(redis_url, config_path) as client:
        assert await client.pending_count("small-co") == 2
        with pytest.raises(QuotaExceeded):
            await client.enqueue("echo", tenant_id="small-co", payload={"message": "py"}, idempotency_key="py")

        # A worker comes: Node's jobs run, leave the pending count, and the refused one can now go in.
        await spawn_worker(config_path, "standard").wait_serving()
        assert await client.job("small-co:echo:k1").result(timeout=20) == "k1"
        assert await client.job("small-co:echo:k2").result(timeout=20) == "k2"
        await wait_for(lambda: _is_zero(client.pending_count("small-co")), 10, what="pending to drain")
    _outcome, result = await producer.enqueue("small-co", "echo", "k3", {"message": "k3"}, "--wait", "20")
    assert result["s"] is True and result["r"] == "k3"


async def _is_zero(count: Any) -> bool:
    return bool(await count == 0)

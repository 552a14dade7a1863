"""Job leases, crash accounting and dead letters, in-process against a real Redis.

A :class:`ShardWorker` is driven directly (no subprocess): claims, finishes, renewals, the supervisor's
release of a dead holder and the dead-letter moves are checked key by key, in milliseconds. The
end-to-end behaviour (kill -9 of real workers) is in ``tests/test_crash_recovery.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from arq.connections import ArqRedis
from arq.worker import Retry, func
from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.admission import Enqueuer
from agentworker.config import PoolQuota, QuotaConfig
from agentworker.job_leases import publish_limits, release_holder
from agentworker.pools.arq_internals import ShardWorker
from agentworker.pools.gate import ConcurrencyGate
from agentworker.pools.leases import Leases
from agentworker.tasks.envelope import FinalFailure
from tests.conftest import wait_for

QUEUE = keys.queue("standard", 0)  # the shard's inbox (what a plain ARQ producer writes)


def tenant_queue(tenant: str = "acme") -> str:
    return keys.tenant_queue("standard", 0, tenant)


class Harness:
    """One ShardWorker of holder ``holder`` with plain (envelope-less) functions, recording what it reports."""

    def __init__(self, redis: ArqRedis, holder: str, *, max_crash_retries: int = 5, max_tries: int = 3,
                 cap: int | None = None, concurrency: int = 5) -> None:
        self.failures: list[FinalFailure] = []
        self.dead: list[tuple[str, str]] = []
        self.ran: list[str] = []
        self.release = asyncio.Event()
        self.quota = PoolQuota(max_crash_retries=max_crash_retries, max_tries=max_tries, concurrency=concurrency)
        self.leases = Leases(redis, job_ttl_s=2, tenant_ttl_s=30, holder=holder)
        self.cap = cap

        async def echo(ctx: dict[str, Any], **payload: Any) -> Any:
            self.ran.append(ctx["job_id"])
            return payload.get("message")

        async def block(ctx: dict[str, Any], **payload: Any) -> Any:
            self.ran.append(ctx["job_id"])
            await self.release.wait()
            return "released"

        async def again(ctx: dict[str, Any], **payload: Any) -> Any:
            raise Retry(defer=60)

        async def report(failure: FinalFailure) -> None:
            self.failures.append(failure)

        self.worker = ShardWorker(
            functions=[func(echo, name="echo", timeout=30), func(block, name="block", timeout=30),
                       func(again, name="again", timeout=30)],
            queue_name=QUEUE, pool_name="standard", shard=0, redis=redis, gate=ConcurrencyGate(concurrency),
            leases=self.leases, pool_quota=lambda: self.quota,
            on_deferred=lambda tenant: None, on_done=lambda job_id: None, on_final_failure=report,
            on_dead_letter=lambda reason, job_id: self.dead.append((reason, job_id)), keep_result=60,
            poll_delay=0.05, job_serializer=jobs.dumps,
            job_deserializer=jobs.WorkerJobDecoder({"echo", "block", "again"}), ctx={})

    async def poll(self) -> None:
        if self.cap is not None:
            config = QuotaConfig.model_validate({"pools": {"standard": {"shards": 1}},
                                                 "tenant_defaults": {"max_concurrency": self.cap}})
            await publish_limits(self.worker.pool, config, "standard", 1)
        await self.worker._poll_once()

    async def claim_only(self, job_id: str) -> list[Any]:
        """Claim (as a worker about to die would) without running: the claim's entry for ``job_id``."""
        entries = await self.worker._claim_batch(1)
        assert [e[1].decode() for e in entries] == [job_id], entries
        return list(entries[0])

    async def settle(self) -> None:
        await self.worker.wait_idle()


async def _enqueue(redis: Redis, job_id: str, task: str = "echo", score: int = 1000, **payload: Any) -> None:
    tenant = job_id.split(":")[0]
    await Enqueuer(redis).enqueue(
        job_id=job_id, tenant_id=tenant, pool="standard", shard=0,
        job_bytes=jobs.encode_job(task, {"tenant_id": tenant, **payload}, score), score_ms=score,
        expires_ms=600_000, max_pending=None, rate=None)


async def _wait(condition: Callable[[], Awaitable[bool] | bool], timeout: float = 5) -> None:
    await wait_for(condition, timeout, interval=0.01)


async def test_a_claim_is_a_short_lease_named_after_its_holder_and_listed_under_it(arq_redis: ArqRedis) -> None:
    h = Harness(arq_redis, "host-a:1")
    await _enqueue(arq_redis, "acme:block:1", task="block")
    await h.poll()
    await _wait(lambda: h.ran == ["acme:block:1"])
    lease = jobs.in_progress_key("acme:block:1")
    assert await arq_redis.get(lease) == b"host-a:1"
    assert 0 < await arq_redis.pttl(lease) <= 2000, "the lease lives the job lease TTL, not job_timeout"
    assert await arq_redis.smembers(keys.held_jobs("host-a:1")) == {b"acme:block:1"}
    assert await arq_redis.hget(keys.job_attempt("acme:block:1"), "holder") == b"host-a:1"
    h.release.set()
    await h.settle()
    # Finished: ARQ's finished-job state, and nothing of ours left behind.
    assert json.loads(await arq_redis.get(jobs.result_key("acme:block:1")))["r"] == "released"
    for key in (lease, jobs.job_key("acme:block:1"), jobs.retry_key("acme:block:1"),
                keys.job_attempt("acme:block:1"), keys.held_jobs("host-a:1")):
        assert not await arq_redis.exists(key), key
    assert await arq_redis.zcard(tenant_queue()) == 0
    assert await arq_redis.zcard(keys.running_jobs("standard", 0)) == 0


async def test_renewal_keeps_a_running_jobs_lease_alive_past_its_ttl(arq_redis: ArqRedis) -> None:
    h = Harness(arq_redis, "host-a:1")
    await _enqueue(arq_redis, "acme:block:1", task="block")
    await h.poll()
    await _wait(lambda: h.ran == ["acme:block:1"])
    for _ in range(3):  # 3 x 1 s > the 2 s TTL
        await asyncio.sleep(1.0)
        assert await h.leases.renew_all() == []
    assert await arq_redis.get(jobs.in_progress_key("acme:block:1")) == b"host-a:1"
    assert await arq_redis.pttl(keys.held_jobs("host-a:1")) > 0
    h.release.set()
    await h.settle()


async def test_a_released_dead_holders_job_runs_again_at_once_without_spending_a_try(arq_redis: ArqRedis) -> None:
    dead = Harness(arq_redis, "host-a:1")
    await _enqueue(arq_redis, "acme:block:1", task="block")
    # The worker claims the job and dies running it (kill -9: nothing of it runs any more). Its supervisor
    # reaps it and releases its leases.
    await dead.claim_only("acme:block:1")
    assert await arq_redis.get(jobs.retry_key("acme:block:1")) == b"1"
    assert await release_holder(arq_redis, "host-a:1", "standard") == 1
    assert not await arq_redis.exists(jobs.in_progress_key("acme:block:1"))
    assert not await arq_redis.exists(keys.held_jobs("host-a:1"))
    alive = Harness(arq_redis, "host-b:2")
    await alive.poll()
    await _wait(lambda: alive.ran == ["acme:block:1"])
    assert await arq_redis.get(jobs.retry_key("acme:block:1")) == b"1", "the crash gave its try back"
    assert await arq_redis.hget(keys.job_attempt("acme:block:1"), "crashes") == b"1"
    alive.release.set()
    await alive.settle()
    result = json.loads(await arq_redis.get(jobs.result_key("acme:block:1")))
    assert (result["s"], result["t"]) == (True, 1)


async def test_release_only_drops_leases_still_held_by_the_dead_holder(arq_redis: ArqRedis) -> None:
    await arq_redis.sadd(keys.held_jobs("host-a:1"), "acme:echo:mine", "acme:echo:taken")
    await arq_redis.set(jobs.in_progress_key("acme:echo:mine"), "host-a:1", px=10_000)
    await arq_redis.set(jobs.in_progress_key("acme:echo:taken"), "host-b:2", px=10_000)
    await arq_redis.zadd(keys.tenant_leases("acme"), {"acme:echo:mine@host-a:1": 10**15,
                                                      "acme:echo:taken@host-b:2": 10**15})
    assert await release_holder(arq_redis, "host-a:1", "standard") == 1
    assert not await arq_redis.exists(jobs.in_progress_key("acme:echo:mine"))
    assert await arq_redis.get(jobs.in_progress_key("acme:echo:taken")) == b"host-b:2"
    assert await arq_redis.zrange(keys.tenant_leases("acme"), 0, -1) == [b"acme:echo:taken@host-b:2"]


async def _crash_once(redis: ArqRedis, holder: str, job_id: str, *, max_crash_retries: int) -> None:
    """Claim the job as ``holder`` and die running it; the supervisor releases the lease."""
    reply = await Harness(redis, holder, max_crash_retries=max_crash_retries).claim_only(job_id)
    assert reply[0] == b"run"
    assert await release_holder(redis, holder, "standard") == 1


async def test_a_job_whose_worker_dies_past_max_crash_retries_is_poisoned(arq_redis: ArqRedis) -> None:
    await _enqueue(arq_redis, "acme:block:p", task="block")
    for n in range(3):  # max_crash_retries=2: three deaths, the fourth claim poisons it
        await _crash_once(arq_redis, f"host:{n}", "acme:block:p", max_crash_retries=2)
    assert await arq_redis.get(jobs.retry_key("acme:block:p")) == b"1", "three crashes, still the first try"
    last = Harness(arq_redis, "host:last", max_crash_retries=2)
    await last.poll()
    await _wait(lambda: bool(last.failures))
    await last.settle()
    assert last.ran == [], "a poisoned job is not run again"
    failure = last.failures[0]
    assert (failure.reason, type(failure.error).__name__, failure.task) == ("poisoned", "JobPoisoned", "block")
    assert "3 times" in str(failure.error)
    result = json.loads(await arq_redis.get(jobs.result_key("acme:block:p")))
    assert result["s"] is False and result["r"]["error"] == "JobPoisoned"
    assert result["t"] == 1, "crashes spent no try"
    assert await arq_redis.zcard(tenant_queue()) == 0
    assert not await arq_redis.exists(keys.job_attempt("acme:block:p"))


async def test_a_finish_after_another_worker_took_the_job_over_writes_nothing(arq_redis: ArqRedis) -> None:
    slow = Harness(arq_redis, "host-a:1")
    await _enqueue(arq_redis, "acme:block:1", task="block")
    await slow.poll()
    await _wait(lambda: slow.ran == ["acme:block:1"])
    # Its lease lapsed (a blocked loop) and another worker took the job.
    await arq_redis.set(jobs.in_progress_key("acme:block:1"), "host-b:2", px=10_000)
    assert await slow.leases.renew_all() == ["acme:block:1"], "renewal tells the old holder it lost the job"
    slow.release.set()
    await slow.settle()
    assert await arq_redis.get(jobs.in_progress_key("acme:block:1")) == b"host-b:2"
    assert not await arq_redis.exists(jobs.result_key("acme:block:1"))
    assert await arq_redis.exists(jobs.job_key("acme:block:1"))
    assert await arq_redis.zscore(keys.running_jobs("standard", 0), "acme:block:1") is not None, \
        "still the new holder's"


async def test_renewal_stops_a_job_whose_lease_another_worker_took(arq_redis: ArqRedis) -> None:
    h = Harness(arq_redis, "host-a:1")
    await _enqueue(arq_redis, "acme:block:1", task="block")
    await h.poll()
    await _wait(lambda: h.ran == ["acme:block:1"])
    await arq_redis.set(jobs.in_progress_key("acme:block:1"), "host-b:2", px=10_000)
    lost = await h.leases.renew_all()
    assert lost == ["acme:block:1"]
    assert h.worker.lease_lost("acme:block:1") is True
    await h.settle()
    assert await arq_redis.get(jobs.in_progress_key("acme:block:1")) == b"host-b:2", "the new holder's lease stays"


async def test_a_lapsed_lease_is_lost_and_the_job_goes_back_to_its_tenants_queue(arq_redis: ArqRedis) -> None:
    h = Harness(arq_redis, "host-a:1")
    await _enqueue(arq_redis, "acme:block:1", task="block")
    await h.poll()
    await _wait(lambda: h.ran == ["acme:block:1"])
    await arq_redis.delete(jobs.in_progress_key("acme:block:1"))  # lapsed: the loop stalled past the TTL
    await arq_redis.zadd(keys.running_jobs("standard", 0), {"acme:block:1": 1})  # its deadline passed
    assert await h.leases.renew_all() == ["acme:block:1"], "a lapsed lease is not taken back"
    other = Harness(arq_redis, "host-b:2")
    await other.poll()  # the next claim finds the lapsed lease and puts the job back: then runs it
    await _wait(lambda: other.ran == ["acme:block:1"])
    assert await arq_redis.hget(keys.job_attempt("acme:block:1"), "crashes") == b"1"
    assert h.worker.lease_lost("acme:block:1")
    other.release.set()
    h.release.set()
    await h.settle()
    await other.settle()
    assert json.loads(await arq_redis.get(jobs.result_key("acme:block:1")))["s"] is True


async def test_a_drained_job_runs_again_at_once_without_spending_a_try(arq_redis: ArqRedis) -> None:
    h = Harness(arq_redis, "host-a:1")
    await _enqueue(arq_redis, "acme:block:1", task="block")
    await h.poll()
    await _wait(lambda: h.ran == ["acme:block:1"])
    assert h.worker.cancel_running() == 1
    await h.settle()
    assert not await arq_redis.exists(jobs.in_progress_key("acme:block:1"))
    assert await arq_redis.get(jobs.retry_key("acme:block:1")) == b"0"
    assert not await arq_redis.hexists(keys.job_attempt("acme:block:1"), "holder"), "a drain is not a crash"
    assert await arq_redis.zscore(tenant_queue(), "acme:block:1") == 1000, "it keeps its place"
    again = Harness(arq_redis, "host-b:2")
    await again.poll()
    await _wait(lambda: again.ran == ["acme:block:1"])
    again.release.set()
    await again.settle()
    assert json.loads(await arq_redis.get(jobs.result_key("acme:block:1")))["t"] == 1


async def test_retry_re_scores_the_job_and_counts_the_try(arq_redis: ArqRedis) -> None:
    h = Harness(arq_redis, "host-a:1")
    await _enqueue(arq_redis, "acme:again:1", task="again")
    await h.poll()
    await h.settle()
    score = await arq_redis.zscore(tenant_queue(), "acme:again:1")
    assert score is not None and score > time.time() * 1000 + 50_000
    assert await arq_redis.zscore(keys.waiting_tenants("standard", 0), "acme") == score, "waiting for it"
    assert await arq_redis.get(jobs.retry_key("acme:again:1")) == b"1"
    assert not await arq_redis.exists(jobs.in_progress_key("acme:again:1"))


async def test_a_try_past_max_tries_fails_for_good_and_is_reported(arq_redis: ArqRedis) -> None:
    h = Harness(arq_redis, "host-a:1", max_tries=2)
    await _enqueue(arq_redis, "acme:echo:late", message="m")
    await arq_redis.set(jobs.retry_key("acme:echo:late"), 2)
    await h.poll()
    await h.settle()
    assert h.ran == []
    assert [f.reason for f in h.failures] == ["tries_exhausted"]
    assert json.loads(await arq_redis.get(jobs.result_key("acme:echo:late")))["r"]["error"] == "JobTriesExhausted"


UNREADABLE: list[tuple[str, str]] = [
    ("missing_record", "acme:echo:missing"),
    ("wrong_type", "acme:echo:hash"),
    ("bad_record", "acme:echo:notjson"),
    ("bad_field", "acme:echo:badtry"),
    ("bad_field", "acme:echo:hugetime"),
    ("bad_field", "acme:echo:payload"),
]


async def test_every_unreadable_entry_is_dead_lettered_once_and_the_job_behind_runs(arq_redis: ArqRedis) -> None:
    await arq_redis.zadd(QUEUE, {b"acme:echo:\xff\xfe": 100})
    await arq_redis.zadd(QUEUE, {"acme:echo:missing": 101})
    await arq_redis.hset(jobs.job_key("acme:echo:hash"), "f", "echo")
    await arq_redis.zadd(QUEUE, {"acme:echo:hash": 102})
    for job_id, body, score in [
            ("acme:echo:notjson", b"\x80not json{", 103),
            ("acme:echo:badtry", b'{"t": "x", "f": "echo", "a": [], "k": {"tenant_id": "acme"}, "et": 1}', 104),
            ("acme:echo:hugetime", b'{"t": 1, "f": "echo", "a": [], "k": {"tenant_id": "acme"}, "et": 1e20}', 105),
            ("acme:echo:payload", b'{"t": 1, "f": "echo", "a": [], "k": [1, 2], "et": 1}', 106)]:
        await arq_redis.set(jobs.job_key(job_id), body)
        await arq_redis.zadd(QUEUE, {job_id: score})
    await _enqueue(arq_redis, "acme:echo:good", score=200, message="behind them")
    h = Harness(arq_redis, "host-a:1")
    for _ in range(3):  # a claim adopts and takes a batch at a time (5 here)
        await h.poll()
        await h.settle()
    assert h.ran == ["acme:echo:good"]
    assert json.loads(await arq_redis.get(jobs.result_key("acme:echo:good")))["r"] == "behind them"
    expected = [("non_utf8_id", "acme:echo:\\xff\\xfe"), *UNREADABLE]
    assert sorted(h.dead) == sorted(expected)
    dead = await arq_redis.hgetall(keys.dead_letters("standard"))
    assert set(dead) == {b"acme:echo:\xff\xfe", *(job_id.encode() for _, job_id in UNREADABLE)}
    for reason, job_id in UNREADABLE:
        record = json.loads(dead[job_id.encode()])
        assert record["reason"] == reason and record["queue"] == QUEUE and record["detail"], job_id
        assert json.loads(await arq_redis.get(jobs.result_key(job_id)))["r"]["error"] == "JobUnreadable"
        assert not await arq_redis.exists(jobs.in_progress_key(job_id)), job_id
    assert await arq_redis.zcard(QUEUE) == 0, "each moved once, out of the queue"
    assert await arq_redis.zcard(tenant_queue()) == 0
    assert not await arq_redis.smembers(keys.held_jobs("host-a:1"))
    assert {f.reason for f in h.failures} == {"unreadable"}
    # A second worker finds nothing more to move.
    again = Harness(arq_redis, "host-b:2")
    await again.poll()
    assert again.dead == []


async def test_a_tenant_at_its_cap_is_left_queued_and_its_lease_released_on_finish(arq_redis: ArqRedis) -> None:
    h = Harness(arq_redis, "host-a:1", cap=1)
    await _enqueue(arq_redis, "acme:block:1", task="block", score=1)
    await _enqueue(arq_redis, "acme:block:2", task="block", score=2)
    await h.poll()
    await _wait(lambda: h.ran == ["acme:block:1"])
    assert await arq_redis.zrange(keys.tenant_leases("acme"), 0, -1) == [b"acme:block:1@host-a:1"]
    assert not await arq_redis.exists(jobs.in_progress_key("acme:block:2"))
    h.release.set()
    await h.settle()
    assert await arq_redis.zcard(keys.tenant_leases("acme")) == 0

"""Dead letters: the module in-process against real Redis, the CLI as a subprocess, a real worker and
the real supervisor's /status."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker import dead_letters, jobs, keys
from agentworker.config import QuotaConfig, load_config
from agentworker.dead_letters import DeadLetterError, DeadLetterNotFound, RequeueRefused
from agentworker.job_leases import dead_letter_record
from agentworker.routing import route_tenant
from tests.conftest import BASIC_QUOTAS, ROOT, make_client, wait_for, worker_env
from tests.supervisor_helpers import SupervisorProcess, supervisor_factory

NON_UTF8 = b"acme:echo:\xff\xfe"


@pytest.fixture
def config(quota_file: Path) -> QuotaConfig:
    return load_config(quota_file)


async def bury(redis: Redis, pool: str, raw_id: bytes | str, *, reason: str = "bad_record",
               detail: str = "job record is not valid JSON", queue: str | None = None, score: float = 1_000.0,
               ts: int | None = None) -> None:
    """Leave a dead letter exactly as the worker writes it (same record writer)."""
    record = json.loads(dead_letter_record(reason=reason, detail=detail, queue=queue or keys.queue(pool, 0),
                                           score=score))
    if ts is not None:
        record["ts"] = ts
    await redis.hset(keys.dead_letters(pool), raw_id, json.dumps(record))  # type: ignore[misc]


async def bury_job(redis: Redis, config: QuotaConfig, tenant: str, key: str, record: bytes | None,
                   score: float = 1_000.0) -> str:
    """A dead letter of a job routed as the tenant's jobs are, with its (broken) record and failed result."""
    job_id = f"{tenant}:echo:{key}"
    route = route_tenant(config, tenant)
    await bury(redis, route.pool, job_id, queue=route.queue, score=score)
    if record is not None:
        await redis.set(jobs.job_key(job_id), record)
    await redis.set(jobs.result_key(job_id), b"the JobUnreadable result")
    await redis.hset(keys.job_attempt(job_id), "crashes", 0)  # type: ignore[misc]
    await redis.set(jobs.retry_key(job_id), 1)
    return job_id


def good_record(tenant: str, message: str = "back") -> bytes:
    return jobs.encode_job("echo", {"tenant_id": tenant, "message": message}, int(time.time() * 1000))


# -- the id notation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "shown"), [
    (b"acme:echo:k1", "acme:echo:k1"),
    (b"hex:echo:k1", "hex:echo:k1"),  # a job of tenant "hex" reads as itself
    (NON_UTF8, "hex:" + NON_UTF8.hex()),
    (b"hex:ff", "hex:6865783a6666"),  # UTF-8, but it would read as hex notation: shown in hex to round-trip
    (b"acme:echo:\x1b[31m", "hex:" + b"acme:echo:\x1b[31m".hex()),  # no terminal escapes on screen
])
def test_ids_are_shown_as_text_or_hex_and_parse_back(raw: bytes, shown: str) -> None:
    assert dead_letters.format_id(raw) == shown
    assert dead_letters.parse_id(shown) == raw


def test_hex_notation_is_always_hex_and_an_empty_id_is_refused() -> None:
    assert dead_letters.parse_id("hex:FF00") == b"\xff\x00"
    assert dead_letters.parse_id("hex:abc") == b"hex:abc"  # odd length: not the notation, plain text
    with pytest.raises(DeadLetterError, match="must not be empty"):
        dead_letters.parse_id("")


# -- the module, in-process --------------------------------------------------------------------------


async def test_list_shows_every_dead_letter_oldest_first_with_non_utf8_ids_in_hex(redis: Redis) -> None:
    await bury(redis, "standard", b"acme:echo:new", reason="missing_record", ts=3_000)
    await bury(redis, "standard", NON_UTF8, reason="non_utf8_id", detail="the job id is not UTF-8", ts=1_000)
    await bury(redis, "standard", b"acme:echo:mid", reason="wrong_type", ts=2_000)
    await redis.hset(keys.dead_letters("standard"), b"acme:echo:junk", b"not json")  # type: ignore[misc]
    await bury(redis, "premium", b"vip:echo:x")

    listing = await dead_letters.list_dead_letters(redis, "standard")
    assert listing.total == 4 and listing.more == 0
    assert [d.id for d in listing.letters] == ["acme:echo:junk", "hex:" + NON_UTF8.hex(), "acme:echo:mid",
                                               "acme:echo:new"]
    odd = listing.letters[1]
    assert (odd.raw, odd.reason, odd.detail, odd.queue, odd.score) == (
        NON_UTF8, "non_utf8_id", "the job id is not UTF-8", keys.queue("standard", 0), 1_000.0)
    assert listing.letters[0].reason == "?"  # a mangled entry still lists
    assert odd.as_dict()["id"] == "hex:" + NON_UTF8.hex()

    capped = await dead_letters.list_dead_letters(redis, "standard", limit=3)
    assert len(capped.letters) == 3 and capped.total == 4 and capped.more == 1
    assert await dead_letters.count_dead_letters(redis, ["premium", "standard", "none"]) == {
        "premium": 1, "standard": 4, "none": 0}
    assert await dead_letters.find_pools(redis, ["premium", "standard"], NON_UTF8) == ["standard"]


async def test_requeue_is_refused_until_the_record_is_repaired(redis: Redis, config: QuotaConfig) -> None:
    job_id = await bury_job(redis, config, "acme", "k1", None, score=1234.0)
    route = route_tenant(config, "acme")
    raw = job_id.encode()

    with pytest.raises(RequeueRefused, match=rf"job {job_id}'s record arq:job:{job_id} does not exist"):
        await dead_letters.requeue(redis, route.pool, raw, config=config)
    await redis.hset(jobs.job_key(job_id), "f", "echo")  # type: ignore[misc]
    with pytest.raises(RequeueRefused, match="is a Redis hash, not a string"):
        await dead_letters.requeue(redis, route.pool, raw, config=config)
    await redis.delete(jobs.job_key(job_id))
    await redis.set(jobs.job_key(job_id), b"\x80not json{")
    with pytest.raises(RequeueRefused, match=r"still unreadable \(bad_record: job record is not valid JSON"):
        await dead_letters.requeue(redis, route.pool, raw, config=config)
    await redis.set(jobs.job_key(job_id), b'{"f": 3, "k": {}}')
    with pytest.raises(RequeueRefused, match=r"still unreadable \(bad_field: job field 'f'"):
        await dead_letters.requeue(redis, route.pool, raw, config=config)
    # Every refusal left everything as it was.
    assert await redis.hexists(keys.dead_letters(route.pool), raw)  # type: ignore[misc]
    assert await redis.zscore(route.queue, job_id) is None

    repaired = good_record("acme")
    await redis.set(jobs.job_key(job_id), repaired)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.wakeup_channel(route.pool))
    try:
        letter = await dead_letters.requeue(redis, route.pool, raw, config=config)
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:  # the subscribe confirmation reads as None
            message = await pubsub.get_message(timeout=1)
    finally:
        await pubsub.aclose()
    assert (letter.id, letter.queue) == (job_id, route.queue)
    assert await redis.zscore(route.queue, job_id) == 1234.0  # its recorded score: its old place in the queue
    assert not await redis.hexists(keys.dead_letters(route.pool), raw)  # type: ignore[misc]
    for gone in (jobs.result_key(job_id), keys.job_attempt(job_id), jobs.retry_key(job_id)):
        assert not await redis.exists(gone), gone
    assert await redis.get(jobs.job_key(job_id)) == repaired  # the record the worker will run
    assert message is not None and message["data"] == route.queue.encode()  # an idle worker looks now

    with pytest.raises(DeadLetterNotFound, match=f"job {job_id} is not among the dead letters of pool"):
        await dead_letters.requeue(redis, route.pool, raw, config=config)


async def test_requeue_refuses_ids_no_worker_could_run(redis: Redis, config: QuotaConfig) -> None:
    await bury(redis, "standard", NON_UTF8, reason="non_utf8_id")
    with pytest.raises(RequeueRefused, match=rf"job hex:{NON_UTF8.hex()} has an id that is not UTF-8"):
        await dead_letters.requeue(redis, "standard", NON_UTF8, config=config)

    # A queue that is not the pool's.
    job_id = await bury_job(redis, config, "acme", "elsewhere", good_record("acme"))
    await bury(redis, "standard", job_id, queue=keys.queue("premium", 0))
    with pytest.raises(RequeueRefused, match="recorded queue 'agentworker:queue:premium:0' is not a queue of pool"):
        await dead_letters.requeue(redis, "standard", job_id.encode(), config=config)

    # A queue of the pool, but not the one the tenant routes to now: the worker would refuse it there.
    route = route_tenant(config, "acme")
    other = keys.queue("standard", (route.shard + 1) % 4)
    await bury(redis, "standard", job_id, queue=other)
    with pytest.raises(RequeueRefused, match=f"now routes to {route.queue}, not to its recorded queue {other}"):
        await dead_letters.requeue(redis, "standard", job_id.encode(), config=config)

    # Enqueued anew meanwhile: the new entry is left alone.
    await bury(redis, "standard", job_id, queue=route.queue)
    await redis.zadd(route.queue, {job_id: 5})
    with pytest.raises(RequeueRefused, match=r"is already in .* again"):
        await dead_letters.requeue(redis, "standard", job_id.encode(), config=config)
    assert await redis.zscore(route.queue, job_id) == 5


async def test_delete_drops_the_dead_letter_and_its_record(redis: Redis, config: QuotaConfig) -> None:
    job_id = await bury_job(redis, config, "acme", "gone", b"\x80not json{")
    pool = route_tenant(config, "acme").pool
    letter = await dead_letters.delete(redis, pool, job_id.encode())
    assert letter.id == job_id
    assert not await redis.hexists(keys.dead_letters(pool), job_id)  # type: ignore[misc]
    for gone in (jobs.job_key(job_id), keys.job_attempt(job_id), jobs.retry_key(job_id)):
        assert not await redis.exists(gone), gone
    assert await redis.exists(jobs.result_key(job_id))  # the job's answer stays until it expires

    await bury(redis, "standard", NON_UTF8, reason="non_utf8_id")
    await redis.set(b"arq:job:" + NON_UTF8, b"junk")
    await dead_letters.delete(redis, "standard", NON_UTF8)
    assert not await redis.exists(b"arq:job:" + NON_UTF8)
    assert await redis.hlen(keys.dead_letters("standard")) == 0  # type: ignore[misc]
    with pytest.raises(DeadLetterNotFound, match=f"job {job_id} is not among the dead letters of pool 'standard'"):
        await dead_letters.delete(redis, "standard", job_id.encode())


# -- the CLI, as a subprocess ------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentworker", "dead-letters", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60)


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    assert proc.returncode == code, proc
    assert proc.stderr.startswith("agentworker: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.slow
async def test_cli_lists_requeues_and_deletes(redis: Redis, redis_url: str, quota_file: Path,
                                              config: QuotaConfig) -> None:
    env = worker_env(redis_url, AGENTWORKER_CONFIG=str(quota_file))
    broken = await bury_job(redis, config, "acme", "broken", b"\x80not json{")
    await bury(redis, "standard", NON_UTF8, reason="non_utf8_id", detail="the job id is not UTF-8 " + "x" * 100,
               ts=int(time.time() * 1000) - 3_600_000)
    await bury(redis, "premium", b"vip:echo:1", reason="missing_record")

    listed = await asyncio.to_thread(_cli, "list", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["POOL", "ID", "REASON", "AGE", "DETAIL"]
    odd = next(line for line in lines if "non_utf8_id" in line)
    assert f"hex:{NON_UTF8.hex()}" in odd and " 60m " in odd and odd.endswith("…")
    assert any(line.startswith("premium") and "vip:echo:1" in line for line in lines)
    assert lines[-1] == "3 dead letter(s): 1 in pool premium, 2 in pool standard"

    as_json = await asyncio.to_thread(_cli, "list", "--pool", "standard", "--json", env=env)
    document = json.loads(as_json.stdout)
    assert document["total"] == {"standard": 2}
    assert {d["id"] for d in document["dead_letters"]} == {broken, f"hex:{NON_UTF8.hex()}"}

    # Refused while the record is broken: one line, exit 1, nothing moved.
    refused = await asyncio.to_thread(_cli, "requeue", broken, env=env)
    _one_line_error(refused, 1, f"job {broken}'s record arq:job:{broken} is still unreadable (bad_record")
    await redis.set(jobs.job_key(broken), good_record("acme"))
    requeued = await asyncio.to_thread(_cli, "requeue", broken, env=env)
    route = route_tenant(config, "acme")
    assert requeued.returncode == 0, requeued.stderr
    assert requeued.stdout.startswith(f"job {broken} requeued on {route.queue} (pool standard)")
    assert await redis.zscore(route.queue, broken) == 1_000.0

    not_utf8 = await asyncio.to_thread(_cli, "requeue", f"hex:{NON_UTF8.hex()}", env=env)
    _one_line_error(not_utf8, 1, "has an id that is not UTF-8")
    deleted = await asyncio.to_thread(_cli, "delete", f"hex:{NON_UTF8.hex()}", "--pool", "standard", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted from the dead letters of pool standard" in deleted.stdout
    assert not await redis.hexists(keys.dead_letters("standard"), NON_UTF8)  # type: ignore[misc]

    empty = await asyncio.to_thread(_cli, "list", "--pool", "standard", env=env)
    assert empty.stdout.strip() == "0 dead letter(s): 0 in pool standard"


@pytest.mark.slow
async def test_cli_errors_are_one_line(redis: Redis, redis_url: str, quota_file: Path,
                                       write_quotas: Callable[..., Path]) -> None:
    env = worker_env(redis_url, AGENTWORKER_CONFIG=str(quota_file))
    await bury(redis, "standard", b"acme:echo:twice")
    await bury(redis, "premium", b"acme:echo:twice")
    cases = [
        (("requeue", "acme:echo:nope"), 1, "job acme:echo:nope is not among the dead letters of any pool "
                                           "(premium, standard)"),
        (("delete", "acme:echo:nope", "--pool", "premium"), 1,
         "job acme:echo:nope is not among the dead letters of pool 'premium'"),
        (("delete", "acme:echo:twice"), 2, "is among the dead letters of pools premium, standard; say which"),
        (("list", "--pool", "gold"), 2, "unknown pool 'gold': the quota file has premium, standard"),
        (("list", "--limit", "0"), 2, "--limit must be at least 1"),
    ]
    for args, code, message in cases:
        _one_line_error(await asyncio.to_thread(_cli, *args, env=env), code, message)
    # --config before the action is honoured (not reset by the action's parser).
    solo = write_quotas({"default_pool": "solo", "pools": {"solo": {"shards": 1}}}, name="solo.yaml")
    before = await asyncio.to_thread(_cli, "--config", str(solo), "list", "--pool", "standard",
                                     env=worker_env(redis_url))
    _one_line_error(before, 2, "unknown pool 'standard': the quota file has solo")
    down = worker_env("redis://127.0.0.1:1/0", AGENTWORKER_CONFIG=str(quota_file))
    _one_line_error(await asyncio.to_thread(_cli, "list", env=down), 1, "cannot reach Redis")


# -- a real worker -----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_repaired_dead_letter_runs_after_requeue(redis: Redis, redis_url: str, quota_file: Path,
                                                         config: QuotaConfig, spawn_worker: Any) -> None:
    worker = spawn_worker(quota_file)
    await worker.wait_serving()
    route = route_tenant(config, "acme")
    job_id = "acme:echo:repaired"
    await redis.set(jobs.job_key(job_id), b"\x80not json{", px=60_000)
    await redis.zadd(route.queue, {job_id: int(time.time() * 1000)})

    # The worker moves it and then writes its failed result: wait for both before requeueing.
    await wait_for(lambda: redis.exists(jobs.result_key(job_id)), 20, what="the job to be dead-lettered")
    assert await redis.hexists(keys.dead_letters(route.pool), job_id)  # type: ignore[misc]
    assert await redis.zscore(route.queue, job_id) is None

    await redis.set(jobs.job_key(job_id), good_record("acme", "repaired"), px=60_000)
    env = worker_env(redis_url, AGENTWORKER_CONFIG=str(quota_file))
    requeued = await asyncio.to_thread(_cli, "requeue", job_id, env=env)
    assert requeued.returncode == 0, requeued.stderr
    async with make_client(redis_url, quota_file) as client:
        assert await client.job(job_id).result(timeout=20) == "repaired"
    assert not await redis.hexists(keys.dead_letters(route.pool), job_id)  # type: ignore[misc]
    assert worker.proc.poll() is None


# -- the supervisor's /status --------------------------------------------------------------------------


@pytest.fixture
def supervisors(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


@pytest.mark.slow
async def test_status_counts_dead_letters_per_pool(redis: Redis, redis_url: str,
                                                   write_quotas: Callable[..., Path],
                                                   supervisors: Callable[..., SupervisorProcess]) -> None:
    quotas = {**BASIC_QUOTAS, "pools": {name: {**pool, "shards": 1} for name, pool in BASIC_QUOTAS["pools"].items()}}
    sup = supervisors(write_quotas(quotas))
    await sup.wait_up()
    await bury(redis, "standard", b"acme:echo:a")
    await bury(redis, "standard", NON_UTF8, reason="non_utf8_id")
    status = await sup.wait_status(lambda s: s.get("dead_letters", {}).get("standard") == 2, 20,
                                   what="/status to count the dead letters")
    assert status["dead_letters"] == {"premium": 0, "standard": 2}
    assert {"supervisor", "pools", "processes", "queues", "tenants"} <= set(status)  # the keys it had stay
    samples = await sup.metrics()
    assert samples[("agentworker_dead_letter_entries", frozenset({("pool", "standard")}))] == 2

    table = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "agentworker", "status", "--url", sup.url], capture_output=True,
        text=True, env=worker_env(redis_url), cwd=ROOT, timeout=60)
    assert table.returncode == 0, table.stderr
    header = next(line for line in table.stdout.splitlines() if line.startswith("POOL") and "DEAD" in line)
    dead_column = header.index("DEAD")
    standard = next(line for line in table.stdout.splitlines() if line.startswith("standard "))
    assert standard[dead_column:].split()[0] == "2"
    assert "2 dead letter(s): see `agentworker dead-letters list`" in table.stdout

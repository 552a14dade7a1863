"""Hostile or mistaken jobs are refused with one sentence, never with a stray exception.

Deeply nested JSON, payload keys the envelope reserves, a payload that is not a dict: refused at
enqueue with :class:`InvalidJob`, and by the worker's decoder as a rejected job (``JobRejected``, with
``job_rejected`` and ``job_failed`` events), the worker going on."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker import jobs
from agentworker.client import JobFailed
from agentworker.config import load_config
from agentworker.jobs import MAX_PAYLOAD_DEPTH, REJECT_TASK, InvalidJob, UnreadableJob, WorkerJobDecoder
from agentworker.routing import route_tenant
from agentworker.tasks.context import JobContext
from agentworker.tasks.registry import TaskRegistry
from tests.conftest import make_client

DECODE = WorkerJobDecoder({"echo"})
NOW = 1_767_225_600_000


def nested(levels: int) -> Any:
    """``levels`` levels of arrays and objects, alternating: nested(1) == []."""
    value: Any = []
    for level in range(levels - 1):
        value = {"n": value} if level % 2 else [value]
    return value


def deep_record(levels: int) -> bytes:
    """A job record whose payload (the object, then its ``message`` arrays) nests ``levels`` levels,
    written without Python's recursive encoder."""
    return (b'{"t":null,"f":"echo","a":[],"k":{"tenant_id":"acme","message":' + b"[" * (levels - 1)
            + b"]" * (levels - 1) + b'},"et":' + str(NOW).encode() + b"}")


def rejected_reason(decoded: dict[str, Any]) -> str:
    assert decoded["f"] == REJECT_TASK, decoded
    reason: str = decoded["k"]["reason"]
    return reason


def test_nesting_is_measured_without_recursion() -> None:
    assert jobs.nesting_depth("x") == 0 and jobs.nesting_depth({}) == 1 and jobs.nesting_depth([[{}]]) == 3
    assert jobs.nesting_depth(nested(MAX_PAYLOAD_DEPTH)) == MAX_PAYLOAD_DEPTH
    assert jobs.nesting_depth(nested(100_000)) == MAX_PAYLOAD_DEPTH + 1  # stops counting past the limit
    loop: dict[str, Any] = {}
    loop["self"] = loop
    assert jobs.nesting_depth(loop) == MAX_PAYLOAD_DEPTH + 1


def test_the_decoder_refuses_json_nested_100k_levels_deep_without_raising() -> None:
    raw = deep_record(100_000)
    decoded = DECODE(raw)  # json.loads alone raises RecursionError here
    assert rejected_reason(decoded) == (f"job nests objects or arrays deeper than the {MAX_PAYLOAD_DEPTH}-level "
                                        f"limit")
    # Just over the limit the record parses, and the payload is refused with its task and tenant known.
    over = DECODE(deep_record(MAX_PAYLOAD_DEPTH + 1))
    assert rejected_reason(over) == f"payload nests objects or arrays deeper than the {MAX_PAYLOAD_DEPTH}-level limit"
    assert over["k"]["task"] == "echo" and over["k"]["payload_tenant_id"] == "acme"
    at_limit = DECODE(deep_record(MAX_PAYLOAD_DEPTH))
    assert at_limit["f"] == "echo"


def test_the_decoder_refuses_reserved_payload_keys() -> None:
    for key in ("arq_ctx", "ctx", "_private", "__class__"):
        record = jobs.encode_job("echo", {"tenant_id": "acme", key: 1}, NOW)
        assert rejected_reason(DECODE(record)) == (
            f"payload key {key!r} is reserved (ctx, arq_ctx and names starting with '_' belong to the job "
            f"envelope); rename it")
    assert DECODE(jobs.encode_job("echo", {"tenant_id": "acme", "context": 1, "a_b": 2}, NOW))["f"] == "echo"


def test_structural_problems_still_go_to_the_dead_letters() -> None:
    for raw, reason in [(b"\x80not json", "bad_record"), (b"[]", "bad_record"),
                        (b'{"f": 1, "k": {}}', "bad_field")]:
        with pytest.raises(UnreadableJob) as info:
            DECODE(raw)
        assert info.value.reason == reason


def test_check_payload_refuses_in_one_sentence() -> None:
    loop: dict[str, Any] = {"tenant_id": "acme"}
    loop["self"] = loop
    cases: list[tuple[Any, str]] = [
        (["a", "list"], "payload must be a JSON object (a dict), not list"),
        ({"tenant_id": "acme", "arq_ctx": {}}, "payload key 'arq_ctx' is reserved"),
        ({"tenant_id": "acme", "_hidden": 1}, "payload key '_hidden' is reserved"),
        ({"tenant_id": "acme", "x": nested(MAX_PAYLOAD_DEPTH)}, f"deeper than the {MAX_PAYLOAD_DEPTH}-level limit"),
        ({"tenant_id": "acme", "x": nested(100_000)}, f"deeper than the {MAX_PAYLOAD_DEPTH}-level limit"),
        (loop, "payload is not JSON-serializable: Circular reference detected"),
    ]
    for payload, message in cases:
        with pytest.raises(InvalidJob) as info:
            jobs.check_payload(payload, "acme")
        assert message in str(info.value), str(info.value)
    jobs.check_payload({"tenant_id": "acme", "x": nested(MAX_PAYLOAD_DEPTH - 1)}, "acme")


async def test_enqueue_refuses_a_payload_that_is_not_a_dict(redis: Redis, redis_url: str, quota_file: Path) -> None:
    async with make_client(redis_url, quota_file) as client:
        for payload, name in ((["a"], "list"), ("text", "str"), (b"{}", "bytes")):
            with pytest.raises(InvalidJob, match=f"^payload must be a dict of the task's keyword arguments "
                                                 f"\\(a JSON object\\), not {name}$"):
                await client.enqueue("echo", "acme", payload=payload)  # type: ignore[arg-type]
        for defer, message in (("5", "not str"), (True, "not bool"), (float("nan"), "finite")):
            with pytest.raises(InvalidJob, match=message):
                await client.enqueue("echo", "acme", payload={"message": "x"}, defer=defer)  # type: ignore[arg-type]
        with pytest.raises(InvalidJob, match="'ctx' is reserved"):
            await client.enqueue("echo", "acme", payload={"ctx": 1})
    assert await redis.dbsize() == 0, "nothing was written"


def test_a_task_cannot_declare_a_reserved_parameter() -> None:
    registry = TaskRegistry()

    async def fine(ctx: JobContext, tenant_id: str, **extra: Any) -> None: ...

    async def private(ctx: JobContext, tenant_id: str, _secret: str = "") -> None: ...

    async def envelope(context: JobContext, tenant_id: str, arq_ctx: str = "") -> None: ...

    registry.register(fine)
    for func, name in ((private, "_secret"), (envelope, "arq_ctx")):
        with pytest.raises(ValueError, match=f"has a parameter '{name}', a reserved payload name"):
            registry.register(func)


@pytest.mark.slow
async def test_the_worker_rejects_hostile_jobs_with_events_and_goes_on(
        redis: Redis, redis_url: str, quota_file: Path, spawn_worker: Any) -> None:
    worker = spawn_worker(quota_file)
    await worker.wait_serving()
    route = route_tenant(load_config(quota_file), "acme")
    now = int(time.time() * 1000)
    hostile = {
        "acme:echo:deep": (deep_record(100_000), "job nests objects or arrays deeper than the 64-level limit"),
        "acme:echo:deep65": (deep_record(MAX_PAYLOAD_DEPTH + 1),
                             "payload nests objects or arrays deeper than the 64-level limit"),
        "acme:echo:arqctx": (jobs.encode_job("echo", {"tenant_id": "acme", "arq_ctx": {"job_id": "x"}}, now),
                             "payload key 'arq_ctx' is reserved"),
        "acme:echo:ctx": (jobs.encode_job("echo", {"tenant_id": "acme", "ctx": 1}, now),
                          "payload key 'ctx' is reserved"),
        "acme:echo:underscore": (jobs.encode_job("echo", {"tenant_id": "acme", "_runtime": 1}, now),
                                 "payload key '_runtime' is reserved"),
    }
    for job_id, (record, _reason) in hostile.items():  # a plain ARQ producer's way in: the shard's inbox
        await redis.set(jobs.job_key(job_id), record, px=60_000)
        await redis.zadd(route.queue, {job_id: now})
    async with make_client(redis_url, quota_file) as client:
        for job_id, (_record, reason) in hostile.items():
            with pytest.raises(JobFailed) as info:
                await client.job(job_id).result(timeout=20)
            assert info.value.error == "JobRejected" and reason in info.value.message, (job_id, info.value)
        good = await client.enqueue("echo", tenant_id="acme", payload={"message": "still serving"})
        assert await good.result(timeout=20) == "still serving"
        rejected: dict[str, str] = {}
        failed: set[str] = set()
        async for event in client.events("acme", since="0", block_ms=200):
            if event.event == "job_rejected":
                rejected[event.data["job_id"]] = event.data["reason"]
            elif event.event == "job_failed" and event.data["reason"] == "rejected":
                failed.add(event.data["job_id"])
            elif event.event == "job_completed":
                break
    assert set(rejected) == failed == set(hostile)
    assert all(hostile[job_id][1] in reason for job_id, reason in rejected.items())
    assert worker.proc.poll() is None
    log = worker.log()
    assert "RecursionError" not in log and "Traceback" not in log

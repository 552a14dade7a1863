"""Tripwire: fails loudly if the pinned ARQ changes what agentworker relies on (formats, names, keys)."""

from __future__ import annotations

import importlib
import inspect

import arq
import arq.constants
from arq.jobs import deserialize_job_raw, serialize_job, serialize_result
from arq.worker import Function, Retry, func

from agentworker import jobs
from agentworker.pools.arq_internals import ARQ_NAMES_RELIED_ON


def test_arq_version_is_the_pinned_minor() -> None:
    assert arq.VERSION.startswith("0.28."), f"arq {arq.VERSION}: re-check pools/arq_internals.py"


def test_every_name_we_rely_on_exists() -> None:
    for dotted in ARQ_NAMES_RELIED_ON:
        module, _, name = dotted.rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"{dotted} is gone from arq {arq.VERSION}"


async def _noop(ctx: dict[str, object]) -> None:
    return None


def test_function_and_retry_carry_what_the_job_loop_reads() -> None:
    function = func(_noop, name="noop", timeout=5, keep_result=7, max_tries=2)
    assert isinstance(function, Function)
    assert (function.name, function.timeout_s, function.keep_result_s, function.max_tries) == ("noop", 5, 7, 2)
    assert function.keep_result_forever is None and function.coroutine is _noop
    assert Retry(defer=2).defer_score == 2000
    assert Retry().defer_score is None
    assert list(inspect.signature(serialize_result).parameters)[:12] == [
        "function", "args", "kwargs", "job_try", "enqueue_time_ms", "success", "result", "start_ms", "finished_ms",
        "ref", "queue_name", "job_id"]


def test_key_prefixes_and_record_format() -> None:
    assert arq.constants.job_key_prefix == "arq:job:"
    assert arq.constants.in_progress_key_prefix == "arq:in-progress:"
    assert arq.constants.result_key_prefix == "arq:result:"
    assert arq.constants.retry_key_prefix == "arq:retry:"
    assert arq.constants.abort_jobs_ss == "arq:abort"
    # Our enqueue script writes what ARQ's own serializer would, and ARQ reads it back.
    ours = jobs.encode_job("echo", {"tenant_id": "t", "message": "m"}, 123)
    theirs = serialize_job("echo", (), {"tenant_id": "t", "message": "m"}, None, 123, serializer=jobs.dumps)
    assert jobs.loads(ours) == jobs.loads(theirs)
    assert deserialize_job_raw(ours, deserializer=jobs.loads) == ("echo", [], {"tenant_id": "t", "message": "m"},
                                                                  None, 123)
    result = serialize_result("echo", (), {}, 1, 1, False, ValueError("x"), 2, 3, "ref", "q", "id",
                              serializer=jobs.dumps)
    assert result is not None
    assert jobs.loads(result)["r"] == {"error": "ValueError", "message": "x"}

"""Tripwire: fails loudly if the pinned ARQ changes what agentworker/pools/arq_internals.py relies on."""

from __future__ import annotations

import inspect

import arq
import arq.constants
from arq.jobs import deserialize_job_raw, serialize_job, serialize_result
from arq.worker import Worker

from agentworker import jobs
from agentworker.pools.arq_internals import ARQ_WORKER_ATTRIBUTES, ShardWorker


def test_arq_version_is_the_pinned_minor() -> None:
    assert arq.VERSION.startswith("0.28."), f"arq {arq.VERSION}: re-check pools/arq_internals.py"


async def _noop(ctx: dict[str, object]) -> None:
    return None


async def test_worker_attributes_we_rely_on_exist() -> None:
    worker = Worker(functions=[_noop], redis_pool=None, queue_name="q", handle_signals=False)
    for name in ARQ_WORKER_ATTRIBUTES:
        assert hasattr(worker, name), f"arq.Worker has no {name!r} any more"
    assert worker.job_counter == 0
    assert worker.allow_pick_jobs is True
    assert isinstance(worker.tasks, dict)


def test_overridden_methods_keep_their_signatures() -> None:
    assert list(inspect.signature(Worker.run_job).parameters) == ["self", "job_id", "score"]
    assert list(inspect.signature(Worker.start_jobs).parameters) == ["self", "job_ids"]
    assert list(inspect.signature(Worker._poll_iteration).parameters) == ["self"]
    assert list(inspect.signature(Worker.main).parameters) == ["self"]
    for name in ("main", "_poll_iteration", "start_jobs"):
        assert getattr(ShardWorker, name) is not getattr(Worker, name)


def test_key_prefixes_and_record_format() -> None:
    assert arq.constants.job_key_prefix == "arq:job:"
    assert arq.constants.in_progress_key_prefix == "arq:in-progress:"
    assert arq.constants.result_key_prefix == "arq:result:"
    assert arq.constants.retry_key_prefix == "arq:retry:"
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

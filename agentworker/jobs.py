"""Job ids and the JSON wire format of jobs and results.

Jobs are ARQ jobs serialized as JSON, never pickle: a pickle read from Redis is code execution for
whoever can write to Redis. The record keeps ARQ's field names so a stock ARQ worker could read it:

    job     {"t": try, "f": task, "a": [], "k": payload, "et": enqueue_ms}
    result  job fields + {"s": success, "r": result, "st": start_ms, "ft": finish_ms, "q": queue, "id": id}

A failed job's ``r`` is ``{"error": "<ExceptionClass>", "message": "..."}``.

Job ids are ``{tenant_id}:{task}:{idempotency_key}``, so enqueuing the same key twice is a no-op and
ids never collide across tenants in ARQ's database-global job keys.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix

from agentworker.errors import AgentWorkerError
from agentworker.routing import validate_tenant_id

TASK_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.]{0,63}$")
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces
DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576

#: Name under which the worker runs jobs it must refuse (see :class:`WorkerJobDecoder`).
REJECT_TASK = "_agentworker_reject"
#: Payload keys no job may carry: the envelope's own parameter names (ARQ's context reaches the job
#: function as ``arq_ctx``, the task's as ``ctx``), and every name starting with ``_``, kept for the
#: envelope. A payload with one is refused before any task runs (:func:`reserved_payload_key`).
RESERVED_PAYLOAD_KEYS = frozenset({"ctx", "arq_ctx"})
#: How deeply objects and arrays may nest in a payload (the payload object itself is level 1). Deeper
#: JSON is refused at enqueue and by the worker: parsing and re-encoding it recurses once per level, and
#: ~1,000 levels exhaust Python's stack (a RecursionError, not a readable refusal).
MAX_PAYLOAD_DEPTH = 64


def job_key(job_id: str) -> str:
    """ARQ's key holding the job record (global per Redis database)."""
    return job_key_prefix + job_id


def result_key(job_id: str) -> str:
    return result_key_prefix + job_id


def in_progress_key(job_id: str) -> str:
    return in_progress_key_prefix + job_id


def retry_key(job_id: str) -> str:
    return retry_key_prefix + job_id


class JobDeferred(Exception):
    """Raised inside a job that must wait for a resource (a tenant's LLM token budget): the job goes back
    to its queue, due in ``retry_after_s`` seconds, without spending a try, and is counted as deferred.
    Nothing of the run is reported as failed. Outside the :class:`AgentWorkerError` tree on purpose: a
    step's or a tool's ``except AgentWorkerError`` must not swallow it."""

    def __init__(self, message: str, retry_after_s: float, *, reason: str = "deferred") -> None:
        self.retry_after_s = max(0.0, float(retry_after_s))
        self.reason = reason
        super().__init__(message)


class JobCancelled(AgentWorkerError):
    """The job was cancelled on request (:func:`agentworker.job_control.cancel_job`): it ends for good,
    with this error in its result, a ``job_cancelled`` event and no retry. Raised inside a task (a
    workflow about to start its next step) when it finds its cancel requested; the worker also ends a
    running job this way by cancelling its asyncio task. Not the cancellation of a worker that is
    stopping, which re-queues the job."""


class InvalidJob(AgentWorkerError, ValueError):
    """A job that cannot be enqueued as given (bad task name, key, or payload)."""


@dataclass(frozen=True, slots=True)
class JobId:
    tenant_id: str
    task: str
    key: str

    def __str__(self) -> str:
        return f"{self.tenant_id}:{self.task}:{self.key}"

    @classmethod
    def parse(cls, job_id: str) -> JobId:
        parts = job_id.split(":", 2)
        if len(parts) != 3 or not all(parts):
            raise InvalidJob(f"job id {job_id!r} is not of the form tenant:task:key")
        return cls(tenant_id=parts[0], task=parts[1], key=parts[2])


def validate_task_name(task: object) -> str:
    if not isinstance(task, str) or not TASK_NAME_RE.fullmatch(task):
        raise InvalidJob(f"invalid task name {task!r}: must match {TASK_NAME_RE.pattern}")
    return task


def make_job_id(tenant_id: str, task: str, idempotency_key: str | None = None) -> JobId:
    """Build the job id; a random key (a UUID) when the caller gives none."""
    validate_tenant_id(tenant_id)
    validate_task_name(task)
    key = uuid.uuid4().hex if idempotency_key is None else idempotency_key
    if not isinstance(key, str) or not IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise InvalidJob(
            f"invalid idempotency key {key!r}: must be 1-200 printable ASCII characters without spaces"
        )
    return JobId(tenant_id=tenant_id, task=task, key=key)


def _encode_default(value: Any) -> Any:
    if isinstance(value, BaseException):
        return error_record(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def error_record(exc: BaseException) -> dict[str, str]:
    return {"error": type(exc).__name__, "message": str(exc) or type(exc).__name__}


def dumps(data: Any) -> bytes:
    """The JSON serializer handed to ARQ for jobs and results."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=_encode_default).encode()


def loads(raw: bytes | str) -> Any:
    """The strict JSON deserializer (clients reading results)."""
    return json.loads(raw)


def encode_job(task: str, payload: dict[str, Any], enqueue_time_ms: int, job_try: int | None = None) -> bytes:
    """Serialize a job record exactly as ARQ's ``serialize_job`` would with :func:`dumps`."""
    return dumps({"t": job_try, "f": task, "a": [], "k": payload, "et": enqueue_time_ms})


def reserved_payload_key(payload: dict[str, Any]) -> str | None:
    """The first key of ``payload`` that :data:`RESERVED_PAYLOAD_KEYS` or a leading ``_`` reserves."""
    for key in payload:
        if key in RESERVED_PAYLOAD_KEYS or (isinstance(key, str) and key.startswith("_")):
            return str(key)
    return None


def _reserved_key_reason(key: str) -> str:
    return (f"payload key {key!r} is reserved (ctx, arq_ctx and names starting with '_' belong to the job "
            f"envelope); rename it")


def _depth_reason(what: str) -> str:
    return f"{what} nests objects or arrays deeper than the {MAX_PAYLOAD_DEPTH}-level limit"


def nesting_depth(value: Any, stop_after: int = MAX_PAYLOAD_DEPTH) -> int:
    """How deeply objects (dicts) and arrays (lists) nest in ``value``: 0 for a scalar, 1 for ``{}``.

    Iterative, so it is safe on any depth; it stops counting past ``stop_after`` (returning
    ``stop_after + 1``), which also ends it on a self-referencing structure.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if level > stop_after:
            return level
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def nests_too_deeply(value: Any, encoded: bytes) -> bool:
    """Whether ``value`` (parsed from, or encoded as, the JSON ``encoded``) nests deeper than
    :data:`MAX_PAYLOAD_DEPTH`."""
    # Cheap upper bound first: fewer opening brackets than the limit, even counting those inside strings,
    # cannot nest past it; so a typical payload is never walked.
    if encoded.count(b"{") + encoded.count(b"[") <= MAX_PAYLOAD_DEPTH:
        return False
    return nesting_depth(value) > MAX_PAYLOAD_DEPTH


def check_payload(payload: Any, tenant_id: str, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> bytes:
    """Validate a payload for enqueue; return its JSON encoding (used only for its size)."""
    if not isinstance(payload, dict):
        raise InvalidJob(f"payload must be a JSON object (a dict), not {type(payload).__name__}")
    if "tenant_id" in payload and payload["tenant_id"] != tenant_id:
        raise InvalidJob(f"payload tenant_id {payload['tenant_id']!r} does not match tenant {tenant_id!r}")
    reserved = reserved_payload_key(payload)
    if reserved is not None:
        raise InvalidJob(_reserved_key_reason(reserved))
    try:
        encoded = dumps(payload)
    except RecursionError:
        raise InvalidJob(_depth_reason("payload")) from None
    except (TypeError, ValueError) as exc:
        raise InvalidJob(f"payload is not JSON-serializable: {exc}") from None
    if len(encoded) > max_bytes:
        raise InvalidJob(f"payload is {len(encoded)} bytes, over the {max_bytes}-byte limit")
    if nests_too_deeply(payload, encoded):
        raise InvalidJob(_depth_reason("payload"))
    return encoded


class UnreadableJob(ValueError):
    """A queue entry that is not a job this service can read; it goes to the dead letters.

    ``reason`` is one of :data:`agentworker.job_leases.DEAD_LETTER_REASONS`; ``detail`` says what is wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


#: the largest try number and enqueue time (ms; year 5138) a record may carry
_MAX_TRY = 1_000_000
_MAX_TIME_MS = 10**14


class WorkerJobDecoder:
    """The worker's job deserializer.

    A record that is not an ARQ job at all (not JSON, not an object, no ``f``/``k``, a field of the wrong
    type or out of range) raises :class:`UnreadableJob`: the worker moves it to the dead letters. A
    readable job the worker must refuse (unknown task, positional arguments, no tenant, a reserved
    payload key, too large, nested deeper than :data:`MAX_PAYLOAD_DEPTH`) is decoded as a call to
    :data:`REJECT_TASK` with the reason, which fails it through our envelope: logged with tenant and job
    id, reported as events (the tenant is the job id's), and the worker moves on. Nothing else ever
    leaves the decoder: not even JSON nested too deeply for Python's parser (a RecursionError), which is
    refused like a job too large to read.
    """

    def __init__(self, known_tasks: set[str], max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.known_tasks = known_tasks
        self.max_payload_bytes = max_payload_bytes

    def __call__(self, raw: bytes) -> dict[str, Any]:
        if len(raw) > self.max_payload_bytes + 1024:
            return self._reject(f"job is {len(raw)} bytes, over the {self.max_payload_bytes}-byte payload limit")
        try:
            record = json.loads(raw)
        except RecursionError:
            return self._reject(_depth_reason("job"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UnreadableJob("bad_record", f"job record is not valid JSON ({exc.__class__.__name__}: {exc})") \
                from None
        if not isinstance(record, dict) or not {"f", "k"} <= record.keys():
            raise UnreadableJob("bad_record", "job record is not an ARQ job object with 'f' and 'k'")
        task, kwargs, job_try, et = record["f"], record["k"], record.get("t"), record.get("et", 0)
        if not isinstance(task, str):
            raise UnreadableJob("bad_field", f"job field 'f' (the task) is {type(task).__name__}, not a string")
        if not isinstance(kwargs, dict):
            raise UnreadableJob("bad_field", "job field 'k' (the payload) is not a JSON object")
        if job_try is not None and (not _is_int(job_try) or not 0 <= job_try <= _MAX_TRY):
            raise UnreadableJob("bad_field", f"job field 't' (the try) is {job_try!r}, not null or an integer "
                                             f"from 0 to {_MAX_TRY}")
        if et is None:
            et = 0
        if not _is_int(et) or not 0 <= et <= _MAX_TIME_MS:
            raise UnreadableJob("bad_field", f"job field 'et' (the enqueue time) is {et!r}, not an integer "
                                             f"number of milliseconds from 0 to {_MAX_TIME_MS}")
        if record.get("a"):
            return self._reject("positional arguments are not supported; send a payload object", et, task)
        if task not in self.known_tasks or task == REJECT_TASK:
            return self._reject(f"unknown task {task!r}", et, task, kwargs)
        if "tenant_id" not in kwargs:
            return self._reject("payload has no tenant_id", et, task, kwargs)
        reserved = reserved_payload_key(kwargs)
        if reserved is not None:
            return self._reject(_reserved_key_reason(reserved), et, task, kwargs)
        if nests_too_deeply(kwargs, raw):
            return self._reject(_depth_reason("payload"), et, task, kwargs)
        return {"t": job_try, "f": task, "a": [], "k": kwargs, "et": et}

    @staticmethod
    def _reject(reason: str, enqueue_ms: int = 0, task: Any = None,
                kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        tenant = kwargs.get("tenant_id") if kwargs else None
        return {"t": None, "f": REJECT_TASK, "a": [],
                "k": {"reason": reason, "task": task if isinstance(task, str) else None,
                      "payload_tenant_id": tenant if isinstance(tenant, str) else None},
                "et": enqueue_ms}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

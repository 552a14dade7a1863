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

from agentworker.routing import validate_tenant_id

TASK_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.]{0,63}$")
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces
DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576

#: Name under which the worker runs jobs it must refuse (see :class:`WorkerJobDecoder`).
REJECT_TASK = "_agentworker_reject"


def job_key(job_id: str) -> str:
    """ARQ's key holding the job record (global per Redis database)."""
    return job_key_prefix + job_id


def result_key(job_id: str) -> str:
    return result_key_prefix + job_id


def in_progress_key(job_id: str) -> str:
    return in_progress_key_prefix + job_id


def retry_key(job_id: str) -> str:
    return retry_key_prefix + job_id


class InvalidJob(ValueError):
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


def check_payload(payload: Any, tenant_id: str, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> bytes:
    """Validate a payload for enqueue; return its JSON encoding (used only for its size)."""
    if not isinstance(payload, dict):
        raise InvalidJob(f"payload must be a JSON object, not {type(payload).__name__}")
    if "tenant_id" in payload and payload["tenant_id"] != tenant_id:
        raise InvalidJob(f"payload tenant_id {payload['tenant_id']!r} does not match tenant {tenant_id!r}")
    try:
        encoded = dumps(payload)
    except (TypeError, ValueError) as exc:
        raise InvalidJob(f"payload is not JSON-serializable: {exc}") from None
    if len(encoded) > max_bytes:
        raise InvalidJob(f"payload is {len(encoded)} bytes, over the {max_bytes}-byte limit")
    return encoded


class WorkerJobDecoder:
    """The worker's job deserializer: it never raises.

    ARQ fails a job it cannot decode, or whose function is unknown, without calling any of our code,
    so the tenant would never hear of it. Instead, anything malformed is decoded as a call to
    :data:`REJECT_TASK` with the reason, which fails the job through our envelope: logged with tenant
    and job id, reported as an event, and the worker moves on.
    """

    def __init__(self, known_tasks: set[str], max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.known_tasks = known_tasks
        self.max_payload_bytes = max_payload_bytes

    def __call__(self, raw: bytes) -> dict[str, Any]:
        if len(raw) > self.max_payload_bytes + 1024:
            return self._reject(f"job is {len(raw)} bytes, over the {self.max_payload_bytes}-byte payload limit")
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._reject(f"job is not valid JSON ({exc.__class__.__name__}: {exc})")
        if not isinstance(record, dict) or not {"f", "k"} <= record.keys():
            return self._reject("job record is not an ARQ job object with 'f' and 'k'")
        et = record.get("et")
        enqueue_ms = et if isinstance(et, int) else 0
        task, kwargs = record["f"], record["k"]
        if not isinstance(kwargs, dict):
            return self._reject("job payload is not a JSON object", enqueue_ms, task)
        if record.get("a"):
            return self._reject("positional arguments are not supported; send a payload object", enqueue_ms, task)
        if not isinstance(task, str) or task not in self.known_tasks or task == REJECT_TASK:
            return self._reject(f"unknown task {task!r}", enqueue_ms, task, kwargs)
        if "tenant_id" not in kwargs:
            return self._reject("payload has no tenant_id", enqueue_ms, task, kwargs)
        return {"t": record.get("t"), "f": task, "a": [], "k": kwargs, "et": enqueue_ms}

    @staticmethod
    def _reject(reason: str, enqueue_ms: int = 0, task: Any = None,
                kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        tenant = kwargs.get("tenant_id") if kwargs else None
        return {"t": None, "f": REJECT_TASK, "a": [],
                "k": {"reason": reason, "task": task if isinstance(task, str) else None,
                      "payload_tenant_id": tenant if isinstance(tenant, str) else None},
                "et": enqueue_ms}

"""Structured logs: one JSON object per line on stdout.

Context (``tenant_id``, ``job_id``, ``pool``, ``slot``, ``pid``) is bound with structlog's contextvars,
so it follows a job's task without being passed around. Values of keys that look like secrets are
masked before rendering, whatever code logged them.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_MARKERS = ("password", "passwd", "secret", "token", "api_key", "apikey", "authorization",
                   "credential")


@functools.lru_cache(maxsize=4096)
def _is_secret_key(key: str) -> bool:
    # Cached: log keys are few and every line checks each of them (this runs twice per job).
    lowered = key.lower()
    return any(marker in lowered for marker in _SECRET_MARKERS)


def _mask_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if _is_secret_key(key):
            event[key] = "***"
    return event


def _drop_arq_job_failures(record: logging.LogRecord) -> bool:
    """ARQ logs every failed job with its traceback; the job envelope has already logged it with the
    tenant and job bound, so the duplicate is dropped. ARQ's other warnings (expired job, max tries
    exceeded) go through."""
    return not (record.name == "arq.worker" and record.levelno >= logging.ERROR and record.exc_info)


def configure_logging(level: str = "info", fmt: str = "json", **bind: Any) -> None:
    """Set up structlog (and the stdlib loggers of ARQ and friends) to write to stdout."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _mask_secrets,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    # ARQ and asyncio log through the stdlib; render them the same way.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.processors.format_exc_info],
    ))
    handler.addFilter(_drop_arq_job_failures)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # ARQ logs every job start and end at INFO; our envelope logs richer lines itself.
    logging.getLogger("arq").setLevel(max(numeric, logging.WARNING))
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(pid=os.getpid(), **bind)


#: what every ``log`` field and parameter holds: structlog's filtering bound logger (``configure_logging``)
Logger = structlog.typing.FilteringBoundLogger


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)

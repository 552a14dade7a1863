"""``agentworker status``: fetch ``/status`` from a running supervisor and print it as tables."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

from agentworker.errors import AgentWorkerError


class StatusUnavailable(AgentWorkerError):
    """The supervisor could not be reached or did not answer with a status document."""


def fetch_status(url: str, timeout: float = 5.0, token: str | None = None) -> dict[str, Any]:
    """``GET {url}/status``, sending ``token`` as the bearer when given (``AGENTWORKER_STATUS_TOKEN`` or
    the admin token: the supervisor takes either)."""
    target = url.rstrip("/") + "/status"
    request = urllib.request.Request(target, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            hint = ("the token sent was refused" if token else
                    "set AGENTWORKER_STATUS_TOKEN (or AGENTWORKER_ADMIN_TOKEN) to the supervisor's token")
            raise StatusUnavailable(f"{target} answered HTTP 401: {hint}") from None
        raise StatusUnavailable(f"{target} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # HTTPException: not HTTP
        reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
        raise StatusUnavailable(f"cannot reach {target}: {reason}") from None
    try:
        document: Any = json.loads(body)
    except ValueError:
        raise StatusUnavailable(f"{target} did not answer JSON") from None
    if not isinstance(document, dict) or "processes" not in document:
        raise StatusUnavailable(f"{target} did not answer an agentworker status document")
    return document


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return lines


def _mb(value: Any) -> str | None:
    return f"{value / 1048576:.0f}M" if isinstance(value, int | float) else None


def render_status(document: dict[str, Any]) -> str:
    sup = document.get("supervisor", {})
    lines = [f"supervisor pid {sup.get('pid')} {sup.get('state')}, up {_cell(sup.get('uptime_s'))}s, "
             f"redis {'ok' if sup.get('redis_ok') else 'DOWN' if sup.get('redis_ok') is False else '?'}, "
             f"config {sup.get('config')} (version {sup.get('config_version')})", ""]
    pools = document.get("pools", {})
    dead = document.get("dead_letters") or {}
    lines += _table(["POOL", "STATUS", "SERVING", "PROCS", "SHARDS", "CONC", "RESTARTS", "DEAD", "REASON"],
                    [[name, p.get("status"), p.get("serving"), p.get("processes"), p.get("shards"),
                      p.get("concurrency"), p.get("restarts"), dead.get(name), p.get("reason")]
                     for name, p in pools.items()])
    dead_total = sum(n for n in dead.values() if isinstance(n, int))
    if dead_total:
        lines.append(f"{dead_total} dead letter(s): see `agentworker dead-letters list`")
    lines.append("")
    rows = []
    for proc in document.get("processes", []):
        last = proc.get("last_exit") or {}
        rows.append([proc.get("pool"), proc.get("slot"), proc.get("role"), proc.get("pid"), proc.get("state"),
                     proc.get("uptime_s"), _mb(proc.get("rss_bytes")), proc.get("jobs_served"), proc.get("running"),
                     proc.get("restarts"), proc.get("backoff_s") or None,
                     f"{last.get('reason')}: {last.get('description')}" if last else None])
    lines += _table(["POOL", "SLOT", "ROLE", "PID", "STATE", "UPTIME", "RSS", "JOBS", "RUNNING", "RESTARTS",
                     "BACKOFF", "LAST EXIT"], rows)
    queues = document.get("queues", {})
    if queues:
        lines.append("")
        lines += _table(["POOL", "SHARD", "READY", "TOTAL"],
                        [[pool, shard, d.get("ready"), d.get("total")]
                         for pool, shards in queues.items() for shard, d in shards.items()])
    tenants = document.get("tenants", {})
    if tenants:
        lines.append("")
        lines += _table(["TENANT", "IN FLIGHT", "MAX CONC", "PENDING", "MAX PENDING", "RATE"],
                        [[t, c.get("in_flight"), c.get("max_concurrency"), c.get("pending"), c.get("max_pending"),
                          c.get("rate_limit")] for t, c in tenants.items()])
    return "\n".join(lines)

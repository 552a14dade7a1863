"""The numbers of a run report: a tenant's workflow runs started in a period, summarised in SQL."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agentworker.db.database import SCHEMA, TenantTransaction

#: failed runs listed one by one in a report (all are counted)
MAX_FAILURES_LISTED = 20


@dataclass(frozen=True, slots=True)
class FailedRun:
    run_id: str
    workflow_id: str
    created_at: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class RunSummary:
    start: datetime
    end: datetime
    counts: dict[str, int]
    #: seconds from start to finish of the finished runs: p50, p90, p99 (interpolated) and max
    durations: dict[str, float] = field(default_factory=dict)
    finished: int = 0
    failures: tuple[FailedRun, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "total": self.total,
                "counts": self.counts, "finished": self.finished, "durations": self.durations,
                "failures": [{"run_id": f.run_id, "workflow_id": f.workflow_id, "reason": f.reason,
                              "created_at": f.created_at.isoformat()} for f in self.failures]}


def _reason(error: Any) -> str:
    if isinstance(error, dict):
        where = f"step {error['step_id']}: " if error.get("step_id") else ""
        return f"{where}{error.get('error', 'Error')}: {error.get('message', '')}".strip().rstrip(":")
    return "unknown error" if error is None else str(error)


async def summarise_runs(tx: TenantTransaction, start: datetime, end: datetime) -> RunSummary:
    """Runs created in ``[start, end)``: counts by status, duration percentiles, the failures' reasons."""
    window = f"FROM {SCHEMA}.workflow_runs WHERE created_at >= $1 AND created_at < $2"
    counts = {r["status"]: int(r["n"]) for r in await tx.fetch(
        f"SELECT status, count(*) AS n {window} GROUP BY status ORDER BY status", start, end)}
    stats = await tx.fetchrow(
        "SELECT count(*) AS n, percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY d) AS p, max(d) AS mx "
        f"FROM (SELECT extract(epoch FROM finished_at - created_at)::float8 AS d {window} "
        "AND finished_at IS NOT NULL) finished", start, end)
    durations: dict[str, float] = {}
    if stats is not None and stats["n"]:
        p50, p90, p99 = stats["p"]
        durations = {"p50": round(p50, 3), "p90": round(p90, 3), "p99": round(p99, 3), "max": round(stats["mx"], 3)}
    failed = await tx.fetch(f"SELECT run_id, workflow_id, created_at, error {window} AND status = 'failed' "
                            "ORDER BY created_at, run_id LIMIT $3", start, end, MAX_FAILURES_LISTED)
    return RunSummary(start=start, end=end, counts=counts, durations=durations,
                      finished=int(stats["n"]) if stats is not None else 0,
                      failures=tuple(FailedRun(str(r["run_id"]), r["workflow_id"], r["created_at"], _reason(r["error"]))
                                     for r in failed))

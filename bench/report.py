"""Bench results: one :class:`Metric` per table row, the table, the targets of issue 6, and the JSON file."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import write_document

#: table columns: agentworker first, then the baselines its ratios are taken against
SYSTEMS = ("agentworker", "arq-default", "arq-tuned", "saq")
BASELINES = ("arq-default", "arq-tuned", "saq")
TITLES = {"agentworker": "agentworker", "arq-default": "ARQ default", "arq-tuned": "ARQ tuned", "saq": "SAQ"}


@dataclass
class Target:
    """A goal for the agentworker value: ``kind`` is ``max`` or ``min`` (an absolute bound),
    ``ratio_min`` / ``ratio_max`` (agentworker / ``against``, where ``against`` is a system key or the
    metric named in ``against_metric``), or ``delta_max`` (agentworker's value minus its value in
    ``against_metric``, at most ``bound``)."""

    kind: str
    bound: float
    against: str | None = None
    against_metric: str | None = None

    def describe(self, unit: str) -> str:
        if self.kind == "max":
            return f"<= {self.bound:g} {unit}"
        if self.kind == "min":
            return f">= {self.bound:g} {unit}"
        other = TITLES.get(self.against or "", self.against_metric or "")
        if self.kind == "delta_max":
            return f"<= {other} + {self.bound:g} {unit}"
        return f"{'>=' if self.kind == 'ratio_min' else '<='} {self.bound:g}x {other}"


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    better: str  # "higher", "lower", or "closer" (to a value the label names)
    values: dict[str, float | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # e.g. "partial: 612/5000 in 30 s", "> 10 s"
    targets: list[Target] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def ratio(self, baseline: str) -> float | None:
        ours, theirs = self.values.get("agentworker"), self.values.get(baseline)
        if ours is None or theirs is None or theirs == 0:
            return None
        return ours / theirs


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "mean": statistics.fmean(values), "max": max(values), "min": min(values)}


def check_targets(metrics: dict[str, Metric]) -> list[dict[str, Any]]:
    """Each target with the measured figure and whether it is met."""
    checks = []
    for metric in metrics.values():
        ours = metric.values.get("agentworker")
        for target in metric.targets:
            if target.against is not None and target.against not in metric.values:
                continue  # that baseline was not run
            if target.kind in ("max", "min"):
                measured = ours
            elif target.against_metric is not None:
                other = metrics.get(target.against_metric)
                theirs = other.values.get("agentworker") if other else None
                if target.kind == "delta_max":
                    measured = ours - theirs if ours is not None and theirs is not None else None
                else:
                    measured = ours / theirs if ours is not None and theirs else None
            else:
                measured = metric.ratio(target.against or "")
            at_most = target.kind in ("max", "ratio_max", "delta_max")
            met = None if measured is None else (measured <= target.bound if at_most else measured >= target.bound)
            checks.append({"metric": metric.key, "label": metric.label, "target": target.describe(metric.unit),
                           "measured": measured, "met": met})
    return checks


def _fmt(value: float | None, note: str | None = None) -> str:
    if note and value is None:
        return note
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return f"{text} ({note})" if note else text


def _ratio(r: float | None) -> str:
    """Two decimals; a ratio below 0.01 with two significant digits (0.0015, 0.000072), not 0.00."""
    if r is None:
        return "-"
    if 0 < r < 0.01:
        return f"{float(f'{r:.2g}'):.12f}".rstrip("0")
    return f"{r:.2f}"


def table(metrics: dict[str, Metric], systems: tuple[str, ...]) -> str:
    """Markdown table: one row per metric; values per system, then agentworker / each baseline."""
    baselines = [b for b in BASELINES if b in systems]
    head = ["metric", "unit", *(TITLES[s] for s in systems), *(f"x {TITLES[b]}" for b in baselines)]
    rows = [head, ["---"] * len(head)]
    for metric in metrics.values():
        if not any(v is not None or s in metric.notes for s, v in metric.values.items()):
            continue
        arrow = {"higher": " ↑", "lower": " ↓"}.get(metric.better, "")  # "closer": to a target in the label
        row = [f"{metric.label}{arrow}", metric.unit]
        row += [_fmt(metric.values.get(s), metric.notes.get(s)) for s in systems]
        for b in baselines:
            r = metric.ratio(b)
            row.append(_ratio(r))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for row in rows:
        if row[0] == "---":
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        else:
            lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def targets_table(checks: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for check in checks:
        measured = check["measured"]
        shown = "-" if measured is None else f"{measured:.3g}"
        met = "-" if check["met"] is None else ("yes" if check["met"] else "**no**")
        lines.append(f"| {check['label']}: {check['target']} | {shown} | {met} |")
    return "\n".join(lines)


def write_json(path: Path, metrics: dict[str, Metric], checks: list[dict[str, Any]],
               environment: dict[str, Any]) -> None:
    write_document(path, {"environment": environment, "metrics": {k: asdict(m) for k, m in metrics.items()},
                          "targets": checks})

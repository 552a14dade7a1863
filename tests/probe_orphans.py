"""A task that leaves an orphan behind (loaded via AGENTWORKER_TASK_MODULES), to show the supervisor
reaps orphans when it runs as PID 1 of a container."""

from __future__ import annotations

import asyncio
import subprocess

from agentworker.tasks import JobContext, task


@task()
async def probe_orphan(ctx: JobContext, tenant_id: str, seconds: float = 3.0) -> int:
    """Start ``sleep`` through a shell that exits at once: the sleep is orphaned, re-parented to the
    nearest subreaper or to PID 1, which must reap it when it ends. Returns its pid."""
    # subprocess.run in a thread, not asyncio's subprocesses: uvloop's would wait for the orphan too.
    shell = await asyncio.to_thread(
        subprocess.run, ["sh", "-c", f"sleep {float(seconds)} </dev/null >/dev/null 2>&1 & echo $!"],
        capture_output=True, check=True, timeout=10)
    return int(shell.stdout)

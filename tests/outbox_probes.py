"""Tools and a fault for the event outbox tests (loaded in workers via AGENTWORKER_TASK_MODULES).

* ``wait_for_file``: touches ``args["reached"]``, then waits for ``args["release"]`` to exist, without
  touching Redis (the test stops Redis meanwhile).
* ``notify_then_die``: promises a ``workflow_notification`` like ``notify``, then SIGKILLs its own worker
  inside the ledger's transaction (before its commit), the first time only (``args["marker"]``).
* With ``OUTBOX_PROBE_DIE_AFTER_PUBLISH`` set to a path, the first worker that gets a
  ``workflow_notification`` into Redis SIGKILLs itself right then: after the publish, before its outbox row
  is deleted.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from agentworker.event_outbox import EventOutbox
from agentworker.tools import ToolContext, tool


def _first_time(marker: str) -> bool:
    """True for the one caller, across processes, that creates ``marker``."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


@tool(side_effects=False)
async def wait_for_file(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    _first_time(str(args["reached"]))
    release = str(args["release"])
    for _ in range(1200):
        if await asyncio.to_thread(os.path.exists, release):
            return {"released": True}
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{release} did not appear within 60 s")


@tool(side_effects=True)
async def notify_then_die(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    await ctx.emit_once("workflow_notification", {"run_id": ctx.run_id, "step_id": ctx.step_id,
                                                  "message": args.get("message"),
                                                  "idempotency_key": ctx.idempotency_key})
    if _first_time(str(args["marker"])):
        os.kill(os.getpid(), signal.SIGKILL)
    return {"notified": True}


_DIE_AFTER_PUBLISH = os.environ.get("OUTBOX_PROBE_DIE_AFTER_PUBLISH")
if _DIE_AFTER_PUBLISH:
    _after_publish = EventOutbox._after_publish

    def _dying_after_publish(self: EventOutbox, written: asyncio.Future[bool], event: tuple[str, str, str]) -> None:
        published = not written.cancelled() and written.exception() is None
        if published and '"workflow_notification"' in event[2] and _first_time(str(_DIE_AFTER_PUBLISH)):
            os.kill(os.getpid(), signal.SIGKILL)
        _after_publish(self, written, event)

    EventOutbox._after_publish = _dying_after_publish  # type: ignore[method-assign]

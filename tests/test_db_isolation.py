"""Tenant isolation in PostgreSQL: row-level security on a per-transaction tenant, a role that cannot
bypass it, and the ledger. Against the session's real database."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from agentworker.client import JobFailed
from agentworker.db import APP_ROLE, Database, approvals, definitions, runs
from agentworker.db.ledger import Ledger
from agentworker.db.runs import RunStatus
from tests.conftest import new_tenant
from tests.workflow_helpers import workflow_client, workflow_worker_env

TABLES = ("workflow_definitions", "workflow_runs", "workflow_steps", "workflow_approvals", "side_effects",
          "checkpoints", "checkpoint_blobs", "checkpoint_writes")


async def _tenant_with_a_run(database: Database, tenant: str) -> str:
    async with database.tenant(tenant) as tx:
        stored = await definitions.save_definition(tx, "wf", {"id": "wf", "steps": []})
        run, created = await runs.create_run(tx, workflow_id="wf", workflow_version=stored.version,
                                             idempotency_key=f"{tenant}:execute_workflow:k", trigger="manual",
                                             input_data={"secret": tenant})
        assert created
        attempt = await runs.start_step(tx, run.run_id, "s1", kind="tool", input_data={}, job_id="j")
        await runs.finish_step(tx, run.run_id, "s1", attempt, runs.StepStatus.COMPLETED, output={"o": tenant})
        await approvals.request_approval(tx, run.run_id, "gate", {"message": "ok?"})
        await tx.execute("INSERT INTO agentworker.checkpoints (thread_id, checkpoint_ns, checkpoint_id, checkpoint, "
                         "metadata) VALUES ($1, '', $2, '{}', '{}')", f"{tenant}:{run.run_id}", str(uuid.uuid4()))
    await Ledger(database).run_once(tenant, run.run_id, "s1", "call", _effect({"receipt": tenant}))
    return run.run_id


def _effect(result: Any, calls: list[str] | None = None) -> Any:
    async def effect(key: str) -> Any:
        if calls is not None:
            calls.append(key)
        return result

    return effect


async def test_a_tenant_can_neither_read_nor_write_another_tenants_rows(database: Database) -> None:
    a, b = new_tenant("a"), new_tenant("b")
    await _tenant_with_a_run(database, a)
    b_run = await _tenant_with_a_run(database, b)

    async with database.tenant(a) as tx:
        # Through the repositories the tasks use, with B's ids in hand:
        assert await runs.get_run(tx, b_run) is None
        assert all(r.tenant_id == a for r in await runs.list_runs(tx))
        assert await runs.list_steps(tx, b_run) == []
        assert await runs.completed_step(tx, b_run, "s1") is None
        assert await approvals.get_approval(tx, b_run, "gate") is None
        assert await approvals.decide(tx, b_run, "gate", approved=True, decision={}) is None
        await runs.set_run_status(tx, b_run, RunStatus.FAILED, error={"hijacked": True})
        await runs.count_attempt(tx, b_run, job_id="j")
        assert (await definitions.get_definition(tx, "wf")).tenant_id == a  # type: ignore[union-attr]
        # And with raw SQL under A's setting:
        for table in TABLES:
            owners = await tx.fetch(f"SELECT DISTINCT split_part(thread_id, ':', 1) AS t FROM agentworker.{table}"
                                    if table.startswith("checkpoint") else
                                    f"SELECT DISTINCT tenant_id AS t FROM agentworker.{table}")
            assert [r["t"] for r in owners] in ([a], []), table
        assert await tx.execute("UPDATE agentworker.workflow_runs SET status = 'failed' WHERE tenant_id = $1",
                                b) == "UPDATE 0"
        assert await tx.execute("DELETE FROM agentworker.checkpoints WHERE thread_id LIKE $1", f"{b}:%") == "DELETE 0"
    for sql, args in [
        ("INSERT INTO agentworker.workflow_definitions (tenant_id, workflow_id, version, definition, digest) "
         "VALUES ($1, 'evil', 1, '{}', 'x')", (b,)),
        ("UPDATE agentworker.workflow_runs SET tenant_id = $1", (b,)),
        ("INSERT INTO agentworker.side_effects (tenant_id, run_id, step_id, call_key, result) "
         "VALUES ($1, 'r', 's', 'c', '1')", (b,)),
        ("INSERT INTO agentworker.checkpoints (thread_id, checkpoint_ns, checkpoint_id, checkpoint, metadata) "
         "VALUES ($1, '', 'x', '{}', '{}')", (f"{b}:run",)),
    ]:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            async with database.tenant(a) as tx:
                await tx.execute(sql, *args)

    async with database.tenant(b) as tx:
        run = await runs.get_run(tx, b_run, with_steps=True)
        assert run is not None and run.status == "running" and run.error is None and run.attempts == 1
        assert run.input == {"secret": b} and run.steps[0].output == {"o": b}
        assert (await approvals.get_approval(tx, b_run, "gate")).status == "pending"  # type: ignore[union-attr]
    # The ledger is per tenant too: A holding B's run, step and call keys runs its own effect.
    calls: list[str] = []
    assert await Ledger(database).run_once(a, b_run, "s1", "call", _effect({"receipt": a}, calls)) == {"receipt": a}
    assert len(calls) == 1
    assert await Ledger(database).recorded(b, b_run, "s1", "call") == (True, {"receipt": b})


async def test_the_runtime_role_cannot_bypass_row_level_security(database: Database) -> None:
    tenant = new_tenant("role")
    await _tenant_with_a_run(database, tenant)
    async with database.tenant(tenant) as tx:
        assert await tx.fetchval("SELECT current_user") == APP_ROLE
        assert await tx.fetchval("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user") is False
        assert await tx.fetchval("SELECT relforcerowsecurity FROM pg_class WHERE oid = "
                                 "'agentworker.workflow_runs'::regclass") is True
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with database.tenant(tenant) as tx:
            await tx.execute("ALTER TABLE agentworker.workflow_runs DISABLE ROW LEVEL SECURITY")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with database.tenant(tenant) as tx:
            await tx.execute("DELETE FROM agentworker.workflow_steps")
    # Outside a tenant transaction (the setting reverts at commit), nothing is visible.
    async with database._pool.acquire() as conn:
        assert await conn.fetchval("SELECT current_user") == APP_ROLE
        assert await conn.fetchval("SELECT count(*) FROM agentworker.workflow_runs") == 0
        assert await conn.fetchval("SELECT count(*) FROM agentworker.checkpoints") == 0


async def test_the_ledger_runs_an_effect_once_and_returns_the_stored_result(database: Database) -> None:
    import asyncio

    tenant = new_tenant("ledger")
    ledger = Ledger(database)
    calls: list[str] = []

    async def slow_effect(key: str) -> dict[str, Any]:
        calls.append(key)
        await asyncio.sleep(0.2)
        return {"sent": len(calls)}

    results = await asyncio.gather(*(ledger.run_once(tenant, "run-1", "email", "send:0", slow_effect)
                                     for _ in range(3)))
    assert results == [{"sent": 1}] * 3 and len(calls) == 1, "concurrent callers wait for the first"
    assert await ledger.run_once(tenant, "run-1", "email", "send:1", slow_effect) == {"sent": 2}
    assert len(set(calls)) == 2, "each call has its own stable idempotency key"

    async def failing(key: str) -> None:
        calls.append(key)
        raise ConnectionError("smtp down")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await ledger.run_once(tenant, "run-1", "email", "send:2", failing)
    assert calls[-1] == calls[-2], "a failed effect records nothing and retries with the same key"
    assert await ledger.recorded(tenant, "run-1", "email", "send:2") == (False, None)
    assert await ledger.run_once(tenant, "run-1", "email", "none", _effect(None)) is None
    assert await ledger.recorded(tenant, "run-1", "email", "none") == (True, None)


@pytest.mark.slow
async def test_jobs_of_one_tenant_cannot_reach_another_tenants_run(
        redis_url: str, quota_file: Path, database_url: str, database: Database, spawn_worker: Any) -> None:
    a, b = new_tenant("ja"), new_tenant("jb")
    b_run = await _tenant_with_a_run(database, b)
    async with database.tenant(b) as tx:
        await runs.set_run_status(tx, b_run, RunStatus.WAITING_APPROVAL)
    worker = spawn_worker(quota_file, **workflow_worker_env(database_url))
    await worker.wait_serving()
    async with workflow_client(redis_url, quota_file, database) as client:
        job = await client.enqueue("resume_run", tenant_id=a, payload={"run_id": b_run, "decision": "approve"})
        with pytest.raises(JobFailed) as info:
            await job.result(timeout=30)
        assert (info.value.error, info.value.message) == ("RunNotFound", f"run '{b_run}' not found for tenant '{a}'")
        job = await client.enqueue("execute_workflow", tenant_id=a, payload={"workflow_id": "wf"})
        with pytest.raises(JobFailed) as info:
            await job.result(timeout=30)
        assert info.value.message == f"workflow 'wf' is not defined for tenant '{a}'"
        assert await client.get_run(a, b_run) is None
        assert await client.get_run(b, b_run) is not None
    async with database.tenant(b) as tx:
        approval = await approvals.get_approval(tx, b_run, "gate")
        assert approval is not None and approval.status == "pending"

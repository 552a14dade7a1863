"""Agents end to end: real worker processes, the real OpenAI client against a local fake endpoint, a
local CRM API and SMTP server, PostgreSQL checkpoints, kill -9 in the middle of a send."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from agentworker.client import JobFailed
from agentworker.db import Database
from tests.agent_helpers import agent_events, crm_settings, model_settings, smtp_settings
from tests.conftest import CRM_TOKENS, new_tenant, wait_for
from tests.workflow_helpers import workflow_client, workflow_worker_env

pytestmark = pytest.mark.slow

SECRETS = ("sk-fake-key", "smtp-secret-xyz", CRM_TOKENS[0])


async def test_the_agent_looks_up_the_contact_and_sends_one_email_even_when_killed_right_after_sending(
        redis_url: str, write_quotas: Callable[..., Path], database_url: str, database: Database,
        spawn_worker: Any, smtp_server: Any, fake_crm: Any, fake_openai: Any) -> None:
    # Without a supervisor to release it, a SIGKILLed worker's job lease lapses after AGENTWORKER_JOB_LEASE_TTL
    # (3 s here, not the default 10).
    path = write_quotas({"pools": {"standard": {"shards": 2, "job_timeout": 12, "max_tries": 3}}})
    # The server keeps the message but holds its reply: the worker dies not knowing it was accepted.
    smtp = smtp_server(hold_first=30)
    tenant = new_tenant("mail")
    env = workflow_worker_env(database_url, AGENTWORKER_JOB_LEASE_TTL="3")
    first = spawn_worker(path, slot=0, **env)
    async with workflow_client(redis_url, path, database) as client:
        await client.save_integration(tenant, "model", model_settings(fake_openai, streaming=True))
        await client.save_integration(tenant, "crm", crm_settings(fake_crm))
        await client.save_integration(tenant, "smtp", smtp_settings(smtp))
        await first.wait_serving()
        job = await client.enqueue("run_tool_agent", tenant_id=tenant, payload={
            "instructions": "Email Ada Lovelace about our meeting on Monday", "run_id": "meeting-1"})
        paused = await job.result(timeout=60)
        assert paused["status"] == "waiting_approval", paused
        (waiting,) = paused["waiting_for"]
        assert waiting["name"] == "send_email" and waiting["args"]["to"] == ["ada@example.com"]
        assert [c["tool"] for c in paused["tool_calls"]] == ["crm_find_contacts", "send_email"]
        assert smtp.messages() == [], "nothing is sent before a person approves"

        resume = await client.enqueue("resume_agent", tenant_id=tenant,
                                      payload={"run_id": "meeting-1", "decision": "approve"})
        await wait_for(lambda: len(smtp.messages()) == 1, 60, what="the email to reach the SMTP server")
        killed_at = time.time()
        first.signal(signal.SIGKILL)
        await first.wait_exit()
        second = spawn_worker(path, slot=1, **env)
        await second.wait_serving()
        done = await resume.result(timeout=90)
        info = await resume.info()
        assert info is not None and info.start_time_ms / 1000 > killed_at, "the resume job ran again after the kill"
        assert info.job_try == 1, "a re-run after a crash spends no try"
        assert done["status"] == "completed" and done["reply"] == "Done: send_email answered."
        sent = [c for c in done["tool_calls"] if c["tool"] == "send_email"]
        assert len(sent) == 1 and '"status": "unconfirmed"' in sent[0]["output"], \
            "the retry found the send cut off in transmission and did not send again"

        (mail,) = smtp.messages()
        assert mail.rcpt_tos == ["ada@example.com"] and mail.message["Subject"] == "Our meeting"
        assert "Hello Ada Lovelace" in mail.message.get_payload()
        assert [(r["method"], r["query"]) for r in fake_crm.requests] == [("GET", {"query": "Ada Lovelace"})]
        assert {r["stream"] for r in fake_openai.requests} == {True}
        assert {r["authorization"] for r in fake_openai.requests} == {"Bearer sk-fake-key"}

        events = await agent_events(client, tenant, "agent_run_completed", run_id="meeting-1")
        names = [e.event for e in events]
        assert names[:5] == ["agent_run_started", "agent_tool_call", "agent_tool_result", "agent_tool_call",
                             "agent_waiting_for_approval"]
        assert events[1].data["tool"] == "crm_find_contacts" and events[3].data["tool"] == "send_email"
        assert names.count("agent_approval_decided") == 1 and names[-1] == "agent_run_completed"
    for worker in (first, second):
        assert not any(secret in worker.log() for secret in SECRETS), "no credential in any log line"


async def test_a_tool_under_approval_pauses_the_agent_reject_skips_it_and_approve_runs_it(
        redis_url: str, quota_file: Path, database_url: str, database: Database, spawn_worker: Any,
        smtp_server: Any) -> None:
    smtp = smtp_server()
    tenant = new_tenant("appr")  # no model saved: the offline model
    worker = spawn_worker(quota_file, **workflow_worker_env(database_url))
    instructions = 'Tell Ada.\ncall send_email {"to": ["ada@example.com"], "subject": "Hi", "body": "Hello"}'
    async with workflow_client(redis_url, quota_file, database) as client:
        await client.save_integration(tenant, "smtp", smtp_settings(smtp))
        await worker.wait_serving()
        runs = {}
        for run_id in ("no", "yes"):
            job = await client.enqueue("run_tool_agent", tenant_id=tenant,
                                       payload={"instructions": instructions, "run_id": run_id})
            runs[run_id] = await job.result(timeout=60)
            assert runs[run_id]["status"] == "waiting_approval"
            assert runs[run_id]["waiting_for"][0]["args"] == {"to": ["ada@example.com"], "subject": "Hi",
                                                              "body": "Hello"}
        reject = await client.enqueue("resume_agent", tenant_id=tenant, payload={
            "run_id": "no", "decision": {"decision": "reject", "comment": "not today"}})
        rejected = await reject.result(timeout=60)
        assert rejected["status"] == "completed" and smtp.messages() == []
        assert rejected["tool_calls"][0]["status"] == "error"
        assert "rejected the tool call for `send_email` with reason: not today" in rejected["reply"]
        again = await client.enqueue("resume_agent", tenant_id=tenant, payload={"run_id": "no", "decision": "approve"})
        assert (await again.result(timeout=60))["status"] == "completed", "a finished run stays as it is"
        assert smtp.messages() == []

        approve = await client.enqueue("resume_agent", tenant_id=tenant, payload={"run_id": "yes",
                                                                                  "decision": "approve"})
        approved = await approve.result(timeout=60)
        assert approved["status"] == "completed" and approved["tool_calls"][0]["status"] == "success"
        assert approved["reply"].startswith('[offline] send_email returned {\n  "status": "sent"')
        assert [m.rcpt_tos for m in smtp.messages()] == [["ada@example.com"]]

        events = await agent_events(client, tenant, "agent_run_completed", run_id="yes")
        results = [(e.data["run_id"], e.data["status"]) for e in events if e.event == "agent_tool_result"]
        assert results == [("no", "rejected"), ("yes", "success")]
        bad = await client.enqueue("resume_agent", tenant_id=tenant, payload={"run_id": "yes", "decision": "maybe"})
        with pytest.raises(JobFailed) as failed:
            await bad.result(timeout=30)
        assert failed.value.message == "decision 'maybe': use 'approve', 'reject' or 'edit'"


async def test_a_hanging_model_endpoint_is_cut_at_its_timeout_and_counted_in_the_metrics(
        redis_url: str, write_quotas: Callable[..., Path], database_url: str, database: Database,
        spawn_worker: Any, fake_openai: Any, tmp_path: Path) -> None:
    path = write_quotas({"pools": {"standard": {"shards": 1, "job_timeout": 30, "max_tries": 1}}})
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    tenant = new_tenant("hang")
    worker = spawn_worker(path, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), **workflow_worker_env(database_url))
    async with workflow_client(redis_url, path, database) as client:
        await client.save_integration(tenant, "model", model_settings(fake_openai, "hang", timeout=1, max_retries=1))
        await worker.wait_serving()
        job = await client.enqueue("run_chat_agent", tenant_id=tenant,
                                   payload={"conversation_id": "c1", "message": "hello?"})
        with pytest.raises(JobFailed) as info:
            await job.result(timeout=60)
        assert info.value.error == "ModelTimeout"
        assert info.value.message == "chat model 'openai:hang' did not answer within 1s (with 1 retries)"
        assert len(fake_openai.requests) == 2
        events = await agent_events(client, tenant, "agent_run_failed")
        assert events[-1].data["error"] == "ModelTimeout" and events[-1].data["conversation_id"] == "c1"

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    labels = {"provider": "openai", "model": "hang"}
    assert registry.get_sample_value("agentworker_llm_requests_total", {**labels, "outcome": "timeout"}) == 1
    assert registry.get_sample_value("agentworker_llm_request_duration_seconds_count", labels) == 1


async def test_an_agent_run_cancelled_while_its_model_call_hangs_ends_cancelled(
        redis_url: str, write_quotas: Callable[..., Path], database_url: str, database: Database,
        spawn_worker: Any, fake_openai: Any) -> None:
    path = write_quotas({"pools": {"standard": {"shards": 1, "job_timeout": 120, "max_tries": 3}}})
    tenant = new_tenant("stop")
    worker = spawn_worker(path, **workflow_worker_env(database_url))
    async with workflow_client(redis_url, path, database) as client:
        await client.save_integration(tenant, "model", model_settings(fake_openai, "hang", timeout=60))
        await worker.wait_serving()
        job = await client.enqueue("run_chat_agent", tenant_id=tenant,
                                   payload={"conversation_id": "c1", "message": "hello?"})
        await wait_for(lambda: len(fake_openai.requests) == 1, 30, what="the agent to call its model")
        view = await client.cancel(job.job_id, by="sre")
        assert view.status in ("running", "cancelled")
        with pytest.raises(JobFailed) as info:
            await job.result(timeout=30)
        assert info.value.error == "JobCancelled"
        events = await agent_events(client, tenant, "agent_cancelled")
        assert events[-1].data["conversation_id"] == "c1" and events[-1].data["by"] == "sre"
        assert not [e for e in events if e.event == "agent_run_failed"]
        assert (await client.get_job(job.job_id)).status == "cancelled"
        assert len(fake_openai.requests) == 1  # not retried


async def test_the_chat_agent_remembers_the_conversation_across_worker_processes(
        redis_url: str, quota_file: Path, database_url: str, database: Database, spawn_worker: Any,
        fake_openai: Any) -> None:
    tenant = new_tenant("chat")
    env = workflow_worker_env(database_url)
    first = spawn_worker(quota_file, slot=0, **env)
    async with workflow_client(redis_url, quota_file, database) as client:
        await client.save_integration(tenant, "model", model_settings(fake_openai))
        await first.wait_serving()

        async def say(conversation: str, message: str) -> dict[str, Any]:
            job = await client.enqueue("run_chat_agent", tenant_id=tenant,
                                       payload={"conversation_id": conversation, "message": message})
            result: dict[str, Any] = await job.result(timeout=60)
            return result

        assert (await say("c1", "Hi, my name is Ada"))["reply"] == "Noted: Hi, my name is Ada"
        first.signal(signal.SIGTERM)
        assert await first.wait_exit() == 0
        second = spawn_worker(quota_file, slot=1, **env)
        await second.wait_serving()
        assert (await say("c1", "What is my name?"))["reply"] == "Your name is Ada."
        assert (await say("c2", "What is my name?"))["reply"] == "I do not know your name.", "another conversation"
        sent = [(m["role"], m["content"]) for m in fake_openai.requests[1]["messages"]]
        assert sent[1:] == [("user", "Hi, my name is Ada"), ("assistant", "Noted: Hi, my name is Ada"),
                            ("user", "What is my name?")] and sent[0][0] == "system"
        assert "crm_find_contacts" in fake_openai.requests[1]["tools"]
        assert "send_email" not in fake_openai.requests[1]["tools"], "the chat agent has read-only tools"
        events = await agent_events(client, tenant, "agent_message", content="I do not know your name.")
        replies = [(e.data["conversation_id"], e.data["content"]) for e in events if e.event == "agent_message"]
        assert replies == [("c1", "Noted: Hi, my name is Ada"), ("c1", "Your name is Ada."),
                           ("c2", "I do not know your name.")]


async def test_the_router_sends_each_message_to_the_expected_agent(
        redis_url: str, quota_file: Path, database_url: str, database: Database, spawn_worker: Any,
        fake_openai: Any) -> None:
    tenant = new_tenant("route")
    worker = spawn_worker(quota_file, **workflow_worker_env(database_url))
    async with workflow_client(redis_url, quota_file, database) as client:
        await client.save_integration(tenant, "model", model_settings(fake_openai))
        await client.save_workflow(tenant, {"id": "greeting", "steps": [
            {"id": "hello", "kind": "transform", "template": {"said": "{{ input.message }}"}}]})
        await worker.wait_serving()
        script = [
            ("Hello there", "chat", "model"),
            ("Please send the minutes to the team", "tool", "model"),
            ("run greeting for Ada", "workflow", "model"),
            ("run nosuchflow now", "chat", "rules"),  # the model named an unknown workflow: the rules decide
        ]
        results = []
        for index, (message, _, _) in enumerate(script):
            job = await client.enqueue("handle_message", tenant_id=tenant,
                                       payload={"conversation_id": "conv-1", "message": message},
                                       idempotency_key=f"m{index}")
            results.append(await job.result(timeout=60))
        assert [(r["routed_to"], r["decided_by"]) for r in results] == [(a, d) for _, a, d in script]
        assert results[0]["result"]["reply"] == "Noted: Hello there"
        assert results[1]["result"]["status"] == "completed" and results[1]["result"]["run_id"].startswith("msg-")
        assert results[2]["workflow_id"] == "greeting" and results[2]["result"]["status"] == "completed"
        assert results[2]["result"]["output"] == {"hello": {"said": "run greeting for Ada"}}
        assert results[3]["result"]["reply"] == "Noted: run nosuchflow now"
        events = await agent_events(client, tenant, "agent_routed", decided_by="rules")
        routed = [(e.data["agent"], e.data["decided_by"]) for e in events if e.event == "agent_routed"]
        assert routed == [(a, d) for _, a, d in script]

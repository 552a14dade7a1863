from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

from agentworker.client import JobFailed
from agentworker.logs import configure_logging, get_logger
from tests.conftest import ROOT, make_client, worker_env

pytestmark = pytest.mark.slow


def test_secrets_never_reach_a_log_line(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("info", "json", pool="p", slot=0)
        get_logger("t").info("connecting", api_key="sk-very-secret", smtp_password="hunter2", token="tkn",
                             authorization="Bearer abc", user="bob")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        structlog.reset_defaults()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("api_key", "smtp_password", "token", "authorization"):
        assert line[key] == "***"
    assert line["user"] == "bob"
    assert line["pool"] == "p" and line["slot"] == 0 and isinstance(line["pid"], int)
    structlog.contextvars.clear_contextvars()


async def test_job_log_lines_carry_tenant_job_pool_slot_and_pid(redis_url: str, quota_file: Path,
                                                                spawn_worker: Any) -> None:
    worker = spawn_worker(quota_file, "standard", 3)
    await worker.wait_serving()
    async with make_client(redis_url, quota_file) as client:
        job = await client.enqueue("echo", tenant_id="acme", payload={"message": "x"})
        await job.result(timeout=10)
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    completed = [line for line in lines if line.get("event") == "job completed"]
    assert len(completed) == 1
    entry = completed[0]
    assert entry["tenant_id"] == "acme" and entry["job_id"] == job.job_id
    assert entry["pool"] == "standard" and entry["slot"] == 3 and entry["pid"] == worker.pid
    assert entry["level"] == "info" and entry["timestamp"].endswith("Z")


async def test_retryable_errors_are_retried_with_backoff(redis_url: str, quota_file: Path,
                                                         spawn_worker: Any) -> None:
    worker = spawn_worker(quota_file)
    await worker.wait_serving()
    async with make_client(redis_url, quota_file) as client:
        job = await client.enqueue("probe_flaky", tenant_id="acme", payload={"failures": 1})
        assert await job.result(timeout=30) == 2
        # max_tries is 3 (the default): three failures exhaust it.
        doomed = await client.enqueue("probe_flaky", tenant_id="acme", payload={"failures": 5})
        with pytest.raises(JobFailed) as info:
            await doomed.result(timeout=60)
        assert info.value.error == "ConnectionError"
        retrying = []
        async for event in client.events("acme", since="0", block_ms=200):
            if event.event == "job_retrying":
                retrying.append(event.data["job_id"])
            if event.event == "job_failed":
                break
        assert retrying == [job.job_id, doomed.job_id, doomed.job_id]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentworker", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)


async def test_enqueue_from_the_shell(redis_url: str, quota_file: Path, spawn_worker: Any) -> None:
    worker = spawn_worker(quota_file)
    await worker.wait_serving()
    env = worker_env(redis_url, AGENTWORKER_CONFIG=str(quota_file))
    args = ("enqueue", "echo", "--tenant", "acme", "--payload", '{"message": "from the shell"}', "--key", "k1")
    first = await asyncio.to_thread(_cli, *args, "--wait", env=env)
    assert first.returncode == 0, first.stderr
    assert "job acme:echo:k1 enqueued on agentworker:queue:standard:" in first.stdout
    assert first.stdout.strip().splitlines()[-1] == '"from the shell"'
    again = await asyncio.to_thread(_cli, *args, env=env)
    assert again.returncode == 0
    assert "already exists (same idempotency key): not enqueued again" in again.stdout
    failing = await asyncio.to_thread(_cli, "enqueue", "probe_fail", "--tenant", "acme", "--wait", env=env)
    assert failing.returncode == 1
    assert "failed: RuntimeError: boom" in failing.stderr
    for bad_args, message in [
        (("enqueue", "echo", "--tenant", "Bad Tenant"), "invalid tenant id 'Bad Tenant'"),
        (("enqueue", "echo", "--tenant", "acme", "--payload", "{nope"), "--payload is not valid JSON"),
        (("enqueue", "echo", "--tenant", "acme", "--payload", "[1]"), "--payload must be a JSON object"),
    ]:
        proc = await asyncio.to_thread(_cli, *bad_args, env=env)
        assert proc.returncode == 2, proc
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_enqueue_with_redis_down_is_one_line(quota_file: Path) -> None:
    env = worker_env("redis://127.0.0.1:1/0", AGENTWORKER_CONFIG=str(quota_file))
    proc = _cli("enqueue", "echo", "--tenant", "acme", env=env)
    assert proc.returncode == 1
    assert proc.stderr.startswith("agentworker: cannot reach Redis")
    assert "Traceback" not in proc.stderr

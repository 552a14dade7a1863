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
        # Both at once: their backoffs (2 s, then 4 s) overlap instead of adding up.
        job = await client.enqueue("probe_flaky", tenant_id="acme", payload={"failures": 1})
        # max_tries is 3 (the default): three failures exhaust it.
        doomed = await client.enqueue("probe_flaky", tenant_id="acme", payload={"failures": 5})
        assert await job.result(timeout=30) == 2
        with pytest.raises(JobFailed) as info:
            await doomed.result(timeout=60)
        assert info.value.error == "ConnectionError"
        retrying = []
        async for event in client.events("acme", since="0", block_ms=200):
            if event.event == "job_retrying":
                retrying.append(event.data["job_id"])
            if event.event == "job_failed":
                break
        assert sorted(retrying) == sorted([job.job_id, doomed.job_id, doomed.job_id])
        assert retrying[-1] == doomed.job_id, "the doomed job's second retry comes last"


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


# -- one --config, one-line mistakes, plain help (issue 18) ---------------------------------------------

#: nothing listens there: a command that tried to reach Redis would say so instead of what is asserted
NO_REDIS_ENV = worker_env("redis://127.0.0.1:1/0")


def _only_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The single line a failed command printed on stderr, after checking its exit code and that it
    printed no traceback."""
    assert proc.returncode == code, proc
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_config_before_or_after_the_command_is_one_option(write_quotas: Any) -> None:
    b = write_quotas({"default_pool": "b", "pools": {"b": {"shards": 1}}}, name="b.yaml")
    c = write_quotas({"default_pool": "c", "pools": {"c": {"shards": 1}}}, name="c.yaml")
    checked = _cli("--config", str(b), "check-config", env=NO_REDIS_ENV)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines()[0] == f"{b}: OK"
    # The option wins over AGENTWORKER_CONFIG wherever it is given, down to dead-letters' own commands
    # (an unknown --pool is refused from the quota file, before Redis is reached).
    env = {**NO_REDIS_ENV, "AGENTWORKER_CONFIG": str(c)}
    for args in (("--config", str(b), "route", "acme"), ("route", "acme", "--config", str(b))):
        routed = _cli(*args, env=env)
        assert (routed.returncode, routed.stdout) == (0, "tenant acme: pool b, shard 0, queue agentworker:queue:b:0\n")
    for args in (("--config", str(b), "dead-letters", "list", "--pool", "x"),
                 ("dead-letters", "--config", str(b), "list", "--pool", "x"),
                 ("dead-letters", "list", "--pool", "x", "--config", str(b))):
        assert _only_line(_cli(*args, env=env), 2) == "agentworker: unknown pool 'x': the quota file has b"
    same = _cli("--config", str(b), "route", "acme", "--config", str(b.parent / "." / b.name), env=env)
    assert same.returncode == 0 and "pool b," in same.stdout
    conflict = _cli("--config", str(b), "route", "acme", "--config", str(c), env=env)
    assert _only_line(conflict, 2) == f"agentworker: --config names two different files, {b} and {c}: give it once"


@pytest.mark.parametrize(("args", "env", "code", "line"), [
    (("status", "--url", "not-a-url"), {}, 2,
     "agentworker: --url 'not-a-url' is not an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000"),
    (("migrate", "--database-url", "not-a-url"), {}, 2,
     "agentworker: --database-url is not a URL: it must start with postgresql:// or postgres://"),
    (("migrate", "--database-url", "mysql://x"), {}, 2,
     "agentworker: --database-url must start with postgresql:// or postgres://, not mysql://"),
    (("migrate", "--database-url", "postgresql://postgres:hunter2@127.0.0.1:1/x?sslmode=bogus"), {}, 2,
     "agentworker: --database-url: sslmode='bogus' is not one of disable, allow, prefer, require, verify-ca, "
     "verify-full"),
    (("run",), {"AGENTWORKER_DATABASE_URL": "postgresql://postgres:hunter2@127.0.0.1/x?sslmode=bogus"}, 2,
     "agentworker: AGENTWORKER_DATABASE_URL: sslmode='bogus' is not one of disable, allow, prefer, require, "
     "verify-ca, verify-full"),
    (("run",), {"AGENTWORKER_DATABASE_URL": "postgresql://postgres@127.0.0.1:port/x"}, 2,
     "agentworker: AGENTWORKER_DATABASE_URL: port 'port' is not a number from 1 to 65535"),
    (("run", "--port", "99999"), {}, 2,
     "agentworker run: argument --port: 99999 is not a port number from 0 to 65535 (see agentworker run --help)"),
], ids=["status-url", "migrate-not-a-url", "migrate-mysql", "migrate-sslmode", "run-sslmode", "run-port-in-url",
        "run-port"])
def test_user_mistakes_are_one_sentence_and_an_exit_code(args: tuple[str, ...], env: dict[str, str], code: int,
                                                         line: str) -> None:
    proc = _cli(*args, env={**NO_REDIS_ENV, **env})
    assert _only_line(proc, code) == line
    assert "hunter2" not in proc.stderr
    assert '"supervisor started"' not in proc.stdout  # `run` refused before starting anything


def test_yaml_errors_name_the_file_not_the_parser_input(tmp_path: Path) -> None:
    bad = tmp_path / "quotas.yaml"
    bad.write_text("pools:\n  standard: {shards: [1\n")
    expected = (f"{bad}: not valid YAML: did not find expected ',' or ']' at line 3, column 1 "
                "(while parsing a flow sequence at line 2, column 22)")
    assert _only_line(_cli("check-config", "--config", str(bad), env=NO_REDIS_ENV), 2) == expected
    refused = _cli("run", "--config", str(bad), env=NO_REDIS_ENV)
    assert _only_line(refused, 2) == f"agentworker: bad quota file {expected}"


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    from agentworker.cli import main

    top = _cli("--help", env=NO_REDIS_ENV)
    assert top.returncode == 0
    assert "The agentworker command (also python -m agentworker)" in top.stdout
    assert "--config FILE may be given before or after the command name" in " ".join(top.stdout.split())
    texts = [top.stdout]
    for command in (["check-config"], ["route"], ["enqueue"], ["run"], ["status"], ["migrate"], ["dead-letters"],
                    ["dead-letters", "list"], ["dead-letters", "requeue"], ["dead-letters", "delete"]):
        with pytest.raises(SystemExit) as exited:
            main([*command, "--help"])
        assert exited.value.code == 0
        texts.append(capsys.readouterr().out)
    for text in texts:
        assert "--config FILE" in text
        for markup in ("``", ":class:", ":func:", ":mod:", ":meth:"):
            assert markup not in text, text


def test_check_config_prints_each_tenants_effective_limits(write_quotas: Any) -> None:
    path = write_quotas({"default_pool": "standard",
                         "pools": {"standard": {"shards": 2, "job_timeout": 60}},
                         "tenant_defaults": {"max_concurrency": 4, "max_pending": 100},
                         "tenants": {"acme": {"weight": 2},
                                     "zeta": {"max_concurrency": 1, "job_timeout": 20}}})
    checked = _cli("check-config", "--config", str(path), env=NO_REDIS_ENV)
    assert checked.returncode == 0, checked.stderr
    lines = {line.split()[0]: line for line in checked.stdout.splitlines() if line.startswith("  ")}
    # acme's own weight, tenant_defaults' caps, and the pool's tighter job timeout.
    assert "max_concurrency=4" in lines["acme"] and "max_pending=100" in lines["acme"]
    assert "weight=2" in lines["acme"] and "job_timeout=60" in lines["acme"]
    assert "max_concurrency=1" in lines["zeta"] and "max_pending=100" in lines["zeta"]
    assert "job_timeout=20" in lines["zeta"]


def test_the_client_writes_nothing_into_the_backends_output(write_quotas: Any, tmp_path: Path) -> None:
    """A backend that configured no logging sees no line from the client, even when it reloads the quota
    file or refuses a broken one; the lines go to the standard library's ``agentworker.client`` logger."""
    path = write_quotas({"pools": {"standard": {"shards": 1}}})
    script = tmp_path / "backend.py"
    script.write_text(f"""
import logging
from agentworker.client import AgentWorkerClient
from agentworker.settings import Settings

path = {str(path)!r}
client = AgentWorkerClient.from_settings(Settings(redis_url="redis://127.0.0.1:1/0", config=path))
open(path, "w").write("pools: {{standard: {{shards: 2}}}}\\n")
assert client.refresh_config(force=True) and client.config.pools["standard"].shards == 2
open(path, "w").write("pools: [not, a, mapping]\\n")
assert not client.refresh_config(force=True)
records = []
handler = logging.Handler(); handler.emit = records.append
logging.getLogger("agentworker.client").addHandler(handler)
logging.getLogger("agentworker.client").setLevel(logging.INFO)
open(path, "w").write("pools: {{standard: {{shards: 3}}}}\\n")
assert client.refresh_config(force=True)
print("records", len(records))
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env=NO_REDIS_ENV)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "records 1\n", "only the backend's own print; the client's lines reach its logger"
    assert "quota file" not in done.stderr

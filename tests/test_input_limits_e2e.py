"""Input limits end to end: the real ``agentworker run`` and a real worker process under hostile quota
files (Latin-1, 50 MB, alias bombs, 100k levels of nesting), seen only from outside: HTTP, logs, pids.

Every refusal keeps the running config in the supervisor and in every worker, with one log line and no
traceback; the supervisor refuses with the very function the workers use, so it never signals them a
file they would refuse. The one time bound asserted is where the issue says "refused within a second":
POST /admin/reload answers within a generous 5 s.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis

from agentworker import keys
from tests.conftest import make_client, wait_for
from tests.supervisor_helpers import SupervisorProcess, serving_pids, supervisor_factory
from tests.test_input_limits import DEEP, LATIN1, alias_bomb, many_aliases

pytestmark = pytest.mark.slow

TOKEN = "limits-admin-token"
REFUSED_WITHIN_S = 5.0  # the issue says "within a second"; room for a loaded machine
REFUSED = "quota file reload refused; keeping the running config"
QUOTAS: dict[str, Any] = {"default_pool": "standard",
                          "pools": {"standard": {"shards": 1, "processes": 2, "concurrency": 4, "job_timeout": 30}},
                          "tenants": {"acme": {"max_concurrency": 4}}}


@pytest.fixture
def supervisors(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


def log_records(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def refusals(text: str) -> list[dict[str, Any]]:
    return [r for r in log_records(text) if r.get("event") == REFUSED]


async def restarts_total(sup: SupervisorProcess) -> float:
    return sum(value for (name, _labels), value in (await sup.metrics()).items()
               if name == "agentworker_worker_restarts_total")


async def reload_with_health_polled(sup: SupervisorProcess) -> tuple[int, dict[str, Any], float, list[int]]:
    """POST /admin/reload while /health is polled without pause; the answer, its time, /health codes."""
    codes: list[int] = []
    done = asyncio.Event()

    async def poll_health() -> None:
        while not done.is_set():
            code, _headers, _body = await sup.request("/health")
            codes.append(code)

    poller = asyncio.create_task(poll_health())
    try:
        started = time.monotonic()
        code, body = await sup.get_json("/admin/reload", "POST", token=TOKEN)
        took = time.monotonic() - started
        await wait_for(lambda: len(codes) >= 2, 10, what="/health answers")
    finally:
        done.set()
        await poller
    return code, body, took, codes


@pytest.mark.timeout(180)
async def test_a_latin1_quota_file_is_refused_by_the_supervisor_and_no_worker_restarts(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Callable[..., Path], redis_url: str) -> None:
    config = write_quotas(QUOTAS)
    client_config = write_quotas(QUOTAS, name="client.yaml")
    sup = supervisors(config, AGENTWORKER_ADMIN_TOKEN=TOKEN)
    status = await sup.wait_ready()
    pids = serving_pids(status, "standard")
    assert len(pids) == 2

    # Valid but for a Latin-1 comment, and it would change the workers' concurrency if it were taken.
    config.write_bytes(LATIN1.replace(b"{shards: 2}", b"{shards: 1, processes: 2, concurrency: 9}"))
    # The file watcher (polling every 0.5 s) refuses it first, then the admin endpoint and SIGHUP.
    await sup.wait_status(lambda s: (s["supervisor"]["last_reload"] or {}).get("trigger") == "file change", 20,
                          what="the watcher to refuse the file")
    code, body = await sup.get_json("/admin/reload", "POST", token=TOKEN)
    assert code == 422 and body["ok"] is False
    assert body["errors"] == ["the file is not UTF-8: byte 0xe9 at line 4, column 15 cannot be decoded "
                              "(save it as UTF-8)"]
    sup.signal(signal.SIGHUP)
    await sup.wait_status(lambda s: s["supervisor"]["last_reload"]["trigger"] == "SIGHUP", 20,
                          what="the SIGHUP reload to be refused")

    status = await sup.status()
    assert status["supervisor"]["config_version"] == 1 and status["supervisor"]["last_reload"]["ok"] is False
    assert serving_pids(status, "standard") == pids  # the same processes, never signalled
    assert await restarts_total(sup) == 0
    log = sup.log()
    assert "Traceback" not in log and "UnicodeDecodeError" not in log
    # One line per refusal, all the supervisor's: no worker was sent the file.
    assert {r.get("role") for r in refusals(log)} == {"supervisor"} and len(refusals(log)) == 3
    async with make_client(redis_url, client_config) as client:
        job = await client.enqueue("probe_count", tenant_id="acme", payload={"message": "after"})
        assert await job.result(timeout=30) is not None


@pytest.mark.timeout(240)
async def test_big_bombed_and_deep_quota_files_are_refused_quickly_while_health_answers(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Callable[..., Path], tmp_path: Path) -> None:
    config = write_quotas(QUOTAS)
    good = config.read_bytes()
    sup = supervisors(config, AGENTWORKER_ADMIN_TOKEN=TOKEN, AGENTWORKER_CONFIG_POLL_INTERVAL="0")
    status = await sup.wait_ready()
    pids = serving_pids(status, "standard")

    tenants = "".join(f"  t{i}: {{max_pending: 10}}\n" for i in range(50 * 1024 * 1024 // 24))
    hostile = {
        "50 MB": (good + b"tenants:\n" + tenants.encode(), "AGENTWORKER_MAX_CONFIG_BYTES=8388608"),
        "alias bomb": (alias_bomb().encode(), "AGENTWORKER_MAX_CONFIG_BYTES=8388608"),
        "many aliases": (many_aliases().encode(), "AGENTWORKER_MAX_YAML_ALIASES=100"),
        "100k nested": (DEEP.encode(), "AGENTWORKER_MAX_YAML_DEPTH=64"),
    }
    for name, (content, limit) in hostile.items():
        config.write_bytes(content)
        code, body, took, health = await reload_with_health_polled(sup)
        assert code == 422 and body["ok"] is False, (name, body)
        assert took < REFUSED_WITHIN_S, (name, took)
        (error,) = body["errors"]
        assert limit in error and "\n" not in error, (name, error)
        assert set(health) == {200}, (name, health)

    status = await sup.status()
    assert status["supervisor"]["config_version"] == 1 and serving_pids(status, "standard") == pids
    assert await restarts_total(sup) == 0
    log = sup.log()
    assert "Traceback" not in log and "RecursionError" not in log
    assert len(refusals(log)) == len(hostile)
    # The good file again: taken, as before.
    config.write_bytes(good)
    code, body = await sup.get_json("/admin/reload", "POST", token=TOKEN)
    assert code == 200 and body["ok"] is True


@pytest.mark.timeout(120)
async def test_a_worker_refuses_a_latin1_file_on_sighup_and_keeps_serving(
        spawn_worker: Any, write_quotas: Callable[..., Path], redis_url: str, redis: Redis) -> None:
    data = {"pools": {"standard": {"shards": 1, "concurrency": 4, "job_timeout": 30}},
            "tenants": {"acme": {"max_concurrency": 2}}}
    path = write_quotas(data)
    client_config = write_quotas(data, name="client.yaml")
    worker = spawn_worker(path)
    await worker.wait_serving()
    for hostile in (LATIN1, DEEP.encode(), alias_bomb().encode()):
        before = len(refusals(worker.log()))
        path.write_bytes(hostile)
        worker.signal(signal.SIGHUP)
        await wait_for(lambda before=before: len(refusals(worker.log())) == before + 1, 20,
                       what="the worker to refuse the file")
        assert worker.proc.poll() is None
        async with make_client(redis_url, client_config) as client:
            job = await client.enqueue("probe_count", tenant_id="acme", payload={"message": "still serving"})
            assert await job.result(timeout=30) is not None
    log = worker.log()
    assert "Traceback" not in log and "RecursionError" not in log and "UnicodeDecodeError" not in log
    first, deep, bomb = (r["errors"] for r in refusals(log))
    assert first == ["the file is not UTF-8: byte 0xe9 at line 4, column 15 cannot be decoded (save it as UTF-8)"]
    assert "AGENTWORKER_MAX_YAML_DEPTH=64" in deep[0] and "AGENTWORKER_MAX_CONFIG_BYTES" in bomb[0]
    # A good file afterwards is taken.
    path.write_text(yaml.safe_dump({**data, "tenants": {"acme": {"max_concurrency": 1}}}))
    worker.signal(signal.SIGHUP)
    await wait_for(lambda: _acme_limits_are(redis, b"1 1 -1"), 20, what="the good file's cap to be published")


async def _acme_limits_are(redis: Redis, value: bytes) -> bool:
    """acme's limits as the worker published them for the claim script (max_concurrency weight max_pending)."""
    return await redis.hget(keys.tenant_limits("standard"), "acme") == value

"""End-to-end: ``agentworker run`` keeps its workers up, replaces dead, hung and bloated ones.

Every test starts the real supervisor as a subprocess and observes it only from outside: HTTP (/status,
/ready, /health, /metrics), Redis and the client, signals and the process table.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from redis.asyncio import Redis

from agentworker import keys
from agentworker.client import JobStatus
from agentworker.config import load_config
from agentworker.routing import routing_table_json
from tests.conftest import ROOT, free_port, make_client, wait_for, worker_env
from tests.supervisor_helpers import SupervisorProcess, live_workers, serving_pids, slot_rows, supervisor_factory

pytestmark = pytest.mark.slow

Quotas = Callable[..., Path]


@pytest.fixture
def supervisors(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


def quotas(**pools: dict[str, Any]) -> dict[str, Any]:
    return {"default_pool": next(iter(pools)), "pools": pools, "tenants": {}}


async def test_pools_come_up_with_their_process_counts(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis: Redis, redis_url: str,
        tmp_path: Path) -> None:
    config = write_quotas(quotas(standard={"shards": 3, "processes": 2, "concurrency": 4, "job_timeout": 30},
                                 premium={"shards": 1, "processes": 1, "concurrency": 4, "job_timeout": 30}))
    sup = supervisors(config)
    status = await sup.wait_ready()

    assert [r["slot"] for r in slot_rows(status, "standard")] == [0, 1]
    assert [r["slot"] for r in slot_rows(status, "premium")] == [0]
    pids = serving_pids(status, "standard") + serving_pids(status, "premium")
    assert len(set(pids)) == 3 and all(isinstance(pid, int) for pid in pids)
    assert sorted(live_workers(set(pids))) == sorted(pids)
    assert status["pools"]["standard"]["status"] == "ok"

    code, health = await sup.get_json("/health")
    assert code == 200 and health["status"] == "pass"
    code, headers, body = await sup.request("/ready")
    assert code == 200 and headers["Content-Type"].startswith("application/health+json")
    ready = json.loads(body)
    assert ready["status"] == "pass"
    assert {"redis:ping", "postgresql:connect", "pool:standard", "pool:premium"} <= set(ready["checks"])

    # The routing table is published for backends in other languages.
    await wait_for(lambda: redis.exists(keys.ROUTING), 10, what="routing table")
    assert (await redis.get(keys.ROUTING)).decode() == routing_table_json(load_config(config))

    # Jobs run, and their metrics reach /metrics through the supervisor.
    async with make_client(redis_url, config) as client:
        jobs = [await client.enqueue("echo", tenant_id=f"t{i}", payload={"message": str(i)}) for i in range(6)]
        assert [await job.result(timeout=15) for job in jobs] == [str(i) for i in range(6)]
    samples = await sup.metrics()
    done = sum(v for (name, labels), v in samples.items()
               if name == "agentworker_jobs_total" and ("outcome", "success") in labels)
    assert done == 6
    assert samples[("agentworker_worker_processes", frozenset({("pool", "standard"), ("state", "serving")}))] == 2
    assert ("agentworker_queue_depth", frozenset({("pool", "standard"), ("shard", "2")})) in samples

    # `agentworker status` prints the same processes as a table.
    out = await asyncio.to_thread(_run_cli, "status", "--url", sup.url, env=sup.env)
    assert out.returncode == 0, out.stderr
    for pid in pids:
        assert str(pid) in out.stdout
    assert "standard" in out.stdout and "premium" in out.stdout


async def test_kill_9_mid_job_restarts_the_slot_and_the_effect_happens_once(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis: Redis, redis_url: str) -> None:
    # job_timeout 3: ARQ lets another worker take a job of a killed one after 3 + 1 + 10 s.
    config = write_quotas(quotas(standard={"shards": 1, "processes": 1, "concurrency": 2, "job_timeout": 3}))
    sup = supervisors(config)
    status = await sup.wait_ready()
    [old_pid] = serving_pids(status, "standard")

    async with make_client(redis_url, config) as client:
        job = await client.enqueue("probe_effect", tenant_id="acme", payload={"name": "k9", "seconds": 2})
        await wait_for(lambda: _is(job.status(), JobStatus.IN_PROGRESS), 15, what="job to start")
        os.kill(old_pid, signal.SIGKILL)

        status = await sup.wait_status(
            lambda s: serving_pids(s, "standard") not in ([], [old_pid]), 30, what="a new worker in slot 0")
        row = slot_rows(status, "standard")[0]
        assert row["pid"] != old_pid and row["restarts"] == 1
        assert row["last_exit"]["pid"] == old_pid and row["last_exit"]["reason"] == "crash"
        assert row["last_exit"]["code"] == -signal.SIGKILL
        assert await sup.restarts("standard", "crash") == 1
        assert not live_workers({old_pid})

        assert await job.result(timeout=45) == 1
    assert await redis.hget("probe:effects", "k9") == b"1"


async def _is(status: Any, wanted: JobStatus) -> bool:
    return bool(await status == wanted)


async def test_a_worker_whose_loop_blocks_is_replaced_as_hung(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis_url: str) -> None:
    config = write_quotas(quotas(standard={"shards": 1, "processes": 1, "concurrency": 2, "job_timeout": 60,
                                           "max_tries": 1, "hang_timeout": 3}))
    sup = supervisors(config)
    status = await sup.wait_ready()
    [old_pid] = serving_pids(status, "standard")

    async with make_client(redis_url, config) as client:
        await client.enqueue("probe_block", tenant_id="slow", payload={"seconds": 40})
        status = await sup.wait_status(
            lambda s: serving_pids(s, "standard") not in ([], [old_pid]), 30, what="a replacement for the hung worker")
        assert await sup.restarts("standard", "hung") == 1
        status = await sup.wait_status(lambda s: slot_rows(s, "standard")[0]["last_exit"] is not None, 15,
                                       what="the hung worker to be killed and reaped")
        last_exit = slot_rows(status, "standard")[0]["last_exit"]
        assert last_exit["pid"] == old_pid and last_exit["reason"] == "hung"
        assert not live_workers({old_pid})
        # The new worker serves (the blocked job stays claimed by the dead one until ARQ's expiry).
        job = await client.enqueue("echo", tenant_id="other", payload={"message": "after"})
        assert await job.result(timeout=15) == "after"


async def test_a_worker_over_its_memory_limit_is_recycled_without_losing_jobs_or_capacity(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis: Redis, redis_url: str) -> None:
    # 32 MB is below any worker's resident memory: every worker gets recycled, paced by a growing backoff.
    config = write_quotas(quotas(standard={"shards": 2, "processes": 1, "concurrency": 4, "job_timeout": 30,
                                           "memory_limit_mb": 32}))
    sup = supervisors(config)
    await sup.wait_ready()
    min_serving: list[int] = []
    stop_watching = asyncio.Event()

    async def watch_capacity() -> None:
        while not stop_watching.is_set():
            min_serving.append(len(serving_pids(await sup.status(), "standard")))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch_capacity())
    job_ids: list[str] = []
    try:
        async with make_client(redis_url, config) as client:
            n = 0
            while await sup.restarts("standard", "memory") < 2 or n < 20:
                job = await client.enqueue("probe_sleep", tenant_id=f"t{n % 5}", payload={"seconds": 0.3})
                job_ids.append(job.job_id)
                n += 1
                await asyncio.sleep(0.1)
                assert n < 600, "no memory recycle happened"
            for job_id in job_ids:
                await client.job(job_id).result(timeout=30)
    finally:
        stop_watching.set()
        await watcher
    runs = {k.decode(): int(v) for k, v in (await redis.hgetall("probe:runs")).items()}
    assert runs == dict.fromkeys(job_ids, 1)  # every job ran, exactly once
    assert min(min_serving) == 1  # the replacement served before the old worker drained
    status = await sup.status()
    row = slot_rows(status, "standard")[0]
    assert row["memory_backoff_s"] > 0.5  # recycles back off instead of looping
    assert await sup.restarts("standard", "crash") == 0


async def test_a_pool_whose_workers_exit_at_start_backs_off_and_fails_readiness_alone(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis_url: str) -> None:
    config = write_quotas(quotas(standard={"shards": 1, "processes": 1, "concurrency": 2, "job_timeout": 30},
                                 broken={"shards": 1, "processes": 1, "concurrency": 2, "job_timeout": 30}))
    sup = supervisors(config, AGENTWORKER_TASK_MODULES="tests.probe_tasks,tests.probe_crash_at_start",
                      PROBE_CRASH_POOLS="broken")
    await sup.wait_up()
    backoffs: dict[int, float] = {}  # restarts so far -> backoff the slot waits after the last one

    async def failing_long_enough() -> bool:
        status = await sup.status()
        row = slot_rows(status, "broken")[0]
        if row["pid"] is None and row["restarts"]:
            backoffs[row["restarts"]] = row["backoff_s"]
        code, health = await sup.get_json("/health")
        assert code == 200 and health["status"] == "pass"
        return row["restarts"] >= 4 and len(backoffs) >= 3

    await wait_for(failing_long_enough, 60, what="four failed starts", interval=0.05)
    seen = [backoffs[n] for n in sorted(backoffs)]
    assert seen == sorted(seen) and seen[-1] > seen[0]  # growing intervals

    status = await sup.status()
    assert status["pools"]["broken"]["status"] == "failing"
    assert "exited with code 3" in status["pools"]["broken"]["reason"]
    assert status["pools"]["standard"]["status"] == "ok"
    code, ready = await sup.get_json("/ready")
    assert code == 503 and ready["status"] == "fail"
    assert ready["checks"]["pool:broken"][0]["status"] == "fail"
    assert ready["checks"]["pool:standard"][0]["status"] == "pass"
    assert await sup.restarts("broken", "crash") >= 4
    code, _health = await sup.get_json("/health")
    assert code == 200

    async with make_client(redis_url, config) as client:
        job = await client.enqueue("echo", tenant_id="fine", payload={"message": "still serving"})
        assert await job.result(timeout=15) == "still serving"


def _run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentworker", *args], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_user_mistakes_get_one_line_and_a_non_zero_exit(
        redis_url: str, quota_file: Path, tmp_path: Path) -> None:
    env = worker_env(redis_url, AGENTWORKER_HTTP_HOST="127.0.0.1")
    missing = _run_cli("run", "--config", str(tmp_path / "missing.yaml"), env=env)
    assert missing.returncode == 2
    assert "missing.yaml" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    assert "Traceback" not in missing.stderr + missing.stdout

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = _run_cli("run", "--config", str(quota_file), "--port", str(port),
                          env={**env, "AGENTWORKER_METRICS_DIR": str(tmp_path / "m")})
    assert in_use.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in in_use.stderr
    assert "Traceback" not in in_use.stderr + in_use.stdout
    assert len(in_use.stderr.strip().splitlines()) == 1
    assert '"worker started"' not in in_use.stdout

    unreachable = _run_cli("status", "--url", f"http://127.0.0.1:{free_port()}", env=env)
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1

    bad_setting = _run_cli("run", "--config", str(quota_file), env={**env, "AGENTWORKER_RESTART_BACKOFF_MAX": "x"})
    assert bad_setting.returncode == 2 and "AGENTWORKER_RESTART_BACKOFF_MAX" in bad_setting.stderr


def _jobs_succeeded(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> float:
    return sum(v for (name, labels), v in samples.items()
               if name == "agentworker_jobs_total" and ("outcome", "success") in labels)


@pytest.mark.timeout(180)
async def test_a_second_supervisor_on_the_same_metrics_directory_is_refused_and_touches_nothing(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis_url: str, tmp_path: Path) -> None:
    config = write_quotas(quotas(standard={"shards": 1, "processes": 1, "concurrency": 2, "job_timeout": 30}))
    first = supervisors(config, name="first")
    await first.wait_ready()
    async with make_client(redis_url, config) as client:
        jobs = [await client.enqueue("echo", tenant_id="acme", payload={"message": str(i)}) for i in range(3)]
        assert [await job.result(timeout=20) for job in jobs] == ["0", "1", "2"]
    assert _jobs_succeeded(await first.metrics()) == 3
    files_before = {path.name for path in first.metrics_dir.glob("*.db")}
    assert files_before

    # Same directory, on the live service's port (what emptied the directory before finding the port
    # taken) and on a free one (where nothing else would have stopped it).
    env = {**first.env, "AGENTWORKER_RUN_DIR": str(tmp_path / "second-run")}
    for port in (first.port, free_port()):
        second = await asyncio.to_thread(_run_cli, "run", "--config", str(config), "--port", str(port), env=env)
        assert second.returncode == 1, second
        assert second.stderr.strip().splitlines() == [
            f"agentworker: metrics directory {first.metrics_dir} is in use by another running supervisor "
            f"(pid {first.pid}): give each supervisor its own AGENTWORKER_METRICS_DIR"]
        assert "Traceback" not in second.stderr + second.stdout
        assert '"worker started"' not in second.stdout
    assert files_before <= {path.name for path in first.metrics_dir.glob("*.db")}
    assert _jobs_succeeded(await first.metrics()) == 3  # the live service's counters are intact

    # The kernel drops the lock with its holder, even on kill -9: no stale lock keeps the next one out.
    await first.status()  # records the worker pids, for the teardown to kill
    first.signal(signal.SIGKILL)
    assert await first.wait_exit() == -signal.SIGKILL
    third = supervisors(config, name="third", AGENTWORKER_METRICS_DIR=str(first.metrics_dir))
    await third.wait_ready()



async def test_workers_do_not_outlive_a_supervisor_killed_with_sigkill(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas) -> None:
    config = write_quotas(quotas(standard={"shards": 1, "processes": 2, "concurrency": 2, "job_timeout": 30}))
    sup = supervisors(config)
    pids = set(serving_pids(await sup.wait_all_serving(), "standard"))
    assert len(pids) == 2
    sup.signal(signal.SIGKILL)  # no chance to clean up: the kernel's parent-death signal stops the workers
    assert await sup.wait_exit() == -signal.SIGKILL
    await wait_for(lambda: not live_workers(pids), 30, what="orphaned workers to exit", interval=0.1)


PID_NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]


def _can_unshare() -> bool:
    try:
        return subprocess.run([*PID_NAMESPACE, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare and the right to create a PID namespace")
async def test_as_pid_1_it_reaps_orphans_and_stops_cleanly_on_sigterm(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis_url: str) -> None:
    config = write_quotas(quotas(standard={"shards": 1, "processes": 1, "concurrency": 2, "job_timeout": 30}))
    sup = supervisors(config, wrapper=PID_NAMESPACE,
                      AGENTWORKER_TASK_MODULES="tests.probe_tasks,tests.probe_orphans")
    status = await sup.wait_ready()
    assert status["supervisor"]["pid"] == 1
    init = psutil.Process(sup.supervisor_pid())  # unshare forks the supervisor as PID 1 of the namespace
    assert init.pid != sup.pid

    def orphans() -> list[psutil.Process]:
        return [p for p in init.children() if p.name() == "sleep"]

    async with make_client(redis_url, config) as client:
        job = await client.enqueue("probe_orphan", tenant_id="acme", payload={"seconds": 3})
        await job.result(timeout=15)
    await wait_for(lambda: bool(orphans()), 10, what="the orphan to be re-parented to PID 1")
    # Once the orphan exits, PID 1 must reap it: no zombie child is left behind.
    await wait_for(lambda: not orphans(), 20, what="the orphan to be reaped", interval=0.1)

    sup.signal(signal.SIGTERM)  # as Kubernetes does: to PID 1 of the container
    assert await sup.wait_exit() == 0
    assert not init.is_running()

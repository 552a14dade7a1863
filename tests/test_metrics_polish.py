"""What an SRE's dashboards need from /metrics, on a real `agentworker run`: series at 0 from the start,
the build, admission refusals per limit, made-up task names folded into `other`, and the queue depth kept
through a Redis outage."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from agentworker import jobs
from agentworker.config import load_config
from agentworker.routing import route_tenant
from agentworker.submit import QuotaExceeded
from tests.conftest import make_client, wait_for
from tests.supervisor_helpers import SupervisorProcess, supervisor_factory


@pytest.fixture
def supervisors(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.mark.timeout(120)
async def test_a_fresh_supervisor_shows_zeros_its_build_refusals_and_folds_unknown_task_names(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Callable[..., Path], redis: Redis,
        redis_url: str) -> None:
    config = write_quotas({"pools": {"standard": {"shards": 1, "processes": 1, "concurrency": 4}},
                           "tenants": {"acme": {"max_pending": 1, "rate_limit": "1/h"}}})
    sup = supervisors(config)
    await sup.wait_ready()

    async def zero_series() -> bool:
        return _value(await sup.metrics(), "agentworker_jobs_total", pool="standard", task="echo",
                      outcome="success") == 0

    await wait_for(zero_series, 30, what="the job counters at 0 before any job")
    samples = await sup.metrics()
    assert _value(samples, "agentworker_tenant_jobs_total", pool="standard", tenant="acme", outcome="failure") == 0
    assert _value(samples, "agentworker_build_info", version=_installed_version(), python=_python()) == 1
    assert _value(samples, "agentworker_admission_refusals_total", pool="standard", limit="max_pending") == 0

    async with make_client(redis_url, config) as client:
        await client.enqueue("echo", "acme", {"message": "one"}, defer=3600)  # pending: at its max of 1
        with pytest.raises(QuotaExceeded):
            await client.enqueue("echo", "acme", {"message": "two"})
    # 25 made-up task names from a careless producer: one `other` series, not 25
    route = route_tenant(load_config(config), "globex")
    now = int(time.time() * 1000)
    for i in range(25):
        job_id = f"globex:bogus_{i}:k"
        await redis.set(jobs.job_key(job_id), jobs.encode_job(f"bogus_{i}", {"tenant_id": "globex"}, now), px=60_000)
        await redis.zadd(route.queue, {job_id: now})

    async def counted() -> bool:
        samples = await sup.metrics()
        return (_value(samples, "agentworker_admission_refusals_total", pool="standard", limit="max_pending") == 1
                and (_value(samples, "agentworker_jobs_total", pool="standard", task="other",
                            outcome="rejected") or 0) >= 25)

    await wait_for(counted, 30, what="the refusal and the rejected jobs to be counted")
    tasks = {dict(labels)["task"] for name, labels in await _samples(sup) if name == "agentworker_jobs_total"}
    assert not any(task.startswith("bogus_") for task in tasks), tasks


async def _samples(sup: SupervisorProcess) -> list[tuple[str, frozenset[tuple[str, str]]]]:
    return list(await sup.metrics())


def _installed_version() -> str:
    from importlib import metadata

    return metadata.version("agentworker")


def _python() -> str:
    import platform

    return platform.python_version()

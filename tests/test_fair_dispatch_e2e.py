"""Fair dispatch seen from outside: the real ``agentworker run``, tenants sharing one shard.

The order in which jobs start is recorded from inside them (``probe_started``), so the assertions are
about order and shares, not about timings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.conftest import make_client, wait_for
from tests.supervisor_helpers import SupervisorProcess, supervisor_factory

pytestmark = pytest.mark.slow


@pytest.fixture
def supervisors(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


def one_shard(tenants: dict[str, Any], concurrency: int = 4) -> dict[str, Any]:
    return {"default_pool": "standard", "tenants": tenants,
            "pools": {"standard": {"shards": 1, "processes": 1, "concurrency": concurrency, "job_timeout": 60}}}


async def test_a_tenant_beside_a_flood_on_its_own_shard_starts_without_waiting_for_the_backlog(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Callable[..., Path], redis: Redis,
        redis_url: str) -> None:
    config = write_quotas(one_shard({}))
    sup = supervisors(config)
    await sup.wait_ready()
    async with make_client(redis_url, config) as client:
        flood = [await client.enqueue("probe_started", tenant_id="flood", payload={"seconds": 0.05})
                 for _ in range(400)]
        await wait_for(lambda: _started(redis, 8), 30, what="the flood to be running")
        quiet = [await client.enqueue("probe_started", tenant_id="quiet", payload={}) for _ in range(5)]
        for handle in quiet:
            await handle.result(timeout=30)
        starts = [s.decode() for s in await redis.lrange("probe:starts", 0, -1)]
        last_quiet = max(i for i, tenant in enumerate(starts) if tenant == "quiet")
        first_quiet = starts.index("quiet")
        # Each of the quiet tenant's jobs started within a few of the flood's, not after its backlog of ~390.
        assert last_quiet - first_quiet <= 2 * len(quiet) + 4, starts[first_quiet:last_quiet + 1]
        assert starts.count("flood") < 400 - 100, "the quiet jobs were done while most of the flood still waited"
        for handle in flood[:5]:
            await handle.result(timeout=60)


async def _started(redis: Redis, n: int) -> bool:
    return int(await redis.llen("probe:starts")) >= n


async def test_weights_share_the_pool_between_saturating_tenants(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Callable[..., Path], redis: Redis,
        redis_url: str) -> None:
    weights = {"light": 1, "medium": 2, "heavy": 4}
    config = write_quotas(one_shard({name: {"weight": w} for name, w in weights.items()}, concurrency=4))
    async with make_client(redis_url, config) as client:
        # Everything is queued before the supervisor starts, so the three are saturating from the first claim.
        for tenant in weights:
            for _ in range(150):
                await client.enqueue("probe_started", tenant_id=tenant, payload={"seconds": 0.01})
        sup = supervisors(config)
        await sup.wait_ready()
        await wait_for(lambda: _started(redis, 210), 60, what="210 starts")
    starts = Counter(s.decode() for s in (await redis.lrange("probe:starts", 0, 209)))
    for tenant, weight in weights.items():
        share = starts[tenant] / 210
        assert abs(share - weight / 7) <= 0.1 * weight / 7, starts

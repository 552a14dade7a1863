from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import make_client


async def test_echo_roundtrip(redis_url: str, quota_file: Path, spawn_worker: Any) -> None:
    worker = spawn_worker(quota_file, "standard")
    await worker.wait_serving()
    async with make_client(redis_url, quota_file) as client:
        job = await client.enqueue("echo", tenant_id="t1", payload={"message": "hello"})
        assert await job.result(timeout=10) == "hello"

"""The zygote: workers forked from a pre-imported parent hold nothing of it, are the supervisor's children
(reaped, replaced, killed with it), and when the zygote dies workers start afresh until it is back.

Mechanisms, not timings: every test drives the real ``agentworker run`` and looks at it from outside
(its log, /status, Redis ``CLIENT LIST``, the process table and ``/proc``).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from redis.asyncio import Redis

from agentworker.pools.zygote_process import fork_hazards
from agentworker.settings import Settings, SettingsError
from tests.conftest import make_client, wait_for
from tests.supervisor_helpers import SupervisorProcess, live_workers, serving_pids, supervisor_factory

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="the zygote is Linux only")]

Quotas = Callable[..., Path]
POOL = {"shards": 4, "processes": 2, "concurrency": 4, "job_timeout": 30}


@pytest.fixture
def supervisors(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


def quotas(**pool: Any) -> dict[str, Any]:
    return {"default_pool": "standard", "pools": {"standard": {**POOL, **pool}}, "tenants": {}}


def log_events(sup: SupervisorProcess, prefix: str, role: str = "supervisor") -> list[dict[str, Any]]:
    """The JSON log records of ``role`` (supervisor or zygote) whose event starts with ``prefix``."""
    found = []
    for line in sup.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if (isinstance(record, dict) and record.get("role") == role
                and str(record.get("event", "")).startswith(prefix)):
            found.append(record)
    return found


def started_via(sup: SupervisorProcess) -> dict[int, str]:
    """worker pid -> how the supervisor started it ("zygote" or "spawn")."""
    return {int(r["worker_pid"]): str(r["via"]) for r in log_events(sup, "worker started")}


def zygote_pid(sup: SupervisorProcess) -> int | None:
    try:
        children = psutil.Process(sup.supervisor_pid()).children()
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if "agentworker zygote" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                return child.pid
        except psutil.NoSuchProcess:
            continue
    return None


def socket_inodes(pid: int) -> set[str]:
    """The sockets a process holds open, by inode (shared sockets would show the same inode twice)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            inodes.add(target)
    return inodes


def redis_ports(pid: int, redis_port: int) -> set[int]:
    """Local ports of the process's TCP connections to Redis."""
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == redis_port}


async def client_list_ports(redis: Redis) -> set[int]:
    return {int(str(c["addr"]).rsplit(":", 1)[1]) for c in await redis.client_list()}


async def ran_on(redis_url: str, config: Path, pid: int, attempts: int = 200) -> bool:
    """Enqueue probe jobs for many tenants until one runs in process ``pid``."""
    async with make_client(redis_url, config) as client:
        for n in range(attempts):
            job = await client.enqueue("probe_count", tenant_id=f"t{n}", payload={"message": str(n)})
            result = await job.result(timeout=15)
            if result["pid"] == pid:
                return True
    return False


async def test_forked_workers_share_no_connection_with_the_zygote_or_each_other(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis: Redis, redis_url: str) -> None:
    config = write_quotas(quotas())
    sup = supervisors(config)
    first = serving_pids(await sup.wait_all_serving(), "standard")
    assert len(first) == 2
    assert all(started_via(sup)[pid] == "zygote" for pid in first)
    zygote = zygote_pid(sup)
    assert zygote is not None
    for pid in first:  # re-parented by the double fork: the supervisor is their parent, not the zygote
        assert psutil.Process(pid).ppid() == sup.supervisor_pid()
        assert "agentworker.pools.worker" in " ".join(psutil.Process(pid).cmdline())

    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    # The zygote holds no socket at all: nothing a worker could inherit, and not the supervisor's HTTP port.
    assert socket_inodes(zygote) == set()
    assert redis_ports(zygote, redis_port) == set()
    inodes = {pid: socket_inodes(pid) for pid in first}
    ports = {pid: redis_ports(pid, redis_port) for pid in first}
    assert all(inodes.values()) and all(ports.values())
    assert inodes[first[0]].isdisjoint(inodes[first[1]])
    assert ports[first[0]].isdisjoint(ports[first[1]])
    connected = await client_list_ports(redis)
    assert ports[first[0]] | ports[first[1]] <= connected  # Redis sees each worker's own connections

    # kill -9 one: the supervisor reaps it (it is the parent) and forks a replacement from the zygote.
    victim, survivor = first
    os.kill(victim, signal.SIGKILL)
    status = await sup.wait_status(lambda s: len(serving_pids(s, "standard")) == 2
                                   and victim not in serving_pids(s, "standard"), 30, what="a replacement")
    [replacement] = set(serving_pids(status, "standard")) - {survivor}
    assert started_via(sup)[replacement] == "zygote"
    assert await sup.restarts("standard", "crash") == 1
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() != psutil.STATUS_ZOMBIE
    assert zygote_pid(sup) == zygote  # the same zygote served the restart

    await wait_for(lambda: bool(redis_ports(replacement, redis_port)), 10, what="the replacement to connect")
    new_ports = redis_ports(replacement, redis_port)
    assert new_ports.isdisjoint(redis_ports(survivor, redis_port))
    assert socket_inodes(replacement).isdisjoint(socket_inodes(survivor))
    assert socket_inodes(zygote) == set()
    assert new_ports <= await client_list_ports(redis)
    assert await ran_on(redis_url, config, replacement)


async def test_forked_workers_die_with_a_supervisor_killed_with_sigkill(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas) -> None:
    config = write_quotas(quotas())
    sup = supervisors(config)
    pids = set(serving_pids(await sup.wait_all_serving(), "standard"))
    assert {started_via(sup)[pid] for pid in pids} == {"zygote"}
    zygote = zygote_pid(sup)
    assert zygote is not None and len(live_workers(pids)) == 2
    sup.signal(signal.SIGKILL)  # PR_SET_PDEATHSIG, set by each worker once re-parented, stops them
    assert await sup.wait_exit() == -signal.SIGKILL
    await wait_for(lambda: not live_workers(pids), 30, what="forked workers to exit", interval=0.1)

    def zygote_gone() -> bool:
        try:
            return psutil.Process(zygote).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    await wait_for(zygote_gone, 30, what="the zygote to exit", interval=0.1)


async def test_without_the_zygote_workers_start_afresh_until_it_is_back(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis_url: str) -> None:
    config = write_quotas(quotas())
    sup = supervisors(config)
    first = serving_pids(await sup.wait_all_serving(), "standard")
    old_zygote = zygote_pid(sup)
    assert old_zygote is not None

    os.kill(old_zygote, signal.SIGKILL)
    # Reaped (its pid is gone, not a zombie) means the supervisor's loop has handled its exit.
    await wait_for(lambda: not psutil.pid_exists(old_zygote), 15, what="the supervisor to reap the zygote")
    # The next restart cannot wait for the zygote (it restarts after a backoff and re-imports): posix_spawn.
    os.kill(first[0], signal.SIGKILL)
    status = await sup.wait_status(lambda s: len(serving_pids(s, "standard")) == 2
                                   and first[0] not in serving_pids(s, "standard"), 30, what="a replacement")
    [fallback] = set(serving_pids(status, "standard")) - {first[1]}
    assert started_via(sup)[fallback] == "spawn"
    assert await ran_on(redis_url, config, fallback)

    # The zygote comes back, and later restarts are forked from it again.
    await wait_for(lambda: len(log_events(sup, "zygote ready")) == 2, 30, what="a new zygote")
    new_zygote = zygote_pid(sup)
    assert new_zygote is not None and new_zygote != old_zygote
    os.kill(first[1], signal.SIGKILL)
    status = await sup.wait_status(lambda s: len(serving_pids(s, "standard")) == 2
                                   and first[1] not in serving_pids(s, "standard"), 30, what="a replacement")
    [forked] = set(serving_pids(status, "standard")) - {fallback}
    assert started_via(sup)[forked] == "zygote"
    assert await ran_on(redis_url, config, forked)


async def test_a_zygote_left_unsafe_by_a_preloaded_module_is_not_used(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis_url: str) -> None:
    config = write_quotas(quotas(processes=1))
    sup = supervisors(config, AGENTWORKER_ZYGOTE_PRELOAD="tests.zygote_unsafe_probe")
    [pid] = serving_pids(await sup.wait_ready(), "standard")
    assert started_via(sup)[pid] == "spawn"
    [unsafe] = log_events(sup, "zygote unsafe to fork; workers start afresh")
    assert "tests.zygote_unsafe_probe" in unsafe["reason"] and "threads" in unsafe["reason"]
    assert zygote_pid(sup) is None  # not restarted: it would be unsafe again
    assert await ran_on(redis_url, config, pid)


async def test_zygote_off_starts_every_worker_afresh(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Quotas, redis_url: str) -> None:
    config = write_quotas(quotas(processes=1))
    sup = supervisors(config, AGENTWORKER_ZYGOTE="off")
    [pid] = serving_pids(await sup.wait_ready(), "standard")
    assert started_via(sup)[pid] == "spawn" and zygote_pid(sup) is None
    assert await ran_on(redis_url, config, pid)


def test_the_zygote_setting_is_on_or_off() -> None:
    assert Settings.from_env({}).zygote == "on"
    assert Settings.from_env({"AGENTWORKER_ZYGOTE": "off"}).zygote == "off"
    assert Settings.from_env({"AGENTWORKER_ZYGOTE_PRELOAD": "a.b, c"}).zygote_preload == ("a.b", "c")
    with pytest.raises(SettingsError, match="AGENTWORKER_ZYGOTE"):
        Settings.from_env({"AGENTWORKER_ZYGOTE": "yes"})


def test_fork_hazards_name_threads_and_sockets() -> None:
    import socket
    import threading

    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            hazards = fork_hazards()
    finally:
        release.set()
        thread.join()
    assert any("threads" in h for h in hazards)
    assert any("sockets" in h for h in hazards)

"""deploy/redis/users.acl against a real redis-server started with it.

The backend's user enqueues (the client's script), reads results and follows events, and can do nothing
else: no FLUSHALL, no DEL, no write outside the keys the enqueue script writes, no reading the workers'
state. The service's user runs the real supervisor and its workers end to end, without FLUSHALL, CONFIG,
DEBUG or KEYS, and without keys outside ``arq:*`` and ``agentworker:*``."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from agentworker.client import AgentWorkerClient
from agentworker.config import load_config
from agentworker.routing import route_tenant
from agentworker.settings import Settings
from bench.redis_server import PrivateRedis
from tests.conftest import ROOT, wait_for
from tests.supervisor_helpers import SupervisorProcess, serving_pids, supervisor_factory

pytestmark = pytest.mark.slow

ACL_FILE = ROOT / "deploy" / "redis" / "users.acl"
USERS = {"admin": "agentworker-admin", "service": "agentworker-service", "backend": "agentworker-backend"}


@dataclass(frozen=True)
class AclRedis:
    port: int
    passwords: dict[str, str]

    def url(self, role: str) -> str:
        return f"redis://{USERS[role]}:{self.passwords[role]}@127.0.0.1:{self.port}/0"


class RedisWithAcl(PrivateRedis):
    """The bench's private redis-server, started with ``--aclfile`` (its default user is off)."""

    def __init__(self, acl_file: Path, admin_url: str) -> None:
        super().__init__()
        self.acl_file = acl_file
        self.admin_url = admin_url

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--loglevel", "warning", "--aclfile", str(self.acl_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                client = sync_redis.Redis.from_url(self.admin_url.format(port=self.port))
                client.ping()
                client.close()
                return
            except sync_redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not found")
    passwords = {role: secrets.token_hex(16) for role in USERS}
    text = ACL_FILE.read_text()
    for role, password in passwords.items():
        placeholder = f">REPLACE_WITH_{role.upper()}_PASSWORD"
        assert placeholder in text, placeholder
        text = text.replace(placeholder, ">" + password)
    acl = tmp_path_factory.mktemp("acl") / "users.acl"
    acl.write_text(text)
    server = RedisWithAcl(acl, f"redis://{USERS['admin']}:{passwords['admin']}@127.0.0.1:{{port}}/0")
    server.start()
    try:
        yield AclRedis(server.port, passwords)
    finally:
        server.stop()


@pytest.fixture
async def admin(acl_redis: AclRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(acl_redis.url("admin"))
    await client.flushall()
    yield client
    await client.aclose()


async def first_event(client: AgentWorkerClient, tenant: str, name: str) -> str:
    """Follow the tenant's events from the start until one called ``name``."""
    async with asyncio.timeout(30):
        async for event in client.events(tenant, since="0", block_ms=200):
            if event.event == name:
                return event.event
    raise AssertionError("unreachable: the event stream does not end")


def backend_client(acl_redis: AclRedis, quota_file: Path) -> AgentWorkerClient:
    settings = Settings(redis_url=acl_redis.url("backend"), config=str(quota_file))
    return AgentWorkerClient.from_settings(settings, config=load_config(quota_file))


async def refused(call: Callable[[], object]) -> str:
    """The error a Redis call fails with (it must fail for want of permission)."""
    with pytest.raises(ResponseError) as info:
        await call()  # type: ignore[misc]
    message = str(info.value)
    assert (isinstance(info.value, NoPermissionError) or "no permissions" in message
            or "The user executing the script can't" in message), message
    return message


async def test_no_one_gets_in_without_a_user(acl_redis: AclRedis) -> None:
    anonymous = Redis(port=acl_redis.port)
    try:
        with pytest.raises(AuthenticationError, match="Authentication required"):
            await anonymous.get("arq:job:x")
    finally:
        await anonymous.aclose()


async def test_the_backend_user_enqueues_and_reads_and_nothing_more(
        acl_redis: AclRedis, admin: Redis, quota_file: Path) -> None:
    async with backend_client(acl_redis, quota_file) as client:
        job = await client.enqueue("echo", "acme", payload={"message": "hi"}, idempotency_key="k1")
        assert job.created
        again = await client.enqueue("echo", "acme", payload={"message": "hi"}, idempotency_key="k1")
        assert not again.created, "the duplicate check reads arq:job and arq:result"
        deferred = await client.enqueue("echo", "acme", payload={"message": "later"}, defer=60)
        assert (await job.status()).value == "queued" and (await deferred.status()).value == "deferred"
        assert await client.pending_count("acme") == 2
        assert await job.info() is None
        # Results and events, as the workers write them.
        await admin.set("arq:result:acme:echo:k1", b'{"t":1,"f":"echo","a":[],"k":{},"et":0,"s":true,"r":"hi"}')
        await admin.xadd("agentworker:stream:acme", {"event": '{"event": "job_completed", "tenant_id": "acme", '
                                                              '"ts": "2026-01-01T00:00:00Z", "data": {}}'})
        assert await job.result(timeout=5) == "hi"
        assert await first_event(client, "acme", "job_completed") == "job_completed"
        await admin.set("agentworker:routing", b"{}")
        assert await client.redis.get("agentworker:routing") == b"{}"
        pubsub = client.redis.pubsub()
        await pubsub.subscribe("agentworker:events:acme")
        await pubsub.aclose()

        r = client.redis
        await refused(lambda: r.flushall())
        await refused(lambda: r.flushdb())
        await refused(lambda: r.keys("*"))
        await refused(lambda: r.config_get("*"))
        await refused(lambda: r.delete("arq:job:acme:echo:k1"))
        await refused(lambda: r.set("arq:result:acme:echo:forged", b"{}"))
        await refused(lambda: r.set("agentworker:routing", b"{}"))
        await refused(lambda: r.set("elsewhere", b"x"))
        await refused(lambda: r.zadd("agentworker:running:standard:0", {"x": 1}))
        await refused(lambda: r.hset("agentworker:limits:standard", "acme", "0 0 0"))
        await refused(lambda: r.hgetall("agentworker:dead:standard"))
        await refused(lambda: r.hgetall("agentworker:attempt:acme:echo:k1"))
        await refused(lambda: r.set("arq:in-progress:acme:echo:k1", b"me"))
        await refused(lambda: r.zadd("agentworker:capped:standard:0", {"acme": 1}))
        await refused(lambda: r.eval("return redis.call('DEL', KEYS[1])", 1, "arq:job:acme:echo:k1"))
        # A script of its own runs with its own rights: no more than the commands and keys above.
        sha = await r.script_load("return redis.call('DEL', KEYS[1])")
        await refused(lambda: r.evalsha(sha, 1, "arq:job:acme:echo:k1"))
        sha = await r.script_load("return redis.call('SET', 'agentworker:routing', 'x')")
        await refused(lambda: r.evalsha(sha, 0))
        await refused(lambda: r.publish("agentworker:other", "x"))
        forbidden = client.redis.pubsub()
        await forbidden.subscribe("agentworker:wakeup-elsewhere")  # the refusal is the reply
        with pytest.raises(NoPermissionError, match="no permissions to access one of the channels"):
            await forbidden.get_message(timeout=1)
        await forbidden.aclose()
    assert await admin.exists("arq:job:acme:echo:k1") == 1


@pytest.fixture
def start_supervisor(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


async def test_the_service_user_runs_the_service_end_to_end(
        acl_redis: AclRedis, admin: Redis, quota_file: Path,
        start_supervisor: Callable[..., SupervisorProcess]) -> None:
    sup = start_supervisor(quota_file, redis=acl_redis.url("service"))
    await sup.wait_up()
    await sup.wait_status(lambda status: bool(serving_pids(status, "standard")) and
                          bool(serving_pids(status, "premium")), timeout=45)
    async with backend_client(acl_redis, quota_file) as client:
        jobs = [await client.enqueue("echo", tenant, payload={"message": tenant}) for tenant in ("acme", "globex")]
        assert [await job.result(timeout=30) for job in jobs] == ["acme", "globex"]
        assert await first_event(client, "acme", "job_completed") == "job_completed"
        await wait_for(lambda: admin.exists("agentworker:routing"), 15, what="the routing table")
        assert await client.redis.get("agentworker:routing")
        node = shutil.which("node")
        if node is not None:  # the protocol's reference producer (docs/protocol.md), as the backend's user
            done = await asyncio.to_thread(
                subprocess.run, [node, str(ROOT / "tests" / "producers" / "enqueue.mjs"), "--redis",
                                 acl_redis.url("backend"), "--tenant", "acme", "--task", "echo", "--key", "node-1",
                                 "--payload", '{"message": "from node"}', "--wait", "20"],
                capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert done.returncode == 0, (done.stdout, done.stderr)
            assert json.loads(done.stdout.splitlines()[-1])["r"] == "from node"
        # An unreadable job (written as a plain ARQ producer would, into the shard's inbox) is dead-lettered.
        queue = route_tenant(load_config(quota_file), "acme").queue
        await admin.set("arq:job:acme:echo:pickled", b"\x80\x04pickle")
        await admin.zadd(queue, {"acme:echo:pickled": int(time.time() * 1000)})
        await wait_for(lambda: admin.hexists("agentworker:dead:standard", "acme:echo:pickled"), 20,
                       what="the dead letter")
    sup.signal(signal.SIGTERM)
    assert await sup.wait_exit() == 0
    log = sup.log()
    for refusal in ("NOPERM", "NoPermission", "no permissions", "can't run this command"):
        assert refusal not in log, log[-3000:]

    service = Redis.from_url(acl_redis.url("service"))
    try:
        for call in (lambda: service.flushall(), lambda: service.flushdb(), lambda: service.config_get("*"),
                     lambda: service.keys("*"), lambda: service.set("elsewhere", "x"),
                     lambda: service.publish("elsewhere", "x"), lambda: service.acl_list()):
            await refused(call)
        # DEBUG is off in the server anyway (enable-debug-command): ask the ACL itself.
        verdict = await admin.execute_command("ACL", "DRYRUN", USERS["service"], "DEBUG", "SLEEP", "0")
        assert b"no permissions to run the 'debug' command" in verdict
    finally:
        await service.aclose()

"""The egress guard against real local peers: SSRF at the service's own Redis (the session's private
redis-server), PostgreSQL (the machine's, on 5432) and HTTP port, at the metadata address, through names,
DNS answers that change and redirects — through the real call sites (http steps, poll sources, the CRM
tools, tenant MCP servers, SMTP, model endpoints); and the platform's model key never leaving home."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis as sync_redis
import structlog
from aiohttp import web
from langchain_core.messages import HumanMessage

from agentworker import egress
from agentworker.client import JobFailed
from agentworker.db import Database
from agentworker.db import integrations as integration_rows
from agentworker.egress import EgressGuard, EgressRefused, internal_reason, parse_allow_list
from agentworker.graphs.models import ModelSpecError, chat_model, tenant_chat_model
from agentworker.graphs.run_context import RunContext
from agentworker.graphs.step_kinds import PermanentStepError, execute
from agentworker.integrations import ModelSettings
from agentworker.schedules.sources import SourceError, read_source
from agentworker.schedules.spec import PollSource
from agentworker.settings import Settings, SettingsError
from agentworker.tools import TOOLS, ToolContext, ToolError
from agentworker.tools.scope import TenantScope
from agentworker.tools.toolset import open_toolset
from agentworker.workflows.definition import HttpStep
from tests.conftest import new_tenant
from tests.workflow_helpers import workflow_client, workflow_worker_env

HINT = "; allow it with AGENTWORKER_EGRESS_ALLOW"
NEVER = ", which no allow-list opens to tenants"
PLATFORM_KEY = "sk-platform-secret-key"


class Peer:
    """An aiohttp app on 127.0.0.1 that records what reaches it; ``/redirect...`` answers 307 to
    ``redirect_to``."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.redirect_to = ""
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        async def answer(request: web.Request) -> web.StreamResponse:
            self.requests.append(request.path)
            if request.path.startswith("/redirect"):
                raise web.HTTPTemporaryRedirect(self.redirect_to)
            return web.json_response({"items": [], "next_cursor": None, "contacts": [], "path": request.path})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    started = Peer()
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture
async def supervisor_port() -> AsyncIterator[Peer]:
    """Stands in for the supervisor's HTTP port (AGENTWORKER_PORT points at it)."""
    started = Peer()
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture
def own(monkeypatch: pytest.MonkeyPatch, redis_url: str, database_url: str,
        supervisor_port: Peer) -> dict[str, tuple[str, str]]:
    """The service's own endpoints, as this process's settings name them: name -> (URL, refusal)."""
    monkeypatch.setenv("AGENTWORKER_REDIS_URL", redis_url)
    monkeypatch.setenv("AGENTWORKER_DATABASE_URL", database_url)
    monkeypatch.setenv("AGENTWORKER_PORT", str(supervisor_port.port))
    redis_port, database_port = urlsplit(redis_url).port, urlsplit(database_url).port or 5432
    return {
        "redis": (f"http://127.0.0.1:{redis_port}/",
                  f"egress to 127.0.0.1:{redis_port} refused: the service's own Redis (AGENTWORKER_REDIS_URL){NEVER}"),
        "postgresql": (f"http://127.0.0.1:{database_port}/",
                       f"egress to 127.0.0.1:{database_port} refused: the service's own PostgreSQL "
                       f"(AGENTWORKER_DATABASE_URL){NEVER}"),
        "http port": (f"{supervisor_port.base}/health",
                      f"egress to 127.0.0.1:{supervisor_port.port} refused: the service's own HTTP port "
                      f"(AGENTWORKER_PORT){NEVER}"),
    }


@pytest.fixture
def allow(monkeypatch: pytest.MonkeyPatch) -> Callable[[str | None], None]:
    def set_allow(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("AGENTWORKER_EGRESS_ALLOW", raising=False)
        else:
            monkeypatch.setenv("AGENTWORKER_EGRESS_ALLOW", value)

    return set_allow


def redis_connections(redis_url: str) -> Callable[[], int]:
    """Connections the Redis server has accepted so far (counted over one connection of our own)."""
    client = sync_redis.Redis.from_url(redis_url)

    def count() -> int:
        return int(client.info("stats")["total_connections_received"])

    return count


def step_env(database: Database | None = None) -> RunContext:
    async def emit(event: str, data: dict[str, Any]) -> None:
        return None

    scope = TenantScope(tenant_id="egress", database=database, emit=emit,  # type: ignore[arg-type]
                        log=structlog.get_logger("test"))
    return RunContext(scope=scope, workflow_id="wf", run_id="run-1", job_id="egress:execute_workflow:j")


async def http_step(url: str) -> Any:
    return await execute(HttpStep(id="call", kind="http", url=url), {"url": url}, step_env())


async def poll(url: str) -> Any:
    return await read_source(PollSource(url=url, workflow_id="on-item", timeout=5), None, set())


def tool_context(database: Database, tenant: str) -> ToolContext:
    async def emit(event: str, data: dict[str, Any]) -> None:
        return None

    return ToolContext(tenant_id=tenant, run_id="run-1", step_id="s1", idempotency_key="k1",
                       log=structlog.get_logger("test"), emit=emit, database=database)


async def crm_lookup(database: Database, base_url: str) -> Any:
    tenant = new_tenant("egress")
    async with database.tenant(tenant) as tx:
        await integration_rows.save_integration(tx, "crm", "default", {"base_url": base_url, "token": "crm-t"})
    return await TOOLS.get(tenant, "crm_find_contacts").func(tool_context(database, tenant), {"query": "Ada"})


# -- the policy ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback address"), ("127.8.9.10", "loopback address"), ("::1", "loopback address"),
    ("169.254.169.254", "link-local address"), ("fe80::1", "link-local address"),
    ("10.1.2.3", "private address"), ("172.16.0.1", "private address"), ("172.31.255.255", "private address"),
    ("192.168.1.1", "private address"), ("100.64.0.1", "shared (CGNAT) address"),
    ("100.127.255.254", "shared (CGNAT) address"), ("fc00::1", "unique-local address"),
    ("fd00:ec2::254", "unique-local address"), ("0.0.0.0", "unspecified address"), ("0.1.2.3", "unspecified address"),
    ("::", "unspecified address"), ("224.0.0.251", "multicast address"), ("ff02::1", "multicast address"),
    ("240.0.0.1", "reserved address"), ("255.255.255.255", "reserved address"), ("192.0.2.10", "reserved address"),
    ("198.18.0.1", "reserved address"), ("2001:db8::1", "reserved address"), ("::ffff:127.0.0.1", "loopback address"),
    ("::ffff:169.254.169.254", "link-local address"), ("::ffff:10.0.0.1", "private address"),
    ("2002:a00:1::", "private address (10.0.0.1) inside 2002:a00:1::"),
    ("64:ff9b::7f00:1", "loopback address (127.0.0.1) inside 64:ff9b::7f00:1"),
    ("8.8.8.8", None), ("172.32.0.1", None), ("100.128.0.1", None), ("2606:4700:4700::1111", None),
    ("::ffff:1.1.1.1", None),
])
def test_internal_ranges_are_named_and_public_addresses_pass(address: str, reason: str | None) -> None:
    assert internal_reason(ipaddress.ip_address(address)) == reason


def test_the_allow_list_takes_cidrs_and_host_port_pairs_and_names_a_bad_entry() -> None:
    allowed = parse_allow_list(["10.1.2.0/24", " crm.internal:8443", "127.0.0.1:9999", "[fd00::5]:443", "10.9.9.9"])
    assert [str(n) for n in allowed.networks] == ["10.1.2.0/24", "10.9.9.9/32"]
    assert allowed.names == {("crm.internal", 8443)}
    assert allowed.endpoints == {(ipaddress.ip_address("127.0.0.1"), 9999), (ipaddress.ip_address("fd00::5"), 443)}
    guard = EgressGuard(allowed, [])
    guard.check(ipaddress.ip_address("10.1.2.77"), 80)
    guard.check(ipaddress.ip_address("10.0.0.9"), 8443, "crm.internal")
    guard.check(ipaddress.ip_address("::ffff:127.0.0.1"), 9999)
    with pytest.raises(EgressRefused, match=r"^egress to crm.internal:8444 \(10.0.0.9\) refused: private address;"):
        guard.check(ipaddress.ip_address("10.0.0.9"), 8444, "crm.internal")  # the pair allows one port only
    with pytest.raises(EgressRefused, match=r"^egress to 127.0.0.1:9998 refused: loopback address;"):
        guard.check(ipaddress.ip_address("127.0.0.1"), 9998)
    for bad in ("crm.internal", "10.1.2.0/33", "host:http", "a b:80"):
        with pytest.raises(SettingsError, match=rf"AGENTWORKER_EGRESS_ALLOW: '{bad}'"):
            parse_allow_list([bad])
    with pytest.raises(SettingsError, match="AGENTWORKER_EGRESS_ALLOW: 'nope'"):
        Settings.from_env({"AGENTWORKER_EGRESS_ALLOW": "10.0.0.0/8,nope"})
    assert Settings.from_env({"AGENTWORKER_EGRESS_ALLOW": "10.0.0.0/8, crm:1"}).egress_allow == ("10.0.0.0/8", "crm:1")


async def test_the_services_own_endpoints_stay_refused_whatever_the_allow_list_says() -> None:
    settings = Settings(redis_url="redis://:pw@10.0.0.7:6380/0", database_url="postgresql://u@db1:5432,10.0.0.8/x",
                        egress_allow=("10.0.0.0/8", "127.0.0.0/8", "10.0.0.7:6380", "db1:5432", "0.0.0.0/0"),
                        port=8123)

    async def lookup(host: str, port: int, family: int) -> list[str]:
        return {"db1": ["10.0.0.9"], "other.internal": ["10.0.0.9"]}[host]

    guard = EgressGuard.from_settings(settings, lookup=lookup)
    await guard.prepare()
    refusals = {
        ("10.0.0.7", 6380): "the service's own Redis (AGENTWORKER_REDIS_URL)",
        ("10.0.0.8", 5432): "the service's own PostgreSQL (AGENTWORKER_DATABASE_URL)",
        ("10.0.0.9", 5432): "the service's own PostgreSQL (AGENTWORKER_DATABASE_URL)",  # what db1 resolves to
        ("127.0.0.1", 8123): "the service's own HTTP port (AGENTWORKER_PORT)",  # it binds 0.0.0.0
        ("127.3.2.1", 8123): "the service's own HTTP port (AGENTWORKER_PORT)",
        ("::ffff:127.0.0.1", 8123): "the service's own HTTP port (AGENTWORKER_PORT)",
        ("0.0.0.0", 8123): "the service's own HTTP port (AGENTWORKER_PORT)",
    }
    for (address, port), what in refusals.items():
        with pytest.raises(EgressRefused) as info:
            await guard.resolve(address, port)
        assert str(info.value).endswith(f"refused: {what}{NEVER}")
    with pytest.raises(EgressRefused, match=r"^egress to db1:5432 refused: the service's own PostgreSQL"):
        await guard.resolve("db1", 5432)  # by name, before any lookup
    assert await guard.resolve("10.0.0.7", 6379) == [ipaddress.ip_address("10.0.0.7")], "other ports: allowed"
    assert await guard.resolve("other.internal", 5433) == [ipaddress.ip_address("10.0.0.9")]


# -- refused by default, at every call site -----------------------------------------------------------------


async def test_by_default_loopback_is_refused_at_every_call_site_and_nothing_reaches_the_peer(
        peer: Peer, allow: Callable[[str | None], None], database: Database) -> None:
    allow(None)
    refused = f"egress to 127.0.0.1:{peer.port} refused: loopback address{HINT}"
    with pytest.raises(PermanentStepError) as step:
        await http_step(f"{peer.base}/items/1")
    assert str(step.value) == refused
    with pytest.raises(SourceError) as source:
        await poll(f"{peer.base}/feed")
    assert str(source.value) == refused
    with pytest.raises(ToolError) as crm:
        await crm_lookup(database, f"{peer.base}/api")
    assert str(crm.value) == f"CRM call GET {peer.base}/api/contacts: {refused}"
    model, _ = tenant_chat_model(ModelSettings(model="openai:gpt-x", base_url=f"{peer.base}/v1", max_retries=0))
    with pytest.raises(EgressRefused) as llm:
        await model.ainvoke([HumanMessage("hi")])
    assert str(llm.value) == refused
    with pytest.raises(PermanentStepError, match=rf"^egress to localhost:{peer.port} \(127.0.0.1\) refused: loopback"):
        await http_step(f"http://localhost:{peer.port}/")  # a name resolving to loopback
    assert peer.requests == [], "no request reached the peer"

    allow("127.0.0.1/32")  # the operator allows it: the same calls go through
    assert (await http_step(f"{peer.base}/items/1"))["body"]["path"] == "/items/1"
    assert (await poll(f"{peer.base}/feed")).pages == 1
    assert (await crm_lookup(database, f"{peer.base}/api"))["path"] == "/api/contacts"
    assert (await http_step(f"http://localhost:{peer.port}/ok"))["status"] == 200


@pytest.mark.parametrize("target", ["redis", "postgresql", "http port"])
async def test_ssrf_at_the_services_own_endpoints_is_refused_with_loopback_allowed(
        target: str, own: dict[str, tuple[str, str]], allow: Callable[[str | None], None], redis_url: str,
        database: Database, supervisor_port: Peer) -> None:
    allow(f"127.0.0.0/8,{urlsplit(own[target][0]).netloc}")  # even a pair naming it exactly does not open it
    url, refused = own[target]
    connections = redis_connections(redis_url)
    before = connections()
    with pytest.raises(PermanentStepError) as step:
        await http_step(url)
    assert str(step.value) == refused
    with pytest.raises(SourceError) as source:
        await poll(url)
    assert str(source.value) == refused
    with pytest.raises(ToolError) as crm:
        await crm_lookup(database, url.rstrip("/"))
    assert str(crm.value).endswith(f": {refused}")
    model, _ = tenant_chat_model(ModelSettings(model="openai:gpt-x", base_url=url.rstrip("/"), max_retries=0))
    with pytest.raises(EgressRefused) as llm:
        await model.ainvoke([HumanMessage("hi")])
    assert str(llm.value) == refused
    port = urlsplit(url).port
    with pytest.raises(PermanentStepError, match=rf"^egress to localhost:{port} \(127.0.0.1\) refused: the service"):
        await http_step(f"http://localhost:{port}/")
    with pytest.raises(PermanentStepError, match=rf"^egress to 127.0.0.1:{port} refused: the service's own"):
        await http_step(f"http://[::ffff:127.0.0.1]:{port}/")  # IPv4-mapped
    assert connections() == before, "Redis accepted no connection"
    assert supervisor_port.requests == []


async def test_the_metadata_address_and_internal_ranges_are_refused_without_trying_to_connect(
        allow: Callable[[str | None], None]) -> None:
    allow("127.0.0.1/32")
    with pytest.raises(PermanentStepError) as step:
        await http_step("http://169.254.169.254/latest/meta-data/iam/security-credentials/")
    assert str(step.value) == f"egress to 169.254.169.254:80 refused: link-local address{HINT}"
    with pytest.raises(SourceError, match=rf"^egress to \[fd00:ec2::254\]:80 refused: unique-local address{HINT}$"):
        await poll("http://[fd00:ec2::254]/latest/meta-data/")
    model, _ = tenant_chat_model(ModelSettings(model="openai:gpt-x", base_url="http://100.100.100.200/v1"))
    with pytest.raises(EgressRefused, match=r"^egress to 100.100.100.200:80 refused: shared \(CGNAT\) address"):
        await model.ainvoke([HumanMessage("hi")])
    async with egress.httpx_client(timeout=5) as client:
        with pytest.raises(EgressRefused, match=r"^egress to 167772161:80 \(10.0.0.1\) refused: private address"):
            await client.get("http://167772161/")  # a legacy numeric form of 10.0.0.1


# -- DNS: resolved once, every address checked, only checked addresses connected to --------------------------


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
async def test_a_name_is_resolved_once_and_a_changed_answer_cannot_get_round_the_check(
        client: str, peer: Peer) -> None:
    answers = [["127.0.0.1"], ["127.0.0.2"], ["93.184.215.14", "127.0.0.1"]]
    asked: list[str] = []

    async def rebinding(host: str, port: int, family: int) -> list[str]:
        asked.append(host)
        return answers[len(asked) - 1]

    guard = EgressGuard.from_settings(Settings(egress_allow=("127.0.0.1/32",)), lookup=rebinding)

    async def get(url: str) -> int:
        if client == "aiohttp":
            async with egress.http_session(timeout=aiohttp.ClientTimeout(total=5), guard=guard) as session, \
                    session.get(url) as response:
                return response.status
        async with egress.httpx_client(timeout=5, guard=guard) as http:
            return (await http.get(url)).status_code

    url = f"http://rebind.test:{peer.port}/ok"
    assert await get(url) == 200, "the checked address is the one connected to (the peer listens on 127.0.0.1)"
    assert asked == ["rebind.test"], "resolved once: the client never asks again behind the guard's back"
    with pytest.raises(EgressRefused) as changed:
        await get(url)
    assert str(changed.value) == f"egress to rebind.test:{peer.port} (127.0.0.2) refused: loopback address{HINT}"
    guard.allow = parse_allow_list([])  # a public and a loopback answer: all or nothing, nothing connected
    with pytest.raises(EgressRefused, match=rf"^egress to rebind.test:{peer.port} \(127.0.0.1\) refused: loopback"):
        await get(url)
    assert peer.requests == ["/ok"]


# -- redirects: every hop is checked ------------------------------------------------------------------------


async def test_a_redirect_from_an_allowed_server_to_a_refused_address_is_refused(
        peer: Peer, own: dict[str, tuple[str, str]], allow: Callable[[str | None], None], redis_url: str) -> None:
    allow("127.0.0.1/32")
    connections = redis_connections(redis_url)
    before = connections()
    redis_target, redis_refused = own["redis"]
    peer.redirect_to = f"{peer.base}/landed"
    assert (await http_step(f"{peer.base}/redirect"))["body"]["path"] == "/landed", "an allowed hop is followed"

    peer.redirect_to = redis_target
    with pytest.raises(PermanentStepError) as step:
        await http_step(f"{peer.base}/redirect")
    assert str(step.value) == redis_refused
    with pytest.raises(SourceError) as source:
        await poll(f"{peer.base}/redirect")
    assert str(source.value) == redis_refused
    peer.redirect_to = "http://169.254.169.254/latest/meta-data/"
    async with egress.httpx_client(timeout=5, follow_redirects=True) as client:
        with pytest.raises(EgressRefused, match=rf"^egress to 169.254.169.254:80 refused: link-local address{HINT}$"):
            await client.get(f"{peer.base}/redirect")
    peer.redirect_to = f"{redis_target}v1/chat/completions"
    model, _ = tenant_chat_model(ModelSettings(model="openai:gpt-x", base_url=f"{peer.base}/redirect", max_retries=0))
    with pytest.raises(EgressRefused) as llm:
        await model.ainvoke([HumanMessage("hi")])
    assert str(llm.value) == redis_refused
    assert peer.requests == ["/redirect", "/landed", "/redirect", "/redirect", "/redirect",
                             "/redirect/chat/completions"]
    assert connections() == before, "Redis accepted no connection"


# -- tenant MCP servers and SMTP ----------------------------------------------------------------------------


async def test_tenant_mcp_servers_and_smtp_hosts_go_through_the_guard(
        peer: Peer, own: dict[str, tuple[str, str]], allow: Callable[[str | None], None],
        database: Database) -> None:
    tenant = new_tenant("egress")
    redis_target, redis_refused = own["redis"]
    async with database.tenant(tenant) as tx:
        await integration_rows.save_integration(tx, "mcp", "local", {"url": f"{peer.base}/mcp", "timeout": 5})
        await integration_rows.save_integration(tx, "mcp", "redis", {"url": f"{redis_target}mcp", "timeout": 5})
        await integration_rows.save_integration(tx, "smtp", "default", {
            "host": "127.0.0.1", "port": urlsplit(redis_target).port, "security": "none",
            "from_address": "bot@acme.example"})
    events: list[tuple[str, dict[str, Any]]] = []

    async def emit(event: str, data: dict[str, Any]) -> None:
        events.append((event, data))

    scope = TenantScope(tenant_id=tenant, database=database, emit=emit, log=structlog.get_logger("test"))
    allow(None)
    async with open_toolset(scope, run_id="r1", step_id="tools") as toolset:
        assert toolset.servers == ()
    assert events == [
        ("agent_mcp_server_unavailable", {"server": "local", "error": f"egress to 127.0.0.1:{peer.port} refused: "
                                                                      f"loopback address{HINT}"}),
        ("agent_mcp_server_unavailable", {"server": "redis", "error": redis_refused})]
    assert peer.requests == []

    allow("127.0.0.1/32")
    with pytest.raises(ToolError) as smtp:
        await TOOLS.get(tenant, "send_email").func(tool_context(database, tenant), {
            "to": ["ada@example.com"], "subject": "Hi", "body": "Hello"})
    assert str(smtp.value) == f"SMTP server 127.0.0.1:{urlsplit(redis_target).port}: {redis_refused}"


# -- model endpoints: the platform's key stays home ---------------------------------------------------------


async def test_the_platform_key_goes_to_the_platform_endpoint_only(
        fake_openai: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", PLATFORM_KEY)
    monkeypatch.setenv("OPENAI_ORG_ID", "org-platform")
    tenant_endpoint = ModelSettings(model="openai:gpt-fake", base_url=fake_openai.base_url, max_retries=0)
    model, _ = tenant_chat_model(tenant_endpoint)
    assert (await model.ainvoke([HumanMessage("hello")])).text == "Noted: hello"
    model, _ = tenant_chat_model(tenant_endpoint.model_copy(update={"streaming": True}),
                                 override="openai:gpt-other")  # a step's override keeps the tenant's endpoint
    assert (await model.ainvoke([HumanMessage("again")])).text == "Noted: again"
    model, _ = tenant_chat_model(ModelSettings(model="openai:gpt-fake", base_url=fake_openai.base_url,
                                               api_key="sk-tenant-own", max_retries=0))
    await model.ainvoke([HumanMessage("with a key")])
    seen = [(r["authorization"], r["organization"]) for r in fake_openai.requests]
    assert seen == [(None, None), (None, None), ("Bearer sk-tenant-own", None)], \
        "a tenant endpoint gets the tenant's key or none, never the platform's key or organization"

    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)  # the operator's platform endpoint
    model, _ = tenant_chat_model(ModelSettings(model="openai:gpt-fake", max_retries=0))
    await model.ainvoke([HumanMessage("platform")])
    assert (fake_openai.requests[-1]["authorization"], fake_openai.requests[-1]["organization"]) == (
        f"Bearer {PLATFORM_KEY}", "org-platform")
    with pytest.raises(ModelSpecError, match=r"^model 'groq:llama' cannot use a base_url: only openai models"):
        chat_model("groq:llama", base_url=fake_openai.base_url)


@pytest.mark.slow
async def test_in_a_worker_an_agent_on_a_tenant_endpoint_never_sends_the_platform_key_and_ssrf_fails_the_step(
        redis_url: str, quota_file: Path, database_url: str, database: Database, spawn_worker: Any,
        fake_openai: Any) -> None:
    redis_port = urlsplit(redis_url).port
    worker = spawn_worker(quota_file, OPENAI_API_KEY=PLATFORM_KEY, **workflow_worker_env(database_url))
    tenant = new_tenant("egress")
    async with workflow_client(redis_url, quota_file, database) as client:
        await client.save_integration(tenant, "model", {"model": "openai:gpt-fake", "base_url": fake_openai.base_url,
                                                        "max_retries": 0})
        await client.save_workflow(tenant, {"id": "ssrf", "steps": [
            {"id": "steal", "kind": "http", "url": f"http://127.0.0.1:{redis_port}/"}]})
        await worker.wait_serving()
        chat = await client.enqueue("run_chat_agent", tenant_id=tenant,
                                    payload={"conversation_id": "c1", "message": "hello"})
        assert (await chat.result(timeout=60))["reply"] == "Noted: hello"
        job = await client.enqueue("execute_workflow", tenant_id=tenant, payload={"workflow_id": "ssrf"})
        with pytest.raises(JobFailed) as failed:
            await job.result(timeout=60)
    assert {r["authorization"] for r in fake_openai.requests} == {None}
    assert PLATFORM_KEY not in worker.log()
    assert (f"failed at step 'steal': egress to 127.0.0.1:{redis_port} refused: the service's own Redis "
            f"(AGENTWORKER_REDIS_URL){NEVER}") in failed.value.message

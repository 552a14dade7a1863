"""The tenant store from the outside: ``agentworker tenants ...`` (the real command, in a subprocess) and
the supervisor's ``/admin/tenants`` endpoints (the real app and SupervisorBackend). Real Redis and
PostgreSQL throughout; the store itself is tested in test_tenant_store.py."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from agentworker import keys
from agentworker.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from agentworker.health.app import MAX_BODY_BYTES, create_app
from agentworker.settings import Settings
from agentworker.supervisor.runner import SupervisorBackend
from tests.conftest import ROOT, TEST_DATABASE_SERVER, database_url_for, new_tenant, worker_env
from tests.supervisor_helpers import in_process_backend

QUOTAS: dict[str, Any] = {
    "default_pool": "standard",
    "pools": {"standard": {"shards": 2, "job_timeout": 300}, "premium": {"shards": 2, "job_timeout": 900}},
    "plans": {
        "free": {"max_concurrency": 2, "rate_limit": "5/s", "max_pending": 50},
        "pro": {"pool": "premium", "max_concurrency": 8, "weight": 2, "job_timeout": 600},
    },
    "tenant_defaults": {"plan": "free", "max_pending": 100},
    "tenants": {},
}
TOKEN = "tenants-admin-token"
#: nothing listens there
NO_DATABASE_URL = "postgresql://postgres@127.0.0.1:1/postgres"


@pytest.fixture
def quotas(write_quotas: Callable[[dict[str, Any]], Path]) -> Path:
    return write_quotas(QUOTAS)


# -- the command ---------------------------------------------------------------------------------------------


@pytest.fixture
def cli(redis_url: str, database_url: str, quotas: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str, database: str = database_url) -> subprocess.CompletedProcess[str]:
        env = worker_env(redis_url, AGENTWORKER_DATABASE_URL=database)
        return subprocess.run([sys.executable, "-m", "agentworker", "tenants", *args, "--config", str(quotas)],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)

    return run


def ok(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The stdout lines of a command that succeeded without a word on stderr."""
    assert proc.returncode == EXIT_OK, proc
    assert proc.stderr == "", proc.stderr
    return proc.stdout.splitlines()


def only_error_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, proc
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def limit_line(lines: list[str], key: str) -> list[str]:
    """``[value, source]`` of ``key`` in the effective limits a view prints."""
    found = [line.split(None, 2)[1:] for line in lines if re.match(rf"^  {key}\s", line)]
    assert len(found) == 1, lines
    return found[0]


def test_set_then_get_shows_the_override_and_where_each_limit_comes_from(cli: Callable[..., Any]) -> None:
    tenant = new_tenant("cli")
    lines = ok(cli("set", tenant, "--plan", "pro", "--max-concurrency", "4", "--rate-limit", "100/s",
                   "--by", "ops@test"))
    assert lines[0] == f"tenant {tenant}: saved as version 1"
    assert limit_line(lines, "max_concurrency") == ["4", "override"]

    lines = ok(cli("get", tenant))
    assert re.fullmatch(rf"tenant {tenant}: stored entry version 1, updated \S+ by ops@test", lines[0]), lines
    assert "plan: pro" in lines
    assert "overrides: max_concurrency=4 rate_limit=100/s" in lines
    assert re.fullmatch(r"route: pool premium, shard \d, queue agentworker:queue:premium:\d", lines[3]), lines
    assert limit_line(lines, "max_concurrency") == ["4", "override"]
    assert limit_line(lines, "rate_limit") == ["100/s", "override"]
    assert limit_line(lines, "pool") == ["premium", "plan pro"]
    assert limit_line(lines, "weight") == ["2", "plan pro"]
    assert limit_line(lines, "max_pending") == ["100", "tenant_defaults"]
    assert limit_line(lines, "job_timeout") == ["600", "plan pro"]

    view = json.loads(ok(cli("get", tenant, "--json"))[0])
    assert view["stored"] is True and view["plan"] == "pro" and view["version"] == 1
    assert view["overrides"] == {"max_concurrency": 4, "rate_limit": "100/s"}
    assert view["sources"]["max_concurrency"] == "override" and view["updated_by"] == "ops@test"

    # the same again changes nothing; --no-plan and a float; the default --by names this shell
    assert ok(cli("set", tenant, "--max-concurrency", "4"))[0] == f"tenant {tenant}: nothing changed " \
                                                                  "(the entry already says so)"
    view = json.loads(ok(cli("set", tenant, "--no-plan", "--weight", "1.5", "--json"))[0])
    assert view["version"] == 2 and view["plan"] is None and view["pool"] == "standard"
    assert view["limits"]["weight"] == 1.5 and view["updated_by"].startswith("cli:")


def test_a_tenant_without_an_entry_shows_the_files_limits(cli: Callable[..., Any]) -> None:
    tenant = new_tenant("cli")
    lines = ok(cli("get", tenant))
    assert lines[0] == f"tenant {tenant}: no stored entry (the quota file's limits apply)"
    assert limit_line(lines, "max_concurrency") == ["2", "plan free (tenant_defaults)"]
    assert limit_line(lines, "weight") == ["-", "(no limit)"]
    assert limit_line(lines, "job_timeout") == ["300", "pool standard"]


def test_a_bad_value_is_refused_with_its_path_and_nothing_changes(cli: Callable[..., Any]) -> None:
    tenant = new_tenant("cli")
    proc = cli("set", tenant, "--max-concurrency", "0")
    assert proc.returncode == EXIT_USAGE, proc
    assert proc.stderr.splitlines() == [f"tenant {tenant}: 1 error(s)",
                                        "  overrides.max_concurrency: must be >= 1 (got 0)"]
    assert proc.stdout == ""
    proc = cli("set", tenant, "--plan", "gold", "--job-timeout", "1000", "--rate-limit", "lots")
    assert proc.returncode == EXIT_USAGE, proc
    assert proc.stderr.splitlines()[0] == f"tenant {tenant}: 2 error(s)"
    assert "  plan: names plan 'gold', which is not defined (plans: free, pro)" in proc.stderr.splitlines()
    assert json.loads(ok(cli("history", tenant, "--json"))[0]) == []
    assert json.loads(ok(cli("get", tenant, "--json"))[0])["stored"] is False

    # mistakes of the command line itself: one line, exit 2
    assert "nothing to set" in only_error_line(cli("set", tenant), EXIT_USAGE)
    assert "invalid int value: 'many'" in only_error_line(cli("set", tenant, "--max-concurrency", "many"),
                                                          EXIT_USAGE)
    assert "not allowed with argument" in only_error_line(cli("set", tenant, "--plan", "pro", "--no-plan"),
                                                          EXIT_USAGE)
    proc = cli("set", tenant, "--max-concurrency", "3", "--by", "")
    assert proc.returncode == EXIT_USAGE and "by: must say who makes the change" in proc.stderr


def test_unset_keys_then_the_whole_entry(cli: Callable[..., Any]) -> None:
    tenant = new_tenant("cli")
    ok(cli("set", tenant, "--plan", "pro", "--max-concurrency", "4", "--max-pending", "7", "--by", "ops"))
    lines = ok(cli("unset", tenant, "max-concurrency", "plan", "--by", "ops"))
    assert lines[0] == f"tenant {tenant}: max_concurrency, plan unset, saved as version 2"
    assert limit_line(lines, "max_concurrency") == ["2", "plan free (tenant_defaults)"]
    assert limit_line(lines, "max_pending") == ["7", "override"]
    assert ok(cli("unset", tenant, "max_concurrency"))[0] == \
        f"tenant {tenant}: nothing changed (max_concurrency not set)"
    proc = cli("unset", tenant, "colour")
    assert proc.returncode == EXIT_USAGE, proc
    assert proc.stderr.splitlines()[0] == f"tenant {tenant}: 1 error(s)"
    assert proc.stderr.splitlines()[1].startswith("  unset.colour: unknown key (known: plan, pool, ")

    assert ok(cli("unset", tenant, "--by", "ops"))[0] == \
        f"tenant {tenant}: entry removed; the quota file's limits apply"
    view = json.loads(ok(cli("get", tenant, "--json"))[0])
    assert view["stored"] is False and view["overrides"] == {} and view["version"] == 3
    assert ok(cli("unset", tenant))[0] == f"tenant {tenant}: no stored entry; nothing to remove"

    other = new_tenant("cli")  # keys of a tenant without an entry: nothing recorded
    assert ok(cli("unset", other, "weight", "plan"))[0] == f"tenant {other}: no stored entry; nothing to remove"
    assert json.loads(ok(cli("history", other, "--json"))[0]) == []


def test_list_pages_through_the_stored_tenants(cli: Callable[..., Any]) -> None:
    prefix = f"lst-{uuid.uuid4().hex[:8]}"
    tenants = [f"{prefix}-{i}" for i in range(3)]
    for tenant in tenants:
        ok(cli("set", tenant, "--plan", "pro", "--by", "ops"))
    page = json.loads(ok(cli("list", "--after", prefix, "--limit", "2", "--json"))[0])
    assert [view["tenant_id"] for view in page] == tenants[:2]
    assert page[0]["plan"] == "pro" and page[0]["pool"] == "premium"
    lines = ok(cli("list", "--after", tenants[1], "--limit", "1"))
    assert lines[0].split() == ["TENANT", "PLAN", "POOL", "SHARD", "VERSION", "UPDATED", "BY", "OVERRIDES"]
    assert lines[1].split()[:3] == [tenants[2], "pro", "premium"]
    assert lines[-1] == f"1 stored tenant(s) after {tenants[1]!r}; more may follow: --after {tenants[2]}"
    proc = cli("list", "--limit", "0")
    assert proc.returncode == EXIT_USAGE, proc
    assert proc.stderr.splitlines() == ["tenant list: 1 error(s)",
                                        "  limit: must be an integer from 1 to 5000 (got 0)"]


def test_history_lists_each_change_newest_first(cli: Callable[..., Any]) -> None:
    tenant = new_tenant("cli")
    ok(cli("set", tenant, "--plan", "free", "--max-concurrency", "3", "--by", "alice"))
    ok(cli("set", tenant, "--plan", "pro", "--by", "bob"))
    ok(cli("unset", tenant, "--by", "carol"))
    lines = ok(cli("history", tenant))
    assert lines[0].split() == ["VERSION", "CHANGED", "BY", "CHANGE"]
    rows = [line.split(None, 3) for line in lines[1:4]]
    assert [(row[0], row[2]) for row in rows] == [("3", "carol"), ("2", "bob"), ("1", "alice")]
    assert rows[0][3] == "entry removed (was: plan=pro max_concurrency=3)"
    assert rows[1][3] == "plan free -> pro"
    assert rows[2][3] == "entry created: plan=free max_concurrency=3"
    assert lines[-1] == f"tenant {tenant}: 3 change(s)"
    changes = json.loads(ok(cli("history", tenant, "--limit", "1", "--json"))[0])
    assert len(changes) == 1 and changes[0]["changed_by"] == "carol" and changes[0]["new"] is None
    assert changes[0]["old"] == {"plan": "pro", "overrides": {"max_concurrency": 3}}


@pytest.fixture
def unmigrated_database_url() -> Iterator[str]:
    name = f"aw_unmigrated_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(TEST_DATABASE_SERVER, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield database_url_for(TEST_DATABASE_SERVER, name)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_a_bad_tenant_id_or_an_unusable_database_is_one_line(cli: Callable[..., Any],
                                                             unmigrated_database_url: str) -> None:
    for args in (("get", "Bad Tenant"), ("set", "Bad Tenant", "--plan", "pro"), ("history", "_x")):
        assert "invalid tenant id" in only_error_line(cli(*args, database=NO_DATABASE_URL), EXIT_USAGE)
    tenant = new_tenant("cli")
    line = only_error_line(cli("get", tenant, database=NO_DATABASE_URL), EXIT_FAILED)
    assert line.startswith("agentworker: cannot reach PostgreSQL at postgresql://postgres@127.0.0.1:1/"), line
    line = only_error_line(cli("set", tenant, "--plan", "pro", database=unmigrated_database_url), EXIT_FAILED)
    assert "is not migrated" in line and "run `agentworker migrate`" in line
    missing = database_url_for(TEST_DATABASE_SERVER, f"aw_missing_{uuid.uuid4().hex[:8]}")
    line = only_error_line(cli("list", database=missing), EXIT_FAILED)
    assert line.startswith("agentworker: PostgreSQL at ") and "has no such database" in line


# -- /admin/tenants --------------------------------------------------------------------------------------------


@pytest.fixture
async def served(redis: Redis, quotas: Path, tmp_path: Path,
                 database_url: str) -> AsyncIterator[tuple[TestClient[Any, Any], SupervisorBackend]]:
    backend = in_process_backend(redis, quotas, tmp_path, database_url=database_url, admin_token=TOKEN)
    async with TestClient(TestServer(create_app(backend))) as client:
        try:
            yield client, backend
        finally:
            await backend.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_patch_get_list_history_delete(served: tuple[TestClient[Any, Any], SupervisorBackend],
                                             redis: Redis) -> None:
    http, backend = served
    tenant = new_tenant("http")
    assert not backend._database.opened  # opened on the first tenant request only

    answer = await http.get(f"/admin/tenants/{tenant}", headers=AUTH)
    assert answer.status == 200
    view = await answer.json()
    assert view["stored"] is False and view["limits"]["max_concurrency"] == 2
    assert view["sources"]["max_concurrency"] == "plan free (tenant_defaults)"

    answer = await http.patch(f"/admin/tenants/{tenant}", headers=AUTH,
                              json={"plan": "pro", "overrides": {"max_concurrency": 4}, "by": "api:test"})
    assert answer.status == 200, await answer.text()
    view = await answer.json()
    assert view["stored"] is True and view["version"] == 1 and view["plan"] == "pro"
    assert view["pool"] == "premium" and view["sources"]["max_concurrency"] == "override"
    assert view["updated_by"] == "api:test"
    assert (await redis.hget(keys.tenant_record(tenant), "plan")) == b"pro"  # copied to Redis

    answer = await http.patch(f"/admin/tenants/{tenant}", headers=AUTH,
                              json={"plan": None, "unset": ["max_concurrency"], "overrides": {"weight": 3},
                                    "by": "api:test"})
    assert answer.status == 200, await answer.text()
    view = await answer.json()
    assert view["version"] == 2 and view["plan"] is None and view["overrides"] == {"weight": 3}
    assert view["pool"] == "standard"
    assert (await (await http.get(f"/admin/tenants/{tenant}", headers=AUTH)).json()) == view

    answer = await http.get("/admin/tenants", headers=AUTH, params={"after": tenant[:-1], "limit": "1"})
    assert answer.status == 200
    assert [v["tenant_id"] for v in await answer.json()] == [tenant]

    answer = await http.get(f"/admin/tenants/{tenant}/history", headers=AUTH, params={"limit": "5"})
    assert answer.status == 200
    changes = await answer.json()
    assert [c["version"] for c in changes] == [2, 1]
    assert changes[0]["old"] == {"plan": "pro", "overrides": {"max_concurrency": 4}}
    assert changes[0]["new"] == {"plan": None, "overrides": {"weight": 3}}

    answer = await http.delete(f"/admin/tenants/{tenant}", headers=AUTH, params={"by": "api:test"})
    assert answer.status == 200
    view = await answer.json()
    assert view["stored"] is False and view["version"] == 3 and view["overrides"] == {}
    answer = await http.delete(f"/admin/tenants/{tenant}", headers=AUTH, params={"by": "api:test"})
    assert answer.status == 404
    assert await answer.json() == {"error": f"tenant {tenant} has no stored entry", "errors": []}

    other = new_tenant("http")  # unsetting keys of a tenant without an entry records nothing
    answer = await http.patch(f"/admin/tenants/{other}", headers=AUTH, json={"unset": ["weight"], "by": "api"})
    assert answer.status == 200 and (await answer.json())["stored"] is False
    assert await (await http.get(f"/admin/tenants/{other}/history", headers=AUTH)).json() == []

    assert backend._database.opened
    await backend.close()
    assert not backend._database.opened


async def test_refused_requests_answer_400_with_every_error(
        served: tuple[TestClient[Any, Any], SupervisorBackend]) -> None:
    http, _ = served
    tenant = new_tenant("http")

    async def refused(method: str, path: str, status: int = 400, **kwargs: Any) -> dict[str, Any]:
        answer = await http.request(method, path, headers={**AUTH, **kwargs.pop("headers", {})}, **kwargs)
        assert answer.status == status, await answer.text()
        body: dict[str, Any] = await answer.json()
        assert set(body) == {"error", "errors"}, body
        return body

    body = await refused("PATCH", f"/admin/tenants/{tenant}",
                         json={"overrides": {"max_concurrency": 0, "rate_limit": "lots"}, "by": "api"})
    assert body["errors"] == ["overrides.max_concurrency: must be >= 1 (got 0)",
                              "overrides.rate_limit: must look like 50/s, 600/m or 1000/h"]
    assert body["error"] == f"tenant {tenant}: 2 error(s)"
    body = await refused("PATCH", f"/admin/tenants/{tenant}", json={"plan": "gold", "by": "api"})
    assert body["errors"] == ["plan: names plan 'gold', which is not defined (plans: free, pro)"]
    body = await refused("PATCH", f"/admin/tenants/{tenant}", json={"unset": ["colour"], "by": "api"})
    assert body["errors"][0].startswith("unset.colour: unknown key")
    body = await refused("PATCH", f"/admin/tenants/{tenant}", json={"plan": "pro", "by": ""})
    assert body["errors"][0].startswith("by: must say who makes the change")

    # the body's shape: every problem at once
    body = await refused("PATCH", f"/admin/tenants/{tenant}",
                         json={"plan": 3, "overrides": [1], "unset": "plan", "colour": "red"})
    assert body["error"] == "invalid request body"
    assert body["errors"] == ["colour: unknown key (known: by, overrides, plan, unset)",
                              "by: required (who makes the change, kept in the tenant's history)",
                              "plan: must be a plan's name or null (no plan)",
                              "overrides: must be a JSON object of tenant keys",
                              "unset: must be a list of key names"]
    for data in (b"[1, 2]", b"{nope", b"\xff\xfe", b"", b"[" * 50_000):
        body = await refused("PATCH", f"/admin/tenants/{tenant}", data=data)
        assert body["errors"][0].startswith("body: "), body
    body = await refused("PATCH", f"/admin/tenants/{tenant}", json={"by": "api"})
    assert body["errors"] == ["body: nothing to change (give plan, overrides or unset)"]
    big = json.dumps({"by": "api", "plan": "p" * MAX_BODY_BYTES}).encode()
    body = await refused("PATCH", f"/admin/tenants/{tenant}", 413, data=big)
    assert body["errors"] == [f"body: larger than {MAX_BODY_BYTES} bytes"]

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b" " * 1024

    body = await refused("PATCH", f"/admin/tenants/{tenant}", 413, data=chunked())
    assert body["errors"] == [f"body: larger than {MAX_BODY_BYTES} bytes"]

    # bad tenant ids and query values
    for method, path in [("GET", "/admin/tenants/Bad%20Tenant"), ("PATCH", "/admin/tenants/-x"),
                         ("DELETE", "/admin/tenants/Bad?by=api"), ("GET", "/admin/tenants/_x/history")]:
        body = await refused(method, path, json={"plan": "pro", "by": "api"} if method == "PATCH" else None)
        assert body["error"] == "invalid tenant id" and body["errors"][0].startswith("invalid tenant id")
    body = await refused("GET", "/admin/tenants?limit=lots")
    assert body["errors"] == ["limit: must be an integer from 1 to 5000 (got 'lots')"]
    body = await refused("GET", "/admin/tenants?limit=0")
    assert body["errors"] == ["limit: must be an integer from 1 to 5000 (got 0)"]
    body = await refused("GET", f"/admin/tenants/{tenant}/history?limit=9999")
    assert body["errors"] == ["limit: must be an integer from 1 to 5000 (got 9999)"]
    body = await refused("DELETE", f"/admin/tenants/{tenant}")  # no ?by=
    assert body["errors"][0].startswith("by: must say who makes the change")

    # none of it changed anything
    history = await http.get(f"/admin/tenants/{tenant}/history", headers=AUTH)
    assert history.status == 200 and await history.json() == []


async def test_the_admin_token_is_required(served: tuple[TestClient[Any, Any], SupervisorBackend],
                                           redis: Redis, quotas: Path, tmp_path: Path, database_url: str) -> None:
    http, _ = served
    tenant = new_tenant("http")
    for method, path in [("GET", "/admin/tenants"), ("GET", f"/admin/tenants/{tenant}"),
                         ("PATCH", f"/admin/tenants/{tenant}"), ("DELETE", f"/admin/tenants/{tenant}?by=x"),
                         ("GET", f"/admin/tenants/{tenant}/history")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            answer = await http.request(method, path, headers=headers, json={"plan": "pro", "by": "x"})
            assert answer.status == 401, (method, path, headers)
            assert answer.headers["WWW-Authenticate"] == 'Bearer realm="agentworker"'
    assert await (await http.get(f"/admin/tenants/{tenant}/history", headers=AUTH)).json() == []

    # no token configured: the admin endpoints do not exist
    backend = in_process_backend(redis, quotas, tmp_path, database_url=database_url)
    async with TestClient(TestServer(create_app(backend))) as tokenless:
        for headers in ({}, AUTH):
            answer = await tokenless.get(f"/admin/tenants/{tenant}", headers=headers)
            assert answer.status == 404
    await backend.close()


async def test_postgresql_unavailable_is_503_and_the_next_request_tries_again(
        redis: Redis, quotas: Path, tmp_path: Path, database_url: str) -> None:
    backend = in_process_backend(redis, quotas, tmp_path, database_url=NO_DATABASE_URL, admin_token=TOKEN)
    tenant = new_tenant("http")
    async with TestClient(TestServer(create_app(backend))) as http:
        for method, path in [("GET", "/admin/tenants"), ("GET", f"/admin/tenants/{tenant}"),
                             ("PATCH", f"/admin/tenants/{tenant}"), ("DELETE", f"/admin/tenants/{tenant}?by=x"),
                             ("GET", f"/admin/tenants/{tenant}/history")]:
            answer = await http.request(method, path, headers=AUTH, json={"plan": "pro", "by": "x"})
            assert answer.status == 503, await answer.text()
            body = await answer.json()
            assert body["error"] == "the tenant store is unavailable: PostgreSQL cannot be used"
            assert body["errors"][0].startswith("cannot reach PostgreSQL at postgresql://postgres@127.0.0.1:1/")
        assert not backend._database.opened
        # PostgreSQL is back (here: the right URL): the next request opens the database
        backend.settings = Settings.from_env({}, config=str(quotas), database_url=database_url, admin_token=TOKEN)
        answer = await http.get(f"/admin/tenants/{tenant}", headers=AUTH)
        assert answer.status == 200
    await backend.close()

    missing = database_url_for(TEST_DATABASE_SERVER, f"aw_missing_{uuid.uuid4().hex[:8]}")
    backend = in_process_backend(redis, quotas, tmp_path, database_url=missing, admin_token=TOKEN)
    async with TestClient(TestServer(create_app(backend))) as http:
        answer = await http.get(f"/admin/tenants/{tenant}", headers=AUTH)
        assert answer.status == 503
        assert "does not exist" in (await answer.json())["errors"][0]
    await backend.close()


async def test_a_body_that_does_not_arrive_is_answered_408(
        served: tuple[TestClient[Any, Any], SupervisorBackend], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agentworker.health.common.BODY_TIMEOUT_S", 0.3)
    http, _ = served
    tenant = new_tenant("http")
    reader, writer = await asyncio.open_connection(http.host, http.port)
    try:
        writer.write(f"PATCH /admin/tenants/{tenant} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"by\": ".encode())
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), head
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            body = json.loads(await reader.readexactly(length))
    finally:
        writer.close()
        await writer.wait_closed()
    assert body == {"error": "request body too slow", "errors": ["body: not received within 0.3s"]}
    assert await (await http.get(f"/admin/tenants/{tenant}/history", headers=AUTH)).json() == []

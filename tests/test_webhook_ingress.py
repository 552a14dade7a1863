"""The webhook ingress (`agentworker webhooks`) over real HTTP, with real Redis and PostgreSQL.

Most tests serve the ingress app in process on a real aiohttp server (what `agentworker webhooks` runs);
the last ones start the command itself as a subprocess, and one runs a real worker behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from agentworker.client import JobFailed
from agentworker.config import load_config
from agentworker.db import Database, LazyDatabase
from agentworker.health.server import HttpServer
from agentworker.ingress.app import WebhookIngress
from agentworker.ingress.buckets import TokenBuckets
from agentworker.jobs import make_job_id
from agentworker.keys import tenant_queue
from agentworker.routing import route_tenant
from agentworker.schedules.webhooks import delivery_key, sign
from agentworker.settings import Settings
from agentworker.submit import JobSubmitter
from bench.redis_server import free_port
from tests.conftest import ROOT, new_tenant, wait_for, worker_env
from tests.workflow_helpers import workflow_client

SECRET = "whsec-ingress-0123456789"
BODY = b'{"event": "payment.succeeded", "amount": 42, "note": "body-marker-7f3a"}'
ON_PAYMENT = {"id": "on-payment", "steps": [{"id": "take", "kind": "transform", "template": {
    "event": "{{ input.payload.event }}", "delivery": "{{ input.delivery_id }}"}}]}


def signed(body: bytes = BODY, *, delivery: str = "evt-1", secret: str = SECRET, at: int | None = None,
           **extra: str) -> dict[str, str]:
    at = int(time.time()) if at is None else at
    return {"Content-Type": "application/json", "X-Signature": sign(secret, body, at),
            "X-Signature-Timestamp": str(at), "X-Delivery-Id": delivery, **extra}


@contextlib.asynccontextmanager
async def serving(redis_url: str, database_url: str, quota_file: Path,
                  **overrides: Any) -> AsyncIterator[tuple[str, WebhookIngress]]:
    """The ingress app on a real server on a free loopback port, as `agentworker webhooks` builds it."""
    settings = Settings(redis_url=redis_url, database_url=database_url, config=str(quota_file), **overrides)
    redis = Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
    database = LazyDatabase(database_url, max_size=10)
    submitter = JobSubmitter(redis, load_config(quota_file), max_payload_bytes=settings.max_payload_bytes)
    ingress = WebhookIngress(settings, redis, database, submitter)
    http = HttpServer(ingress.make_app(), "127.0.0.1", 0)
    await http.start()
    try:
        yield f"http://127.0.0.1:{http.bound_port}", ingress
    finally:
        await http.close()
        await database.close()
        await redis.aclose()


async def save_source(redis_url: str, quota_file: Path, database: Database, tenant: str, name: str = "shop",
                      **settings: Any) -> None:
    async with workflow_client(redis_url, quota_file, database) as client:
        await client.save_workflow(tenant, ON_PAYMENT)
        await client.save_integration(tenant, "webhook", {"secret": SECRET, "workflow_id": "on-payment",
                                                          **settings}, name=name)


async def post(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
               body: bytes = BODY) -> tuple[int, dict[str, Any], Any]:
    async with session.post(url, data=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.json(content_type=None)


async def raw_request(base: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send ``head`` (and ``body``) on a fresh connection; the status and whatever came back."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 30)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return int(answer.split(b" ", 2)[1]), answer


def assert_refusal(document: Any, *needles: str) -> None:
    """One sentence of JSON, without the body or the secret."""
    assert set(document) == {"error"} and isinstance(document["error"], str), document
    assert SECRET not in document["error"] and "body-marker" not in document["error"]
    for needle in needles:
        assert needle in document["error"], document


async def queued_jobs(redis: Redis, quota_file: Path, tenant: str) -> list[bytes]:
    route = route_tenant(load_config(quota_file), tenant)
    return list(await redis.zrange(tenant_queue(route.pool, route.shard, tenant), 0, -1))


# -- each status --------------------------------------------------------------------------------------


async def test_a_signed_delivery_is_accepted_once_and_every_refusal_has_its_status(
        redis: Redis, redis_url: str, database_url: str, database: Database, quota_file: Path) -> None:
    tenant = new_tenant("ing")
    await save_source(redis_url, quota_file, database, tenant)
    async with serving(redis_url, database_url, quota_file) as (base, ingress), aiohttp.ClientSession() as session:
        url = f"{base}/webhooks/{tenant}/shop"

        status, _, document = await post(session, url, signed(Authorization="Bearer provider-token",
                                                               Cookie="session=1"))
        expected_id = str(make_job_id(tenant, "handle_webhook", delivery_key("shop", "evt-1")))
        assert (status, document) == (202, {"status": "accepted", "job_id": expected_id, "delivery_id": "evt-1"})
        assert await queued_jobs(redis, quota_file, tenant) == [expected_id.encode()]
        record = json.loads(await redis.get(f"arq:job:{expected_id}"))
        kwargs = record["k"]
        assert kwargs["source"] == "shop" and kwargs["body"] == BODY.decode() and kwargs["body_encoding"] == "text"
        assert abs(kwargs["received_at"] - time.time()) < 600
        assert "authorization" not in kwargs["headers"] and "cookie" not in kwargs["headers"]
        assert kwargs["headers"]["x-delivery-id"] == "evt-1" and "x-signature" in kwargs["headers"]

        # The provider retries the same delivery (a new timestamp and signature): enqueued once.
        status, _, document = await post(session, url, signed(at=int(time.time()) - 5))
        assert (status, document) == (200, {"status": "duplicate", "job_id": expected_id, "delivery_id": "evt-1"})

        refusals: list[tuple[str, Callable[[], Any], int, str]] = [
            ("wrong secret", lambda: post(session, url, signed(secret="not-the-tenant-secret", delivery="e2")),
             401, "the signature does not match"),
            ("no signature", lambda: post(session, url, {k: v for k, v in signed(delivery="e3").items()
                                                         if k != "X-Signature"}),
             401, "missing or malformed X-Signature header"),
            ("stale", lambda: post(session, url, signed(delivery="e4", at=int(time.time()) - 3600)),
             401, "more than 300s from now"),
            ("unknown source", lambda: post(session, f"{base}/webhooks/{tenant}/github", signed(delivery="e5")),
             404, "has no webhook source 'github'"),
            ("unknown tenant", lambda: post(session, f"{base}/webhooks/{new_tenant('nobody')}/shop",
                                            signed(delivery="e6")), 404, "has no webhook source"),
            ("bad tenant id", lambda: post(session, f"{base}/webhooks/Not_A_Tenant/shop", signed(delivery="e7")),
             404, "valid tenant id"),
            ("bad source name", lambda: post(session, f"{base}/webhooks/{tenant}/Shop!", signed(delivery="e8")),
             404, "source name"),
            ("text body", lambda: post(session, url, {**signed(delivery="e9"), "Content-Type": "text/plain"}),
             415, "application/json"),
            ("no content type", lambda: post(session, url, {k: v for k, v in signed(delivery="e10").items()
                                                            if k != "Content-Type"}), 415, "must be application/json"),
            ("not JSON", lambda: post(session, url, signed(b"body-marker not json", delivery="e11"),
                                      b"body-marker not json"), 400, "not a valid UTF-8 JSON document"),
        ]
        for what, send, expected, needle in refusals:
            status, _, document = await send()
            assert status == expected, (what, document)
            assert_refusal(document, needle)
        assert await queued_jobs(redis, quota_file, tenant) == [expected_id.encode()], "refusals enqueue nothing"

        text = await (await session.get(f"{base}/metrics")).text()
    counted = {status: ingress.metrics.registry.get_sample_value("agentworker_webhook_requests_total",
                                                                  {"status": status})
               for status in ("202", "200", "401", "404", "415", "400")}
    assert counted == {"202": 1, "200": 1, "401": 3, "404": 4, "415": 2, "400": 1}
    assert 'agentworker_webhook_requests_total{status="401"} 3.0' in text
    assert "agentworker_webhook_request_duration_seconds_count 12.0" in text
    assert tenant not in text, "no tenant label"


async def test_sizes_and_slow_bodies_are_refused_without_reading_them(
        redis: Redis, redis_url: str, database_url: str, database: Database, quota_file: Path) -> None:
    tenant = new_tenant("ing")
    await save_source(redis_url, quota_file, database, tenant)
    async with serving(redis_url, database_url, quota_file, webhook_max_body_bytes=4096,
                       webhook_body_timeout=1.0) as (base, _ingress):
        path = f"/webhooks/{tenant}/shop"
        head = f"POST {path} HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        # A Content-Length over the limit: refused before a byte of the body is sent.
        status, answer = await raw_request(base, head + "Content-Length: 50000000\n")
        assert status == 413 and b"over the 4096-byte limit" in answer and b"Connection: close" in answer
        # Chunked, no length: reading stops past the limit.
        chunk = b"a" * 3000
        chunked = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2
        status, answer = await raw_request(base, head + "Transfer-Encoding: chunked\n", chunked)
        assert status == 413 and b"over the 4096-byte limit" in answer
        # A body that never arrives: 408 after the body deadline.
        status, answer = await raw_request(base, head + "Content-Length: 100\n", b'{"a"')
        assert status == 408 and b"did not arrive within 1s" in answer
    assert await queued_jobs(redis, quota_file, tenant) == []


async def test_a_source_past_its_bucket_gets_429_with_retry_after(
        redis_url: str, database_url: str, database: Database, quota_file: Path) -> None:
    tenant, other = new_tenant("ing"), new_tenant("ing")
    await save_source(redis_url, quota_file, database, tenant)
    await save_source(redis_url, quota_file, database, other)
    async with serving(redis_url, database_url, quota_file, webhook_rate=0.01, webhook_burst=3) as (base, _), \
            aiohttp.ClientSession() as session:
        # Refused calls spend nothing: junk at the source's address cannot hold the provider back.
        for index in range(5):
            status, _, _ = await post(session, f"{base}/webhooks/{tenant}/shop",
                                      signed(delivery=f"junk{index}", secret="not-the-tenant-secret"))
            assert status == 401
        answers = [await post(session, f"{base}/webhooks/{tenant}/shop", signed(delivery=f"r{i}"))
                   for i in range(5)]
        assert [status for status, _, _ in answers] == [202, 202, 202, 429, 429]
        _, headers, document = answers[3]
        assert int(headers["Retry-After"]) >= 1
        assert_refusal(document, "too many deliveries from this source")
        # Buckets are per tenant and source: another tenant's source is not held back.
        status, _, _ = await post(session, f"{base}/webhooks/{other}/shop", signed(delivery="r0"))
        assert status == 202


async def test_redis_or_postgresql_down_answers_503(
        redis_url: str, database_url: str, database: Database, quota_file: Path) -> None:
    tenant = new_tenant("ing")
    await save_source(redis_url, quota_file, database, tenant)
    nowhere = free_port()
    down_database = f"postgresql://postgres@127.0.0.1:{nowhere}/postgres"
    async with serving(redis_url, down_database, quota_file) as (base, _), aiohttp.ClientSession() as session:
        status, headers, document = await post(session, f"{base}/webhooks/{tenant}/shop", signed())
        assert status == 503 and headers["Retry-After"] == "5"
        assert_refusal(document, "PostgreSQL cannot be used now")
        async with session.get(f"{base}/ready") as response:
            ready = await response.json(content_type=None)
            assert response.status == 503 and ready["status"] == "fail"
        async with session.get(f"{base}/health") as response:
            assert response.status == 200, "liveness does not depend on PostgreSQL"
    async with serving(f"redis://127.0.0.1:{nowhere}/0", database_url, quota_file) as (base, _), \
            aiohttp.ClientSession() as session:
        status, headers, document = await post(session, f"{base}/webhooks/{tenant}/shop", signed())
        assert status == 503 and headers["Retry-After"] == "5"
        assert_refusal(document, "Redis cannot be used now")


# -- exactly once ---------------------------------------------------------------------------------------


async def test_a_replay_under_concurrency_is_enqueued_exactly_once(
        redis: Redis, redis_url: str, database_url: str, database: Database, quota_file: Path) -> None:
    tenant = new_tenant("ing")
    await save_source(redis_url, quota_file, database, tenant)
    async with serving(redis_url, database_url, quota_file) as (base, ingress), aiohttp.ClientSession() as session:
        headers = signed(delivery="evt-concurrent")
        answers = await asyncio.gather(*(post(session, f"{base}/webhooks/{tenant}/shop", headers)
                                         for _ in range(20)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * 19 + [202], statuses
    job_ids = {document["job_id"] for _, _, document in answers}
    assert len(job_ids) == 1
    assert await queued_jobs(redis, quota_file, tenant) == [job_ids.pop().encode()]
    assert ingress.metrics.registry.get_sample_value("agentworker_webhook_requests_total", {"status": "200"}) == 19


def test_token_buckets_refill_and_keep_a_bounded_number_of_sources() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=2, max_keys=3, clock=lambda: now[0])
    assert [buckets.take(("t", "s")) for _ in range(3)] == [0.0, 0.0, 0.5]
    now[0] += 0.5  # one token back
    assert buckets.take(("t", "s")) == 0.0 and buckets.take(("t", "s")) > 0
    for index in range(10):
        buckets.take(("t", f"other-{index}"))
    assert len(buckets) == 3


# -- the command, and a real worker behind it -----------------------------------------------------------


def start_ingress(tmp_path: Path, quota_file: Path, redis_url: str, database_url: str,
                  **env: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    log = tmp_path / f"ingress-{port}.log"
    environment = worker_env(redis_url, AGENTWORKER_DATABASE_URL=database_url, **env)
    with log.open("wb") as output:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "agentworker", "webhooks", "--config", str(quota_file),
                                 "--port", str(port), "--host", "127.0.0.1"], env=environment, cwd=ROOT,
                                stdout=output, stderr=subprocess.STDOUT)
    return proc, port, log


def read_log(path: Path) -> str:
    return path.read_text(errors="replace")


async def wait_listening(session: aiohttp.ClientSession, proc: subprocess.Popen[bytes], port: int,
                         log: Path) -> None:
    async def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the ingress exited with {proc.returncode}:\n{read_log(log)}")
        try:
            async with session.get(f"http://127.0.0.1:{port}/health") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(up, 60, what="the webhook ingress to listen", interval=0.1)


@pytest.mark.slow
async def test_the_command_serves_until_sigterm_and_a_worker_runs_what_it_accepted(
        redis: Redis, redis_url: str, database_url: str, database: Database, quota_file: Path, tmp_path: Path,
        spawn_worker: Any) -> None:
    from tests.schedule_helpers import schedule_worker_env

    tenant = new_tenant("ing")
    await save_source(redis_url, quota_file, database, tenant)
    proc, port, log = start_ingress(tmp_path, quota_file, redis_url, database_url)
    worker = spawn_worker(quota_file, **schedule_worker_env(database_url))
    try:
        async with aiohttp.ClientSession() as session, workflow_client(redis_url, quota_file, database) as client:
            await wait_listening(session, proc, port, log)
            url = f"http://127.0.0.1:{port}/webhooks/{tenant}/shop"
            status, _, accepted = await post(session, url, signed(delivery="evt-run"))
            assert status == 202
            async with session.get(f"http://127.0.0.1:{port}/ready") as response:
                ready = await response.json(content_type=None)
                assert response.status == 200, ready
                assert ready["serviceId"].startswith("agentworker-webhooks/") and ready["version"]

            await worker.wait_serving()
            handled = await client.job(accepted["job_id"]).result(timeout=60)
            assert handled["status"] == "accepted" and handled["delivery_id"] == "evt-run"
            run = await client.job(handled["job_id"]).result(timeout=60)
            assert run["status"] == "completed"
            assert run["output"] == {"take": {"event": "payment.succeeded", "delivery": "evt-run"}}

            # Redis forgets the job (its record expired): PostgreSQL's delivery record still answers.
            await redis.delete(f"arq:job:{accepted['job_id']}", f"arq:result:{accepted['job_id']}")
            status, _, again = await post(session, url, signed(delivery="evt-run"))
            assert (status, again["status"], again["job_id"]) == (200, "duplicate", accepted["job_id"])
            assert await queued_jobs(redis, quota_file, tenant) == []
            assert len(await client.list_runs(tenant)) == 1, "the replay started no second run"

            # The worker checks the signed timestamp against when the call was received, not against now:
            # a delivery verified an hour ago (a long queue, retries) is still accepted; an implausible
            # receipt time is refused.
            an_hour_ago = int(time.time()) - 3600
            late = {k.lower(): v for k, v in signed(delivery="evt-late", at=an_hour_ago).items()}
            job = await client.enqueue("handle_webhook", tenant, idempotency_key="late", payload={
                "source": "shop", "headers": late, "body": BODY.decode(), "received_at": an_hour_ago + 10})
            assert (await job.result(timeout=60))["status"] == "accepted"
            job = await client.enqueue("handle_webhook", tenant, idempotency_key="implausible", payload={
                "source": "shop", "headers": late, "body": BODY.decode(), "received_at": an_hour_ago - 3 * 86400})
            with pytest.raises(JobFailed, match="received_at must be the Unix time"):
                await job.result(timeout=60)

            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            assert 'agentworker_webhook_requests_total{status="202"} 1.0' in text
            assert 'agentworker_webhook_requests_total{status="200"} 1.0' in text

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        output = read_log(log)
        assert "webhook ingress stopped" in output and SECRET not in output and "body-marker" not in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_command_refuses_bad_options_in_one_line(quota_file: Path, redis_url: str) -> None:
    env = worker_env(redis_url)
    for argv, needle in ((["--port", "70000"], "not a port number"),
                         (["--config", str(quota_file.parent / "missing.yaml")], "cannot read the file"),
                         (["--config", str(quota_file), "--host", ""], "(--host, AGENTWORKER_WEBHOOK_HOST) is empty")):
        done = subprocess.run([sys.executable, "-m", "agentworker", "webhooks", *argv], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    env = {**env, "AGENTWORKER_WEBHOOK_MAX_BODY_BYTES": str(4 * 1024 * 1024)}
    done = subprocess.run([sys.executable, "-m", "agentworker", "webhooks", "--config", str(quota_file)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "at most half of AGENTWORKER_MAX_PAYLOAD_BYTES" in done.stderr, done.stderr



# -- deploy/ ----------------------------------------------------------------------------------------------


def test_the_webhook_manifests_agree_with_the_command_and_open_only_what_it_needs() -> None:
    import yaml

    webhooks = ROOT / "deploy" / "kubernetes" / "webhooks"

    def doc(name: str) -> Any:
        return yaml.safe_load((webhooks / name).read_text())

    deployment, service, policy = doc("deployment.yaml"), doc("service.yaml"), doc("networkpolicy.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["webhooks"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "webhooks": int(env["AGENTWORKER_WEBHOOK_PORT"])} == {"webhooks": Settings().webhook_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "webhooks"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "webhooks"}
    assert "AGENTWORKER_ADMIN_TOKEN" not in env, "the internet-facing pod never holds the admin token"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "webhooks"
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     policy["spec"]["podSelector"]["matchLabels"], doc("pdb.yaml")["spec"]["selector"]["matchLabels"],
                     doc("servicemonitor.yaml")["spec"]["selector"]["matchLabels"]):
        assert selector == labels
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["webhooks"]
    # Anyone may call its port; it may reach DNS, Redis and PostgreSQL only.
    assert policy["spec"]["ingress"] == [{"ports": [{"port": "webhooks", "protocol": "TCP"}]}]
    egress_ports = sorted(port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"])
    assert egress_ports == [53, 53, 5432, 6379]
    assert all("ipBlock" not in peer for rule in policy["spec"]["egress"] for peer in rule["to"])
    # The worker's Service and NetworkPolicy select the worker pods only.
    base = ROOT / "deploy" / "kubernetes" / "base"
    assert yaml.safe_load((base / "service.yaml").read_text())["spec"]["selector"] != labels

    example = ROOT / "deploy" / "kubernetes" / "overlays" / "example"
    assert "../../webhooks" in yaml.safe_load((example / "kustomization.yaml").read_text())["resources"]
    ingress = yaml.safe_load((example / "webhooks-ingress.yaml").read_text())
    paths = [path for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    assert [(p["path"], p["backend"]["service"]["name"], p["backend"]["service"]["port"]) for p in paths] == [
        ("/webhooks/", service["metadata"]["name"], {"name": "webhooks"})]

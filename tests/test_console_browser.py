"""The operator console in a real browser: Playwright for Python driving Debian's headless Chromium
(``/usr/bin/chromium``, launched by ``executable_path``; Playwright's own browser download is never used)
against a real ``agentworker run`` with jobs running, tokens set, Redis and PostgreSQL real.

The browser test skips, saying why, only when Chromium or Playwright is missing and neither ``CI`` nor
``AGENTWORKER_TEST_REQUIRE_BROWSER`` (set by .ci/run, which installs Debian's chromium) asks for it; then
it fails instead. The console's screenshot is saved under ``AGENTWORKER_TEST_ARTIFACTS`` (default: the
test's temporary directory), and the path is printed; docs/console.png is a copy of one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker import job_control
from agentworker.client import JobFailed
from agentworker.db import Database
from tests.conftest import wait_for
from tests.supervisor_helpers import SupervisorProcess, supervisor_factory
from tests.workflow_helpers import counts, probe, workflow_client, workflow_worker_env

pytestmark = pytest.mark.slow

ADMIN, READER = "browser-admin-token", "browser-status-token"
QUOTAS: dict[str, Any] = {
    "default_pool": "standard",
    "pools": {"standard": {"shards": 2, "processes": 1, "concurrency": 8, "job_timeout": 120, "max_tries": 1,
                           "memory_limit_mb": 1024}},
    "tenants": {"acme": {"max_concurrency": 6, "max_pending": 500, "rate_limit": "100/s"}},
}
#: generous: a loaded 2-core host, a browser and a supervisor with its workers
UI_TIMEOUT_MS = 45_000
#: a failure message a tenant controls: it must appear as text, never become an element
HOSTILE = '<img src=x data-testid="injected"> boom'


def _browser_required() -> bool:
    return (os.environ.get("CI", "").lower() in ("1", "true", "yes")
            or os.environ.get("AGENTWORKER_TEST_REQUIRE_BROWSER") == "1")


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, or a skip (a failure under CI) saying what is missing."""
    path = os.environ.get("AGENTWORKER_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    missing = []
    if not Path(path).is_file():
        missing.append(f"no Chromium at {path} (apt-get install -y chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("Playwright for Python is not installed (pip install -e '.[test]')")
    if missing:
        reason = "; ".join(missing)
        if _browser_required():
            pytest.fail(f"the browser tests are required here: {reason}")
        pytest.skip(f"browser tests skipped: {reason}")
    return path


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("AGENTWORKER_TEST_ARTIFACTS") or tmp_path / "artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def start_supervisor(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


@pytest.fixture
async def page(chromium: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        # --no-sandbox: the tests may run as root in a container, where Chromium's sandbox cannot start.
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True,
                                                   args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            context = await browser.new_context(viewport={"width": 1400, "height": 1000})
            tab = await context.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" and
                   "401" not in msg.text else None)
            tab.errors = errors
            yield tab
        finally:
            await browser.close()


@pytest.mark.timeout(400)
async def test_the_console_shows_the_service_and_cancels_and_approves_from_the_page(
        page: Any, start_supervisor: Callable[..., SupervisorProcess], write_quotas: Callable[..., Path],
        redis: Redis, redis_url: str, database_url: str, database: Database, artifacts: Path) -> None:
    from playwright.async_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    quotas = write_quotas(QUOTAS)
    sup = start_supervisor(quotas, **workflow_worker_env(database_url), AGENTWORKER_ADMIN_TOKEN=ADMIN,
                           AGENTWORKER_STATUS_TOKEN=READER)
    await sup.wait_up(60)
    tenant = "acme"
    async with workflow_client(redis_url, quotas, database) as client:
        # Jobs for the page: one that fails (its message is hostile markup), one that keeps running, and a
        # workflow run that waits for an approval.
        failing = await client.enqueue("probe_fail", tenant_id=tenant, payload={"message": HOSTILE})
        with pytest.raises(JobFailed):
            await failing.result(timeout=90)
        running = await client.enqueue("probe_sleep", tenant_id=tenant, payload={"seconds": 300})

        async def is_running() -> bool:
            return (await job_control.get_job(redis, running.job_id)).status == "running"

        await wait_for(is_running, 90, what="the long job to start", interval=0.2)
        await client.save_workflow(tenant, {"id": "expense", "steps": [
            probe("prepare"),
            {"id": "manager", "kind": "approval", "depends_on": ["prepare"], "message": "Approve {{ input.amount }}?"},
            probe("pay", ["manager"])]})
        started = await client.enqueue("execute_workflow", tenant_id=tenant,
                                       payload={"workflow_id": "expense", "input_data": {"amount": 12}})
        paused = await started.result(timeout=90)
        assert paused["status"] == "waiting_approval"
        run_id = paused["run_id"]

        # Without a token the page says what it needs; with the admin token it reads and acts.
        await page.goto(f"{sup.url}/ui")
        await expect(page.get_by_test_id("auth-error")).to_be_visible()
        await expect(page.get_by_test_id("auth-error")).to_contain_text("AGENTWORKER_STATUS_TOKEN")
        await page.get_by_test_id("token-input").fill(ADMIN)
        await page.get_by_test_id("operator-input").fill("sre-on-call")
        await page.get_by_test_id("token-save").click()
        await expect(page.get_by_test_id("auth-error")).to_be_hidden()

        # Pools and processes: the one worker process, serving, with its pid; the tenant with a job in flight.
        status = await sup.get_json("/status", token=READER)
        (pid,) = [row["pid"] for row in status[1]["processes"] if row["state"] == "serving"]
        process = page.get_by_test_id("process-row").filter(has_text=str(pid))
        await expect(process).to_have_count(1)
        await expect(process).to_contain_text("serving")
        await expect(process).to_contain_text("/ 1024 MB")
        await expect(page.get_by_test_id("pool-row").filter(has_text="standard")).to_contain_text("ok")
        tenant_row = page.locator(f'[data-testid="tenant-row"][data-tenant="{tenant}"]')
        await expect(tenant_row).to_contain_text("500")  # its max_pending, next to what is pending
        await expect(tenant_row).to_contain_text("boom")  # its recent failure
        await expect(page.get_by_test_id("queues-table")).to_be_visible()
        await expect(page.get_by_test_id("dead-letters-table-empty")).to_be_visible()

        async def observed_running() -> bool:  # the observer's and the heartbeat's view have caught up
            document = (await sup.get_json("/status", token=READER))[1]
            rows = [row for row in document["processes"] if row["pid"] == pid]
            return (document["tenants"].get(tenant, {}).get("in_flight") == 1
                    and bool(rows) and rows[0].get("running") == 1)

        await wait_for(observed_running, 60, what="/status to show the running job", interval=0.2)
        await expect(tenant_row.locator("td").nth(1)).to_have_text("1")
        await expect(process.locator("td").nth(8)).to_have_text("1")
        shot = artifacts / "console.png"
        await page.screenshot(path=str(shot), full_page=True)
        print(f"console screenshot: {shot}")

        # The failed job: on the tenant's page with its error, then on its own page; the hostile message is
        # text, not an element.
        await page.goto(f"{sup.url}/ui#tenant={tenant}")
        failure = page.get_by_test_id("failure-row").filter(has_text=failing.job_id)
        await expect(failure).to_contain_text("RuntimeError")
        await expect(failure).to_contain_text(HOSTILE)
        await failure.get_by_test_id("job-link").click()
        await expect(page.get_by_test_id("job-status")).to_have_text("failed")
        await expect(page.get_by_test_id("job-error")).to_contain_text(f"RuntimeError: {HOSTILE}")
        await expect(page.get_by_test_id("job-retry")).to_be_enabled()
        assert await page.locator('[data-testid="injected"]').count() == 0
        await page.screenshot(path=str(artifacts / "console-job.png"), full_page=True)

        # Cancel the running job from its page: checked in Redis and in the job's result.
        await page.get_by_test_id("job-input").fill(running.job_id)
        await page.get_by_test_id("job-open").click()
        await expect(page.get_by_test_id("job-status")).to_have_text("running")
        await page.get_by_test_id("job-cancel").click()
        await expect(page.get_by_test_id("message")).to_contain_text("Cancel:")
        await expect(page.get_by_test_id("job-status")).to_have_text("cancelled")
        assert (await job_control.get_job(redis, running.job_id)).status == "cancelled"
        with pytest.raises(JobFailed) as cancelled:
            await running.result(timeout=30)
        assert cancelled.value.error == "JobCancelled" and "sre-on-call" in cancelled.value.message
        await expect(page.get_by_test_id("job-events")).to_contain_text("job_cancelled")

        # Approve the waiting run from its page: it completes, its last step ran once.
        await page.goto(f"{sup.url}/ui#tenant={tenant}&run={run_id}")
        await expect(page.get_by_test_id("run-status")).to_have_text("waiting_approval")
        await expect(page.get_by_test_id("approval")).to_contain_text("Approve 12?")
        await page.screenshot(path=str(artifacts / "console-run.png"), full_page=True)
        await page.get_by_test_id("approval-comment-manager").fill("fine by me")
        await page.get_by_test_id("approve-manager").click()
        await expect(page.get_by_test_id("message")).to_contain_text("Approve:")
        await expect(page.get_by_test_id("run-status")).to_have_text("completed")
        await expect(page.locator('[data-testid="step-row"][data-step="pay"]')).to_contain_text("completed")
        await expect(page.get_by_test_id("approvals-empty")).to_be_visible()
        run = await client.get_run(tenant, run_id)
        assert run is not None and run.status == "completed"
        assert await counts(redis, tenant, ["prepare", "pay"]) == {"prepare": 1, "pay": 1}

        # The quota file reloads from the page (nothing changed: applied, config version unchanged).
        await page.get_by_test_id("reload-quotas").click()
        await expect(page.get_by_test_id("message")).to_contain_text("Reload: applied")

        # A refused action shows its sentence: the status token reads but may not act.
        await page.get_by_test_id("token-input").fill(READER)
        await page.get_by_test_id("token-save").click()
        await page.goto(f"{sup.url}/ui#job={failing.job_id}")
        await expect(page.get_by_test_id("job-status")).to_have_text("failed")
        await page.get_by_test_id("job-retry").click()
        await expect(page.get_by_test_id("message")).to_contain_text("Retry refused (HTTP 401)")
        assert (await job_control.get_job(redis, failing.job_id)).status == "failed"
    assert page.errors == [], page.errors

"""Unit tests of the supervisor's pure parts: backoff, reload planning, the quota-file watch, reaping,
health documents and the status table."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agentworker.config import ConfigError, parse_config
from agentworker.health.checks import FAIL, PASS, WARN, Check, health_document
from agentworker.health.status_table import render_status
from agentworker.supervisor.backoff import FAILING_AFTER, STABLE_AFTER, RestartBackoff
from agentworker.supervisor.directory_lock import LOCK_NAME, DirectoryInUse, DirectoryLock
from agentworker.supervisor.reload import QuotaFileWatch, plan_reload


def test_backoff_grows_with_jitter_caps_and_never_gives_up() -> None:
    backoff = RestartBackoff(initial=0.5, maximum=4, rng=random.Random(7))
    delays = [backoff.failed(uptime=0.1) for _ in range(8)]
    assert delays[:4] == sorted(delays[:4]) and len(set(delays[:4])) == 4
    for n, delay in enumerate(delays[:4]):
        assert 0.8 * 0.5 * 2**n <= delay <= 0.5 * 2**n
    assert all(3.2 <= d <= 4 for d in delays[3:])  # capped, still retried
    assert backoff.failing and backoff.failures == 8 >= FAILING_AFTER


def test_a_process_that_stayed_up_resets_the_backoff() -> None:
    backoff = RestartBackoff(initial=1, maximum=30)
    for _ in range(4):
        backoff.failed(uptime=0)
    assert backoff.failing
    assert backoff.failed(uptime=STABLE_AFTER) <= 1
    assert backoff.failures == 1 and not backoff.failing


BASE = {"default_pool": "a",
        "pools": {"a": {"processes": 1, "concurrency": 2}, "b": {"processes": 2}},
        "tenants": {"acme": {"max_concurrency": 4}}}


def test_plan_reload_tells_added_removed_resized_and_replaced_pools() -> None:
    old = parse_config(BASE)
    new = parse_config({"default_pool": "a",
                        "pools": {"a": {"processes": 3, "concurrency": 5, "hang_timeout": 9},
                                  "c": {"processes": 1}},
                        "tenants": {"acme": {"max_concurrency": 1}}})
    plan = plan_reload(old, new)
    assert plan.added == ("c",) and plan.removed == ("b",)
    assert plan.resized == {"a": (1, 3)}
    assert plan.replaced == ("a",)  # concurrency is read by the worker; hang_timeout is not
    assert plan.tenants_changed


def test_supervisor_only_settings_replace_no_process() -> None:
    old = parse_config(BASE)
    changed = {**BASE, "pools": {**BASE["pools"], "a": {"processes": 1, "concurrency": 2, "memory_limit_mb": 64,
                                                        "max_jobs_per_process": 5, "hang_timeout": 3}}}
    plan = plan_reload(old, parse_config(changed))
    assert plan.replaced == () and plan.resized == {} and not plan.tenants_changed


def test_the_watch_sees_a_configmap_style_symlink_swap(tmp_path: Path) -> None:
    # Kubernetes mounts quotas.yaml -> ..data/quotas.yaml and swaps ..data to a new directory.
    for version, processes in (("v1", 1), ("v2", 2)):
        (tmp_path / version).mkdir()
        (tmp_path / version / "quotas.yaml").write_text(yaml.safe_dump(
            {"default_pool": "a", "pools": {"a": {"processes": processes}}}))
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "quotas.yaml").symlink_to("..data/quotas.yaml")
    watch = QuotaFileWatch(tmp_path / "quotas.yaml")
    assert watch.load().pools["a"].processes == 1
    assert not watch.changed()
    os.utime(tmp_path / "v1" / "quotas.yaml")  # a touch is no change
    assert not watch.changed()
    (tmp_path / "..data_tmp").symlink_to("v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert watch.changed()
    assert watch.load().pools["a"].processes == 2
    assert not watch.changed()


def test_a_bad_file_is_reported_once_and_a_missing_one_is_no_change(tmp_path: Path) -> None:
    path = tmp_path / "quotas.yaml"
    path.write_text("pools: {a: {processes: 0}}\n")
    watch = QuotaFileWatch(path)
    assert watch.changed()
    with pytest.raises(ConfigError) as caught:
        watch.load()
    assert any("processes" in e for e in caught.value.errors)
    assert not watch.changed()
    path.unlink()
    assert not watch.changed()


# Run in a process of its own: waitpid(-1) in the pytest process could reap other tests' children.
REAP_SCRIPT = """
import json, os, sys, time
from agentworker.supervisor import process
exits = process.spawn([sys.executable, "-c", "import sys; sys.exit(7)"], dict(os.environ))
killed = process.spawn([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                       dict(os.environ))
found = {}
deadline = time.monotonic() + 30
while len(found) < 2 and time.monotonic() < deadline:
    found.update(process.reap())
    time.sleep(0.01)
print(json.dumps({"exits": found.get(exits), "killed": found.get(killed), "again": process.reap()}))
"""


def test_reap_returns_exit_codes_and_signals_of_children() -> None:
    out = subprocess.run([sys.executable, "-c", REAP_SCRIPT], capture_output=True, text=True, timeout=60,
                         check=True)
    assert json.loads(out.stdout) == {"exits": 7, "killed": -9, "again": []}


def test_health_document_status_is_the_worst_check() -> None:
    checks = [Check("redis:ping", PASS), Check("pool:a", WARN, "degraded")]
    assert health_document(checks, "x")["status"] == WARN
    document = health_document([*checks, Check("postgresql:connect", FAIL, "refused")], "x")
    assert document["status"] == FAIL
    assert document["checks"]["postgresql:connect"][0]["output"] == "refused"


def test_status_table_shows_every_slot() -> None:
    document = {
        "supervisor": {"pid": 1, "state": "running", "uptime_s": 3.0, "redis_ok": True, "config": "q.yaml",
                       "config_version": 1},
        "pools": {"a": {"status": "failing", "serving": 0, "processes": 1, "shards": 2, "concurrency": 3,
                        "restarts": 4, "reason": "slot 0: exited with code 3"}},
        "processes": [{"pool": "a", "slot": 0, "role": "current", "pid": None, "state": "backoff",
                       "restarts": 4, "backoff_s": 4.0,
                       "last_exit": {"reason": "crash", "description": "exited with code 3"}},
                      {"pool": "a", "slot": 1, "role": "current", "pid": 4242, "state": "serving",
                       "uptime_s": 1.5, "rss_bytes": 50 * 1048576, "jobs_served": 9, "running": 1}],
        "queues": {"a": {"0": {"ready": 5, "total": 6}}},
        "tenants": {"acme": {"in_flight": 1, "pending": 2}},
    }
    text = render_status(document)
    assert "failing" in text and "4242" in text and "50M" in text and "crash: exited with code 3" in text
    assert "acme" in text


def test_a_metrics_directory_is_locked_by_one_supervisor_at_a_time(tmp_path: Path) -> None:
    # flock locks belong to an open file, so two locks in one process conflict as two processes do.
    live = tmp_path / "counter_123.db"
    live.write_bytes(b"live samples")
    first, second = DirectoryLock(tmp_path), DirectoryLock(tmp_path)
    first.acquire()
    with pytest.raises(DirectoryInUse) as refused:
        second.acquire()
    assert str(refused.value) == (f"metrics directory {tmp_path} is in use by another running supervisor "
                                  f"(pid {os.getpid()}): give each supervisor its own AGENTWORKER_METRICS_DIR")
    assert not second.held and live.read_bytes() == b"live samples"
    assert not LOCK_NAME.endswith(".db")  # prometheus_client's collector never reads the lock file
    first.release()
    second.acquire()  # released: the next supervisor takes it (the kernel also drops it on kill -9)
    assert second.held
    second.release()

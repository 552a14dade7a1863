from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentworker.cli import main
from agentworker.config import ConfigError, RateLimit, default_config_path, load_config, parse_config
from agentworker.settings import Settings, SettingsError

GOOD: dict[str, Any] = {
    "default_pool": "standard",
    "pools": {
        "standard": {"shards": 8, "processes": 2, "concurrency": 20, "job_timeout": 300, "max_tries": 3,
                     "memory_limit_mb": 512, "max_jobs_per_process": 10000},
        "premium": {"shards": 2, "processes": 2, "concurrency": 50, "job_timeout": 900},
    },
    "tenants": {"acme": {"pool": "premium", "max_concurrency": 10, "max_pending": 1000, "job_timeout": 120,
                         "rate_limit": "50/s"}},
}


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def test_design_example_is_valid_and_defaults_fill_in() -> None:
    config = parse_config(GOOD)
    premium = config.pools["premium"]
    assert premium.max_tries == 3 and premium.memory_limit_mb == 512 and premium.hang_timeout == 30
    assert config.pool_of("acme") == "premium"
    assert config.pool_of("nobody") == "standard"
    assert config.job_timeout_for("acme") == 120
    assert config.job_timeout_for("nobody") == 300
    rate = config.limits_of("acme").rate
    assert rate == RateLimit(50, 1) and str(rate) == "50/s"


def test_packaged_default_file_is_valid() -> None:
    config = load_config(default_config_path())
    assert config.default_pool in config.pools


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda d: d["pools"]["standard"].update(concurrency=0), "pools.standard.concurrency: must be >= 1 (got 0)"),
    (lambda d: d["pools"]["standard"].update(processes=0), "pools.standard.processes: must be >= 1 (got 0)"),
    (lambda d: d["pools"]["standard"].update(concurency=5), "pools.standard.concurency: unknown key"),
    (lambda d: d.update(extra_section={}), "extra_section: unknown key"),
    (lambda d: d["tenants"]["acme"].update(job_timeout=1000),
     "tenants.acme.job_timeout: 1000s is above pool 'premium''s job_timeout 900s"),
    (lambda d: d["tenants"]["acme"].update(pool="gold"), "tenants.acme.pool: names pool 'gold', which is not defined"),
    (lambda d: d.update(default_pool="nope"), "default_pool: names pool 'nope', which is not defined"),
    (lambda d: d["tenants"]["acme"].update(rate_limit="fast"),
     "tenants.acme.rate_limit: must look like 50/s, 600/m or 1000/h"),
    (lambda d: d["tenants"]["acme"].update(max_concurrency=0), "tenants.acme.max_concurrency: must be >= 1 (got 0)"),
    (lambda d: d["pools"]["standard"].update(shards="many"), "pools.standard.shards: must be an integer (got 'many')"),
    (lambda d: d["tenants"].update({"Bad Tenant": {}}), "tenants.Bad Tenant: tenant id must match"),
    (lambda d: d["pools"].update({"Gold": {}}), "pools.Gold: pool name must match"),
    (lambda d: d["pools"]["standard"].update(job_timeout=-1), "pools.standard.job_timeout: must be > 0 (got -1)"),
])
def test_bad_values_are_refused_with_the_dotted_path(mutate: Any, expected: str) -> None:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    mutate(data)
    errors = errors_of(data)
    assert any(e.startswith(expected) for e in errors), errors


def test_every_error_is_reported_at_once() -> None:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    data["pools"]["standard"]["concurrency"] = 0
    data["pools"]["premium"]["shards"] = 0
    data["pools"]["premium"]["colour"] = "red"
    errors = errors_of(data)
    assert len(errors) == 3, errors


def test_not_a_mapping_and_no_pools() -> None:
    assert errors_of([1, 2]) == ["(top level): must be a mapping with a 'pools' key"]
    assert any(e.startswith("pools: required key is missing") for e in errors_of({}))


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_tenant_defaults_apply_key_by_key() -> None:
    data = {**GOOD, "tenant_defaults": {"max_concurrency": 4, "max_pending": 50, "rate_limit": "10/m"}}
    config = parse_config(data)
    assert config.limits_of("nobody").max_concurrency == 4
    acme = config.limits_of("acme")
    assert acme.max_concurrency == 10 and acme.max_pending == 1000  # its own
    assert str(acme.rate) == "50/s"
    assert str(config.limits_of("nobody").rate) == "10/m"
    with pytest.raises(ConfigError, match=r"tenant_defaults\.job_timeout"):
        parse_config({**GOOD, "tenant_defaults": {"job_timeout": 500}})


def test_check_config_prints_pools_and_tenants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "premium" in out and "standard" in out and "acme" in out


def test_check_config_lists_every_error_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    data["pools"]["standard"]["concurrency"] = 0
    data["tenants"]["acme"]["job_timeout"] = 1000
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 error(s)" in err
    assert "pools.standard.concurrency: must be >= 1" in err
    assert "tenants.acme.job_timeout" in err
    assert "Traceback" not in err


def test_config_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump({"pools": {"standard": {"shards": 3}}, "tenants": {"zed": {}}}))
    monkeypatch.setenv("AGENTWORKER_CONFIG", str(path))
    assert main(["route", "zed"]) == 0
    assert "pool standard" in capsys.readouterr().out


def test_cli_as_a_module_prints_one_line_for_user_errors() -> None:
    proc = subprocess.run([sys.executable, "-m", "agentworker", "route", "../x"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "invalid tenant id '../x'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_settings_from_env_and_errors() -> None:
    settings = Settings.from_env({"AGENTWORKER_SHUTDOWN_GRACE": "3", "AGENTWORKER_TASK_MODULES": "a.b, c",
                                  "AGENTWORKER_REDIS_URL": "redis://h:1/2"})
    assert settings.shutdown_grace == 3.0 and settings.task_modules == ("a.b", "c")
    assert settings.redis_url == "redis://h:1/2"
    with pytest.raises(SettingsError, match=r"AGENTWORKER_SHUTDOWN_GRACE='soon' is not a number"):
        Settings.from_env({"AGENTWORKER_SHUTDOWN_GRACE": "soon"})
    with pytest.raises(SettingsError, match="AGENTWORKER_REDIS_URL"):
        Settings.from_env({"AGENTWORKER_REDIS_URL": "http://x"})
    assert "admin_token" not in repr(Settings(admin_token="s3cret")) or "s3cret" not in repr(
        Settings(admin_token="s3cret"))

"""Input limits, in-process: every input a tenant or an operator sends is refused past its limit with
one sentence naming the limit and its value, never a RecursionError or a traceback.

(The supervisor and worker processes under the same inputs: tests/test_input_limits_e2e.py.)

Only the alias bombs and the 50 MB file carry a time bound, because the issue says "refused within a
second": the bound asserted is a generous 5 s, so a loaded machine does not fail them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from redis.asyncio import Redis

from agentworker import keys
from agentworker.cli import main
from agentworker.client import AgentWorkerClient
from agentworker.config import ConfigError, QuotaFileWatch, load_config, load_config_text
from agentworker.events import EventPublisher, read_events
from agentworker.graphs.step_kinds import PermanentStepError, execute
from agentworker.integrations import IntegrationError, parse_integration
from agentworker.safe_yaml import DocumentRefused, check_value, load_yaml
from agentworker.schedules.spec import InvalidSchedule, parse_schedule
from agentworker.settings import InputLimits, Settings, SettingsError
from agentworker.supervisor.reload import QuotaFileRead
from agentworker.tasks.agent_tasks import InvalidAgentInput, _check_text
from agentworker.workflows import InvalidWorkflow, parse_workflow
from agentworker.workflows.definition import LlmStep, TransformStep
from agentworker.workflows.templates import TemplateError, render
from tests.conftest import new_tenant

#: the issue says "within a second"; asserted with room for a loaded machine
REFUSED_WITHIN_S = 5.0

QUOTAS: dict[str, Any] = {"default_pool": "standard", "pools": {"standard": {"shards": 2, "concurrency": 4}},
                          "tenants": {"acme": {"max_pending": 10}}}
LATIN1 = "default_pool: standard\npools:\n  standard: {shards: 2}\n# Quotas de l'équipe\n".encode("latin-1")
DEEP = "[" * 100_000 + "]" * 100_000


def alias_bomb(levels: int = 9, fan_out: int = 9) -> str:
    """The billion laughs: ``levels`` x ``fan_out`` aliases (81, under the alias count limit, in <500
    bytes), each level ``fan_out`` times the one below: 9^9 strings once expanded."""
    lines = ["lol0: &lol0 [" + ", ".join(['"lol"'] * fan_out) + "]"]
    for level in range(1, levels):
        lines.append(f"lol{level}: &lol{level} [" + ", ".join([f"*lol{level - 1}"] * fan_out) + "]")
    return "\n".join(lines) + "\n"


def many_aliases(count: int = 150) -> str:
    return "base: &b 1\nuses: [" + ", ".join(["*b"] * count) + "]\n"


def one_sentence(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and "RecursionError" not in message, message


# -- the safe loader -----------------------------------------------------------------------------------


def test_the_safe_loader_keeps_ordinary_anchors_and_refuses_bombs_recursion_and_depth() -> None:
    limits = InputLimits()
    ordinary = load_yaml("defaults: &d {max_pending: 5}\nacme: *d\nbeta: {<<: *d, weight: 2}\n",
                         what="the doc", limits=limits, size_limit="max_config_bytes")
    assert ordinary == {"defaults": {"max_pending": 5}, "acme": {"max_pending": 5},
                        "beta": {"max_pending": 5, "weight": 2}}
    with pytest.raises(DocumentRefused, match=r"expands to more than 1048576 bytes through its YAML aliases, "
                                              r"over the limit AGENTWORKER_MAX_DEFINITION_BYTES=1048576"):
        load_yaml(alias_bomb(), what="the doc", limits=limits, size_limit="max_definition_bytes")
    with pytest.raises(DocumentRefused, match=r"uses more than 100 YAML aliases, over the limit "
                                              r"AGENTWORKER_MAX_YAML_ALIASES=100"):
        load_yaml(many_aliases(), what="the doc", limits=limits, size_limit="max_definition_bytes")
    with pytest.raises(yaml.YAMLError, match="recursive alias"):
        load_yaml("a: &a [*a]\n", what="the doc", limits=limits, size_limit="max_definition_bytes")
    for deep in (DEEP, "{a: " * 100_000 + "1" + "}" * 100_000, "- " * 100_000 + "x",
                 "".join(" " * i + f"k{i}:\n" for i in range(100))):
        with pytest.raises(DocumentRefused, match=r"nested more than 64 levels deep .*AGENTWORKER_MAX_YAML_DEPTH=64"):
            load_yaml(deep, what="the doc", limits=limits, size_limit="max_definition_bytes")


def test_an_already_parsed_value_is_held_to_the_same_depth_and_size() -> None:
    limits = InputLimits()
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(DocumentRefused, match="nested more than 64 levels deep"):
        check_value(deep, what="the value", limits=limits, size_limit="max_definition_bytes")
    # Shared references (a bomb built in Python) count once per use, and the walk stops at the limit.
    shared: Any = ["x" * 1000] * 10
    for _ in range(8):
        shared = [shared] * 10
    started = time.monotonic()
    with pytest.raises(DocumentRefused, match="more than 1048576 bytes as JSON"):
        check_value(shared, what="the value", limits=limits, size_limit="max_definition_bytes")
    assert time.monotonic() - started < REFUSED_WITHIN_S
    assert check_value({"a": [1, "xy"]}, what="v", limits=limits, size_limit="max_definition_bytes") > 0


def test_limits_come_from_the_environment_and_bad_values_are_one_sentence() -> None:
    settings = Settings.from_env({"AGENTWORKER_MAX_EVENT_BYTES": "4096", "AGENTWORKER_MAX_YAML_DEPTH": "16"})
    assert settings.limits.max_event_bytes == 4096 and settings.limits.max_yaml_depth == 16
    assert InputLimits.from_env({"AGENTWORKER_MAX_PROMPT_BYTES": "2048"}).max_prompt_bytes == 2048
    assert InputLimits.from_env({}) == InputLimits() == Settings().limits
    with pytest.raises(SettingsError, match=r"AGENTWORKER_MAX_CONFIG_BYTES=10: must be an integer >= 1024"):
        Settings.from_env({"AGENTWORKER_MAX_CONFIG_BYTES": "10"})
    with pytest.raises(SettingsError, match="is not a number"):
        InputLimits.from_env({"AGENTWORKER_MAX_YAML_ALIASES": "many"})


# -- quota files -----------------------------------------------------------------------------------------


def test_a_latin1_quota_file_is_refused_in_one_line_by_check_config(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "quotas.yaml"
    path.write_bytes(LATIN1)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors == ["the file is not UTF-8: byte 0xe9 at line 4, column 15 cannot be decoded "
                                   "(save it as UTF-8)"]
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"{path}: the file is not UTF-8: byte 0xe9 at line 4, column 15 cannot be decoded " \
                          "(save it as UTF-8)"
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("content", "limit"), [
    (DEEP, "AGENTWORKER_MAX_YAML_DEPTH=64"),
    (alias_bomb(), "AGENTWORKER_MAX_CONFIG_BYTES=8388608"),
    (many_aliases(), "AGENTWORKER_MAX_YAML_ALIASES=100"),
], ids=["100k-nested", "alias-bomb", "too-many-aliases"])
def test_hostile_quota_files_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     content: str, limit: str) -> None:
    path = tmp_path / "quotas.yaml"
    path.write_text(content)
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert time.monotonic() - started < REFUSED_WITHIN_S
    assert len(caught.value.errors) == 1 and limit in caught.value.errors[0]
    one_sentence(str(caught.value))
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert limit in err and len(err.splitlines()) == 1
    one_sentence(err)


def test_a_50mb_quota_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "quotas.yaml"
    tenants = "".join(f"  t{i}: {{max_pending: 10}}\n" for i in range(50 * 1024 * 1024 // 24))
    path.write_text("default_pool: standard\npools: {standard: {shards: 2}}\ntenants:\n" + tenants)
    size = path.stat().st_size
    assert size > 50 * 1024 * 1024 - 1024
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert time.monotonic() - started < REFUSED_WITHIN_S
    assert caught.value.errors == [f"the file is {size} bytes, over the limit AGENTWORKER_MAX_CONFIG_BYTES=8388608"]
    # The limit is a setting; the same file under a smaller one, as text, is refused the same way.
    with pytest.raises(ConfigError, match="AGENTWORKER_MAX_CONFIG_BYTES=2048"):
        load_config_text("pools: {a: {}}\n" + "#" * 4096, limits=InputLimits(max_config_bytes=2048))


def test_the_watch_reports_a_refused_file_once_and_never_raises_anything_but_config_error(tmp_path: Path) -> None:
    path = tmp_path / "quotas.yaml"
    path.write_text(yaml.safe_dump(QUOTAS))
    watch = QuotaFileWatch(path)
    assert watch.load().tenants["acme"].max_pending == 10
    assert watch.poll() is None  # unchanged
    path.write_bytes(LATIN1)
    with pytest.raises(ConfigError, match="not UTF-8"):
        watch.poll()
    assert watch.poll() is None  # reported once
    path.write_text(DEEP)
    with pytest.raises(ConfigError, match="AGENTWORKER_MAX_YAML_DEPTH"):
        watch.poll()
    path.write_text(yaml.safe_dump({**QUOTAS, "tenants": {"acme": {"max_pending": 3}}}))
    new = watch.poll()
    assert new is not None and new.tenants["acme"].max_pending == 3


async def test_the_supervisor_reads_the_file_off_its_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "quotas.yaml"
    tenants = {f"tenant-{i}": {"max_pending": i % 50 + 1, "rate_limit": "50/s"} for i in range(20_000)}
    path.write_text(yaml.safe_dump({**QUOTAS, "tenants": tenants}))
    woken = asyncio.Event()
    reading = QuotaFileRead(QuotaFileWatch(path), woken.set)
    reading.start("test", [])
    ticks = 0
    while reading.busy:  # the loop turns while the file is parsed in a thread
        ticks += 1
        await asyncio.sleep(0.001)
    assert ticks >= 1
    await asyncio.wait_for(woken.wait(), 5)
    finished = reading.take()
    assert finished is not None
    trigger, _waiting, outcome = finished
    assert trigger == "test" and not isinstance(outcome, ConfigError) and outcome is not None
    assert len(outcome.tenants) == 20_000
    assert reading.take() is None


async def test_any_failure_while_reading_becomes_a_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "quotas.yaml"
    path.write_text(yaml.safe_dump(QUOTAS))
    watch = QuotaFileWatch(path)

    def broken() -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(watch, "load", broken)
    woken = asyncio.Event()
    reading = QuotaFileRead(watch, woken.set)
    reading.start("test", [])
    await asyncio.wait_for(woken.wait(), 5)
    finished = reading.take()
    assert finished is not None and isinstance(finished[2], ConfigError)
    assert finished[2].errors == ["cannot load the file: RecursionError: maximum recursion depth exceeded"]


async def test_a_following_client_keeps_its_config_when_the_file_is_refused(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path]) -> None:
    path = write_quotas(QUOTAS)
    async with AgentWorkerClient.from_settings(Settings(redis_url=redis_url, config=str(path))) as client:
        client.config_check_interval = 0.0
        for hostile in (LATIN1, DEEP.encode(), alias_bomb().encode()):
            path.write_bytes(hostile)
            assert not await client.follow_config(force=True)
            assert client.config.tenants["acme"].max_pending == 10
            assert client.route("acme").pool == "standard"
            tenant = new_tenant("lim")
            assert (await client.enqueue("probe_count", tenant_id=tenant)).created
        # A good edit is still taken (off the event loop, before routing an enqueue).
        path.write_text(json.dumps({**QUOTAS, "tenants": {"acme": {"max_pending": 20}}}))
        await client.enqueue("probe_count", tenant_id=new_tenant("lim"))
        assert client.config.tenants["acme"].max_pending == 20


# -- workflow definitions, schedules, integrations ---------------------------------------------------


def test_alias_bombs_in_a_workflow_definition_are_refused_quickly() -> None:
    for bomb in (alias_bomb(), many_aliases()):
        definition = "id: bomb\nsteps:\n  - {id: a, kind: transform, template: {x: 1}}\n" + bomb
        assert len(definition.encode()) < 1200
        started = time.monotonic()
        with pytest.raises(InvalidWorkflow) as caught:
            parse_workflow(definition)
        assert time.monotonic() - started < REFUSED_WITHIN_S
        (error,) = caught.value.errors
        assert "YAML aliases" in error and "over the limit AGENTWORKER_MAX_" in error
        one_sentence(error)


async def test_save_workflow_refuses_a_bomb_before_touching_the_database(redis: Redis) -> None:
    # No database is reachable at this URL: the refusal comes first.
    client = AgentWorkerClient(redis, load_config_text(yaml.safe_dump(QUOTAS)),
                               Settings(database_url="postgresql://nobody@127.0.0.1:1/none"))
    started = time.monotonic()
    with pytest.raises(InvalidWorkflow, match="YAML aliases"):
        await client.save_workflow("acme", "id: bomb\nsteps: [{id: a, kind: transform, template: 1}]\n"
                                   + alias_bomb())
    assert time.monotonic() - started < REFUSED_WITHIN_S


def test_deep_workflow_definitions_are_refused_in_one_sentence() -> None:
    with pytest.raises(InvalidWorkflow) as caught:
        parse_workflow(DEEP)
    assert caught.value.errors == ["(document): the workflow definition is nested more than 64 levels deep (at "
                                   "line 1), over the limit AGENTWORKER_MAX_YAML_DEPTH=64"]
    template: Any = "leaf"
    for _ in range(100_000):
        template = {"x": template}
    with pytest.raises(InvalidWorkflow, match="nested more than 64 levels deep"):
        parse_workflow({"id": "deep", "steps": [{"id": "a", "kind": "transform", "template": template}]})


def test_definition_size_steps_and_prompts_are_limited() -> None:
    huge_prompt = "x" * (20 * 1024 * 1024)
    text = json.dumps({"id": "big", "steps": [{"id": "a", "kind": "llm", "prompt": huge_prompt}]})
    with pytest.raises(InvalidWorkflow) as caught:
        parse_workflow(text)
    assert caught.value.errors == [f"(document): the workflow definition is {len(text)} bytes, over the limit "
                                   "AGENTWORKER_MAX_DEFINITION_BYTES=1048576"]
    with pytest.raises(InvalidWorkflow, match=r"more than 1048576 bytes as JSON, over the limit "
                                              r"AGENTWORKER_MAX_DEFINITION_BYTES"):
        parse_workflow({"id": "big", "steps": [{"id": "a", "kind": "llm", "prompt": huge_prompt}]})
    with pytest.raises(InvalidWorkflow) as caught:
        parse_workflow({"id": "long", "steps": [{"id": "a", "kind": "llm", "prompt": "é" * 150_000}]})
    assert caught.value.errors == ["steps[0].prompt: is 300000 bytes, over the limit "
                                   "AGENTWORKER_MAX_PROMPT_BYTES=262144"]
    steps = [{"id": f"s{i}", "kind": "transform", "template": i} for i in range(4)]
    with pytest.raises(InvalidWorkflow) as caught:
        parse_workflow({"id": "many", "steps": steps}, limits=InputLimits(max_definition_steps=3))
    assert caught.value.errors == ["steps: the workflow definition has 4 steps, over the limit "
                                   "AGENTWORKER_MAX_DEFINITION_STEPS=3"]
    assert len(parse_workflow({"id": "many", "steps": steps}).steps) == 4


def test_schedules_and_integrations_use_the_same_loader_and_limits() -> None:
    good = parse_schedule("id: nightly\ncron: '0 2 * * *'\ntask: probe_count\n")
    assert good.task == "probe_count"
    for hostile, limit in ((DEEP, "AGENTWORKER_MAX_YAML_DEPTH"), (alias_bomb(), "AGENTWORKER_MAX_DEFINITION_BYTES"),
                           (many_aliases(), "AGENTWORKER_MAX_YAML_ALIASES")):
        with pytest.raises(InvalidSchedule, match=limit) as refused_schedule:
            parse_schedule(hostile)
        one_sentence(str(refused_schedule.value))
        with pytest.raises(IntegrationError, match=limit) as refused_integration:
            parse_integration("crm", hostile)
        one_sentence(str(refused_integration.value))
    deep: Any = {}
    for _ in range(100_000):
        deep = {"x": deep}
    with pytest.raises(InvalidSchedule, match="nested more than 64 levels deep"):
        parse_schedule({"id": "deep", "cron": "* * * * *", "task": "probe_count", "payload": deep})
    with pytest.raises(IntegrationError, match="nested more than 64 levels deep"):
        parse_integration("crm", {"base_url": "https://crm.example.com", "extra": deep})
    # A YAML error in integration settings never quotes the text (it may hold a password).
    with pytest.raises(IntegrationError) as caught:
        parse_integration("smtp", 'host: smtp.example.com\npassword: "s3cret')
    assert "s3cret" not in str(caught.value)


# -- what runs: templates, prompts, step outputs, events ---------------------------------------------


def test_template_output_is_limited() -> None:
    context = {"input": {}, "steps": {"a": "x" * 10_000}}
    assert render({"copy": "{{ steps.a.output }}"}, context) == {"copy": "x" * 10_000}
    with pytest.raises(TemplateError) as caught:
        render({"copies": ["{{ steps.a.output }}"] * 1000}, context)
    assert str(caught.value) == ("the rendered inputs are more than 1048576 bytes, over the limit "
                                 "AGENTWORKER_MAX_TEMPLATE_OUTPUT_BYTES=1048576")
    with pytest.raises(TemplateError, match="AGENTWORKER_MAX_TEMPLATE_OUTPUT_BYTES"):
        render("{{ steps.a.output }}" * 200, context)
    with pytest.raises(TemplateError, match="more than 4096 bytes"):
        render("{{ steps.a.output }}", context, max_bytes=4096)


def test_a_20mb_prompt_is_refused() -> None:
    limits = InputLimits()
    huge = "x" * (20 * 1024 * 1024)
    with pytest.raises(InvalidAgentInput) as caught:
        _check_text("message", huge, limits)
    assert str(caught.value) == "message is 20971520 bytes, over the limit AGENTWORKER_MAX_PROMPT_BYTES=262144"
    assert _check_text("message", "hello", limits) == "hello"


async def test_a_rendered_prompt_over_the_limit_is_not_sent_and_a_huge_output_not_kept() -> None:
    step = LlmStep(id="ask", kind="llm", prompt="{{ input.text }}")
    no_env = cast(Any, None)  # the limit is checked before anything uses the environment
    with pytest.raises(PermanentStepError) as caught:
        await execute(step, {"prompt": "x" * (20 * 1024 * 1024), "system": None}, no_env)
    assert str(caught.value) == ("the rendered prompt of step 'ask' is 20971520 bytes, over the limit "
                                 "AGENTWORKER_MAX_PROMPT_BYTES=262144")
    transform = TransformStep(id="t", kind="transform", template="{{ input.x }}")
    with pytest.raises(PermanentStepError, match=r"the output of step 't' is more than 4194304 bytes as JSON, "
                                                 r"over the limit AGENTWORKER_MAX_STEP_OUTPUT_BYTES=4194304"):
        await execute(transform, {"template": "y" * (5 * 1024 * 1024)}, no_env)
    assert await execute(transform, {"template": {"ok": True}}, no_env) == {"ok": True}


async def test_an_oversized_event_is_truncated_in_the_stream(redis: Redis) -> None:
    tenant = new_tenant("ev")
    publisher = EventPublisher(redis, max_event_bytes=4096)
    small = await publisher.publish(tenant, "workflow_step_completed", {"run_id": "r1", "output": "fine"})
    assert small["data"] == {"run_id": "r1", "output": "fine"}
    big = {"run_id": "r1", "step_id": "fetch", "status": "success", "output": {"body": "é" * 200_000}}
    await publisher.publish(tenant, "workflow_step_completed", big)
    entries = await redis.xrange(keys.event_stream(tenant))
    assert len(entries) == 2
    raw = entries[1][1][b"event"]
    assert len(raw) <= 4096
    events = []
    async for event in read_events(redis, tenant, block_ms=100):
        events.append(event)
        if len(events) == 2:
            break
    data = events[1].data
    assert data["truncated"] is True and data["bytes"] == len(json.dumps(big, separators=(",", ":")))
    assert {data["run_id"], data["step_id"], data["status"]} == {"r1", "fetch", "success"}
    assert data["preview"].startswith('{"run_id":"r1"') and data["preview"].endswith("…")
    assert "output" not in data


async def test_the_event_limit_is_a_setting(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTWORKER_MAX_EVENT_BYTES", "2048")
    publisher = EventPublisher(redis)
    assert publisher.max_event_bytes == 2048
    record = await publisher.publish(new_tenant("ev"), "job_completed", {"job_id": "j", "result": "z" * 5000})
    assert record["data"]["truncated"] is True and record["data"]["job_id"] == "j"
    assert len(json.dumps(record, separators=(",", ":"))) <= 2048

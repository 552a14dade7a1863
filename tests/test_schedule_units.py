"""The pure parts of scheduling: cron expressions and daylight saving, the missed-run plan, schedule
validation, the polling source contract and webhook signatures."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from agentworker.integrations import WebhookSettings
from agentworker.schedules import InvalidCron, InvalidSchedule, parse_cron, parse_schedule
from agentworker.schedules.plan import plan_step
from agentworker.schedules.polling import backoff_seconds
from agentworker.schedules.sources import SourceError, parse_page
from agentworker.schedules.webhooks import WebhookRejected, delivery_id_of, sign, verify

PARIS = ZoneInfo("Europe/Paris")


def fires(expression: str, start: datetime, count: int, timezone: str = "Europe/Paris") -> list[str]:
    cron = parse_cron(expression, timezone)
    found, at = [], start
    for _ in range(count):
        at = cron.next_after(at)
        assert at.tzinfo is UTC
        found.append(at.astimezone(ZoneInfo(timezone)).strftime("%m-%d %H:%M:%S%z"))
    return found


def test_five_and_six_field_expressions_and_macros() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert fires("*/20 * * * * *", start, 3, "UTC") == ["01-01 00:00:20+0000", "01-01 00:00:40+0000",
                                                        "01-01 00:01:00+0000"]
    assert fires("0 9 * * mon-fri", start, 2, "UTC") == ["01-01 09:00:00+0000", "01-02 09:00:00+0000"]
    assert fires("@monthly", start, 2, "UTC") == ["02-01 00:00:00+0000", "03-01 00:00:00+0000"]
    assert fires("0 8 * * *", start, 1, "Asia/Tokyo") == ["01-02 08:00:00+0900"]  # start is 09:00 in Tokyo


def test_spring_forward_fires_skipped_times_once_at_the_end_of_the_gap() -> None:
    # Paris, 2026-03-29: 02:00 CET becomes 03:00 CEST.
    before = datetime(2026, 3, 28, 23, 0, tzinfo=PARIS)
    assert fires("30 2 * * *", before, 2) == ["03-29 03:00:00+0200", "03-30 02:30:00+0200"]
    assert fires("*/30 * * * *", datetime(2026, 3, 29, 1, 0, tzinfo=PARIS), 3) == [
        "03-29 01:30:00+0100", "03-29 03:00:00+0200", "03-29 03:30:00+0200"]


def test_fall_back_fires_fixed_times_once_and_hourly_ones_through_the_repeated_hour() -> None:
    # Paris, 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:00-02:59 happens twice.
    night = datetime(2026, 10, 25, 0, 0, tzinfo=PARIS)
    assert fires("30 2 * * *", night, 2) == ["10-25 02:30:00+0200", "10-26 02:30:00+0100"]
    assert fires("0 * * * *", night, 4) == ["10-25 01:00:00+0200", "10-25 02:00:00+0200", "10-25 02:00:00+0100",
                                            "10-25 03:00:00+0100"]
    assert fires("*/30 2 * * *", night, 3) == ["10-25 02:00:00+0200", "10-25 02:30:00+0200",
                                               "10-26 02:00:00+0100"]


@pytest.mark.parametrize(("expression", "timezone", "message"), [
    ("61 * * * *", "UTC", "invalid cron expression '61 * * * *': a field value is out of its range"),
    ("* * *", "UTC", "expected 5 fields (minute hour day month weekday) or 6 with seconds first, got 3"),
    ("0 0 31 2 *", "UTC", "invalid cron expression '0 0 31 2 *': it never matches a date"),
    ("H * * * *", "UTC", "hash (H) and random (R) fields are not supported"),
    ("* * * * * * 2030", "UTC", "got 7"),
    ("0 9 * * *", "Europe/Pariss", "unknown time zone 'Europe/Pariss': use an IANA name such as 'Europe/Paris'"),
    ("0 9 * * *", "../../etc/passwd", "unknown time zone '../../etc/passwd'"),
])
def test_invalid_expressions_and_time_zones_are_refused_in_one_sentence(expression: str, timezone: str,
                                                                       message: str) -> None:
    with pytest.raises(InvalidCron) as info:
        parse_cron(expression, timezone)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_schedules_are_validated_with_the_bad_key_named() -> None:
    good = parse_schedule({"id": "nightly", "cron": "0 2 * * *", "timezone": "Europe/Paris", "workflow_id": "sync"})
    assert good.kind == "workflow" and good.missed_policy == "skip" and good.misfire_grace_seconds == 60
    cases = {
        "invalid schedule 'a': unknown time zone 'Mars/Base'": {"id": "a", "cron": "* * * * *",
                                                                "timezone": "Mars/Base", "task": "echo"},
        "invalid schedule 'a': invalid cron expression 'every day'": {"id": "a", "cron": "every day",
                                                                      "task": "echo"},
        "invalid schedule 'a': give exactly one of task, workflow_id or poll (got task, workflow_id)": {
            "id": "a", "cron": "* * * * *", "task": "echo", "workflow_id": "w"},
        "invalid schedule 'a': missed_policy: Input should be 'skip' or 'run_once'": {
            "id": "a", "cron": "* * * * *", "task": "echo", "missed_policy": "all"},
        "invalid schedule 'a': payload must not set tenant_id": {
            "id": "a", "cron": "* * * * *", "task": "echo", "payload": {"tenant_id": "other"}},
        "invalid schedule 'a': poll.url: must be an http:// or https:// URL": {
            "id": "a", "cron": "* * * * *", "poll": {"url": "ftp://feed.example/x", "workflow_id": "w"}},
    }
    for message, spec in cases.items():
        with pytest.raises(InvalidSchedule) as info:
            parse_schedule(spec)
        assert str(info.value).startswith(message), str(info.value)
    secret = parse_schedule({"id": "p", "cron": "* * * * *", "poll": {
        "url": "https://feed.example/items", "workflow_id": "w", "headers": {"Authorization": "Bearer hidden"}}})
    assert secret.masked()["poll"]["headers"] == {"Authorization": "***"} and "hidden" not in repr(secret)
    assert secret.stored()["poll"]["headers"] == {"Authorization": "Bearer hidden"}


def test_on_time_due_times_run_each_and_missed_ones_follow_the_policy() -> None:
    every_minute = parse_cron("0 * * * * *")
    due = datetime(2026, 1, 1, 10, 1, tzinfo=UTC)
    on_time = plan_step(every_minute, due, due + timedelta(seconds=20), grace_seconds=30, missed_policy="skip")
    assert (on_time.run_due, on_time.next_due, on_time.missed) == (due, due + timedelta(minutes=1), 0)
    # Down from 10:01 to 10:06:40: 10:01 ... 10:06 are all older than the 30 s grace.
    later = due + timedelta(minutes=5, seconds=40)
    skip = plan_step(every_minute, due, later, grace_seconds=30, missed_policy="skip")
    assert (skip.run_due, skip.next_due, skip.missed) == (None, due + timedelta(minutes=6), 6)
    once = plan_step(every_minute, due, later, grace_seconds=30, missed_policy="run_once")
    assert (once.run_due, once.next_due, once.missed) == (due + timedelta(minutes=5), due + timedelta(minutes=6), 5)
    # Down until 10:06:10: 10:06 is still on time and is next, the five before it were missed.
    close = plan_step(every_minute, due, due + timedelta(minutes=5, seconds=10), grace_seconds=30,
                      missed_policy="skip")
    assert (close.run_due, close.next_due, close.missed) == (None, due + timedelta(minutes=5), 5)
    # A week of per-second ticks is not walked one by one.
    week = plan_step(parse_cron("* * * * * *"), due, due + timedelta(days=7), grace_seconds=1,
                     missed_policy="run_once")
    assert week.run_due == due + timedelta(days=7, seconds=-2) and week.next_due == due + timedelta(days=7, seconds=-1)


def test_the_source_contract_and_the_backoff() -> None:
    page = parse_page(b'{"items": [{"id": "a", "n": 1}, {"id": 2}], "next_cursor": 7}')
    assert [i["id"] for i in page.items] == ["a", 2] and page.next_cursor == "7"
    assert parse_page(b'{"items": [], "next_cursor": null}').next_cursor is None
    for body, message in [(b"<html>", "not JSON"), (b"[]", "an object with an 'items' list"),
                          (b'{"items": [{"name": "x"}]}', "items[0] has no 'id'"),
                          (b'{"items": [], "next_cursor": {}}', "'next_cursor' must be")]:
        with pytest.raises(SourceError, match=re.escape(message)):
            parse_page(body)
    assert [backoff_seconds(n, 2, 30) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]


def test_webhook_signatures_with_and_without_a_timestamp() -> None:
    secret = "whsec-0123456789abcdef"
    settings = WebhookSettings.model_validate({"secret": secret, "workflow_id": "w"})
    body, now = b'{"event": "paid"}', 1_800_000_000
    good = {"x-signature": sign(secret, body, now), "x-signature-timestamp": str(now), "x-delivery-id": "d-1"}
    verify(settings, good, body, now + 10)
    assert delivery_id_of(settings, good, body) == "d-1"
    assert delivery_id_of(settings, {}, body).startswith("sha256:")
    rejected = {
        "bad_signature": [{**good, "x-signature": sign("another-secret-of-16", body, now)},
                          {**good, "x-signature": sign(secret, body + b" ", now)},
                          {**good, "x-signature": "sha256=zz"}, {k: v for k, v in good.items() if k != "x-signature"},
                          {**good, "x-signature-timestamp": str(now + 1)}, {**good, "x-signature": "sha256=é" * 8}],
        "stale": [good],
    }
    for outcome, attempts in rejected.items():
        for headers in attempts:
            with pytest.raises(WebhookRejected) as info:
                verify(settings, headers, body, now + 10 if outcome == "bad_signature" else now + 301)
            assert info.value.outcome == outcome
    github = WebhookSettings.model_validate({"secret": secret, "workflow_id": "w", "tolerance_seconds": 0,
                                             "signature_header": "X-Hub-Signature-256"})
    verify(github, {"x-hub-signature-256": sign(secret, body)}, body, now)


def test_what_each_kind_of_schedule_enqueues_for_a_due_time() -> None:
    from agentworker.schedules.dispatcher import job_key, target_of

    due = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
    task = parse_schedule({"id": "t", "cron": "0 8 * * *", "task": "send_run_report",
                           "payload": {"to": ["a@b.example"], "period_end": "{{ due_at }}"}})
    assert target_of(task, due) == ("send_run_report", {"to": ["a@b.example"],
                                                        "period_end": "2026-05-01T08:00:00+00:00"})
    flow = parse_schedule({"id": "w", "cron": "0 8 * * *", "workflow_id": "digest", "input": {"day": "{{ due_at }}",
                                                                                              "n": 1}})
    assert target_of(flow, due) == ("execute_workflow", {"workflow_id": "digest", "trigger": "schedule",
                                                         "input_data": {"day": "2026-05-01T08:00:00+00:00", "n": 1}})
    poll = parse_schedule({"id": "p", "cron": "0 8 * * *", "poll": {"url": "https://f.example/x", "workflow_id": "w"}})
    assert target_of(poll, due) == ("poll_source", {"schedule_id": "p", "due_at": "2026-05-01T08:00:00+00:00"})
    assert job_key("t", due) == "sched-t-1777622400"


def test_every_problem_of_a_schedule_is_reported_at_once() -> None:
    with pytest.raises(InvalidSchedule) as info:
        parse_schedule({"id": "s", "cron": "61 * * * *", "task": "echo", "workflow_id": "w",
                        "missed_policy": "never", "payload": {"tenant_id": "x"}})
    errors = info.value.errors
    assert errors[0].startswith("missed_policy:")  # the schema
    assert any("61" in e for e in errors), errors  # the cron expression, in the same report
    assert "give exactly one of task, workflow_id or poll (got task, workflow_id)" in errors  # the target
    assert "payload must not set tenant_id: it is the schedule's tenant" in errors
    assert str(info.value).startswith("invalid schedule 's': missed_policy:")

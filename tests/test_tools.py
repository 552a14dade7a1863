"""The email, calendar and CRM tools against real local peers (aiosmtpd, an aiohttp CRM, PostgreSQL),
and the tenant settings they read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

from agentworker.client import AgentWorkerClient
from agentworker.db import Database, outbox
from agentworker.db.ledger import Ledger, effect_key
from agentworker.integrations import IntegrationError, parse_integration
from agentworker.tools import TOOLS, ToolContext, ToolError, ToolInputError, ToolNotConfigured
from agentworker.tools.ical import fold
from tests.conftest import CRM_TOKENS, new_tenant

SMTP_PASSWORD = "smtp-pass-do-not-log"


class Collected:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def emit(self, event: str, data: dict[str, Any]) -> None:
        self.events.append((event, data))


def context(database: Database, tenant: str, key: str = "k1", step: str = "s1") -> ToolContext:
    return ToolContext(tenant_id=tenant, run_id="run-1", step_id=step, idempotency_key=key,
                       log=structlog.get_logger("test"), emit=Collected().emit, database=database)


@pytest.fixture
async def client(redis_url: str, quota_file: Any, database: Database) -> Any:
    from redis.asyncio import Redis

    from agentworker.config import load_config

    redis = Redis.from_url(redis_url)  # made here, so closed here: the client leaves it open
    try:
        async with AgentWorkerClient(redis, load_config(quota_file), database=database) as made:
            yield made
    finally:
        await redis.aclose()


def smtp_settings(port: int) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "security": "none", "from_address": "bot@acme.example",
            "username": None, "password": SMTP_PASSWORD, "timeout": 10}


def test_bad_settings_name_the_key_and_never_echo_a_secret() -> None:
    with pytest.raises(IntegrationError) as info:
        parse_integration("smtp", {"host": "h", "port": 70000, "password": 12345678, "from_address": "nope",
                                   "surprise": "hunter2-secret"})
    message = str(info.value)
    assert message.startswith("invalid smtp settings: port: Input should be less than or equal to 65535")
    assert "from_address: Value error, not an email address" in message and "surprise: Extra inputs" in message
    assert "hunter2" not in message and "12345678" not in message
    with pytest.raises(IntegrationError, match="unknown integration kind 'fax'"):
        parse_integration("fax", {})
    with pytest.raises(IntegrationError, match="invalid MCP server name 'Bad Name'"):
        parse_integration("mcp", {"url": "http://x.example"}, name="Bad Name")
    with pytest.raises(IntegrationError, match=r"timeout: Input should be less than or equal to 60"):
        parse_integration("model", {"model": "openai:gpt-4o-mini", "timeout": 120})


async def test_credentials_are_scoped_to_their_tenant_and_shown_masked(client: AgentWorkerClient,
                                                                       database: Database) -> None:
    a, b = new_tenant("cred"), new_tenant("cred")
    shown = await client.save_integration(a, "smtp", smtp_settings(25))
    assert shown["password"] == "***" and shown["host"] == "127.0.0.1"
    await client.save_integration(a, "mcp", {"url": "http://127.0.0.1:9/mcp", "headers": {"Authorization": "t0k"}},
                                  name="extras")
    assert await client.get_integration(b, "smtp") is None, "tenant B does not see tenant A's SMTP settings"
    assert await client.list_integrations(b) == []
    listed = await client.list_integrations(a)
    assert [(i["kind"], i["name"]) for i in listed] == [("mcp", "extras"), ("smtp", "default")]
    assert listed[0]["config"]["headers"] == {"Authorization": "***"}
    assert SMTP_PASSWORD not in repr(listed) and "t0k" not in repr(listed)
    # Tenant B's tools cannot reach tenant A's SMTP server: B has no settings of its own.
    with pytest.raises(ToolNotConfigured, match=f"tenant '{b}' has no smtp settings"):
        await TOOLS.get(b, "send_email").func(context(database, b), {"to": ["x@y.example"], "subject": "s",
                                                                       "body": "b"})
    assert await client.delete_integration(a, "mcp", "extras") is True
    assert await client.delete_integration(a, "mcp", "extras") is False


async def test_email_is_sent_once_per_key_with_a_stable_message_id(client: AgentWorkerClient, database: Database,
                                                                   smtp_server: Any) -> None:
    server = smtp_server()
    tenant = new_tenant("mail")
    await client.save_integration(tenant, "smtp", smtp_settings(server.port))
    send = TOOLS.get(tenant, "send_email")
    ledger = Ledger(database)
    args = {"to": ["ada@example.com"], "cc": ["boss@example.com"], "subject": "Hello", "body": "Line one.\n"}

    async def effect(key: str) -> Any:
        return await send.func(context(database, tenant, key), args)

    with structlog.testing.capture_logs() as logs:
        first = await ledger.run_once(tenant, "run-1", "s1", "send_email:1", effect)
        again = await ledger.run_once(tenant, "run-1", "s1", "send_email:1", effect)
    key = effect_key(tenant, "run-1", "s1", "send_email:1")
    assert first == again == {"status": "sent", "message_id": f"<{key}.agentworker@acme.example>",
                              "recipients": ["ada@example.com", "boss@example.com"]}
    (received,) = server.messages()
    assert received.rcpt_tos == ["ada@example.com", "boss@example.com"] and received.mail_from == "bot@acme.example"
    assert received.message["Message-ID"] == first["message_id"] and received.message["Subject"] == "Hello"
    assert received.message.get_payload(decode=True).decode().replace("\r\n", "\n") == "Line one.\n"
    # The ledger row is what a retry normally finds; without it, the outbox still prevents a second send.
    assert (await send.func(context(database, tenant, key), args))["status"] == "sent"
    assert len(server.messages()) == 1
    assert SMTP_PASSWORD not in repr(logs)


async def test_a_send_cut_off_during_transmission_is_not_repeated_but_one_refused_earlier_is(
        client: AgentWorkerClient, database: Database, smtp_server: Any) -> None:
    server = smtp_server()
    tenant = new_tenant("mail")
    await client.save_integration(tenant, "smtp", smtp_settings(server.port))
    send = TOOLS.get(tenant, "send_email")
    args = {"to": ["ada@example.com"], "subject": "Once", "body": "b"}
    # A crash after the data went out leaves 'sending': a retry must not send again.
    async with database.tenant(tenant) as tx:
        await outbox.prepare(tx, "cut-key", "<cut-key@acme.example>", ["ada@example.com"], "Once")
        await outbox.set_status(tx, "cut-key", "sending")
    receipt = await send.func(context(database, tenant, "cut-key"), args)
    assert receipt["status"] == "unconfirmed" and server.messages() == []
    # A recipient refused before any data: nothing was delivered, so the retry sends.
    server.refuse_once.add("ada@example.com")
    with pytest.raises(ToolError, match=r"SMTP server 127.0.0.1:\d+ failed the send: SMTPRecipientRefused: 451"):
        await send.func(context(database, tenant, "refused-key"), args)
    assert (await send.func(context(database, tenant, "refused-key"), args))["status"] == "sent"
    assert len(server.messages()) == 1
    async with database.tenant(tenant) as tx:
        entry = await outbox.get_entry(tx, "refused-key")
    assert entry is not None and entry.status == "sent" and entry.attempts == 2


async def test_tool_inputs_are_validated_in_one_sentence(database: Database) -> None:
    tenant = new_tenant("input")
    with pytest.raises(ToolInputError) as info:
        await TOOLS.get(tenant, "send_email").func(context(database, tenant), {"to": ["not-an-address"],
                                                                               "subject": "a\nb", "body": ""})
    assert str(info.value) == (
        "tool 'send_email': invalid arguments: to.0: Value error, not an email address like name@example.com; "
        "subject: Value error, must be a single line; body: String should have at least 1 character")
    with pytest.raises(ToolInputError, match="give exactly one of ends_at and duration_minutes"):
        await TOOLS.get(tenant, "calendar_create_event").func(
            context(database, tenant), {"title": "x", "starts_at": "2030-01-01T09:00:00+00:00"})


async def test_calendar_events_free_slots_and_icalendar_export(database: Database) -> None:
    tenant, other = new_tenant("cal"), new_tenant("cal")
    create = TOOLS.get(tenant, "calendar_create_event").func
    monday = datetime(2030, 1, 7, tzinfo=UTC)
    made = await create(context(database, tenant, "e1"), {
        "title": "Standup, daily; short", "starts_at": (monday + timedelta(hours=9)).isoformat(),
        "duration_minutes": 30, "attendees": ["ada@example.com"], "description": "Line 1\nLine 2"})
    again = await create(context(database, tenant, "e1"), {
        "title": "Standup, daily; short", "starts_at": (monday + timedelta(hours=9)).isoformat(),
        "duration_minutes": 30})
    assert again["event_id"] == made["event_id"], "a retried create finds its event"
    await create(context(database, tenant, "e2"), {"title": "Review", "starts_at": "2030-01-07T11:00:00+01:00",
                                                   "ends_at": "2030-01-07T12:30:00+01:00"})
    window = {"start": monday.isoformat(), "end": (monday + timedelta(days=1)).isoformat()}
    listed = await TOOLS.get(tenant, "calendar_list_events").func(context(database, tenant), window)
    assert [e["title"] for e in listed["events"]] == ["Standup, daily; short", "Review"]
    assert (await TOOLS.get(other, "calendar_list_events").func(context(database, other), window))["events"] == []

    slots = await TOOLS.get(tenant, "calendar_find_free_slots").func(context(database, tenant), {
        **window, "duration_minutes": 30, "day_start": "09:00", "day_end": "13:00", "max_slots": 3})
    # Busy 09:00-09:30 (standup) and 10:00-11:30 UTC (review, given in +01:00).
    assert [(s["start"][11:16], s["end"][11:16]) for s in slots["slots"]] == [
        ("09:30", "10:00"), ("11:30", "12:00"), ("12:00", "12:30")]
    exported = await TOOLS.get(tenant, "calendar_export_ics").func(context(database, tenant), window)
    ics = exported["ics"]
    assert exported["count"] == 2 and ics.startswith("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:")
    assert ics.endswith("END:VCALENDAR\r\n") and "\n" not in ics.replace("\r\n", "")
    unfolded = ics.replace("\r\n ", "")
    assert "SUMMARY:Standup\\, daily\\; short\r\n" in unfolded and "DESCRIPTION:Line 1\\nLine 2\r\n" in unfolded
    assert "DTSTART:20300107T090000Z\r\nDTEND:20300107T093000Z" in unfolded
    assert f"UID:{made['event_id']}@agentworker" in unfolded and "ATTENDEE;RSVP=TRUE:mailto:ada@example.com" in ics
    assert all(len(line.encode()) <= 75 for line in ics.split("\r\n"))
    assert fold("é" * 60).split("\r\n")[0].encode().decode() == "é" * 37, "never splits a UTF-8 character"


async def test_crm_tools_use_the_tenants_base_url_token_and_idempotency_keys(
        client: AgentWorkerClient, database: Database, fake_crm: Any) -> None:
    a, b = new_tenant("crm"), new_tenant("crm")
    await client.save_integration(a, "crm", {"base_url": fake_crm.base_url, "token": CRM_TOKENS[0]})
    await client.save_integration(b, "crm", {"base_url": fake_crm.base_url, "token": "wrong-token-b"})
    found = await TOOLS.get(a, "crm_find_contacts").func(context(database, a), {"query": "lovelace"})
    assert [c["email"] for c in found["contacts"]] == ["ada@example.com"]
    made = await TOOLS.get(a, "crm_create_contact").func(context(database, a, "c-key"),
                                                         {"name": "Grace Hopper", "email": "grace@example.com"})
    repeat = await TOOLS.get(a, "crm_create_contact").func(context(database, a, "c-key"),
                                                           {"name": "Grace Hopper", "email": "grace@example.com"})
    assert made == repeat and len(fake_crm.books[CRM_TOKENS[0]]) == 3, "the CRM dropped the repeat by its key"
    updated = await TOOLS.get(a, "crm_update_contact").func(context(database, a, "u-key"),
                                                            {"contact_id": made["id"], "company": "Navy"})
    assert updated["company"] == "Navy"
    note = await TOOLS.get(a, "crm_add_note").func(context(database, a, "n-key"), {"contact_id": "c-1", "text": "Hi"})
    assert note["contact_id"] == "c-1" and fake_crm.notes["c-1"][0]["text"] == "Hi"
    writes = [(r["method"], r["idempotency_key"]) for r in fake_crm.requests if r["method"] != "GET"]
    assert writes == [("POST", "c-key"), ("POST", "c-key"), ("PATCH", "u-key"), ("POST", "n-key")]
    assert {r["token"] for r in fake_crm.requests} == {CRM_TOKENS[0]}
    with pytest.raises(ToolError) as info:
        await TOOLS.get(b, "crm_get_contact").func(context(database, b), {"contact_id": "c-1"})
    assert str(info.value).startswith("CRM call GET http://127.0.0.1:") and "answered HTTP 401" in str(info.value)
    assert "wrong-token-b" not in str(info.value)
    with pytest.raises(ToolError, match="not found"):
        await TOOLS.get(a, "crm_get_contact").func(context(database, a), {"contact_id": "c-404"})

"""CRM tools: look up, create and update contacts and add notes, over the tenant's CRM HTTP API.

The API (per tenant ``base_url``, ``Authorization: Bearer <token>``, JSON both ways)::

    GET   {base_url}/contacts?query=Q          -> {"contacts": [contact, ...]}
    GET   {base_url}/contacts/{id}             -> contact
    POST  {base_url}/contacts                  -> contact      (Idempotency-Key header)
    PATCH {base_url}/contacts/{id}             -> contact      (Idempotency-Key header)
    POST  {base_url}/contacts/{id}/notes       -> note         (Idempotency-Key header)

Writes go through the side-effect ledger and carry the call's stable ``Idempotency-Key`` so the CRM can
drop a repeat. An adapter in front of another CRM only has to speak these five calls.
"""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agentworker import egress
from agentworker.db.urls import redact_url
from agentworker.integrations import CrmSettings, EmailAddress
from agentworker.tools.registry import ToolContext, ToolError, tool
from agentworker.tools.tenant_settings import load_settings

_MAX_BODY_BYTES = 1_048_576
ContactId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]


class FindContacts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=200, description="a name, email address or company")


class GetContact(BaseModel):
    model_config = ConfigDict(extra="forbid")

    contact_id: ContactId


class ContactFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    email: EmailAddress | None = None
    phone: str | None = Field(default=None, max_length=50)
    company: str | None = Field(default=None, max_length=200)


class CreateContact(ContactFields):
    name: str = Field(min_length=1, max_length=200)


class UpdateContact(ContactFields):
    contact_id: ContactId

    @model_validator(mode="after")
    def _something(self) -> UpdateContact:
        if not self.changes():
            raise ValueError("give at least one of name, email, phone and company to change")
        return self

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude={"contact_id"}, exclude_none=True)


class AddNote(BaseModel):
    model_config = ConfigDict(extra="forbid")

    contact_id: ContactId
    text: str = Field(min_length=1, max_length=10_000)


@tool(side_effects=False, input_model=FindContacts, timeout=60, description="Find CRM contacts matching a query")
async def crm_find_contacts(ctx: ToolContext, args: FindContacts) -> Any:
    return await _call(ctx, "GET", f"/contacts?query={quote(args.query)}")


@tool(side_effects=False, input_model=GetContact, timeout=60, description="Get one CRM contact by id")
async def crm_get_contact(ctx: ToolContext, args: GetContact) -> Any:
    return await _call(ctx, "GET", f"/contacts/{quote(args.contact_id)}")


@tool(side_effects=True, input_model=CreateContact, timeout=60, description="Create a CRM contact")
async def crm_create_contact(ctx: ToolContext, args: CreateContact) -> Any:
    return await _call(ctx, "POST", "/contacts", args.model_dump(exclude_none=True))


@tool(side_effects=True, input_model=UpdateContact, timeout=60, description="Update fields of a CRM contact")
async def crm_update_contact(ctx: ToolContext, args: UpdateContact) -> Any:
    return await _call(ctx, "PATCH", f"/contacts/{quote(args.contact_id)}", args.changes())


@tool(side_effects=True, input_model=AddNote, timeout=60, description="Add a note to a CRM contact")
async def crm_add_note(ctx: ToolContext, args: AddNote) -> Any:
    return await _call(ctx, "POST", f"/contacts/{quote(args.contact_id)}/notes", {"text": args.text})


async def _call(ctx: ToolContext, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    settings = await load_settings(ctx, "crm", CrmSettings)
    headers = {"Authorization": f"Bearer {settings.token.get_secret_value()}", "Accept": "application/json"}
    if method != "GET":
        headers["Idempotency-Key"] = ctx.idempotency_key
    url = settings.base_url + path
    shown = f"{method} {redact_url(settings.base_url)}{path.split('?', 1)[0]}"
    timeout = aiohttp.ClientTimeout(total=settings.timeout)
    try:
        async with egress.http_session(timeout=timeout) as session, session.request(
                method, url, headers=headers, json=body) as response:
            raw = await response.content.read(_MAX_BODY_BYTES)
            status = response.status
    except egress.EgressRefused as exc:
        raise ToolError(f"CRM call {shown}: {exc}") from None
    except TimeoutError:
        raise ToolError(f"CRM call {shown} timed out after {settings.timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise ToolError(f"CRM call {shown} failed: {type(exc).__name__}") from None
    text = raw.decode("utf-8", errors="replace")
    if status == 404:
        raise ToolError(f"CRM call {shown}: not found")
    if status >= 400:
        raise ToolError(f"CRM call {shown} answered HTTP {status}: {text[:200]}")
    try:
        return json.loads(text) if text else None
    except ValueError:
        raise ToolError(f"CRM call {shown} answered something that is not JSON") from None

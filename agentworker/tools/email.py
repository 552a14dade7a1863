"""The email tool: send a message through the tenant's SMTP server, exactly once.

Exactly once across crashes and retries, in three committed states per send (``agentworker.email_outbox``,
keyed by the call's stable idempotency key, with a Message-ID derived from it):

1. ``prepared`` — committed before connecting. Connecting, logging in and naming sender and recipients
   deliver nothing: a retry that finds ``prepared`` sends (a refused recipient or a dropped connection
   here is simply tried again, and so is a message the server refused with an error reply);
2. ``sending`` — committed right before the message data is transmitted. SMTP delivers on the server's
   reply to the end of the data, so from here on the message may have been accepted even if this process
   dies before it hears the reply. A retry that finds ``sending`` does **not** send again: it returns
   ``status: "unconfirmed"`` (and logs a warning). The window this covers is the transmission of one
   message — milliseconds — and in it we choose at most once: a duplicate email cannot be recalled,
   while an unconfirmed one carries a Message-ID the operator can search the relay's log for;
3. ``sent`` — the server accepted the message.

The call also goes through the side-effect ledger like every side-effecting tool, so a finished send is
answered from the ledger without touching the outbox.
"""

from __future__ import annotations

import time
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from agentworker import egress
from agentworker.db import outbox
from agentworker.integrations import EmailAddress, SmtpSettings
from agentworker.tools.registry import ToolContext, ToolError, tool
from agentworker.tools.tenant_settings import load_settings, require_database


def _one_line(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("must be a single line")
    return value


class SendEmail(BaseModel):
    """A plain-text email."""

    model_config = ConfigDict(extra="forbid")

    to: list[EmailAddress] = Field(min_length=1, max_length=50, description="recipients' addresses")
    cc: list[EmailAddress] = Field(default_factory=list, max_length=50)
    subject: Annotated[str, Field(min_length=1, max_length=300), AfterValidator(_one_line)]
    body: str = Field(min_length=1, max_length=100_000, description="plain text")
    reply_to: EmailAddress | None = None


def message_id_for(idempotency_key: str, from_address: str) -> str:
    """The Message-ID of a send: the same on every try of it."""
    return f"<{idempotency_key}.agentworker@{from_address.rsplit('@', 1)[1]}>"


def build_message(args: SendEmail, settings: SmtpSettings, message_id: str) -> EmailMessage:
    message = EmailMessage(policy=SMTP_POLICY)
    message["From"] = settings.from_address
    message["To"] = ", ".join(args.to)
    if args.cc:
        message["Cc"] = ", ".join(args.cc)
    if args.reply_to:
        message["Reply-To"] = args.reply_to
    message["Subject"] = args.subject
    message["Date"] = formatdate(time.time(), usegmt=True)
    message["Message-ID"] = message_id
    message.set_content(args.body)
    return message


@tool(side_effects=True, input_model=SendEmail, approval=True, timeout=60,
      description="Send a plain-text email from the tenant's address")
async def send_email(ctx: ToolContext, args: SendEmail) -> dict[str, Any]:
    """Send ``args`` through the tenant's SMTP server, once (see the module's docstring)."""
    settings = await load_settings(ctx, "smtp", SmtpSettings)
    database = require_database(ctx)
    recipients = [*args.to, *args.cc]
    message_id = message_id_for(ctx.idempotency_key, settings.from_address)
    async with database.tenant(ctx.tenant_id) as tx:
        entry = await outbox.prepare(tx, ctx.idempotency_key, message_id, recipients, args.subject)
    receipt = {"message_id": entry.message_id, "recipients": recipients}
    if entry.status == "sent":
        return {"status": "sent", **receipt}
    if entry.status == "sending":
        ctx.log.warning("email not sent again: an earlier try was cut off while transmitting it",
                        message_id=entry.message_id, attempts=entry.attempts)
        return {"status": "unconfirmed", **receipt}
    message = build_message(args, settings, entry.message_id)
    await _transmit(ctx, settings, message, recipients)
    async with database.tenant(ctx.tenant_id) as tx:
        await outbox.set_status(tx, ctx.idempotency_key, "sent")
    ctx.log.info("email sent", message_id=entry.message_id, recipient_count=len(recipients))
    return {"status": "sent", **receipt}


async def _transmit(ctx: ToolContext, settings: SmtpSettings, message: EmailMessage, recipients: list[str]) -> None:
    import aiosmtplib

    database = require_database(ctx)
    smtp = aiosmtplib.SMTP(hostname=settings.host, port=settings.port, timeout=settings.timeout,
                           use_tls=settings.security == "tls", start_tls=settings.security == "starttls",
                           local_hostname=settings.from_address.rsplit("@", 1)[1])
    where = f"{settings.host}:{settings.port}"
    try:
        # Connected through the egress guard; aiosmtplib gets the socket (TLS still checks settings.host).
        sock = await egress.connect_socket(settings.host, settings.port, timeout=settings.timeout)
        try:
            await smtp.connect(port=None, sock=sock)
        except BaseException:
            sock.close()
            raise
        if settings.username:
            password = settings.password.get_secret_value() if settings.password else ""
            await smtp.login(settings.username, password)
        await smtp.mail(settings.from_address)
        for recipient in recipients:
            await smtp.rcpt(recipient)
        async with database.tenant(ctx.tenant_id) as tx:
            await outbox.set_status(tx, ctx.idempotency_key, "sending")
        try:
            await smtp.data(message.as_bytes())
        except aiosmtplib.SMTPResponseException:
            # The server answered the data with a refusal: nothing was delivered, a retry may send.
            async with database.tenant(ctx.tenant_id) as tx:
                await outbox.set_status(tx, ctx.idempotency_key, "prepared")
            raise
    except egress.EgressRefused as exc:
        raise ToolError(f"SMTP server {where}: {exc}") from None
    except aiosmtplib.SMTPException as exc:
        # The server's reply and our own words only: credentials are never part of either.
        raise ToolError(f"SMTP server {where} failed the send: {type(exc).__name__}: {_reply(exc)}") from None
    except OSError as exc:
        raise ToolError(f"cannot reach SMTP server {where}: {exc.strerror or type(exc).__name__}") from None
    finally:
        if smtp.is_connected:
            try:
                await smtp.quit()
            except aiosmtplib.SMTPException:
                smtp.close()


def _reply(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    message = str(getattr(exc, "message", "") or "")[:200]
    return f"{code} {message}".strip() if code else message or "no reply"

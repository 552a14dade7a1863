-- Agents and tools: tenant integrations (credentials and settings of SMTP, CRM, MCP servers, the chat
-- model), calendar events, and the email outbox that makes sending exactly-once across crashes.
--
-- Same rule as 0001: every table holds tenant rows under row-level security ENABLED and FORCED, visible
-- and writable only when tenant_id is the transaction's agentworker.tenant_id setting.

-- One row per (tenant, kind, name): kind 'smtp', 'crm' or 'model' (name 'default'), or 'mcp' (name = the
-- server's name). Secrets live in config under keys the code masks (password, token, api_key, headers).
CREATE TABLE agentworker.tenant_integrations (
    tenant_id   text        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('smtp', 'crm', 'mcp', 'model')),
    name        text        NOT NULL,
    config      jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, kind, name)
);

CREATE TABLE agentworker.calendar_events (
    tenant_id        text        NOT NULL,
    event_id         uuid        NOT NULL,
    calendar         text        NOT NULL,
    title            text        NOT NULL,
    description      text        NOT NULL DEFAULT '',
    location         text        NOT NULL DEFAULT '',
    starts_at        timestamptz NOT NULL,
    ends_at          timestamptz NOT NULL,
    attendees        jsonb       NOT NULL DEFAULT '[]',
    -- the effect's stable key: a retried create finds its event instead of adding another
    idempotency_key  text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, event_id),
    UNIQUE (tenant_id, idempotency_key),
    CHECK (ends_at > starts_at)
);
CREATE INDEX calendar_events_by_time ON agentworker.calendar_events (tenant_id, calendar, starts_at);

-- Each email send, keyed by its effect's idempotency key. 'prepared' is committed before the SMTP
-- conversation starts, 'sending' right before the message data is transmitted, 'sent' once the server
-- accepted it: a retry finding 'prepared' sends (nothing was transmitted), one finding 'sending' or
-- 'sent' does not (see agentworker.tools.email).
CREATE TABLE agentworker.email_outbox (
    tenant_id        text        NOT NULL,
    idempotency_key  text        NOT NULL,
    message_id       text        NOT NULL,
    status           text        NOT NULL CHECK (status IN ('prepared', 'sending', 'sent')),
    recipients       jsonb       NOT NULL,
    subject          text        NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, idempotency_key)
);

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['tenant_integrations', 'calendar_events', 'email_outbox']
    LOOP
        EXECUTE format('ALTER TABLE agentworker.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE agentworker.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON agentworker.%I '
            'USING (tenant_id = current_setting(''agentworker.tenant_id'', true)) '
            'WITH CHECK (tenant_id = current_setting(''agentworker.tenant_id'', true))', t);
    END LOOP;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON agentworker.tenant_integrations TO agentworker_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON agentworker.calendar_events TO agentworker_app;
GRANT SELECT, INSERT, UPDATE ON agentworker.email_outbox TO agentworker_app;

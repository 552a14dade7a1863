-- Scheduled and external work: tenant schedules (cron, polling sources), webhook deliveries, and the
-- webhook kind of tenant integrations.
--
-- Same rule as 0001 and 0002: every table holds tenant rows under row-level security ENABLED and FORCED,
-- visible and writable only when tenant_id is the transaction's agentworker.tenant_id setting.
--
-- The one read across tenants is the dispatcher's question "which schedules are due?". It goes through
-- agentworker.due_schedules(), a SECURITY DEFINER function owned by agentworker_scheduler: a NOLOGIN role
-- nobody is a member of, allowed to SELECT only the columns that answer that question (tenant, schedule
-- id, due time, enabled, backoff) through a SELECT-only policy of its own. The runtime role keeps seeing
-- one tenant at a time; it learns which (tenant, schedule) pairs are due, never their payloads, and then
-- reads and updates each in that tenant's own transaction.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'agentworker_scheduler') THEN
        CREATE ROLE agentworker_scheduler NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT;
    END IF;
EXCEPTION
    -- Another database of the same cluster created it at the same moment.
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

CREATE TABLE agentworker.schedules (
    tenant_id              text        NOT NULL,
    schedule_id            text        NOT NULL,
    kind                   text        NOT NULL CHECK (kind IN ('task', 'workflow', 'poll')),
    cron                   text        NOT NULL,
    timezone               text        NOT NULL,
    -- the validated ScheduleSpec (agentworker.schedules.spec); poll source headers are secrets
    spec                   jsonb       NOT NULL,
    enabled                boolean     NOT NULL,
    missed_policy          text        NOT NULL CHECK (missed_policy IN ('skip', 'run_once')),
    misfire_grace_seconds  integer     NOT NULL CHECK (misfire_grace_seconds >= 1),
    -- the next due time not yet dispatched; NULL while disabled
    next_due_at            timestamptz,
    last_due_at            timestamptz,
    last_job_id            text,
    dispatched_count       bigint      NOT NULL DEFAULT 0,
    missed_count           bigint      NOT NULL DEFAULT 0,
    -- polling sources: {"cursor": ..., "seen": [recent item ids]}
    poll_state             jsonb       NOT NULL DEFAULT '{}',
    -- consecutive failures of a polling source, and until when nothing is dispatched (source backoff,
    -- or a tenant over its quota)
    failures               integer     NOT NULL DEFAULT 0,
    last_error             text,
    backoff_until          timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, schedule_id)
);
CREATE INDEX schedules_due ON agentworker.schedules (next_due_at) WHERE enabled;

-- One row per webhook delivery accepted (signature verified): the provider's delivery id, once.
CREATE TABLE agentworker.webhook_deliveries (
    tenant_id     text        NOT NULL,
    source        text        NOT NULL,
    delivery_id   text        NOT NULL,
    job_id        text        NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, source, delivery_id)
);
CREATE INDEX webhook_deliveries_age ON agentworker.webhook_deliveries (tenant_id, source, received_at);

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['schedules', 'webhook_deliveries']
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

GRANT SELECT, INSERT, UPDATE, DELETE ON agentworker.schedules TO agentworker_app;
GRANT SELECT, INSERT, DELETE ON agentworker.webhook_deliveries TO agentworker_app;

-- The dispatcher's index across tenants (see the header).
GRANT USAGE ON SCHEMA agentworker TO agentworker_scheduler;
GRANT SELECT (tenant_id, schedule_id, next_due_at, enabled, backoff_until) ON agentworker.schedules
    TO agentworker_scheduler;
CREATE POLICY due_index ON agentworker.schedules FOR SELECT TO agentworker_scheduler USING (true);

CREATE FUNCTION agentworker.due_schedules(p_now timestamptz, p_limit integer)
RETURNS TABLE (tenant_id text, schedule_id text, next_due_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.tenant_id, s.schedule_id, s.next_due_at
    FROM agentworker.schedules s
    WHERE s.enabled AND s.next_due_at <= p_now AND (s.backoff_until IS NULL OR s.backoff_until <= p_now)
    ORDER BY s.next_due_at
    LIMIT least(greatest(p_limit, 1), 1000)
$$;
ALTER FUNCTION agentworker.due_schedules(timestamptz, integer) OWNER TO agentworker_scheduler;
REVOKE ALL ON FUNCTION agentworker.due_schedules(timestamptz, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agentworker.due_schedules(timestamptz, integer) TO agentworker_app;

-- Webhook sources are tenant integrations (kind 'webhook', name = the source): their secrets live with
-- the tenant's other credentials.
ALTER TABLE agentworker.tenant_integrations DROP CONSTRAINT tenant_integrations_kind_check;
ALTER TABLE agentworker.tenant_integrations
    ADD CONSTRAINT tenant_integrations_kind_check CHECK (kind IN ('smtp', 'crm', 'mcp', 'model', 'webhook'));

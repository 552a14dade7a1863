-- The event outbox: events a workflow promises, recorded in the transaction of the change they report
-- and deleted once they are in the tenant's Redis stream (agentworker.event_outbox module).
--
-- A row exists from that commit until the event is published: what is here is what Redis may not
-- have yet. body is the event's JSON exactly as it is published (its stable id and its ts included), so
-- a re-publication is the same event; Redis keeps one stream entry per id.
--
-- Which rows have waited too long (their worker died before publishing, or Redis was down) crosses
-- tenants: like 0004's idle_running_runs(), agentworker.stale_outbox_events() is SECURITY DEFINER, owned
-- by agentworker_event_relay, a NOLOGIN role nobody is a member of, allowed to SELECT only the columns
-- that answer the question. The relay learns (tenant, event id) and reads each body in its tenant's own
-- transaction, under the usual row-level security.

CREATE TABLE agentworker.event_outbox (
    tenant_id   text        NOT NULL,
    event_id    text        NOT NULL,
    body        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, event_id)
);
CREATE INDEX event_outbox_age ON agentworker.event_outbox (created_at, tenant_id, event_id);

ALTER TABLE agentworker.event_outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE agentworker.event_outbox FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON agentworker.event_outbox
    USING (tenant_id = current_setting('agentworker.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('agentworker.tenant_id', true));

-- Rows leave once published: the table holds only what Redis may still lack.
GRANT SELECT, INSERT, DELETE ON agentworker.event_outbox TO agentworker_app;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'agentworker_event_relay') THEN
        CREATE ROLE agentworker_event_relay NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT;
    END IF;
EXCEPTION
    -- Another database of the same cluster created it at the same moment.
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

GRANT USAGE ON SCHEMA agentworker TO agentworker_event_relay;
GRANT SELECT (tenant_id, event_id, created_at) ON agentworker.event_outbox TO agentworker_event_relay;
CREATE POLICY stale_event_index ON agentworker.event_outbox FOR SELECT TO agentworker_event_relay USING (true);

-- Events of every tenant recorded at least p_age_s seconds ago and not yet published, oldest first.
CREATE FUNCTION agentworker.stale_outbox_events(p_age_s double precision, p_limit integer)
RETURNS TABLE (tenant_id text, event_id text, created_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT o.tenant_id, o.event_id, o.created_at
    FROM agentworker.event_outbox o
    WHERE o.created_at <= now() - make_interval(secs => greatest(p_age_s, 0))
    ORDER BY o.created_at, o.tenant_id, o.event_id
    LIMIT least(greatest(p_limit, 1), 1000)
$$;
ALTER FUNCTION agentworker.stale_outbox_events(double precision, integer) OWNER TO agentworker_event_relay;
REVOKE ALL ON FUNCTION agentworker.stale_outbox_events(double precision, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agentworker.stale_outbox_events(double precision, integer) TO agentworker_app;

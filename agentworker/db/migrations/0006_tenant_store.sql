-- The tenant store: each tenant's plan and individual limit overrides, set through the client, the CLI
-- or the admin endpoints (agentworker.tenants), and the audit trail of every change.
--
-- A row is the source of truth; Redis holds a copy (agentworker:tenant:{id}) that every process reads.
-- seq orders changes for the copy: every write takes the next value, and a process under the
-- tenant-sync lock copies the rows above the last seq it copied (agentworker.tenant_settings_since) and
-- those of the last seconds again (agentworker.tenant_settings_recent).
-- Removing a tenant's entry keeps its row as a tombstone (deleted) so the copy learns of it too.
--
-- Both tables are under the usual row-level security: a change is made in the tenant's own transaction.
-- Reading across tenants (listing, copying) goes through SECURITY DEFINER functions owned by
-- agentworker_tenant_index, a NOLOGIN role nobody is a member of.

CREATE SEQUENCE agentworker.tenant_settings_seq;

CREATE TABLE agentworker.tenant_settings (
    tenant_id       text        PRIMARY KEY,
    plan            text,
    overrides       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    version         bigint      NOT NULL,
    seq             bigint      NOT NULL,
    deleted         boolean     NOT NULL DEFAULT false,
    previous_queue  text        NOT NULL DEFAULT '',
    updated_at      timestamptz NOT NULL DEFAULT now(),
    updated_by      text        NOT NULL
);
CREATE INDEX tenant_settings_by_seq ON agentworker.tenant_settings (seq);
CREATE INDEX tenant_settings_by_time ON agentworker.tenant_settings (updated_at);

CREATE TABLE agentworker.tenant_settings_audit (
    id          bigserial   PRIMARY KEY,
    tenant_id   text        NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    changed_by  text        NOT NULL,
    version     bigint      NOT NULL,
    old         jsonb,
    new         jsonb
);
CREATE INDEX tenant_settings_audit_by_tenant ON agentworker.tenant_settings_audit (tenant_id, id);

ALTER TABLE agentworker.tenant_settings ENABLE ROW LEVEL SECURITY;
ALTER TABLE agentworker.tenant_settings FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON agentworker.tenant_settings
    USING (tenant_id = current_setting('agentworker.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('agentworker.tenant_id', true));
ALTER TABLE agentworker.tenant_settings_audit ENABLE ROW LEVEL SECURITY;
ALTER TABLE agentworker.tenant_settings_audit FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON agentworker.tenant_settings_audit
    USING (tenant_id = current_setting('agentworker.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('agentworker.tenant_id', true));

GRANT SELECT, INSERT, UPDATE ON agentworker.tenant_settings TO agentworker_app;
GRANT USAGE ON SEQUENCE agentworker.tenant_settings_seq TO agentworker_app;
-- the audit trail is appended to, never rewritten
GRANT SELECT, INSERT ON agentworker.tenant_settings_audit TO agentworker_app;
GRANT USAGE ON SEQUENCE agentworker.tenant_settings_audit_id_seq TO agentworker_app;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'agentworker_tenant_index') THEN
        CREATE ROLE agentworker_tenant_index NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

GRANT USAGE ON SCHEMA agentworker TO agentworker_tenant_index;
GRANT SELECT ON agentworker.tenant_settings TO agentworker_tenant_index;
CREATE POLICY tenant_index ON agentworker.tenant_settings FOR SELECT TO agentworker_tenant_index USING (true);

-- Changes above p_seq, in seq order (tombstones included): what the Redis copy lacks.
CREATE FUNCTION agentworker.tenant_settings_since(p_seq bigint, p_limit integer)
RETURNS TABLE (tenant_id text, plan text, overrides jsonb, version bigint, seq bigint, deleted boolean,
               previous_queue text, updated_at timestamptz, updated_by text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.tenant_id, s.plan, s.overrides, s.version, s.seq, s.deleted, s.previous_queue, s.updated_at,
           s.updated_by
    FROM agentworker.tenant_settings s
    WHERE s.seq > p_seq
    ORDER BY s.seq
    LIMIT least(greatest(p_limit, 1), 5000)
$$;
ALTER FUNCTION agentworker.tenant_settings_since(bigint, integer) OWNER TO agentworker_tenant_index;
REVOKE ALL ON FUNCTION agentworker.tenant_settings_since(bigint, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agentworker.tenant_settings_since(bigint, integer) TO agentworker_app;

-- One page of stored tenants (no tombstones) after p_after, by tenant id.
CREATE FUNCTION agentworker.tenant_settings_page(p_after text, p_limit integer)
RETURNS TABLE (tenant_id text, plan text, overrides jsonb, version bigint, seq bigint, deleted boolean,
               previous_queue text, updated_at timestamptz, updated_by text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.tenant_id, s.plan, s.overrides, s.version, s.seq, s.deleted, s.previous_queue, s.updated_at,
           s.updated_by
    FROM agentworker.tenant_settings s
    WHERE s.tenant_id > coalesce(p_after, '') AND NOT s.deleted
    ORDER BY s.tenant_id
    LIMIT least(greatest(p_limit, 1), 5000)
$$;
ALTER FUNCTION agentworker.tenant_settings_page(text, integer) OWNER TO agentworker_tenant_index;
REVOKE ALL ON FUNCTION agentworker.tenant_settings_page(text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agentworker.tenant_settings_page(text, integer) TO agentworker_app;

-- Rows changed in the last p_age_s seconds (the copy reads them again: see agentworker.tenants.sync_once).
CREATE FUNCTION agentworker.tenant_settings_recent(p_age_s double precision, p_limit integer)
RETURNS TABLE (tenant_id text, plan text, overrides jsonb, version bigint, seq bigint, deleted boolean,
               previous_queue text, updated_at timestamptz, updated_by text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.tenant_id, s.plan, s.overrides, s.version, s.seq, s.deleted, s.previous_queue, s.updated_at,
           s.updated_by
    FROM agentworker.tenant_settings s
    -- statement_timestamp(), not clock_timestamp(): a stable bound the planner can use on the index of
    -- updated_at (a few recent rows among 100,000 rather than a read of every row at each sync pass)
    WHERE s.updated_at >= statement_timestamp() - make_interval(secs => greatest(p_age_s, 0))
    ORDER BY s.updated_at
    LIMIT least(greatest(p_limit, 1), 5000)
$$;
ALTER FUNCTION agentworker.tenant_settings_recent(double precision, integer) OWNER TO agentworker_tenant_index;
REVOKE ALL ON FUNCTION agentworker.tenant_settings_recent(double precision, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agentworker.tenant_settings_recent(double precision, integer) TO agentworker_app;

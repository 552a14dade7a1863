-- Workflows: definitions, runs, step records (the audit trail), approvals and the side-effect ledger.
--
-- Every table holds tenant rows, so every table has row-level security ENABLED and FORCED, with one
-- policy: a row is visible and writable only when its tenant_id equals the transaction's
-- agentworker.tenant_id setting (set with set_config(..., true) by agentworker.db.database). The runtime
-- acts as the role agentworker_app: not a superuser and NOBYPASSRLS, so it cannot step around the policy.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'agentworker_app') THEN
        CREATE ROLE agentworker_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
EXCEPTION
    -- Another database of the same cluster created it at the same moment.
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

GRANT USAGE ON SCHEMA agentworker TO agentworker_app;
GRANT SELECT ON agentworker.schema_migrations TO agentworker_app;

CREATE TABLE agentworker.workflow_definitions (
    tenant_id    text        NOT NULL,
    workflow_id  text        NOT NULL,
    version      integer     NOT NULL CHECK (version >= 1),
    definition   jsonb       NOT NULL,
    digest       text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, workflow_id, version)
);

CREATE TABLE agentworker.workflow_runs (
    tenant_id         text        NOT NULL,
    run_id            uuid        NOT NULL,
    workflow_id       text        NOT NULL,
    workflow_version  integer     NOT NULL,
    idempotency_key   text        NOT NULL,
    status            text        NOT NULL
        CHECK (status IN ('running', 'waiting_approval', 'completed', 'failed', 'rejected')),
    trigger           text        NOT NULL,
    input             jsonb       NOT NULL,
    output            jsonb,
    error             jsonb,
    attempts          integer     NOT NULL DEFAULT 1,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    PRIMARY KEY (tenant_id, run_id),
    UNIQUE (tenant_id, idempotency_key),
    FOREIGN KEY (tenant_id, workflow_id, workflow_version)
        REFERENCES agentworker.workflow_definitions (tenant_id, workflow_id, version)
);
CREATE INDEX workflow_runs_listing ON agentworker.workflow_runs (tenant_id, created_at DESC);

-- One row per attempt of a step: the audit trail. A step is done when one of its rows is 'completed'.
CREATE TABLE agentworker.workflow_steps (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    text        NOT NULL,
    run_id       uuid        NOT NULL,
    step_id      text        NOT NULL,
    kind         text        NOT NULL,
    attempt      integer     NOT NULL CHECK (attempt >= 1),
    status       text        NOT NULL
        CHECK (status IN ('running', 'completed', 'failed', 'interrupted', 'waiting_approval', 'rejected',
                          'skipped')),
    input        jsonb,
    output       jsonb,
    error        jsonb,
    job_id       text,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at  timestamptz,
    FOREIGN KEY (tenant_id, run_id) REFERENCES agentworker.workflow_runs (tenant_id, run_id),
    UNIQUE (tenant_id, run_id, step_id, attempt)
);
CREATE UNIQUE INDEX workflow_steps_one_completion
    ON agentworker.workflow_steps (tenant_id, run_id, step_id) WHERE status = 'completed';

CREATE TABLE agentworker.workflow_approvals (
    tenant_id     text        NOT NULL,
    run_id        uuid        NOT NULL,
    step_id       text        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    request       jsonb       NOT NULL,
    decision      jsonb,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    decided_at    timestamptz,
    PRIMARY KEY (tenant_id, run_id, step_id),
    FOREIGN KEY (tenant_id, run_id) REFERENCES agentworker.workflow_runs (tenant_id, run_id)
);

-- Side effects done once per (tenant, run, step, call): see agentworker.db.ledger.
CREATE TABLE agentworker.side_effects (
    tenant_id    text        NOT NULL,
    run_id       text        NOT NULL,
    step_id      text        NOT NULL,
    call_key     text        NOT NULL,
    result       jsonb,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, run_id, step_id, call_key)
);

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['workflow_definitions', 'workflow_runs', 'workflow_steps', 'workflow_approvals',
                             'side_effects']
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

-- The runtime inserts and updates; the audit trail and the ledger are never deleted from by it.
GRANT SELECT, INSERT ON agentworker.workflow_definitions TO agentworker_app;
GRANT SELECT, INSERT, UPDATE ON agentworker.workflow_runs TO agentworker_app;
GRANT SELECT, INSERT, UPDATE ON agentworker.workflow_steps TO agentworker_app;
GRANT SELECT, INSERT, UPDATE ON agentworker.workflow_approvals TO agentworker_app;
GRANT SELECT, INSERT ON agentworker.side_effects TO agentworker_app;

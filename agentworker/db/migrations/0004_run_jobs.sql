-- Which job drives a workflow run, and the run sweeper's index of idle running runs.
--
-- workflow_runs.job_id is the id of the last job that started working the run: execute_workflow's job
-- when it creates the run (or handle_message's, which runs it in-process), the job of each later attempt
-- (a retry, a resume_run). A run is orphaned when it is 'running' and that job is gone from Redis: the
-- sweeper (agentworker.tasks.run_sweeper) fails it, so no run stays 'running' forever. Runs made before
-- this migration have no job_id; their idempotency key is the job id that made them.
--
-- The sweeper's question "which runs have been running, untouched, for a while?" crosses tenants. Like
-- 0003's due_schedules(), it goes through a SECURITY DEFINER function, agentworker.idle_running_runs(),
-- owned by agentworker_run_sweeper: a NOLOGIN role nobody is a member of, allowed to SELECT only the
-- columns that answer that question through a SELECT-only policy of its own. The runtime learns
-- (tenant, run id, job id, updated_at) and nothing else, and fails each run in its tenant's own
-- transaction, under the usual row-level security.

ALTER TABLE agentworker.workflow_runs ADD COLUMN job_id text;
CREATE INDEX workflow_runs_idle ON agentworker.workflow_runs (updated_at, tenant_id, run_id)
    WHERE status = 'running';

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'agentworker_run_sweeper') THEN
        CREATE ROLE agentworker_run_sweeper NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT;
    END IF;
EXCEPTION
    -- Another database of the same cluster created it at the same moment.
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

GRANT USAGE ON SCHEMA agentworker TO agentworker_run_sweeper;
GRANT SELECT (tenant_id, run_id, status, job_id, idempotency_key, updated_at) ON agentworker.workflow_runs
    TO agentworker_run_sweeper;
CREATE POLICY idle_run_index ON agentworker.workflow_runs FOR SELECT TO agentworker_run_sweeper USING (true);

-- Running runs not updated for p_idle_s seconds, oldest first; job_id is the job to look for in Redis.
-- Paged by the last row of the previous page (p_after_*: all NULL for the first page).
CREATE FUNCTION agentworker.idle_running_runs(p_idle_s double precision, p_limit integer,
                                              p_after_updated_at timestamptz, p_after_tenant_id text,
                                              p_after_run_id uuid)
RETURNS TABLE (tenant_id text, run_id uuid, job_id text, updated_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r.tenant_id, r.run_id, coalesce(r.job_id, r.idempotency_key), r.updated_at
    FROM agentworker.workflow_runs r
    WHERE r.status = 'running'
      AND r.updated_at <= now() - make_interval(secs => greatest(p_idle_s, 0))
      AND (p_after_updated_at IS NULL
           OR (r.updated_at, r.tenant_id, r.run_id) > (p_after_updated_at, p_after_tenant_id, p_after_run_id))
    ORDER BY r.updated_at, r.tenant_id, r.run_id
    LIMIT least(greatest(p_limit, 1), 1000)
$$;
ALTER FUNCTION agentworker.idle_running_runs(double precision, integer, timestamptz, text, uuid)
    OWNER TO agentworker_run_sweeper;
REVOKE ALL ON FUNCTION agentworker.idle_running_runs(double precision, integer, timestamptz, text, uuid)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agentworker.idle_running_runs(double precision, integer, timestamptz, text, uuid)
    TO agentworker_app;

-- LangGraph's checkpoint tables under row-level security (see agentworker/db/migrate.py).
--
-- Not a numbered migration: LangGraph creates and upgrades these tables itself (AsyncPostgresSaver.setup,
-- its own migrations, recorded in agentworker.checkpoint_migrations), so `agentworker migrate` runs this
-- file after that setup, every time, under the migration lock and in one transaction. It must therefore
-- stay idempotent; unlike the numbered files it may be edited (the next migrate applies the new text).
--
-- Thread ids are '{tenant_id}:{run_id}' (tenant ids have no ':'), so a row is visible and writable only
-- when its thread's tenant is the connection's agentworker.tenant_id, as for our own tables.

GRANT SELECT ON agentworker.checkpoint_migrations TO agentworker_app;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['checkpoints', 'checkpoint_blobs', 'checkpoint_writes']
    LOOP
        EXECUTE format('ALTER TABLE agentworker.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE agentworker.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('DROP POLICY IF EXISTS tenant_isolation ON agentworker.%I', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON agentworker.%I '
            'USING (split_part(thread_id, '':'', 1) = current_setting(''agentworker.tenant_id'', true)) '
            'WITH CHECK (split_part(thread_id, '':'', 1) = current_setting(''agentworker.tenant_id'', true))', t);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON agentworker.%I TO agentworker_app', t);
    END LOOP;
END
$$;

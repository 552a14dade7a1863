-- Workflow runs may end 'cancelled': their job was cancelled on request (agentworker.job_control), a
-- terminal status like 'completed', 'failed' and 'rejected'. The step of the run that was under way is
-- closed 'interrupted', as for a worker that died; steps after it never start.

ALTER TABLE agentworker.workflow_runs DROP CONSTRAINT workflow_runs_status_check;
ALTER TABLE agentworker.workflow_runs ADD CONSTRAINT workflow_runs_status_check
    CHECK (status IN ('running', 'waiting_approval', 'completed', 'failed', 'rejected', 'cancelled'));

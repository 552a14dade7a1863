-- Model tokens per tenant, model and day (UTC), added after each model call (agentworker.llm_budget):
-- what the platform bills from. prompt_tokens and completion_tokens are the provider's reported usage;
-- estimated_calls counts the calls whose provider reported none (their estimate is in prompt_tokens).

CREATE TABLE agentworker.llm_usage (
    tenant_id          text    NOT NULL,
    day                date    NOT NULL,
    model              text    NOT NULL,
    prompt_tokens      bigint  NOT NULL DEFAULT 0,
    completion_tokens  bigint  NOT NULL DEFAULT 0,
    calls              bigint  NOT NULL DEFAULT 0,
    estimated_calls    bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, day, model)
);

ALTER TABLE agentworker.llm_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE agentworker.llm_usage FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON agentworker.llm_usage
    USING (tenant_id = current_setting('agentworker.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('agentworker.tenant_id', true));

GRANT SELECT, INSERT, UPDATE ON agentworker.llm_usage TO agentworker_app;

-- 0004_tenant_caps: the worker counts a tenant's running tasks on every claim
-- (LONGRUN_TENANT_MAX_RUNNING); this keeps that count an index lookup.
CREATE INDEX tasks_tenant_running_idx ON tasks (tenant) WHERE status = 'running' AND tenant IS NOT NULL;

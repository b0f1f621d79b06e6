-- 0006: a provider outage parks tasks instead of killing them (issue 16 item 7).
--
-- A task whose every model is behind an open circuit is suspended with
-- suspend_reason 'provider_unavailable' and costs no attempt.  outage_since
-- is the time of its first such park; further parks keep it, and the first
-- step a model answers clears it.  The worker dead-letters the task
-- (stop_reason 'provider_unavailable') once now() - outage_since passes the
-- agent's max_outage_seconds.  No index covers it: checkpoints stay HOT.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS outage_since timestamptz;

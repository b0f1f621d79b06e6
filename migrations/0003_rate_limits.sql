-- 0003_rate_limits: fleet-wide request and token rates per model (and per
-- tenant), shared by every worker.  One row per key and minute: a worker
-- reserves a request and an estimate of its tokens before a model call (one
-- conditional upsert), and settles the estimate with the actual usage after.
CREATE TABLE rate_windows (
    key          text NOT NULL,          -- "model:<provider>:<model>" or "tenant:<name>"
    window_start timestamptz NOT NULL,   -- date_trunc('minute', now())
    requests     integer NOT NULL DEFAULT 0,
    tokens       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (key, window_start)
);
-- Retention of old windows (the scheduler deletes rows older than an hour).
CREATE INDEX rate_windows_start_idx ON rate_windows (window_start);

-- 0007: sliding rate windows (issue 17 item 3).
--
-- The fixed one-minute windows of 0003 (rate_windows) let a burst at the end
-- of one minute and another at the start of the next through: twice the
-- limit within seconds.  This keeps a log instead: one row per reservation
-- and key ("model:<provider>:<model>", "tenant:<name>"), and a reservation is
-- admitted when the rows of the last window (60 s, worker/ratewin.h) plus
-- this one fit the key's requests and tokens, so no interval of that length
-- holds more than the limit (the first request into an empty window is
-- admitted whatever its estimate).  A worker reserves with lr_rate_reserve
-- (one statement) and settles the row's tokens to the call's actual usage
-- (one UPDATE by id).
--
-- rate_windows stays for the workers of the previous release during a
-- rolling update (they keep counting there); the scheduler's retention sweep
-- still empties it, and a later migration can drop it.
CREATE TABLE rate_reservations (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key         text NOT NULL,
    reserved_at timestamptz NOT NULL,  -- clock_timestamp() under the key's lock
    tokens      bigint NOT NULL        -- the estimate, then the actual usage
);
CREATE INDEX rate_reservations_key_at_idx ON rate_reservations (key, reserved_at);
-- The retention sweep's scan of old rows whatever their key.
CREATE INDEX rate_reservations_at_idx ON rate_reservations (reserved_at);

-- How long until key k (its rows since now - win) admits one more request of
-- est tokens within rpm requests and tpm tokens (0 = no limit): 0 when it
-- does now (an empty window always does), else the milliseconds until the
-- oldest rows have left the window that free enough room.  Rows of calls in
-- flight count at their estimate, so the wait is an upper bound when those
-- settle lower.  Call with k's lock held.
CREATE FUNCTION lr_rate_wait(k text, t timestamptz, win interval, rpm bigint, tpm bigint, est bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
    total bigint;
    frees timestamptz;
BEGIN
    SELECT count(*), coalesce(sum(tokens), 0) INTO n, total
      FROM rate_reservations WHERE key = k AND reserved_at > t - win;
    IF n = 0 OR ((rpm = 0 OR n < rpm) AND (tpm = 0 OR total + est <= tpm)) THEN
        RETURN 0;
    END IF;
    -- The first row (oldest first) whose leaving, with all older ones, makes
    -- room; the newest always does (the window is empty then).
    SELECT x.reserved_at INTO frees FROM (
        SELECT r.reserved_at, r.id, row_number() OVER w AS gone_n, sum(r.tokens) OVER w AS gone_tokens
          FROM rate_reservations r WHERE r.key = k AND r.reserved_at > t - win
        WINDOW w AS (ORDER BY r.reserved_at, r.id ROWS UNBOUNDED PRECEDING)) x
     WHERE x.gone_n = n OR ((rpm = 0 OR n - x.gone_n < rpm) AND (tpm = 0 OR total - x.gone_tokens + est <= tpm))
     ORDER BY x.reserved_at, x.id LIMIT 1;
    RETURN greatest(1, ceil(extract(epoch FROM frees + win - t) * 1000)::bigint);
END $$;

-- Reserves one request of est tokens on the model's key (mkey, NULL when the
-- model has no limit; rpm, tpm) and the tenant's (tkey, NULL when uncapped;
-- ttpm), both or neither, in a window of win_s seconds.  Each key's advisory
-- lock (transaction-scoped, taken model first, tenant second, in two lock
-- spaces so that no two callers can wait for each other in a cycle)
-- serialises its reservations across the fleet; every statement after the
-- lock reads a fresh snapshot (plpgsql, READ COMMITTED), so it sees the rows
-- of whoever held the lock before.  Prunes the keys' rows that left the
-- window.  Returns granted and the new rows' ids (NULL for a key not asked
-- for), or not granted and wait_ms: how long until the reservation would fit.
CREATE FUNCTION lr_rate_reserve(mkey text, rpm bigint, tpm bigint, tkey text, ttpm bigint, est bigint,
                                win_s integer, OUT granted boolean, OUT wait_ms bigint, OUT model_id bigint,
                                OUT tenant_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    win interval := make_interval(secs => win_s);
    t timestamptz;
BEGIN
    IF mkey IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('longrun.rate.model'), hashtext(mkey));
    END IF;
    IF tkey IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('longrun.rate.tenant'), hashtext(tkey));
    END IF;
    t := clock_timestamp();
    DELETE FROM rate_reservations WHERE key IN (mkey, tkey) AND reserved_at <= t - win;
    wait_ms := greatest(CASE WHEN mkey IS NULL THEN 0 ELSE lr_rate_wait(mkey, t, win, rpm, tpm, est) END,
                        CASE WHEN tkey IS NULL THEN 0 ELSE lr_rate_wait(tkey, t, win, 0, ttpm, est) END);
    granted := wait_ms = 0;
    IF granted THEN
        IF mkey IS NOT NULL THEN
            INSERT INTO rate_reservations (key, reserved_at, tokens) VALUES (mkey, t, est) RETURNING id INTO model_id;
        END IF;
        IF tkey IS NOT NULL THEN
            INSERT INTO rate_reservations (key, reserved_at, tokens) VALUES (tkey, t, est) RETURNING id INTO tenant_id;
        END IF;
    END IF;
END $$;

"""Issue 17 item 3: token-rate limits that bind, over any 60-second window.

Two workers run a batch of 3-step agent tasks against one model whose
`tpm` is about a third of what the fleet would otherwise send (the fixture's
latency and LONGRUN_MAX_IN_FLIGHT set that natural rate; the test measures
it from the first seconds of the run).  The fixture records every request's
arrival time and the usage it answered with; from those the test takes the
largest token count of any 60-second interval (not calendar minutes: fixed
windows let a burst at the end of one minute and another at the start of the
next through, twice the limit within seconds) and checks that it never
exceeds the limit by more than one request's reservation (request bytes / 4
+ max_tokens).  The demand is about 1.6 times the limit, so the run outlasts
one window: tasks refused for longer than LONGRUN_LONG_WAIT_SECONDS are
suspended (rate_limited) and resumed by the scheduler, and every task
succeeds without a retry.  The tasks belong to a tenant whose own cap
(LONGRUN_TENANT_TPM) is higher than the model's, so each call also reserves
and settles a tenant row.  First, the reservation function alone: racing
connections get exactly the limit, a refusal carries the wait, and the two
keys are reserved together or not at all.
"""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

WINDOW = 60.0      # seconds: the limiter's window (worker/ratewin.h)
TPM = 6000         # the model's tokens per minute
TENANT_TPM = 12000  # the tenant's, never the one that binds here
MAX_TOKENS = 16
TASKS = 90         # x 3 requests x ~37 tokens: ~10,000 tokens, ~1.6 x TPM
MODEL = "fixture-steps-3"


def max_window(reqs, width):
    """The largest token sum over requests arriving within any interval [t, t + width)."""
    best, total, j = 0, 0, 0
    for i in range(len(reqs)):
        while j < len(reqs) and reqs[j]["ts"] < reqs[i]["ts"] + width:
            total += reqs[j]["tokens"]
            j += 1
        best = max(best, total)
        total -= reqs[i]["tokens"]
    return best


def race(env):
    """The reservation function alone: 8 connections racing 50 reservations each of 10 tokens on a
    1,000-token limit get exactly 100 (each key's advisory lock serialises them); a refusal says
    how long until the oldest rows leave the window; the tenant's key is reserved with the
    model's or not at all."""
    import psycopg2
    granted = []

    def run():
        c = psycopg2.connect(env.db_url)
        c.autocommit = True
        cur = c.cursor()
        for _ in range(50):
            cur.execute("select granted from lr_rate_reserve('model:race', 0, 1000, 'tenant:race', 100000, 10, 60)")
            granted.append(cur.fetchone()[0])
        c.close()
    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h.eq(sum(granted), 100, "reservations granted by racing connections")
    h.eq(env.scalar("select count(*) from rate_reservations where key = 'tenant:race'"), 100,
         "the tenant's rows are the model's")
    r = env.sql("select * from lr_rate_reserve('model:race', 0, 1000, NULL, 0, 10, 60)")[0]
    h.check(not r["granted"] and 59000 < r["wait_ms"] <= 60000, "refused until the oldest row leaves: %r" % r)
    r = env.sql("select * from lr_rate_reserve('model:race2', 0, 1000, 'tenant:race', 100000, 99500, 60)")[0]
    h.check(not r["granted"] and r["model_id"] is None, "over the tenant's cap: neither row (%r)" % r)
    h.eq(env.scalar("select count(*) from rate_reservations where key = 'model:race2'"), 0, "no model row")
    env.sql("delete from rate_reservations")


def test():
    with h.Env("tpm_window") as env:
        race(env)
        env.start_fixture("--model-latency-ms", "450")
        env.start_scheduler()
        agents = env.write_json("agents.json", {
            "tools": {"lookup": {"description": "Look something up",
                                 "parameters": {"type": "object", "properties": {"step": {"type": "integer"}}},
                                 "url": "${LONGRUN_FIXTURE_URL}/tools/lookup"}},
            "agents": [{"name": "metered", "system": "Be brief.", "tools": ["lookup"],
                        "models": [{"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1", "model": MODEL,
                                    "max_tokens": MAX_TOKENS, "tpm": TPM}]}]})
        workers = [env.start_worker(w, LONGRUN_AGENTS_FILE=agents, LONGRUN_MAX_IN_FLIGHT=2,
                                    LONGRUN_TENANT_TPM=TENANT_TPM) for w in ("w1", "w2")]
        env.wait_queue(consumers=2)
        t0 = time.time()
        ids = env.enqueue_many([{"agent": "metered", "input": "go %d" % i, "tenant": "acme"} for i in range(TASKS)])
        env.wait_all_terminal(TASKS, 240)
        took = time.time() - t0

        reqs = [r for r in env.fixture("/_requests?limit=100000&model=" + MODEL)["requests"] if r["status"] == 200]
        reqs.sort(key=lambda r: r["ts"])
        h.eq(len(reqs), 3 * TASKS, "3 model calls per task, each answered once")
        h.check(all(isinstance(r["tokens"], int) for r in reqs), "the fixture recorded each answer's usage")
        reservation = max(r["body_bytes"] // 4 + MAX_TOKENS for r in reqs)
        peak = max_window(reqs, WINDOW)
        first = reqs[0]["ts"]
        offered = sum(r["tokens"] for r in reqs if r["ts"] < first + 10) * 6  # tokens a minute before it binds
        span = reqs[-1]["ts"] - first
        parked = env.scalar("select count(distinct task_id) from task_events where to_status = 'suspended'"
                            " and reason = 'rate_limited'")
        resumed = env.scalar("select count(distinct task_id) from task_events where from_status = 'suspended'"
                             " and reason = 'resumed:rate_limited'")
        per10 = [0] * (int(span // 10) + 1)
        for r in reqs:
            per10[int((r["ts"] - first) // 10)] += r["tokens"]
        h.log("tokens per 10 s from the first request: %r" % per10)
        h.log("tokens in any %.0f s: at most %d (limit %d, one reservation %d); offered ~%d a minute (%.1f x the"
              " limit); %d requests over %.1f s; %d tasks parked, %d resumed; %.1f s in all"
              % (WINDOW, peak, TPM, reservation, offered, offered / TPM, len(reqs), span, parked, resumed, took))

        h.check(offered >= 2 * TPM, "the limit binds: the fleet offers %d tokens a minute, limit %d" % (offered, TPM))
        h.check(peak <= TPM + reservation,
                "tokens in any %.0f s (%d) within the limit %d plus one reservation (%d)"
                % (WINDOW, peak, TPM, reservation))
        h.check(peak >= TPM // 2, "the limiter lets about the limit through, not far less (%d of %d)" % (peak, TPM))
        h.check(span > WINDOW, "the demand outlasts one window (%.1f s)" % span)
        h.eq(env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and status = 'succeeded'", (ids,)),
             TASKS, "every task succeeded")
        h.eq(env.scalar("select max(attempt) from tasks"), 0, "no attempt burned")
        h.eq(env.scalar("select count(*) from task_events where reason = 'transient_error'"), 0, "no task retry")
        h.check(parked > 0, "tasks waiting longer than LONGRUN_LONG_WAIT_SECONDS were suspended (rate_limited)")
        h.eq(resumed, parked, "every parked task was resumed")
        for w in workers:
            h.eq(w.events("ratelimit.unavailable"), [], "%s: the limiter answered every reservation" % w.name)

        # The reservations of the last window are still there (older ones are pruned): one model row and
        # one tenant row per call, each settled to the usage the fixture answered with.
        rows = env.sql("select key, count(*) as n, sum(tokens)::int as tokens from rate_reservations group by key")
        by_key = {r["key"]: r for r in rows}
        h.eq(sorted(by_key), ["model:openai:" + MODEL, "tenant:acme"], "the model's and the tenant's keys")
        m, t = by_key["model:openai:" + MODEL], by_key["tenant:acme"]
        h.eq((t["n"], t["tokens"]), (m["n"], m["tokens"]), "the tenant counts what the model counts")
        answered = set(r["tokens"] for r in reqs)
        unsettled = env.sql("select key, tokens from rate_reservations where not (tokens = any(%s))",
                            (sorted(answered),))
        h.eq(unsettled, [], "every reservation left was settled to a usage the fixture answered with")

h.run(test)

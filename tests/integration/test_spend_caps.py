"""Issue 19 item 4: a spend ledger with enforced caps, fleet-wide.

First the reservation function alone: eight connections racing reservations on one cap get
exactly what fits, a refusal names the cap and when its period rolls over, expired
reservations stop counting, a settlement is idempotent; and what one reservation and its
settlement cost (round trips timed, and PostgreSQL's own count of the functions' time).

Then the worker.  The fixture's usage is deterministic (prompt 10 + 5 x messages, completion
7 tokens), so with a price table every call's actual cost is known, and its reservation is
the worker's worst case (request bytes / 4 + 1 tokens in, max_tokens out).  200 one-call
tasks across two workers against an agent whose daily cap (in the agents file) allows about
half of them: the ledger's settled spend stays within the cap plus the documented bound
(the sum, over the period's calls, of what each cost beyond its reservation: 0 here, every
reservation covers its call), it equals what the step log recorded, the rest are suspended
with spend_cap until the next UTC midnight (no attempt used), and `longrun spend set-cap`
raising the cap resumes every one of them to success.  A tenant with a monthly cap and a
model whose max_tokens is below what the fixture answers (each call costs more than it
reserved): the overshoot is exactly within the bound; clearing the cap resumes them.  The
ledger unreachable (its function renamed): no model call, no attempt, logged; back, the
tasks finish.  The report (`longrun spend`), `spend caps`, /metrics (the scheduler's
gauges, the worker's counter) and bad input.
"""
import datetime
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

PRICE_IN = 100.0      # USD per million input tokens
PRICE_OUT = 10000.0   # USD per million output tokens
MAX_TOKENS = 8        # the fixture answers 7: every reservation covers its call
PROMPT, COMPLETION = 20, 7  # 10 + 5 x (system, user); the fixture's completion
COST = (PROMPT * PRICE_IN + COMPLETION * PRICE_OUT) / 1e6  # one call: $0.072
TASKS = 200
CAP = round(100 * COST, 6)  # the agent's daily cap: about half of the tasks
MODEL = "fixture-steps-1"
TENANT_MODEL = "fixture-steps-01"   # same script, another price entry and max_tokens 2 (under-reserves)
TENANT_MAX_TOKENS = 2
TENANT_CAP = 1.0
TENANT_TASKS = 60
CLOSED_MODEL = "fixture-steps-001"


def fx(model, max_tokens):
    return {"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1", "model": model, "max_tokens": max_tokens}


AGENTS = {
    "models": {m: {"input_per_mtok": PRICE_IN, "output_per_mtok": PRICE_OUT}
               for m in (MODEL, TENANT_MODEL, CLOSED_MODEL)},
    "agents": [
        {"name": "capped", "system": "Be brief.", "models": [fx(MODEL, MAX_TOKENS)],
         "spend_caps": {"daily_usd": CAP}},
        {"name": "open", "system": "Be brief.", "models": [fx(TENANT_MODEL, TENANT_MAX_TOKENS)]},
        {"name": "closed", "system": "Be brief.", "models": [fx(CLOSED_MODEL, MAX_TOKENS)],
         "spend_caps": {"monthly_usd": 1000}},
    ],
    "tenants": {"acme": {"spend_caps": {"monthly_usd": TENANT_CAP}}},
}


def reservation_of(req, max_tokens):
    """The worker's worst case for a request of this size (lr_agent_worst_cost)."""
    return ((req["body_bytes"] // 4 + 1) * PRICE_IN + max_tokens * PRICE_OUT) / 1e6


def race(env):
    import psycopg2
    env.sql("insert into spend_caps (scope, name, period, cap_usd, source) values"
            " ('agent', 'race', 'day', 1.0, 'operator'), ('tenant', 'race-t', 'month', 100, 'operator')")
    granted = []

    def run():
        c = psycopg2.connect(env.db_url)
        c.autocommit = True
        cur = c.cursor()
        for _ in range(50):
            cur.execute("select granted from lr_spend_reserve('race', 'race-t', 0.01, 900)")
            granted.append(cur.fetchone()[0])
        c.close()
    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h.eq(sum(granted), 100, "reservations of $0.01 granted on a $1.00 cap by 8 racing connections")
    r = env.sql("select * from lr_spend_reserve('race', 'race-t', 0.01, 900)")[0]
    midnight = env.scalar("select lr_spend_period_end('day', now())")
    h.check(not r["granted"] and r["cap_scope"] == "agent" and r["cap_period"] == "day" and
            r["resets_at"] == midnight and float(r["reserved_usd"]) == 1.0,
            "the refusal names the daily cap and the next UTC midnight: %r" % r)
    # settle one at $0.004: room for 0.006 more, not 0.01
    rid = env.scalar("select min(id) from spend_reservations where agent = 'race'")
    h.eq(env.scalar("select lr_spend_settle(%s, 0.004)", (rid,)), True, "settled")
    h.eq(env.scalar("select lr_spend_settle(%s, 0.004)", (rid,)), False, "a second settlement adds nothing")
    h.eq(float(env.scalar("select spent_usd from spend_usage where scope = 'agent' and name = 'race'")), 0.004,
         "the ledger has the actual cost once")
    h.eq(float(env.scalar("select spent_usd from spend_usage where scope = 'tenant' and name = 'race-t'")), 0.004,
         "and the tenant's")
    h.eq(env.scalar("select granted from lr_spend_reserve('race', 'race-t', 0.01, 900)"), False, "0.006 left")
    h.eq(env.scalar("select granted from lr_spend_reserve('race', 'race-t', 0.006, 900)"), True, "0.006 fits")
    # a reservation whose worker died stops counting when it expires
    env.sql("update spend_reservations set expires_at = now() - interval '1 second' where agent = 'race'")
    h.eq(env.scalar("select granted from lr_spend_reserve('race', NULL, 0.9, 900)"), True, "expired rows no longer count")
    # an uncapped task reserves nothing
    r = env.sql("select * from lr_spend_reserve('nobody', 'none', 5, 900)")[0]
    h.check(r["granted"] and r["reservation_id"] is None, "no cap: granted without a row (%r)" % r)

    # what a reservation and its settlement cost: one round trip each (timed here), and in the
    # server (EXPLAIN ANALYZE's execution time of each function)
    env.sql("update spend_caps set cap_usd = 1000000 where name = 'race'")
    n = 500
    cur = env.db.cursor()
    t0 = time.time()
    for _ in range(n):
        cur.execute("select reservation_id from lr_spend_reserve('race', 'race-t', 0.01, 900)")
        cur.execute("select lr_spend_settle(%s, 0.01)", (cur.fetchone()[0],))
    took = (time.time() - t0) / n * 1000
    server = {"reserve": 0.0, "settle": 0.0}
    for _ in range(100):
        cur.execute("explain (analyze, format json) select * from lr_spend_reserve('race', 'race-t', 0.01, 900)")
        server["reserve"] += cur.fetchone()[0][0]["Execution Time"] / 100
        rid = env.scalar("select max(id) from spend_reservations")
        cur.execute("explain (analyze, format json) select lr_spend_settle(%s, 0.01)", (rid,))
        server["settle"] += cur.fetchone()[0][0]["Execution Time"] / 100
    h.log("a reservation plus its settlement: %.2f ms of round trips per model call (%d pairs, one connection);"
          " in the server %.3f ms + %.3f ms" % (took, n, server["reserve"], server["settle"]))
    h.check(took < 50, "a reservation and its settlement take under 50 ms (%.2f)" % took)
    env.sql("delete from spend_reservations; delete from spend_usage; delete from spend_caps")
    return took


def settled(env, scope, name, period):
    v = env.scalar("select spent_usd from spend_cap_status where scope = %s and name = %s and period = %s",
                   (scope, name, period))
    return float(v) if v is not None else None


def live_reservations(env):
    return env.scalar("select count(*) from spend_reservations where expires_at > now()")


def statuses(env, agent):
    return {r["status"]: r["n"] for r in env.sql(
        "select status, count(*) as n from tasks where agent = %s group by status", (agent,))}


def settle_down(env, agent, n):
    """Every task of agent succeeded or suspended by spend_cap, and nothing reserved any more."""
    def done():
        s = statuses(env, agent)
        return s.get("succeeded", 0) + s.get("suspended", 0) == n and live_reservations(env) == 0 and s
    return h.wait_for(done, 120, "%d tasks of %s succeeded or suspended, every reservation settled" % (n, agent),
                      interval=0.5)


def metric(text, family, **labels):
    want = ",".join('%s="%s"' % kv for kv in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(family + "{") or line.startswith(family + " "):
            lab = line[len(family):].split(" ")[0].strip("{}")
            if ",".join(sorted(lab.split(","))) == want:
                return float(line.split(" ")[-1])
    return None


def agent_cap(env, workers, sport):
    ids = env.enqueue_many([{"agent": "capped", "input": "go %d" % i} for i in range(TASKS)])
    s = settle_down(env, "capped", TASKS)
    reqs = [r for r in env.fixture("/_requests?limit=100000&model=" + MODEL)["requests"] if r["status"] == 200]
    succeeded, suspended = s.get("succeeded", 0), s.get("suspended", 0)
    spent = settled(env, "agent", "capped", "day")
    steps_cost = float(env.scalar("select coalesce(sum(s.cost_usd), 0) from task_steps s join tasks t"
                                  " on t.id = s.task_id where t.agent = 'capped'"))
    bound = sum(max(0.0, COST - reservation_of(r, MAX_TOKENS)) for r in reqs)
    largest = max(reservation_of(r, MAX_TOKENS) for r in reqs)
    h.log("agent cap $%.4f (%.0f calls of $%.4f): %d tasks succeeded, %d suspended (spend_cap); settled $%.6f"
          " (the step log: $%.6f), %d calls, each reserving up to $%.4f; bound over the cap $%.6f"
          % (CAP, CAP / COST, COST, succeeded, suspended, spent, steps_cost, len(reqs), largest, bound))
    h.eq(len(reqs), succeeded, "one model call per task that ran")
    h.check(steps_cost <= CAP + bound + 1e-9, "spent per the step log $%.6f within the cap $%.4f + the bound $%.6f"
            % (steps_cost, CAP, bound))
    h.check(spent <= CAP + bound + 1e-9, "settled spend $%.6f within the cap $%.4f + the bound $%.6f" % (spent, CAP,
                                                                                                    bound))
    h.eq(bound, 0.0, "every reservation covers its call (the fixture's 7 tokens under max_tokens 8)")
    h.check(abs(spent - steps_cost) < 1e-6 * (len(reqs) + 1), "the ledger ($%.6f) is what the steps recorded ($%.6f)"
            % (spent, steps_cost))
    h.check(abs(spent - succeeded * COST) < 1e-6 * (len(reqs) + 1), "the ledger is the calls' actual cost")
    h.check(TASKS * 0.4 <= succeeded <= CAP / COST + 1e-9,
            "about half ran: %d of %d (the cap fits %.0f)" % (succeeded, TASKS, CAP / COST))
    h.check(suspended == TASKS - succeeded and suspended > 0, "the rest suspended: %d" % suspended)
    rows = env.sql("select suspend_reason, attempt,"
                   " extract(epoch from resume_at - lr_spend_period_end('day', now())) as late_s"
                   " from tasks where agent = 'capped' and status = 'suspended'")
    h.check(all(r["suspend_reason"] == "spend_cap" for r in rows), "suspended with reason spend_cap")
    h.check(all(r["attempt"] == 0 for r in rows), "no attempt used")
    late = [float(r["late_s"]) for r in rows]
    h.check(all(0 <= x < 5 for x in late), "resume_at is the next UTC midnight (off by %r s)" % (sorted(late)[-3:],))
    h.eq(env.scalar("select count(*) from task_steps s join tasks t on t.id = s.task_id where t.agent = 'capped'"
                    " and t.status = 'suspended' and s.model is not null"), 0, "no model step for a suspended task")
    for w in workers:
        h.check(w.events("spend.cap_reached") or w.events("task.finished"), "%s took part" % w.name)
    h.check(all(w.events("task.finished") for w in workers), "both workers ran tasks")
    reached = [e["msg"] for w in workers for e in w.events("spend.cap_reached")]
    h.eq(len(reached), suspended, "one spend.cap_reached each")
    # suspended only when the settled spend left no room for the call (a cap that only calls in
    # flight filled is waited for, not slept on until midnight)
    import re
    for m in reached:
        x = re.search(r"cap \$([0-9.]+) reached \(spent \$([0-9.]+), reserved \$([0-9.]+), this call up to \$([0-9.]+)\)", m)
        h.check(x is not None and float(x.group(2)) + float(x.group(4)) > float(x.group(1)) - 1e-4,
                "suspended while the settled spend left room: %s" % m)
    # /metrics: the scheduler's gauges and the workers' counters
    text = h.wait_for(lambda: (lambda t: metric(t, "longrun_spend_usd", scope="agent", name="capped", period="day")
                               and abs(metric(t, "longrun_spend_usd", scope="agent", name="capped", period="day")
                                       - spent) < 1e-6 and t)(h.http_get(sport, "/metrics")[1]),
                      30, "the scheduler's spend gauges")
    h.eq(metric(text, "longrun_spend_cap_usd", scope="agent", name="capped", period="day"), CAP, "cap gauge")
    h.eq(metric(text, "longrun_spend_reserved_usd", scope="agent", name="capped", period="day"), 0, "reserved gauge")
    counted = sum(metric(h.http_get(w.port, "/metrics")[1], "longrun_spend_cap_suspensions_total", scope="agent",
                         name="capped", period="day") or 0 for w in workers)
    h.eq(counted, suspended, "longrun_spend_cap_suspensions_total")
    # the report and the caps while they wait
    caps = json.loads(env.cli("spend", "caps", "--json").stdout)
    c = [x for x in caps if x["scope"] == "agent" and x["name"] == "capped" and x["period"] == "day"][0]
    h.check(c["cap_usd"] == CAP and abs(c["spent_usd"] - spent) < 1e-9 and c["reserved_usd"] == 0 and
            c["suspended"] == suspended and c["source"] == "file", "spend caps: %r" % c)
    # raise it: every suspended task resumes and succeeds
    r = env.cli("spend", "set-cap", "--agent", "capped", "--daily", "100", "--actor", "finance", "--json")
    h.eq(r.returncode, 0, "set-cap: %s" % r.stderr)
    out = json.loads(r.stdout)
    h.eq(out["resumed"], suspended, "set-cap resumed the tasks it had suspended")
    h.wait_for(lambda: statuses(env, "capped").get("succeeded", 0) == TASKS, 120, "every task of capped to succeed")
    resumed = env.scalar("select count(distinct task_id) from task_events where reason = 'resumed:spend_cap'")
    raised = env.scalar("select count(*) from task_events where reason = 'spend_cap_raised' and actor = 'finance'")
    h.eq((resumed, raised), (suspended, suspended), "each resumed once, with the operator's event")
    h.eq(env.scalar("select max(attempt) from tasks where id = any(%s::uuid[])", (ids,)), 0, "no attempt used")
    env.check_step_log()
    h.eq(env.scalar("select source from spend_caps where name = 'capped' and period = 'day'"), "operator",
         "the operator's cap")
    return succeeded, suspended, spent


def tenant_cap(env):
    """Calls that cost more than they reserve: the overshoot stays within the documented bound."""
    env.enqueue_many([{"agent": "open", "input": "t %d" % i, "tenant": "acme"} for i in range(TENANT_TASKS)])
    s = settle_down(env, "open", TENANT_TASKS)
    reqs = [r for r in env.fixture("/_requests?limit=100000&model=" + TENANT_MODEL)["requests"] if r["status"] == 200]
    spent = settled(env, "tenant", "acme", "month")
    bound = sum(max(0.0, COST - reservation_of(r, TENANT_MAX_TOKENS)) for r in reqs)
    h.log("tenant monthly cap $%.2f, calls reserving $%.4f but costing $%.4f: %d succeeded, %d suspended;"
          " settled $%.4f <= cap + bound $%.4f" % (TENANT_CAP, reservation_of(reqs[0], TENANT_MAX_TOKENS), COST,
                                                  s.get("succeeded", 0), s.get("suspended", 0), spent,
                                                  TENANT_CAP + bound))
    steps_cost = float(env.scalar("select coalesce(sum(s.cost_usd), 0) from task_steps s join tasks t"
                                  " on t.id = s.task_id where t.tenant = 'acme'"))
    h.check(abs(spent - steps_cost) < 1e-6 * (len(reqs) + 1), "the ledger is what the steps recorded")
    h.check(spent <= TENANT_CAP + bound + 1e-9, "settled $%.4f within cap + bound $%.4f" % (spent, TENANT_CAP + bound))
    h.check(s.get("suspended", 0) > 0, "tasks suspended by the tenant's cap")
    rows = env.sql("select suspend_reason, extract(epoch from resume_at - lr_spend_period_end('month', now())) as d"
                   " from tasks where agent = 'open' and status = 'suspended'")
    h.check(all(r["suspend_reason"] == "spend_cap" and 0 <= float(r["d"]) < 5 for r in rows),
            "suspended until the first of next month (UTC): %r" % rows[:2])
    r = env.cli("spend", "set-cap", "--tenant", "acme", "--clear")
    h.eq(r.returncode, 0, "set-cap --clear: %s" % r.stderr)
    h.check("resumed %d task(s)" % s["suspended"] in r.stdout, r.stdout)
    h.wait_for(lambda: statuses(env, "open").get("succeeded", 0) == TENANT_TASKS, 120, "every task of acme")
    caps = json.loads(env.cli("spend", "caps", "--json").stdout)
    c = [x for x in caps if x["scope"] == "tenant" and x["name"] == "acme"][0]
    h.check(c["cap_usd"] is None and c["source"] == "operator", "a cleared cap is an operator's row: %r" % c)


def fail_closed(env, workers):
    """The ledger's function gone: no model call, no attempt, logged; back: the tasks finish."""
    env.sql("alter function lr_spend_reserve(text, text, numeric, integer) rename to lr_spend_reserve_gone")
    ids = env.enqueue_many([{"agent": "closed", "input": "c %d" % i} for i in range(3)])
    h.wait_for(lambda: sum(len(w.events("spend.unavailable")) for w in workers) >= 3, 30, "spend.unavailable logged")
    time.sleep(2)  # a few backoffs: still no call
    calls = [r for r in env.fixture("/_requests?limit=100000&model=" + CLOSED_MODEL)["requests"]]
    h.eq(calls, [], "no model call without a reservation")
    rows = env.sql("select status, attempt from tasks where id = any(%s::uuid[])", (ids,))
    h.check(all(r["status"] == "running" and r["attempt"] == 0 for r in rows), "waiting, no attempt: %r" % rows)
    # a task waiting for the ledger is cancelled at once (its timer stopped, the reservation's answer moot)
    r = env.cli("cancel", ids[0], "--reason", "not now")
    h.eq(r.returncode, 0, "cancel: %s" % r.stderr)
    h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (ids[0],)) == "cancelled", 10,
               "the waiting task cancelled")
    env.sql("alter function lr_spend_reserve_gone(text, text, numeric, integer) rename to lr_spend_reserve")
    h.wait_for(lambda: statuses(env, "closed").get("succeeded", 0) == 2, 60, "the tasks finish once it is back")
    h.eq(env.scalar("select max(attempt) from tasks where id = any(%s::uuid[])", (ids,)), 0, "no attempt used")
    h.eq(len([x for x in env.fixture("/_requests?limit=100000&model=" + CLOSED_MODEL)["requests"]]), 2,
         "one call per task that was not cancelled")


def report(env):
    by_agent = json.loads(env.cli("spend", "--by", "agent", "--json").stdout)
    want = {r["agent"]: float(r["c"]) for r in env.sql(
        "select t.agent, sum(s.cost_usd) as c from task_steps s join tasks t on t.id = s.task_id group by 1")}
    got = {r["agent"]: r["cost_usd"] for r in by_agent["rows"]}
    h.eq(sorted(got), sorted(want), "the report's agents")
    h.check(all(abs(got[a] - want[a]) < 1e-6 for a in want), "the report's costs: %r vs %r" % (got, want))
    h.check(abs(by_agent["total"]["cost_usd"] - sum(want.values())) < 1e-6, "the report's total")
    by_tenant = json.loads(env.cli("spend", "--by", "tenant", "--since", "1h", "--json").stdout)
    h.eq(sorted(str(r["tenant"]) for r in by_tenant["rows"]), ["None", "acme"], "by tenant (no tenant: null)")
    by_model = json.loads(env.cli("spend", "--by", "model", "--json").stdout)
    h.eq(sorted(r["model"] for r in by_model["rows"]), sorted([MODEL, TENANT_MODEL, CLOSED_MODEL]), "by model")
    day = json.loads(env.cli("spend", "--json").stdout)
    h.eq([r["day"] for r in day["rows"]], [datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")],
         "by UTC day (the default)")
    text = env.cli("spend", "--by", "agent")
    h.check(text.returncode == 0 and "capped" in text.stdout and "total" in text.stdout, text.stdout)
    text = env.cli("spend", "caps")
    h.check(text.returncode == 0 and "capped" in text.stdout and "acme" in text.stdout, text.stdout)


def bad_input(env):
    cases = [
        (["spend", "--by", "week"], "--by"),
        (["spend", "--since", "7x"], "--since"),
        (["spend", "nonsense"], "unknown subcommand"),
        (["spend", "caps", "extra"], "unexpected argument"),
        (["spend", "set-cap", "--daily", "5"], "--agent NAME or --tenant NAME"),
        (["spend", "set-cap", "--agent", "a", "--tenant", "b", "--daily", "1"], "one of"),
        (["spend", "set-cap", "--agent", "Bad Name", "--daily", "1"], "not an agent name"),
        (["spend", "set-cap", "--tenant", "a b", "--daily", "1"], "not a tenant name"),
        (["spend", "set-cap", "--agent", "a"], "nothing to change"),
        (["spend", "set-cap", "--agent", "a", "--daily", "-1"], "--daily"),
        (["spend", "set-cap", "--agent", "a", "--monthly", "ten"], "--monthly"),
        (["spend", "set-cap", "--agent", "a", "--daily", "nan"], "--daily"),
        (["spend", "set-cap", "--agent", "a", "--daily", "1e10"], "--daily"),
        (["spend", "set-cap", "--agent", "a", "--clear", "--daily", "1"], "--clear"),
        (["spend", "set-cap", "--agent", "a", "--daily", "1", "--daily", "2"], "twice"),
    ]
    before = env.scalar("select count(*) from spend_caps")
    for args, word in cases:
        r = env.cli(*args)
        h.eq(r.returncode, 2, "%s: exit code (%s)" % (" ".join(args), r.stderr.strip()))
        h.check(word in r.stderr, "%s: the message names %r: %s" % (" ".join(args), word, r.stderr.strip()))
    h.eq(env.scalar("select count(*) from spend_caps"), before, "bad input changed nothing")
    for args in (["spend", "--help"], ["spend", "caps", "--help"], ["spend", "set-cap", "--help"]):
        r = env.cli(*args)
        h.check(r.returncode == 0 and "set-cap" in r.stdout, "%s: %s" % (args, r.stdout[:80]))


def test():
    with h.Env("spend_caps") as env:
        took = race(env)
        env.start_fixture("--model-latency-ms", "100")
        sport = h.free_port()
        env.start_scheduler(LONGRUN_HTTP_PORT=sport)
        agents = env.write_json("agents.json", AGENTS)
        workers = []
        for name in ("w1", "w2"):
            w, port = env.start_worker_http(name, LONGRUN_AGENTS_FILE=agents, LONGRUN_MAX_IN_FLIGHT=25)
            w.port = port
            workers.append(w)
        env.wait_queue(consumers=2)
        h.wait_for(lambda: env.scalar("select count(*) from spend_caps") == 3, 30, "the file's caps written")
        h.eq(env.sql("select scope, name, period, cap_usd::float8 as cap, source from spend_caps"
                     " order by 1, 2, 3"),
             [{"scope": "agent", "name": "capped", "period": "day", "cap": CAP, "source": "file"},
              {"scope": "agent", "name": "closed", "period": "month", "cap": 1000.0, "source": "file"},
              {"scope": "tenant", "name": "acme", "period": "month", "cap": TENANT_CAP, "source": "file"}],
             "the agents file's caps")
        h.wait_for(lambda: all(w.events("spend.caps_loaded") for w in workers), 30, "caps loaded")
        succeeded, suspended, spent = agent_cap(env, workers, sport)
        tenant_cap(env)
        fail_closed(env, workers)
        report(env)
        bad_input(env)
        # a worker restart does not bring the file's caps back over the operator's
        w3 = env.start_worker("w3", LONGRUN_AGENTS_FILE=agents)
        w3.wait_event("spend.file_caps", 30)
        h.eq(env.scalar("select cap_usd::float8 from spend_caps where name = 'capped' and period = 'day'"), 100.0,
             "the operator's cap stays")
        h.eq(env.scalar("select cap_usd from spend_caps where name = 'acme'"), None, "the operator's clear stays")
        h.log("measured: agent cap $%.4f: %d of %d tasks ran before it (settled $%.6f), %d suspended and all resumed"
              " after set-cap; a reservation + settlement %.2f ms per model call"
              % (CAP, succeeded, TASKS, spent, suspended, took))


h.run(test)

"""Issue 17, item 2: tool retries.  Transient failures (5xx, 429, connect errors) are retried
with exponential backoff and full jitter, after the tool's Retry-After (seconds and HTTP-date),
never past the step timeout, never when the tool says x-should-retry: false; a Retry-After
longer than LONGRUN_LONG_WAIT_SECONDS parks the task (suspended, slot freed) and the call runs
on resume.  Real RabbitMQ and PostgreSQL, the fixture server's tools."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

MODEL = {"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1", "model": "fixture-steps-2"}


def tool(path, **extra):
    t = {"description": "a tool", "url": "${LONGRUN_FIXTURE_URL}/tools/" + path}
    t.update(extra)
    return t


TOOLS = {
    "ra": tool("503-retry-after-2-2", retries=3),
    "rdate": tool("429-retry-date-2-1", retries=2),
    "noretry": tool("noretry-503", retries=3),
    "backoff": tool("flaky-3", retries=3),
    "cap": tool("503-retry-after-12-5", retries=5),
    "park": tool("429-retry-after-6-1", retries=2),
    "refused": {"description": "nothing listens", "url": "http://127.0.0.1:1/tools/x", "retries": 2},
}
AGENTS = {"tools": TOOLS, "agents": [{"name": n, "models": [MODEL], "tools": [n]} for n in TOOLS]}
ON_W2 = ("cap",)  # LONGRUN_LONG_WAIT_SECONDS 30 there, so a 12 s Retry-After does not park


def task(env, tid):
    return env.sql("select * from tasks where id = %s", (tid,))[0]


def steps(env, tid):
    return env.sql("select * from task_steps where task_id = %s order by step_no", (tid,))


def hits(env, name, tid):
    return [r for r in env.fixture_requests("/tools/" + TOOLS[name]["url"].rsplit("/", 1)[1])
            if r["headers"].get("x-longrun-task-id") == tid]


def gaps(rs):
    ts = [r["ts"] for r in rs]
    return [b - a for a, b in zip(ts, ts[1:])]


def tool_results(env, tid):
    return [m for s in steps(env, tid) for m in s["messages"] if m["role"] == "tool"]


def test():
    with h.Env("tool-retries") as env:
        agents = env.write_json("agents.json", AGENTS)
        env.start_fixture()
        env.start_scheduler()
        w = env.start_worker("w1", LONGRUN_AGENTS_FILE=agents, LONGRUN_LONG_WAIT_SECONDS=4,
                             LONGRUN_STEP_TIMEOUT_SECONDS=10)
        w2 = env.start_worker("w2", LONGRUN_AGENTS_FILE=agents, LONGRUN_QUEUES="w2", LONGRUN_STEP_TIMEOUT_SECONDS=10)
        names = [n for n in TOOLS if n not in ON_W2]
        ids = dict(zip(names, env.enqueue_many([{"agent": n, "input": "retry drill " + n} for n in names])))
        ids.update(zip(ON_W2, env.enqueue_many([{"agent": n, "input": "retry drill " + n} for n in ON_W2], queue="w2")))
        # the parked task is seen suspended (its slot free) before it resumes
        h.wait_for(lambda: task(env, ids["park"])["status"] == "suspended", 30, "the park task suspended")
        t = task(env, ids["park"])
        h.eq((t["suspend_reason"], t["attempt"]), ("rate_limited", 0), "parked as rate_limited, no attempt spent")
        env.wait_all_terminal(len(TOOLS), 90)

        for n in TOOLS:
            t = task(env, ids[n])
            h.eq(t["status"], "succeeded", "%s: the agent goes on after its tool call (error %r)" % (n, t["error"]))

        # Retry-After in seconds: two 503s each asking for 2 s, then the answer
        rs = hits(env, "ra", ids["ra"])
        h.eq(len(rs), 3, "ra: three tries")
        h.check(all(g >= 1.95 for g in gaps(rs)), "ra: each retry waited the Retry-After: %r" % gaps(rs))
        h.check(not tool_results(env, ids["ra"])[0].get("is_error"), "ra: the third try's result")

        # Retry-After as an HTTP-date (second resolution: at least a second later)
        rs = hits(env, "rdate", ids["rdate"])
        h.eq(len(rs), 2, "rdate: two tries")
        h.check(gaps(rs)[0] >= 0.95, "rdate: waited until the date: %r" % gaps(rs))

        # x-should-retry: false: one try, whatever `retries` says
        h.eq(len(hits(env, "noretry", ids["noretry"])), 1, "noretry: called once")
        res = tool_results(env, ids["noretry"])[0]
        h.check(res.get("is_error") and "x-should-retry: false" in res["content"], res)

        # no Retry-After: exponential backoff with full jitter, not back-to-back
        rs = hits(env, "backoff", ids["backoff"])
        h.eq(len(rs), 4, "backoff: three 503s then the answer")
        g = gaps(rs)
        h.check(sum(g) > 0.03 and all(x < 8.5 for x in g), "backoff: jittered waits, each under the cap: %r" % g)

        # a retry that would start past the step timeout (10 s, less a 1 s margin: a 12 s Retry-After) is not made
        h.eq(len(hits(env, "cap", ids["cap"])), 1, "cap: not retried past the step timeout")
        res = tool_results(env, ids["cap"])[0]
        h.check(res.get("is_error") and "step timeout" in res["content"], res)

        # a connection refused: retried (transport error), then an error result
        res = tool_results(env, ids["refused"])[0]
        h.check(res.get("is_error") and "after 3 tries" in res["content"], res)

        # a Retry-After over LONGRUN_LONG_WAIT_SECONDS parks the task; the resume runs the call again
        rs = hits(env, "park", ids["park"])
        h.eq(len(rs), 2, "park: called before the park and once on resume")
        h.check(gaps(rs)[0] >= 5.9, "park: resumed after the Retry-After: %r" % gaps(rs))
        st = steps(env, ids["park"])
        h.eq([c["status"] for c in st[0]["tool_calls"]], ["parked"], "step 1 parked the call")
        h.eq([c["status"] for c in st[1]["tool_calls"]], ["ok"], "step 2 ran it")
        h.eq(len(tool_results(env, ids["park"])), 1, "one result for the one call")
        ev = env.sql("select to_status, reason from task_events where task_id = %s order by id", (ids["park"],))
        h.check(("suspended", "rate_limited") in [(e["to_status"], e["reason"]) for e in ev], ev)
        env.check_step_log()
        for p in (w, w2):
            p.signal(15)
            h.eq(p.wait(40), 0, "%s exits 0 (and, under ASan, without a leak)" % p.name)


h.run(test)

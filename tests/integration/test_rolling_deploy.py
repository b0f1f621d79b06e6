"""Issue 8: a rolling deploy that changes the shape of the state.

Worker "N" writes state version 1; worker "N+1" (the same build with
LONGRUN_TEST_HOOKS=1 LONGRUN_TEST_STATE_VERSION=2, worker/state.h) writes
version 2, whose tool results carry "output" instead of "content", and reads
both.  With real RabbitMQ, PostgreSQL and the fixture model:

1. N runs agent tasks part way and is stopped (SIGTERM); N+1 resumes them from
   N's checkpoints and finishes them: the conversation it sends the model is
   whole (every tool result present), steps 1..k stay version 1 and later ones
   are version 2.
2. N meets a task N+1 has written: it hands it back (state_version_too_new)
   without writing a step; N+1 then finishes it.
3. The other way to retire a shape: N runs tasks part way, the test-only data
   migration tests/fixtures/state_v2_migration.sql rewrites their steps into
   version 2, and N+1 finishes them.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

N_STEPS = 8
AGENTS = {
    "tools": {"lookup": {"description": "Look something up", "url": "${LONGRUN_FIXTURE_URL}/tools/lookup"}},
    "agents": [{"name": "long", "models": [{"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1",
                                            "model": "fixture-slow-150-%d" % N_STEPS}],
                "tools": ["lookup"], "budgets": {"max_steps": 20, "max_tool_calls": 20}}],
}


def rows(env, ids):
    return env.sql("select id, status, step, state_version from tasks where id = any(%s::uuid[])", (ids,))


def step_versions(env, tid):
    return [r["state_version"] for r in env.sql(
        "select state_version from task_steps where task_id = %s order by step_no", (tid,))]


def check_conversations(env, ids):
    """Every request N+1 sent for these tasks carried every tool result as content."""
    reqs = env.fixture_requests("/v1/chat/completions")
    seen = 0
    for r in reqs:
        msgs = r["body"]["messages"]
        tools = [m for m in msgs if m["role"] == "tool"]
        calls = [c for m in msgs if m["role"] == "assistant" for c in (m.get("tool_calls") or [])]
        h.eq(len(tools), len(calls), "every tool call answered in the request")
        for m in tools:
            h.check(isinstance(m.get("content"), str) and '"tool":"lookup"' in m["content"],
                    "tool result content sent whole: %r" % m)
        seen += 1
    h.check(seen > 0, "requests recorded")


def run_part_way(env, name, n, min_step, **wenv):
    ids = env.enqueue_many([{"agent": "long", "input": "job %d" % i} for i in range(n)])
    w = env.start_worker(name, **wenv)
    h.wait_for(lambda: all(r["step"] >= min_step for r in rows(env, ids)), 60, "%s: tasks part way" % name)
    w.signal(15)
    h.eq(w.wait(60), 0, "%s drained and exited 0" % name)
    left = [r for r in rows(env, ids) if r["status"] not in ("succeeded", "dead")]
    h.check(len(left) >= n // 2, "%s stopped with tasks part way: %r" % (name, rows(env, ids)))
    return ids


def test():
    with h.Env("rolling") as env:
        agents = env.write_json("agents.json", AGENTS)
        env.start_fixture()
        env.start_scheduler(LONGRUN_OUTBOX_GRACE_SECONDS=2)
        common = dict(LONGRUN_AGENTS_FILE=agents, LONGRUN_DRAIN_SECONDS=10)
        v2 = dict(common, LONGRUN_TEST_HOOKS=1, LONGRUN_TEST_STATE_VERSION=2)

        # 1. N part way, then N+1 resumes from N's checkpoints
        a = run_part_way(env, "n-1", 6, 2, **common)
        done_by_n = {r["id"]: r["step"] for r in rows(env, a)}
        h.check(all(v == 1 for t in a for v in step_versions(env, t)), "N wrote version 1")
        env.fixture("/_reset", {})
        wnext = env.start_worker("n1-1", **v2)
        h.wait_for(lambda: all(r["status"] == "succeeded" for r in rows(env, a)), 90, "N+1 finished N's tasks")
        for t in a:
            vs = step_versions(env, t)
            k = done_by_n[t]
            h.eq(len(vs), N_STEPS, "one step per model turn")
            h.eq(vs[:k], [1] * k, "N's steps kept at version 1")
            h.eq(vs[k:], [2] * (N_STEPS - k), "N+1's steps at version 2")
            res = env.sql("select result, state_version from tasks where id = %s", (t,))[0]
            h.eq(res["result"]["answer"], "done after %d steps" % N_STEPS, "the agent's answer")
            h.eq(res["state_version"], 2, "the task row carries the newest version")
            shapes = env.sql("select messages from task_steps where task_id = %s and state_version = 2", (t,))
            tool_msgs = [m for s in shapes for m in s["messages"] if m["role"] == "tool"]
            h.check(tool_msgs and all("output" in m and "content" not in m for m in tool_msgs),
                    "version 2 steps stored in the new shape")
        check_conversations(env, a)

        # 2. N meets state written by N+1: hands it back untouched; N+1 finishes it
        b = env.enqueue_many([{"agent": "long", "input": "newer"}])[0]
        h.wait_for(lambda: rows(env, [b])[0]["step"] >= 2, 60, "N+1 part way through b")
        wnext.signal(15)
        h.eq(wnext.wait(60), 0, "N+1 drained")
        before = rows(env, [b])[0]
        h.eq(before["state_version"], 2, "b is at version 2")
        wold = env.start_worker("n-2", **common)
        h.wait_for(lambda: env.scalar("select count(*) from task_events where task_id = %s and reason = "
                                      "'state_version_too_new'", (b,)) >= 1, 60, "N handed b back")
        h.eq(rows(env, [b])[0]["step"], before["step"], "N wrote no step of b")
        wold.signal(15)
        h.eq(wold.wait(60), 0, "N drained")
        wnext = env.start_worker("n1-2", **v2)
        h.wait_for(lambda: rows(env, [b])[0]["status"] == "succeeded", 90, "N+1 finished b")
        wnext.signal(15)
        h.eq(wnext.wait(60), 0, "N+1 drained")

        # 3. the data migration: N part way, rows rewritten to version 2, N+1 finishes
        c = run_part_way(env, "n-3", 4, 2, **common)
        env.sql(open(os.path.join(h.SOURCE, "tests", "fixtures", "state_v2_migration.sql")).read())
        h.check(all(v == 2 for t in c for v in step_versions(env, t)), "the migration rewrote every step")
        env.fixture("/_reset", {})
        env.start_worker("n1-3", **v2)
        h.wait_for(lambda: all(r["status"] == "succeeded" for r in rows(env, c)), 90, "N+1 finished migrated tasks")
        check_conversations(env, c)
        env.check_step_log()


h.run(test)

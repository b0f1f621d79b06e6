"""Issue 17, item 1: the five budgets each stop a task at exactly the right step, before
the model or tool call that would go over them; suspended time does not count toward
max_seconds unless the agent's budget_clock is "wall".  Real RabbitMQ and PostgreSQL,
the fixture server for the model (7 output tokens a call) and the tools."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402


def fx(model, **extra):
    m = {"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1", "model": model}
    m.update(extra)
    return m


# fixture-steps-11 costs $0.01 per output token (7 a call: $0.07), nothing for input;
# with max_tokens 10 a call can cost at most $0.10.
AGENTS = {
    "models": {"fixture-steps-11": {"input_per_mtok": 0, "output_per_mtok": 10000}},
    "tools": {"lookup": {"description": "Look something up", "url": "${LONGRUN_FIXTURE_URL}/tools/lookup"}},
    "agents": [
        {"name": "steps", "models": [fx("fixture-steps-10")], "tools": ["lookup"], "budgets": {"max_steps": 3}},
        {"name": "toolcalls", "models": [fx("fixture-parallel-2-10")], "tools": ["lookup"],
         "budgets": {"max_tool_calls": 3}},
        {"name": "tokens", "models": [fx("fixture-steps-10")], "tools": ["lookup"], "budgets": {"max_tokens": 120}},
        {"name": "cost", "models": [fx("fixture-steps-11", max_tokens=10)], "tools": ["lookup"],
         "budgets": {"max_cost_usd": 0.25}},
        {"name": "seconds", "models": [fx("fixture-slow-1500-10")], "tools": ["lookup"],
         "budgets": {"max_seconds": 2}},
        {"name": "sleeper", "models": [fx("fixture-tool:sleep-6")], "tools": ["sleep"],
         "budgets": {"max_seconds": 2}},
        {"name": "sleeper-wall", "budget_clock": "wall", "models": [fx("fixture-tool:sleep-6")], "tools": ["sleep"],
         "budgets": {"max_seconds": 2}},
    ],
}


def task(env, tid):
    return env.sql("select *, extract(epoch from finished_at - started_at) as wall_s from tasks where id = %s",
                   (tid,))[0]


def steps(env, tid):
    return env.sql("select * from task_steps where task_id = %s order by step_no", (tid,))


def tool_hits(env, tid):
    return [r for r in env.fixture_requests("/tools/lookup") if r["headers"].get("x-longrun-task-id") == tid]


def model_hits(env, tid):
    return [r for r in env.fixture_requests("/v1/chat/completions") if r["headers"].get("x-longrun-task-id") == tid]


def test():
    with h.Env("budgets") as env:
        agents = env.write_json("agents.json", AGENTS)
        env.start_fixture()
        env.start_scheduler()
        env.start_worker("w1", LONGRUN_AGENTS_FILE=agents)
        names = [a["name"] for a in AGENTS["agents"]]
        ids = dict(zip(names, env.enqueue_many([{"agent": n, "input": "budget test " + n} for n in names])))
        env.wait_all_terminal(len(names), 120, statuses=("succeeded", "dead"))

        def dead(name, reason):
            t = task(env, ids[name])
            h.eq((t["status"], t["stop_reason"]), ("dead", reason), "%s: dead on %s (error %r)" % (name, reason, t["error"]))
            h.check(t["error"] and "budget" in t["error"], "%s: the error names the budget: %r" % (name, t["error"]))
            return t

        # max_steps: the third step is the last
        t = dead("steps", "max_steps")
        h.eq((t["step"], len(steps(env, ids["steps"]))), (3, 3), "max_steps 3: three steps")

        # max_tool_calls: 2 calls a step; step 2 runs the third and refuses the fourth; step 3 can run none
        t = dead("toolcalls", "max_tool_calls")
        h.eq(t["step"], 3, "max_tool_calls 3 stops at step 3")
        h.eq(len(tool_hits(env, ids["toolcalls"])), 3, "exactly three tool calls reached the tool")
        h.eq([c["status"] for c in steps(env, ids["toolcalls"])[2]["tool_calls"]], ["budget", "budget"],
             "step 3's calls were refused by the budget")

        # max_tokens: the first step whose cumulative tokens reach the budget is the last
        t = dead("tokens", "max_tokens")
        cum, stop = 0, None
        for s in steps(env, ids["tokens"]):
            cum += s["tokens_in"] + s["tokens_out"]
            if cum >= 120 and stop is None:
                stop = s["step_no"]
        h.eq(t["step"], stop, "max_tokens stops at the first step that reaches 120 tokens")

        # max_cost_usd: $0.07 a call, worst case $0.10: calls 1-3 fit ($0.21 spent), the fourth could
        # reach $0.31 > $0.25, so it is never made
        t = dead("cost", "max_cost")
        rows = steps(env, ids["cost"])
        h.eq(t["step"], 4, "max_cost stops at step 4")
        h.eq(len(model_hits(env, ids["cost"])), 3, "three model calls; the fourth was not made")
        h.eq((rows[-1]["model"], rows[-1]["tokens_out"]), (None, 0), "the stopping step called no model")
        h.check(float(t["cost_usd"]) <= 0.25, "the cost never went over the budget: %s" % t["cost_usd"])
        h.eq(round(float(t["cost_usd"]), 4), 0.21, "three calls at $0.07")
        h.check("could cost" in t["error"], "the error says what the next call could cost: %r" % t["error"])

        # max_seconds: a 1.5 s model; step 2's model answer arrives past 2 s, so its tool call never starts
        t = dead("seconds", "max_seconds")
        h.eq(t["step"], 2, "max_seconds 2 stops at step 2")
        h.eq(len(tool_hits(env, ids["seconds"])), 1, "only step 1's tool call ran")
        h.eq([c["status"] for c in steps(env, ids["seconds"])[1]["tool_calls"]], ["budget"],
             "step 2's call was refused by the time budget")

        # suspended time does not count (active clock) ... unless budget_clock is "wall"
        t = task(env, ids["sleeper"])
        h.eq(t["status"], "succeeded", "five 1 s sleeps within max_seconds 2 (active time): %r" % t["error"])
        h.check(t["wall_s"] > 4, "it ran %.1f s of wall time" % t["wall_s"])
        h.check(t["active_ms"] < 2000, "active %d ms" % t["active_ms"])
        t = dead("sleeper-wall", "max_seconds")
        h.check(2 <= t["step"] < 6, "the wall clock stopped it mid-way (step %d)" % t["step"])
        h.check("running for" in t["error"], t["error"])
        env.check_step_log()


h.run(test)

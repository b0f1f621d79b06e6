"""Issue 17, item 5: context strategies with conversations that outgrow their window.  Every
request the model receives is valid (the official OpenAI schema) and correctly paired (each
tool result follows the assistant message that called it, every call has its result), keeps
the system prompt and the task's first message, keeps the pinned messages, and stays bounded
while the conversation grows; a summary is a checkpointed step, so a new delivery (a slice
end) does not summarise again.  Real RabbitMQ and PostgreSQL, the fixture model server."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402
from openai_schema import check_requests  # noqa: E402


def fx(model, **extra):
    m = {"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1", "model": model}
    m.update(extra)
    return m


PIN = '"step":3'  # the results of turn 3 (the fixture's lookup echoes its arguments)
AGENTS = {
    # a 400-token context: summarize triggers at three quarters of it by default
    "models": {"fixture-steps-16": {"context_tokens": 400}},
    "tools": {"lookup": {"description": "Look something up", "url": "${LONGRUN_FIXTURE_URL}/tools/lookup"},
              "note": {"description": "Take a note", "url": "${LONGRUN_FIXTURE_URL}/tools/note"}},
    "agents": [
        {"name": "window", "system": "You are a careful agent.", "models": [fx("fixture-parallel-2-14")],
         "tools": ["lookup", "note"], "budgets": {"max_tool_calls": 100},
         "context": {"strategy": "window", "messages": 4, "pin": [{"role": "tool", "contains": PIN}]}},
        {"name": "full", "system": "You are a careful agent.", "models": [fx("fixture-parallel-2-14")],
         "tools": ["lookup", "note"], "budgets": {"max_tool_calls": 100}},
        {"name": "summarize", "system": "Work step by step.", "models": [fx("fixture-steps-16")],
         "tools": ["lookup"], "slice": {"steps": 2}, "budgets": {"max_steps": 60, "max_tool_calls": 60},
         "context": {"strategy": "summarize", "messages": 4, "pin": [{"tool": "lookup", "contains": PIN}]}},
    ],
}


def task(env, tid):
    return env.sql("select * from tasks where id = %s", (tid,))[0]


def steps(env, tid):
    return env.sql("select * from task_steps where task_id = %s order by step_no", (tid,))


def requests_of(env, tid):
    return [r["body"] for r in env.fixture_requests("/v1/chat/completions")
            if r["headers"].get("x-longrun-task-id") == tid]


def check_paired(msgs, what):
    """Each tool message answers a call of the assistant message before it; no call is left open."""
    pending = set()
    for m in msgs:
        if m["role"] == "tool":
            h.check(m.get("tool_call_id") in pending, "%s: a tool result without its call: %r" % (what, m))
            pending.discard(m["tool_call_id"])
            continue
        h.check(not pending, "%s: calls %r have no result before the next message" % (what, pending))
        if m["role"] == "assistant" and m.get("tool_calls"):
            pending = {c["id"] for c in m["tool_calls"]}
    h.check(not pending, "%s: calls %r end the request unanswered" % (what, pending))


def test():
    with h.Env("context") as env:
        agents = env.write_json("agents.json", AGENTS)
        env.start_fixture()
        env.start_scheduler()
        env.start_worker("w1", LONGRUN_AGENTS_FILE=agents)
        names = [a["name"] for a in AGENTS["agents"]]
        ids = dict(zip(names, env.enqueue_many([{"agent": n, "input": "the task of " + n} for n in names])))
        env.wait_all_terminal(len(names), 120, statuses=("succeeded", "dead"))
        for n in names:
            t = task(env, ids[n])
            h.eq(t["status"], "succeeded", "%s succeeded (error %r)" % (n, t["error"]))
        h.check(check_requests(env, "context") > 20, "every request valid against the official schema")

        # window: 14 turns of 2 parallel calls, 4 messages kept, turn 3's results pinned
        reqs = requests_of(env, ids["window"])
        h.eq(len(reqs), 14, "window: one request per turn")
        for i, body in enumerate(reqs):
            msgs = body["messages"]
            what = "window request %d" % (i + 1)
            h.eq(msgs[0], {"role": "system", "content": "You are a careful agent."}, what + ": the system prompt")
            h.eq((msgs[1]["role"], msgs[1]["content"]), ("user", "the task of window"), what + ": the task")
            check_paired(msgs, what)
            if i >= 3:
                h.check(any(m["role"] == "tool" and PIN in m["content"] for m in msgs),
                        what + ": the pinned results of turn 3 are still sent")
            # system + task + the pinned group (call and its 2 results) + at most 4 + 2 (a whole group)
            h.check(len(msgs) <= 2 + 3 + 6, "%s: %d messages, bounded" % (what, len(msgs)))
        full = requests_of(env, ids["full"])
        h.check(len(json.dumps(full[-1])) > 2 * len(json.dumps(reqs[-1])),
                "the full conversation outgrew the window (%d vs %d bytes)" % (len(json.dumps(full[-1])),
                                                                             len(json.dumps(reqs[-1]))))
        sizes = [len(json.dumps(b)) for b in reqs]
        h.check(max(sizes[7:]) <= max(sizes[3:7]) + 200, "window requests stay bounded: %r" % sizes)
        h.eq(task(env, ids["window"])["result"]["answer"], task(env, ids["full"])["result"]["answer"],
             "the same answer as with the full context")

        # summarize: triggered by the model's context (400 tokens) without a threshold; summaries are
        # steps, so the slice ends (every 2 steps: a new delivery rebuilds the conversation from the
        # step log) never summarise the same part again
        t = task(env, ids["summarize"])
        h.eq(t["result"]["answer"], "done after 16 steps", "the agent kept its count of turns")
        rows = steps(env, ids["summarize"])
        srows = [s for s in rows if any(m["role"] == "summary" for m in s["messages"])]
        h.check(len(srows) >= 2, "summary steps: %d" % len(srows))
        reqs = requests_of(env, ids["summarize"])
        sreqs = [b for b in reqs if "[longrun:summarize]" in json.dumps(b)]
        h.eq(len(sreqs), len(srows), "one summarization request per summary step (none repeated on resume)")
        covers = [m["covers"] for s in srows for m in s["messages"]]
        h.eq(covers, sorted(set(covers)), "each summary covers more than the one before: %r" % covers)
        h.check(env.scalar("select count(*) from task_events where task_id = %s and reason = 'slice_end'",
                           (ids["summarize"],)) >= 5, "the task went through several deliveries")
        later = [b for b in reqs if "[longrun summary of" in json.dumps(b) and "[longrun:summarize]" not in json.dumps(b)]
        h.check(later, "requests after a summary carry it")
        for i, body in enumerate(later):
            check_paired(body["messages"], "summarize request %d" % (i + 1))
            h.check(any(m["role"] == "tool" and PIN in m["content"] for m in body["messages"]),
                    "summarize request %d keeps the pinned result verbatim" % (i + 1))
        h.check(max(len(json.dumps(b)) for b in later) < 8000, "the summarized context stays bounded")
        env.check_step_log()


h.run(test)

"""Issue 4, second part: per-tool circuit breakers (visible in /health and /metrics), the
in-process concurrency gate per model, operator budget ceilings, sampled payload logging
(and no secret in any log), the summarize context strategy, per-agent slices, and the
same Idempotency-Key for an agent's tool call re-run after kill -9.  Real RabbitMQ and
PostgreSQL, the fixture server for models and tools."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402
from openai_schema import check_requests  # noqa: E402

get = h.http_get
free_port = h.free_port

SECRET = "sk-test-DO-NOT-LOG-4f1c9e"


def fx(model, provider="openai", **extra):
    m = {"provider": provider, "base_url": "${LONGRUN_FIXTURE_URL}/v1", "model": model, "api_key_env": "FIXTURE_KEY"}
    m.update(extra)
    return m


AGENTS = {
    "tools": {
        "broken": {"description": "Always 503", "url": "${LONGRUN_FIXTURE_URL}/tools/fail-503", "retries": 0},
        "lookup": {"description": "Look something up",
                   "parameters": {"type": "object", "properties": {"step": {"type": "integer"}}},
                   "url": "${LONGRUN_FIXTURE_URL}/tools/lookup"},
        "strict": {"description": "Search; needs a query",
                   "parameters": {"type": "object", "properties": {"query": {"type": "string", "minLength": 1}},
                                  "required": ["query"], "additionalProperties": False},
                   "url": "${LONGRUN_FIXTURE_URL}/tools/strict"},
        "slowtool": {"description": "Answers after 4 s", "url": "${LONGRUN_FIXTURE_URL}/tools/slow-4000",
                     "timeout_ms": 20000, "retries": 0},
    },
    "agents": [
        {"name": "breaker", "models": [fx("fixture-steps-8")], "tools": ["broken"]},
        {"name": "gated", "models": [fx("fixture-slow-300-2", max_concurrency=2)],
         "tools": ["lookup"]},
        {"name": "capped", "models": [fx("fixture-loop")], "tools": ["lookup"],
         "budgets": {"max_steps": 50, "max_tool_calls": 100}},
        {"name": "summarizer", "system": "Work step by step.",
         "models": [fx("fixture-steps-14")], "tools": ["lookup"],
         "context": {"strategy": "summarize", "threshold_tokens": 300, "messages": 4},
         "budgets": {"max_steps": 40, "max_tool_calls": 40}},
        {"name": "summarizer-anthropic", "models": [fx("fixture-steps-10", "anthropic")], "tools": ["lookup"],
         "context": {"strategy": "summarize", "threshold_tokens": 300, "messages": 4},
         "budgets": {"max_steps": 40, "max_tool_calls": 40}},
        {"name": "sliced", "models": [fx("fixture-steps-7")], "tools": ["lookup"], "slice": {"steps": 2},
         "budgets": {"max_steps": 10}},
        {"name": "slowtools", "models": [fx("fixture-steps-3")], "tools": ["slowtool"]},
        {"name": "strict", "models": [fx("fixture-steps-2")], "tools": ["strict"]},
        {"name": "oneshot", "models": [fx("fixture-steps-1")], "tools": ["lookup"]},
        {"name": "twoapprovals", "models": [fx("fixture-tool:request_approval-3")], "tools": ["request_approval"]},
        {"name": "twoevents", "models": [fx("fixture-tool:wait_for_event-3")], "tools": ["wait_for_event"]},
    ],
}






def task(env, tid):
    return env.sql("select * from tasks where id = %s", (tid,))[0]


def steps(env, tid):
    return env.sql("select * from task_steps where task_id = %s order by step_no", (tid,))


def test():
    with h.Env("resilience") as env:
        agents = env.write_json("agents.json", AGENTS)
        env.start_fixture("--require-auth", SECRET)
        env.start_scheduler()
        port = free_port()
        common = dict(LONGRUN_AGENTS_FILE=agents, FIXTURE_KEY=SECRET, LONGRUN_BREAKER_FAILURES=2,
                      LONGRUN_BREAKER_OPEN_SECONDS=60, LONGRUN_CEILING_MAX_STEPS=30, LONGRUN_MAX_STEPS=4,
                      LONGRUN_RETRY_BASE_MS=200, LONGRUN_RETRY_MAX_MS=500,
                      LONGRUN_CALLBACK_ALLOW=env.fixture_url + "/tools/fail-503")
        validated = 0
        w1 = env.start_worker("w1", LONGRUN_HTTP_PORT=port, LONGRUN_LOG_PAYLOADS=1, **common)

        # -- tool circuit breaker: two failures open it; later calls never reach the tool
        bid = env.enqueue_many([{"agent": "breaker", "input": "use the broken tool"}])[0]
        h.wait_for(lambda: task(env, bid)["status"] in ("succeeded", "dead"), 60, "breaker task done")
        t = task(env, bid)
        h.eq((t["status"], t["stop_reason"], t["step"]), ("dead", "max_steps", 4), "default budget of 4 steps")
        outcomes = [c["status"] for s in steps(env, bid) for c in (s["tool_calls"] or [])]
        h.eq(outcomes[:2], ["error", "error"], "the first two calls reached the tool and failed")
        h.check(outcomes[2:] and set(outcomes[2:]) == {"circuit_open"}, "then the circuit refused: %r" % outcomes)
        hits = env.fixture_requests("/tools/fail-503")
        h.eq(len(hits), 2, "the broken tool was called exactly twice")
        circuits = h.wait_for(lambda: json.loads(get(port, "/health")[1])["status"]["circuits"], 5,
                              "the open circuit in /health (refreshed every second)")
        h.eq(circuits, [{"name": "tool:broken", "state": "open", "failures": 2}], "/health lists the open circuit")
        st, text = get(port, "/metrics")
        h.check('longrun_circuit_state{endpoint="tool:broken"} 2' in text, "circuit gauge in /metrics")
        msgs = [m for s in steps(env, bid) for m in s["messages"] if m["role"] == "tool"]
        h.check("circuit open" in msgs[-1]["content"] and msgs[-1].get("is_error"), msgs[-1])

        # -- arguments that do not match the tool's schema: an error result, the tool never runs
        xid = env.enqueue_many([{"agent": "strict", "input": "search"}])[0]
        h.wait_for(lambda: task(env, xid)["status"] in ("succeeded", "dead"), 30, "strict task")
        h.eq(task(env, xid)["status"], "succeeded", "the loop goes on after invalid arguments")
        tm = [m for s_ in steps(env, xid) for m in s_["messages"] if m["role"] == "tool"]
        h.check(len(tm) == 1 and tm[0].get("is_error") and 'missing required property \\"query\\"' in json.dumps(tm[0]),
                "the model is told what is wrong: %r" % tm)
        h.eq([c["status"] for s_ in steps(env, xid) for c in (s_["tool_calls"] or [])], ["invalid_arguments"],
             "logged as invalid_arguments")
        h.eq(env.fixture_requests("/tools/strict"), [], "the tool never ran on arguments outside its schema")

        # -- operator ceiling over a task's own budget (and the budget shown in the dead letter)
        cid = env.enqueue_many([{"agent": "capped", "input": "loop", "budgets": {"max_steps": 40}}])[0]
        h.wait_for(lambda: task(env, cid)["status"] == "dead", 60, "capped task dead")
        t = task(env, cid)
        h.eq((t["stop_reason"], t["step"]), ("max_steps", 30), "task budget 40 clamped to the ceiling 30")
        h.check(any(e.get("event") == "budget.clamped" for e in w1.events()), "clamp logged")

        # -- per-agent slice: 2 steps per delivery, so 7 steps need 4 deliveries
        sid = env.enqueue_many([{"agent": "sliced", "input": "go"}])[0]
        h.wait_for(lambda: task(env, sid)["status"] in ("succeeded", "dead"), 60, "sliced task")
        h.eq(task(env, sid)["status"], "succeeded", "sliced task")
        ends = env.scalar("select count(*) from task_events where task_id = %s and reason = 'slice_end'", (sid,))
        h.eq(ends, 3, "slice_end after steps 2, 4 and 6 (the agent's slice, not LONGRUN_SLICE_STEPS)")

        # -- concurrency gate: 6 tasks, each call 300 ms, at most 2 in flight
        validated += check_requests(env, "resilience")
        env.fixture("/_reset", {})
        gids = env.enqueue_many([{"agent": "gated", "input": "g%d" % i} for i in range(6)])
        h.wait_for(lambda: all(task(env, g)["status"] == "succeeded" for g in gids), 60, "gated tasks")
        stats = env.fixture("/_stats")["by_model"]["fixture-slow-300-2"]
        h.eq(stats["max_inflight"], 2, "the gate held model calls to 2 in flight (and used both slots)")
        h.eq(stats["count"], 12, "every call made once")

        # -- summarize: long conversations are summarized into steps of their own
        validated += check_requests(env, "resilience")
        env.fixture("/_reset", {})
        sm = env.enqueue_many([{"agent": "summarizer", "input": "a long job"},
                               {"agent": "summarizer-anthropic", "input": "a long job"}])
        h.wait_for(lambda: all(task(env, x)["status"] in ("succeeded", "dead") for x in sm), 90, "summarizers")
        for x, n in zip(sm, (14, 10)):
            t = task(env, x)
            h.eq(t["status"], "succeeded", "summarized task succeeded: %r" % t["error"])
            h.eq(t["result"]["answer"], "done after %d steps" % n, "the agent kept its count of turns")
            srows = [s for s in steps(env, x) if any(m["role"] == "summary" for m in s["messages"])]
            h.check(len(srows) >= 2, "summary steps written: %d" % len(srows))
            for s in srows:
                h.eq(len(s["messages"]), 1, "a summary step holds only the summary")
                h.check(s["messages"][0]["content"].startswith("SUMMARY:"), s["messages"][0])
                h.check(s["tokens_in"] > 0 and s["model"], "the summary step is accounted: %r" % s)
            h.eq(t["step"], n + len(srows), "one step per model turn plus one per summary")
        reqs = env.fixture_requests("/v1/chat/completions")
        mark = [r for r in reqs if "[longrun summary of" in json.dumps(r["body"])]
        h.check(mark, "later requests carry the summary instead of the old messages")
        h.check(max(len(json.dumps(r["body"])) for r in mark) < 6000, "the context stays bounded")
        h.check(all(r["body"].get("tools") is None for r in reqs
                    if "[longrun:summarize]" in json.dumps(r["body"])), "summarization requests offer no tools")
        h.check(all(m["role"] != "summary" for r in reqs for m in r["body"]["messages"]),
                "the summary role never reaches the provider")

        # -- every wait consumes its own signal: a second approval (or event) is waited for, not
        #    answered by the first one
        ap, ev = env.enqueue_many([{"agent": "twoapprovals", "input": "x"}, {"agent": "twoevents", "input": "y"}])

        def waiting(tid, step):
            t = task(env, tid)
            return t["status"] == "suspended" and t["step"] >= step

        for n in (1, 2):
            h.wait_for(lambda: waiting(ap, n) and waiting(ev, n), 30, "both waiting (wait %d)" % n)
            if n == 2:
                # a wake-up without a new signal (as after a redelivery): the old signal must not answer
                before = {x: task(env, x)["step"] for x in (ap, ev)}
                env.sql("update tasks set resume_at = now() where id in (%s, %s)", (ap, ev))
                env.sql("notify longrun_wakeup")
                h.wait_for(lambda: all(waiting(x, before[x] + 1) for x in (ap, ev)), 30,
                           "woken without a signal, both wait again")
                h.eq((task(env, ap)["suspend_reason"], task(env, ev)["suspend_reason"]), ("approval", "event"),
                     "the second wait is not answered by the first signal")
            r = env.cli("approve", ap, "--comment", "ok %d" % n)
            h.eq(r.returncode, 0, r.stderr)
            r = env.cli("signal", ev, "go", "--payload", json.dumps({"n": n}))
            h.eq(r.returncode, 0, r.stderr)
            h.wait_for(lambda: task(env, ap)["step"] > n and task(env, ev)["step"] > n, 30, "woken (wait %d)" % n)
        h.wait_for(lambda: task(env, ap)["status"] == "succeeded" and task(env, ev)["status"] == "succeeded", 30,
                   "both finished after two signals each")
        for tid, want in ((ap, ["ok 1", "ok 2"]), (ev, ['{"n":1}', '{"n":2}'])):
            res = [m for st_ in steps(env, tid) for m in st_["messages"] if m["role"] == "tool"]
            h.eq(len(res), 2, "two answered waits")
            h.check(all(w in m["content"] for w, m in zip(want, res)), "each wait got its own signal: %r" % res)
            h.eq(len({m["signal_id"] for m in res}), 2, "two distinct signals consumed")

        # -- payload logging (LONGRUN_LOG_PAYLOADS=1 on w1): logged, but never the API key
        log1 = w1.log_text()
        h.check('"event":"payload.model_request"' in log1 and '"event":"payload.tool_result"' in log1,
                "payloads logged when sampled")
        h.check(SECRET not in log1, "the API key is never logged")
        w1.signal(15)
        h.eq(w1.wait(40), 0, "w1 exits 0 (and, under ASan, without a leak)")

        # -- kill -9 during an agent's tool call: the re-run sends the same Idempotency-Key
        validated += check_requests(env, "resilience")
        env.fixture("/_reset", {})
        w2 = env.start_worker("w2", LONGRUN_LEASE_SECONDS=4, **common)
        kid = env.enqueue_many([{"agent": "slowtools", "input": "slow"}])[0]
        h.wait_for(lambda: env.fixture_requests("/tools/slow-4000"), 20, "the slow tool was called")
        w2.kill()
        w3 = env.start_worker("w3", LONGRUN_LEASE_SECONDS=4, **common)
        h.wait_for(lambda: task(env, kid)["status"] == "succeeded", 60, "the task finished on another worker")
        keys = [r["headers"].get("idempotency-key") for r in env.fixture_requests("/tools/slow-4000")]
        h.eq(keys[:2], [kid + ":1:0", kid + ":1:0"], "step 1 re-run after kill -9 with the same key")
        h.eq(len(keys), 3, "step 1 twice, step 2 once: %r" % keys)
        h.eq(keys[2], kid + ":2:0", "the next step's key")
        env.check_step_log()

        # -- a callback still being retried when the worker stops: given up, logged, freed (LSan in the asan run)
        oid = env.enqueue_many([{"agent": "oneshot", "input": "x", "callback_url": env.fixture_url + "/tools/fail-503"}])[0]
        h.wait_for(lambda: len(env.fixture_requests("/tools/fail-503")) >= 2, 20, "callback retried")
        h.eq(task(env, oid)["status"], "succeeded", "the outcome is committed whatever the callback does")
        w3.signal(15)
        h.eq(w3.wait(40), 0, "w3 exits 0 with a callback pending")
        h.check(any(e.get("event") == "task.callback_abandoned" and oid in e.get("msg", "") for e in w3.events()),
                "the abandoned callback is logged")
        validated += check_requests(env, "resilience")
        h.log("%d OpenAI request bodies validated against the official schema" % validated)
        h.check(validated > 50, "requests validated")
        for p in (w2, w3):
            h.check(SECRET not in p.log_text(), "no API key in %s's log" % p.name)
            h.check('"event":"payload.' not in p.log_text(), "no payloads logged when LONGRUN_LOG_PAYLOADS=0")


h.run(test)

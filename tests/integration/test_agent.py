"""Issue 4: the agent loop against the fixture server (OpenAI and Anthropic wire
formats), real RabbitMQ and PostgreSQL: budgets, fallback, tool errors,
suspending tools, request bodies valid against the official OpenAI schema."""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402
from openai_schema import request_validator  # noqa: E402

AGENTS = os.path.join(h.SOURCE, "tests", "fixtures", "agents.test.json")


def task(env, tid):
    return env.sql("select * from tasks where id = %s", (tid,))[0]


def steps(env, tid):
    return env.sql("select * from task_steps where task_id = %s order by step_no", (tid,))


def test():
    with h.Env("agent") as env:
        env.start_fixture()
        env.start_scheduler()
        env.start_worker("w1", LONGRUN_AGENTS_FILE=AGENTS, LONGRUN_RETRY_BASE_MS=200, LONGRUN_RETRY_MAX_MS=500,
                         LONGRUN_CALLBACK_ALLOW=env.fixture_url + "/tools/callback")
        env.start_worker("w2", LONGRUN_AGENTS_FILE=AGENTS, LONGRUN_RETRY_BASE_MS=200, LONGRUN_RETRY_MAX_MS=500,
                         LONGRUN_CALLBACK_ALLOW=env.fixture_url + "/tools/callback")
        names = ["steps3", "anthropic3", "runaway", "fallback", "quota", "badargs", "argsobject", "stopwithtools",
                 "notools", "bigresult", "flakytool", "toolbudget", "tokenbudget", "malformed"]
        ids = dict(zip(names, env.enqueue_many([{"agent": n, "input": {"question": "q for " + n}} for n in names])))
        cb = env.enqueue_many([{"agent": "steps3", "input": "call me back", "callback_url": env.fixture_url + "/tools/callback"},
                               {"agent": "steps3", "input": "not allowed", "callback_url": env.fixture_url + "/tools/other"}])
        env.wait_all_terminal(len(names) + 2, 120)
        # the outcome is POSTed to an allowed callback_url, with its idempotency key
        posts = h.wait_for(lambda: env.fixture("/_requests?limit=10000&path_prefix=/tools/callback")["requests"], 15,
                           "callback delivered")
        h.eq(len(posts), 1, "one callback POST")
        h.eq(posts[0]["headers"]["idempotency-key"], cb[0] + ":outcome", "callback idempotency key")
        h.eq((posts[0]["body"]["id"], posts[0]["body"]["status"]), (cb[0], "succeeded"), "callback body")
        h.eq(posts[0]["body"]["result"]["answer"], "done after 3 steps", "callback result")
        h.eq(env.fixture("/_requests?limit=10000&path_prefix=/tools/other")["requests"], [],
             "a callback_url outside LONGRUN_CALLBACK_ALLOW is never called")

        # plain success, both wire formats; usage and cost accounted
        for n in ("steps3", "anthropic3"):
            t = task(env, ids[n])
            h.eq(t["status"], "succeeded", n)
            h.eq(t["step"], 3, n + " steps")
            h.eq(t["result"]["answer"], "done after 3 steps", n + " answer")
            h.check(t["tokens_in"] > 0 and t["tokens_out"] > 0 and t["cost_usd"] > 0, "%s usage %r" % (n, t))
            h.eq(t["tool_calls"], 2, n + " tool calls")
        h.check(task(env, ids["steps3"])["tokens_cached"] > 0, "OpenAI cached tokens counted")

        # runaway: stops exactly at its budget, dead letter shows it
        t = task(env, ids["runaway"])
        h.eq((t["status"], t["stop_reason"], t["step"]), ("dead", "max_steps", 5), "runaway")
        dl = env.sql("select * from dead_letters where task_id = %s", (ids["runaway"],))
        h.eq(len(dl), 1, "runaway dead letter")
        h.eq(dl[0]["reason"], "max_steps", "dead letter reason")
        h.check("5 steps" in dl[0]["error"], dl[0]["error"])
        t = task(env, ids["toolbudget"])
        h.eq((t["status"], t["stop_reason"]), ("dead", "max_tool_calls"), "tool budget")
        h.eq(t["tool_calls"], 3, "exactly 3 tool calls made")
        t = task(env, ids["tokenbudget"])
        h.eq((t["status"], t["stop_reason"]), ("dead", "max_tokens"), "token budget")
        h.check(t["tokens_in"] + t["tokens_out"] >= 200, "token budget reached")

        # fallback: the primary fails, the secondary answers, the step records which model
        t = task(env, ids["fallback"])
        h.eq(t["status"], "succeeded", "fallback")
        h.eq({s["model"] for s in steps(env, ids["fallback"])}, {"fixture-steps-3"}, "answered by the secondary")
        reqs = env.fixture("/_requests?limit=10000&model=fixture-error-500")["requests"]
        h.check(len(reqs) >= 2, "the primary was tried (with a retry): %d" % len(reqs))
        # quota 429 is not retried: straight to the next model
        t = task(env, ids["quota"])
        h.eq(t["status"], "succeeded", "quota fallback")
        q = env.fixture("/_requests?limit=10000&model=fixture-error-429-insufficient_quota")["requests"]
        h.eq(len(q), 3, "insufficient_quota tried once per step, never retried")

        # invalid arguments: never executed, answered with an error, the loop goes on
        t = task(env, ids["badargs"])
        h.eq(t["status"], "succeeded", "bad args task")
        s1 = steps(env, ids["badargs"])[0]
        toolmsg = [m for m in s1["messages"] if m["role"] == "tool"][0]
        h.check(toolmsg.get("is_error") and "not a valid JSON" in toolmsg["content"], toolmsg)
        asst = [m for m in s1["messages"] if m["role"] == "assistant"][0]
        h.eq(asst["tool_calls"][0]["arguments"], '{"city": "Par', "raw arguments kept for replay")
        lk = env.fixture("/_requests?limit=10000&path_prefix=/tools/lookup")["requests"]
        h.check(all(r["headers"].get("idempotency-key", "").split(":")[0] != ids["badargs"] for r in lk),
                "the tool never ran on unparsable arguments")
        # the replay of the raw string reached the model on the next turn
        mreq = [r for r in env.fixture("/_requests?limit=10000&model=fixture-bad-args")["requests"]]
        replayed = [tc["function"]["arguments"] for r in mreq for m in r["body"].get("messages", [])
                    for tc in (m.get("tool_calls") or [])]
        h.check('{"city": "Par' in replayed, "raw arguments replayed byte for byte: %r" % replayed)
        h.eq(task(env, ids["argsobject"])["status"], "succeeded", "arguments as an object accepted")
        h.eq(task(env, ids["stopwithtools"])["status"], "succeeded", "tool calls despite finish_reason stop")
        h.check(task(env, ids["stopwithtools"])["tool_calls"] >= 1, "the tool ran although finish_reason was stop")

        # unknown tool: an error result, not a crash
        s1 = steps(env, ids["notools"])[0]
        tm = [m for m in s1["messages"] if m["role"] == "tool"][0]
        h.check(tm.get("is_error") and "unknown or not allowed" in tm["content"], tm)
        # oversized result: capped with a marker
        s1 = steps(env, ids["bigresult"])[0]
        tm = [m for m in s1["messages"] if m["role"] == "tool"][0]
        h.check(len(tm["content"]) < 1200 and "truncated" in tm["content"], len(tm["content"]))
        h.eq(task(env, ids["bigresult"])["status"], "succeeded", "big result task")
        # flaky tool: retried with the same idempotency key until it answers
        h.eq(task(env, ids["flakytool"])["status"], "succeeded", "flaky tool")
        fl = env.fixture("/_requests?limit=10000&path_prefix=/tools/flaky-2")["requests"]
        keys = [r["headers"]["idempotency-key"] for r in fl]
        h.check(len(keys) >= 3 and len(set(keys)) == 1, "same key on retries: %r" % keys)
        # a malformed provider response: retried, then the task retries, then dead (exhausted)
        t = task(env, ids["malformed"])
        h.eq((t["status"], t["stop_reason"]), ("dead", "exhausted"), "malformed responses exhaust attempts")
        h.check("malformed_response" in t["error"] or "circuit open" in t["error"], t["error"])

        # every request body the worker sent validates against the official schema
        v = request_validator()
        allreq = env.fixture("/_requests?limit=10000&path_prefix=/v1/chat/completions")["requests"]
        h.check(len(allreq) > 20, "requests recorded")
        for r in allreq:
            errs = list(v.iter_errors(r["body"]))
            h.check(not errs, "request invalid against CreateChatCompletionRequest: %s\n%s" % (
                errs[0].message if errs else "", json.dumps(r["body"])[:800]))
        h.log("%d OpenAI request bodies validated against the official schema" % len(allreq))

        # suspending tools: sleep resumes on time; approval waits for a decision
        sid = env.enqueue_many([{"agent": "sleeper", "input": "nap"}])[0]
        aid = env.enqueue_many([{"agent": "approver", "input": "ok?"}])[0]
        did = env.enqueue_many([{"agent": "deployer", "input": "deploy"}])[0]
        h.wait_for(lambda: task(env, sid)["status"] == "suspended", 20, "sleeper suspended")
        t0 = time.time()
        h.eq(task(env, sid)["suspend_reason"], "sleep", "sleep reason")
        h.wait_for(lambda: task(env, sid)["status"] == "succeeded", 20, "sleeper resumed and finished")
        h.check(time.time() - t0 < 6, "sleep(1) resumed within a few seconds")
        h.wait_for(lambda: task(env, aid)["status"] == "suspended", 20, "approver suspended")
        h.eq(task(env, aid)["suspend_reason"], "approval", "approval reason")
        h.wait_for(lambda: task(env, did)["status"] == "suspended", 20, "deployer suspended")
        h.eq(env.fixture("/_requests?limit=10000&path_prefix=/tools/deploy")["requests"], [],
             "a requires_approval tool does not run before approval")
        time.sleep(1.5)
        h.eq(task(env, aid)["status"], "suspended", "still waiting without a decision")
        for tid in (aid, did):
            env.sql("insert into task_signals (task_id, name, payload, actor) values (%s, 'approval', %s, 'test')",
                    (tid, json.dumps({"approved": True, "comment": "fine"})))
            env.sql("update tasks set resume_at = now() where id = %s", (tid,))
            env.sql("notify longrun_wakeup")
        h.wait_for(lambda: task(env, aid)["status"] == "succeeded", 20, "approved task finished")
        h.wait_for(lambda: task(env, did)["status"] == "succeeded", 20, "approved deploy finished")
        h.eq(len(env.fixture("/_requests?limit=10000&path_prefix=/tools/deploy")["requests"]), 1,
             "the approved tool ran once")


h.run(test)

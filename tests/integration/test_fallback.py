"""Issue 17, item 6: fallback drills.  The primary model fails with each class of error (5xx,
timeout, 429 with a long Retry-After, a content-filter refusal, a malformed answer) and the
chain moves on as documented per class: the step records which model answered and why
(task_steps.model, task_steps.fallback), and /metrics counts it by model.  Real RabbitMQ and
PostgreSQL, the fixture server speaking the providers' wire formats."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402


def fx(model, provider="openai", **extra):
    m = {"provider": provider, "base_url": "${LONGRUN_FIXTURE_URL}/v1", "model": model}
    m.update(extra)
    return m


BACKUP = fx("fixture-steps-1")
AGENTS = {
    "tools": {"lookup": {"description": "Look something up", "url": "${LONGRUN_FIXTURE_URL}/tools/lookup"}},
    "agents": [
        {"name": "five-hundred", "models": [fx("fixture-error-503", retries=1), BACKUP]},
        {"name": "timeout", "models": [fx("fixture-hang", timeout_ms=1000, retries=0), BACKUP]},
        {"name": "long-429", "models": [fx("fixture-error-429-retry-after-120", retries=3), fx("fixture-steps-3")],
         "tools": ["lookup"]},
        {"name": "refusal", "models": [fx("fixture-refusal"), BACKUP]},
        {"name": "refusal-anthropic", "models": [fx("fixture-refusal", "anthropic"), fx("fixture-steps-1", "anthropic")]},
        {"name": "malformed", "models": [fx("fixture-malformed", retries=1), BACKUP]},
        # no model after the failing one: what each class does at the end of the chain
        {"name": "refusal-only", "models": [fx("fixture-refusal")]},
        {"name": "long-429-only", "models": [fx("fixture-error-429-retry-after-120")]},
        # one request a minute: step 2's call gets a 429 asking for about a minute
        {"name": "late-429", "models": [fx("fixture-ratelimit-1-3")], "tools": ["lookup"]},
    ],
}


def task(env, tid):
    return env.sql("select * from tasks where id = %s", (tid,))[0]


def steps(env, tid):
    return env.sql("select * from task_steps where task_id = %s order by step_no", (tid,))


def reasons(step):
    return [(f["model"], f["reason"], f["action"]) for f in (step["fallback"] or [])]


def test():
    with h.Env("fallback") as env:
        agents = env.write_json("agents.json", AGENTS)
        env.start_fixture()
        env.start_scheduler()
        w, port = env.start_worker_http("w1", LONGRUN_AGENTS_FILE=agents, LONGRUN_RETRY_BASE_MS=100,
                                        LONGRUN_RETRY_MAX_MS=200)
        names = [a["name"] for a in AGENTS["agents"]]
        ids = dict(zip(names, env.enqueue_many([{"agent": n, "input": "drill " + n} for n in names])))
        h.wait_for(lambda: all(task(env, ids[n])["status"] in ("succeeded", "dead", "suspended") for n in names), 90,
                   "every drill settled")

        expect = {
            "five-hundred": [("fixture-error-503", "server_error", "retry"),
                             ("fixture-error-503", "server_error", "next_model")],
            "timeout": [("fixture-hang", "timeout", "next_model")],
            "long-429": [("fixture-error-429-retry-after-120", "rate_limited", "next_model")],
            "refusal": [("fixture-refusal", "content_filter", "next_model")],
            "refusal-anthropic": [("fixture-refusal", "content_filter", "next_model")],
            "malformed": [("fixture-malformed", "malformed_response", "retry"),
                          ("fixture-malformed", "malformed_response", "next_model")],
        }
        for name, want in expect.items():
            t = task(env, ids[name])
            h.eq(t["status"], "succeeded", "%s: the backup model answered (error %r)" % (name, t["error"]))
            first = steps(env, ids[name])[0]
            h.check(first["model"].startswith("fixture-steps-"), "%s: step 1 answered by %r" % (name, first["model"]))
            h.eq(reasons(first), want, "%s: the step records why it fell back" % name)

        # a long Retry-After (120 s, over LONGRUN_LONG_WAIT_SECONDS) cools the primary: the later steps
        # skip it without calling it, and the task does not wait two minutes
        rows = steps(env, ids["long-429"])
        h.eq(len(rows), 3, "long-429: three steps")
        for s in rows[1:]:
            h.eq(reasons(s), [("fixture-error-429-retry-after-120", "rate_limited", "next_model")],
                 "long-429 step %d skipped the cooling primary" % s["step_no"])
        primary_calls = [r for r in env.fixture_requests("/v1/chat/completions")
                         if r["body"].get("model") == "fixture-error-429-retry-after-120"
                         and r["headers"].get("x-longrun-task-id") == ids["long-429"]]
        h.eq(len(primary_calls), 1, "the rate-limited primary was called once, not retried and not per step")

        # a refusal paid for is counted, and the next model's answer is the result
        t = task(env, ids["refusal"])
        h.eq(t["result"]["model"], "fixture-steps-1", "the refusal's backup answered")
        h.check(steps(env, ids["refusal"])[0]["tokens_out"] > 7, "the refused call's tokens are accounted")

        # the end of the chain: a refusal with no backup is a dead letter named content_filter; a long
        # 429 with no backup suspends the task until the Retry-After (no slot held, no attempt spent)
        t = task(env, ids["refusal-only"])
        h.eq((t["status"], t["stop_reason"]), ("dead", "content_filter"), "refusal-only: %r" % t["error"])
        h.check("declined" in t["error"], t["error"])
        t = task(env, ids["long-429-only"])
        h.eq((t["status"], t["suspend_reason"], t["attempt"]), ("suspended", "rate_limited", 0), "long-429-only")
        left = env.scalar("select extract(epoch from resume_at - now()) from tasks where id = %s",
                          (ids["long-429-only"],))
        h.check(90 < left <= 121, "resumes after the provider's Retry-After: in %.0f s" % left)

        # a rate-limit suspension that added nothing writes no step row: waiting does not use up max_steps
        t = task(env, ids["late-429"])
        h.eq((t["status"], t["suspend_reason"], t["step"]), ("suspended", "rate_limited", 1), "late-429 waits")
        h.eq(len(steps(env, ids["late-429"])), 1, "late-429: only step 1 has a row")

        # metrics by model
        text = h.http_get(port, "/metrics")[1]
        for line in ('longrun_model_fallbacks_total{model="fixture-error-503",reason="server_error",'
                     'action="next_model"} 1',
                     'longrun_model_fallbacks_total{model="fixture-refusal",reason="content_filter",'
                     'action="next_model"} 2',
                     'longrun_model_fallbacks_total{model="fixture-hang",reason="timeout",action="next_model"} 1',
                     'longrun_model_fallbacks_total{model="fixture-error-429-retry-after-120",reason="rate_limited",'
                     'action="next_model"} 3'):
            h.check(line in text, "metric line %s in /metrics" % line)
        h.check('longrun_model_requests_total{provider="openai",model="fixture-error-503",status="503"} 2' in text,
                "requests by model and status")
        env.check_step_log()
        print(json.dumps({n: reasons(steps(env, ids[n])[0]) if steps(env, ids[n]) else None for n in names}))


h.run(test)

"""Issue 16 item 8: readiness that means ready.  A worker whose only model endpoint rejects its
API key (401 on every call) goes not ready with the endpoint in the reason (/readyz, /health, a
worker.not_ready log line); /health shows per-provider and per-tool call counts and error rates;
readiness comes back when the window (LONGRUN_READY_WINDOW_SECONDS, short here) ages out and at
once when another endpoint answers.  A worker whose every model circuit is open is not ready
either, until the circuit's open time is over.  Real RabbitMQ, PostgreSQL and the fixture server
(with --require-auth, so a wrong key gets a real 401)."""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

get = h.http_get
SECRET = "sk-test-readiness-7a2b"
WINDOW = 6


def fx(model, key_env="FIXTURE_KEY"):
    return {"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1", "model": model, "api_key_env": key_env}


AGENTS = {
    "tools": {"lookup": {"description": "Look something up",
                         "parameters": {"type": "object", "properties": {"step": {"type": "integer"}}},
                         "url": "${LONGRUN_FIXTURE_URL}/tools/lookup"}},
    "agents": [
        {"name": "good", "models": [fx("fixture-steps-2")], "tools": ["lookup"]},
        {"name": "badkey", "models": [fx("fixture-steps-3", "WRONG_KEY")], "tools": ["lookup"]},
        {"name": "down", "models": [fx("fixture-error-503")], "tools": ["lookup"]},
    ],
}


def health(port):
    return json.loads(get(port, "/health")[1])


def entry(port, kind, name):
    for e in health(port)["status"].get(kind, []):
        if e["name"] == name:
            return e
    return None


def run(env, agent, n=1, **extra):
    ids = env.enqueue_many([dict({"agent": agent, "input": "go"}, **extra) for _ in range(n)])
    for tid in ids:
        h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (tid,)) in
                   ("succeeded", "dead", "failed"), 60, "task %s of %s done" % (tid, agent))
    return ids


def test():
    with h.Env("readiness") as env:
        agents = env.write_json("agents.json", AGENTS)
        env.start_fixture("--require-auth", SECRET)
        env.start_scheduler()
        w1, port = env.start_worker_http("w1", LONGRUN_AGENTS_FILE=agents, FIXTURE_KEY=SECRET,
                                         WRONG_KEY="sk-test-rotated-away", LONGRUN_READY_WINDOW_SECONDS=WINDOW,
                                         LONGRUN_READY_AUTH_MIN_CALLS=3, LONGRUN_BREAKER_FAILURES=100)

        # -- a good task: per-provider and per-tool counts with a zero error rate
        run(env, "good")
        p = h.wait_for(lambda: entry(port, "providers", "openai/fixture-steps-2"), 5, "provider in /health")
        h.check(p["last_window"]["calls"] >= 2 and p["last_window"]["errors"] == 0 and
                p["last_window"]["error_rate"] == 0, "model calls, no error: %r" % p)
        t = h.wait_for(lambda: entry(port, "tools", "lookup"), 5, "tool in /health")
        h.check(t["last_window"]["calls"] >= 1 and t["last_window"]["error_rate"] == 0, "tool calls: %r" % t)
        h.eq(health(port)["status"]["calls_window_seconds"], WINDOW, "the window in /health")

        # -- the good calls age out of the window; then a key rejected on every call
        h.wait_for(lambda: entry(port, "providers", "openai/fixture-steps-2")["last_window"]["calls"] == 0,
                   WINDOW + 5, "good calls out of the window")
        run(env, "badkey", 2)
        time.sleep(1.5)
        h.eq(get(port, "/readyz")[0], 200, "two 401s are under LONGRUN_READY_AUTH_MIN_CALLS")
        run(env, "badkey")
        h.wait_for(lambda: get(port, "/readyz")[0] == 503, 5, "not ready after three 401s")
        st, body = get(port, "/readyz")
        h.check("model API key rejected" in body and "openai/fixture-steps-3 3/3 calls 401/403" in body,
                "/readyz names the endpoint: %r" % body)
        hj = health(port)
        h.eq(hj["ready"], False, "/health not ready")
        h.check("openai/fixture-steps-3" in hj["not_ready_reason"], hj["not_ready_reason"])
        p = entry(port, "providers", "openai/fixture-steps-3")
        h.eq((p["last_window"]["calls"], p["last_window"]["auth_failures"], p["last_window"]["error_rate"]),
             (3, 3, 1), "/health shows the auth failures: %r" % p)
        st, text = get(port, "/metrics")
        h.check('longrun_model_requests_total{provider="openai",model="fixture-steps-3",status="401"} 3' in text,
                "the 401s in /metrics (the alert's metric)")
        h.check("longrun_ready 0" in text, "ready gauge 0")
        h.check(w1.events("worker.not_ready"), "a worker.not_ready log line")
        h.check(SECRET not in w1.log_text() and "sk-test-rotated-away" not in w1.log_text(), "no key in the log")

        # -- the window ages out: ready again
        h.wait_for(lambda: get(port, "/readyz")[0] == 200, WINDOW + 5, "ready once the 401s age out")
        h.check(w1.events("worker.ready"), "a worker.ready log line")

        # -- a storm again, ended at once by an endpoint that answers
        run(env, "badkey", 3)
        h.wait_for(lambda: get(port, "/readyz")[0] == 503, 5, "not ready again")
        run(env, "good")
        h.wait_for(lambda: get(port, "/readyz")[0] == 200, 3, "ready once another endpoint answers")
        p = entry(port, "providers", "openai/fixture-steps-3")
        h.check(p["last_window"]["auth_failures"] >= 3, "while the 401s are still in the window: %r" % p)
        w1.signal(15)
        h.check(w1.wait(30) is not None, "w1 exits")

        # -- every model circuit open: not ready until the open time is over
        w2, port2 = env.start_worker_http("w2", LONGRUN_AGENTS_FILE=agents, FIXTURE_KEY=SECRET,
                                          LONGRUN_BREAKER_FAILURES=2, LONGRUN_BREAKER_OPEN_SECONDS=4,
                                          LONGRUN_RETRY_BASE_MS=100, LONGRUN_RETRY_MAX_MS=200)
        env.enqueue_many([{"agent": "down", "input": "go", "max_attempts": 1}])
        h.wait_for(lambda: get(port2, "/readyz")[0] == 503, 20, "not ready with every model circuit open")
        st, body = get(port2, "/readyz")
        h.check("every model endpoint's circuit is open (1)" in body, body)
        h.wait_for(lambda: get(port2, "/readyz")[0] == 200, 15, "ready once the open time is over")


h.run(test)

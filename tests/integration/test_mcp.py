"""Issue 18, item 1: MCP tools as durable idempotent steps.  Real RabbitMQ and PostgreSQL; the MCP
reference server @modelcontextprotocol/server-everything (tests/mcp-everything, npm ci by
`scripts/dev deps`) in its streamable HTTP mode, and tests/fixtures/mcp_server.py for the faults:
pagination, JSON and SSE answers, a lost session (404 -> initialize again), a slow SSE answer, a
malformed message, an oversized result, an outputSchema mismatch; and a kill -9 in the middle of MCP
calls, after which no completed step's call is made again (the server's own count)."""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

EVERYTHING = os.path.join(h.SOURCE, "tests", "mcp-everything", "node_modules", "@modelcontextprotocol",
                          "server-everything", "dist", "index.js")


def model(spec):
    return {"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1", "model": spec}


def call(tool, args, n=2):
    return "fixture-call:%s:%s-%d" % (tool, json.dumps(args, separators=(",", ":")), n)


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def tool_results(env, tid):
    rows = env.sql("select messages from task_steps where task_id = %s order by step_no", (tid,))
    return [m for r in rows for m in r["messages"] if m["role"] == "tool"]


def start_test_server(env):
    portfile = os.path.join(env.dir, "mcp.port")
    env.start("aux-mcp", [h.PY, os.path.join(h.SOURCE, "tests", "fixtures", "mcp_server.py"), "--port", "0",
                      "--port-file", portfile])
    h.wait_for(lambda: os.path.exists(portfile), 15, "the test MCP server's port")
    return "http://127.0.0.1:%s" % open(portfile).read().strip()


def start_everything(env):
    if not os.path.exists(EVERYTHING) or shutil.which("node") is None:
        return None
    port = h.free_port()
    p = env.start("aux-everything", ["node", EVERYTHING, "streamableHttp"], PORT=port)
    h.wait_for(lambda: "listening" in p.log_text() or not p.alive(), 30, "server-everything listening")
    h.check(p.alive(), "server-everything runs:\n" + p.tail())
    return "http://127.0.0.1:%d" % port


def test():
    with h.Env("mcp") as env:
        env.start_fixture()
        mcp = start_test_server(env)
        ev = start_everything(env)
        if ev is None:
            h.log("SKIP part: server-everything not installed (run scripts/dev deps)")
        servers = {"t": {"url": mcp + "/mcp", "headers": {"Authorization": "Bearer ${MCP_TEST_TOKEN}"},
                         "deny": ["wrong_id"], "timeout_ms": 3000, "max_result_bytes": 2000}}
        agents = {
            "t-echo": call("t_echo", {"text": "hi %STEP%"}, 3),
            "t-add": call("t_add", {"a": 2, "b": 3}),
            "t-slow": call("t_slow", {"ms": 1500}),
            "t-slowest": call("t_slow", {"ms": 6000}),
            "t-malformed": call("t_malformed", {}),
            "t-big": call("t_big", {"bytes": 5000}),
            "t-huge": call("t_big", {"bytes": 200000}),
            "t-bad-output": call("t_bad_output", {}),
            "t-bad-args": call("t_add", {"a": "x"}),
            "t-denied": call("t_wrong_id", {}),
        }
        doc = {"mcp_servers": servers,
               "agents": [{"name": n, "models": [model(m)], "mcp": ["t"]} for n, m in agents.items()]}
        if ev is not None:
            servers["ev"] = {"url": ev + "/mcp", "prefix": "ev_"}
            for n, m in {"ev-echo": call("ev_echo", {"message": "hello %STEP%"}),
                         "ev-sum": call("ev_get-sum", {"a": 20, "b": 22}),
                         "ev-structured": call("ev_get-structured-content", {"location": "Chicago"})}.items():
                doc["agents"].append({"name": n, "models": [model(m)], "mcp": ["ev"]})
                agents[n] = m
        path = env.write_json("agents.json", doc)
        w = env.start_worker("w1", LONGRUN_AGENTS_FILE=path, MCP_TEST_TOKEN="s3cret-token",
                             LONGRUN_STEP_TIMEOUT_SECONDS=20)
        w.wait_event("mcp.ready", 30)
        names = list(agents)
        ids = dict(zip(names, env.enqueue_many([{"agent": n, "input": "mcp " + n} for n in names])))
        env.wait_all_terminal(len(names), 120)
        res = {n: tool_results(env, ids[n]) for n in names}
        for n in names:
            st = env.sql("select status, error from tasks where id = %s", (ids[n],))[0]
            h.eq(st["status"], "succeeded", "%s succeeds (%r)" % (n, st["error"]))

        h.eq([r["content"] for r in res["t-echo"]], ["echo: hi 1", "echo: hi 2"], "echo over JSON answers")
        add = res["t-add"][0]
        h.eq((add["content"], add.get("structured_content"), add.get("is_error")), ("5", {"sum": 5}, None),
             "add over SSE: text and structuredContent, checkpointed")
        h.eq(res["t-slow"][0]["content"], "slept 1500 ms", "a slow SSE answer within the timeout")
        h.check(res["t-slowest"][0].get("is_error") and "timed out" in res["t-slowest"][0]["content"],
                "a call past its timeout is an error: %r" % res["t-slowest"][0])
        h.check(res["t-malformed"][0].get("is_error") and "malformed" in res["t-malformed"][0]["content"],
                "a malformed answer is an error: %r" % res["t-malformed"][0]["content"][:200])
        h.check(res["t-big"][0]["content"].endswith("[truncated: result over 2000 bytes]"),
                "a long text is cut at max_result_bytes")
        h.check(res["t-huge"][0].get("is_error") and "over" in res["t-huge"][0]["content"],
                "an oversized response is an error: %r" % res["t-huge"][0]["content"][:200])
        h.check(res["t-bad-output"][0].get("is_error") and "outputSchema" in res["t-bad-output"][0]["content"],
                "structuredContent against outputSchema: %r" % res["t-bad-output"][0]["content"])
        h.check(res["t-bad-args"][0].get("is_error") and "parameters" in res["t-bad-args"][0]["content"],
                "arguments checked against the inputSchema: %r" % res["t-bad-args"][0]["content"])
        h.check(res["t-denied"][0].get("is_error") and "unknown or not allowed" in res["t-denied"][0]["content"],
                "a denied tool is not offered: %r" % res["t-denied"][0]["content"])
        stats = get(mcp + "/stats")
        h.check(not any("wrong_id" in k for k in stats["calls"]), "the denied tool never called")
        h.check(all(v == 1 for v in stats["calls"].values()), "each call made once: %r" % stats["calls"])
        h.check(set(stats["versions"]) == {"2025-06-18"}, "MCP-Protocol-Version on every request: %r"
                % set(stats["versions"]))
        key = "%s:1:0" % ids["t-add"]
        h.eq(stats["epochs"].get(key), 1, "the epoch in _meta")
        h.check("s3cret-token" not in w.log_text(), "the header secret is never logged")
        h.check(len(stats["cancelled"]) >= 1, "notifications/cancelled after a timed-out call")
        if ev is not None:
            h.eq(res["ev-echo"][0]["content"], "Echo: hello 1", "server-everything echo")
            h.check("42" in res["ev-sum"][0]["content"], "server-everything get-sum: %r" % res["ev-sum"][0])
            sc = res["ev-structured"][0]
            h.check(isinstance(sc.get("structured_content"), dict) and not sc.get("is_error"),
                    "server-everything structuredContent validated: %r" % sc)

        # session loss: the server forgets every session; the next call initializes again
        inits = stats["initialize"]
        get(mcp + "/control/forget")
        tid = env.enqueue_many([{"agent": "t-echo", "input": "after forget"}])[0]
        h.wait_for(lambda: env.sql("select status from tasks where id = %s", (tid,))[0]["status"] == "succeeded",
                   60, "a task after the session was lost")
        h.eq([r["content"] for r in tool_results(env, tid)], ["echo: hi 1", "echo: hi 2"], "answers after 404")
        h.eq(get(mcp + "/stats")["initialize"], inits + 1, "one new session")

        # kill -9 in the middle of MCP calls: completed steps are not called again
        slow = {"mcp_servers": {"t": {"url": mcp + "/mcp", "timeout_ms": 10000}},
                "agents": [{"name": "k", "models": [model(call("t_slow", {"ms": 700}, 8))], "mcp": ["t"]}]}
        kpath = env.write_json("agents-kill.json", slow)
        w.kill()
        w2 = env.start_worker("w2", LONGRUN_AGENTS_FILE=kpath, LONGRUN_LEASE_SECONDS=3)
        env.start_scheduler()
        tids = env.enqueue_many([{"agent": "k", "input": "kill %d" % i} for i in range(3)])
        h.wait_for(lambda: env.scalar("select count(*) from task_steps where task_id::text = any(%s)", (tids,)) >= 6, 60,
                   "some steps done")
        w2.kill()
        done_before = {(r["task_id"], r["step_no"]) for r in
                       env.sql("select task_id, step_no from task_steps where task_id::text = any(%s)", (tids,))}
        env.start_worker("w3", LONGRUN_AGENTS_FILE=kpath, LONGRUN_LEASE_SECONDS=3)
        h.wait_for(lambda: env.scalar("select count(*) from tasks where id::text = any(%s) and status = 'succeeded'",
                                      (tids,)) == 3, 120, "the killed tasks finish")
        calls = get(mcp + "/stats")["calls"]
        for tid_, step in done_before:
            key = "%s:%d:0" % (tid_, step)
            if key in calls:
                h.eq(calls[key], 1, "step %s:%d checkpointed before the kill: called once" % (tid_, step))
        h.log("kill: %d steps checkpointed before the kill, none called again" % len(done_before))


if __name__ == "__main__":
    h.run(test)

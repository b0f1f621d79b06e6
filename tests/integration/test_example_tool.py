"""Issue 18, item 6: the example tool server (examples/tools/tool_server.py) with a real fleet.

An agent (fixture model fixture-steps-3: a call to its first tool at steps 1 and 2, then
the answer) has one tool, the example server's ledger_append, made slow (3 s per real
execution). Worker w1 is killed -9 while the step-1 call is in progress at the tool. The
tool finishes that work anyway and stores its answer under the call's Idempotency-Key. A
second worker takes the task over (epoch 2) once the scheduler requeues it, runs step 1
again and sends the same key with the same arguments: the tool replays the stored answer
and does not execute again. The server's own counts prove it: exactly one execution (one
ledger entry) per idempotency key, and the checkpointed step holds the stored answer.

Then, directly against the server: a call with a lower epoch than the task's newest is
refused (409) whether or not its key has a stored answer; a key reused with other
arguments is refused (422); a call that arrives while the first with its key still works
waits and gets its answer; and a newer worker's call arriving while a zombie's call works
makes the zombie's work uncommitted (409) and does the work itself, once.
"""
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

SERVER = os.path.join(h.SOURCE, "examples", "tools", "tool_server.py")
WORK_MS = 3000
LEASE = 3


def post(url, key, task_id, epoch, args, raw=None):
    """POSTs a tool call like a worker does: (status, parsed JSON body, headers)."""
    data = raw if raw is not None else json.dumps(args).encode()
    req = urllib.request.Request(url + "/tools/ledger_append", data=data, method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("Idempotency-Key", key)
    req.add_header("X-Longrun-Task-Id", task_id)
    req.add_header("X-Longrun-Epoch", str(epoch))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=10) as r:
        return json.loads(r.read())


def in_thread(fn, *args):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn(*args)), daemon=True)
    t.start()
    return t, out


def test():
    with h.Env("example-tool") as env:
        env.start_fixture()
        portfile = os.path.join(env.dir, "tool.port")
        tool = env.start("aux-tool", [h.PY, SERVER, "--port", "0", "--port-file", portfile,
                                      "--db", os.path.join(env.dir, "tool.db"), "--work-ms", str(WORK_MS)])
        h.wait_for(lambda: os.path.exists(portfile) and open(portfile).read().strip(), 15, "tool server port")
        url = "http://127.0.0.1:%s" % open(portfile).read().strip()
        stats = lambda: get(url, "/stats")  # noqa: E731
        agents = env.write_json("agents.json", {
            "tools": {"ledger_append": {
                "description": "Append an entry to the ledger (a side effect: exactly once per call)",
                "parameters": {"type": "object"}, "url": url + "/tools/ledger_append",
                "timeout_ms": 20000, "retries": 2, "writes": True}},
            "agents": [{"name": "ledger", "models": [{"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1",
                                                      "model": "fixture-steps-3"}],
                        "tools": ["ledger_append"]}]})
        env.start_scheduler()
        w1 = env.start_worker("w1", LONGRUN_AGENTS_FILE=agents, LONGRUN_LEASE_SECONDS=LEASE)
        env.wait_queue("longrun.q.default", consumers=1)
        tid = env.enqueue_many([{"agent": "ledger", "input": "record two entries"}])[0]

        # w1 dies (kill -9) while its step-1 call is working at the tool
        h.wait_for(lambda: stats()["in_progress"] == 1, 30, "the step-1 tool call in progress")
        w1.kill()
        t_kill = time.time()
        h.eq(env.scalar("select count(*) from task_steps where task_id = %s", (tid,)), 0, "no step checkpointed yet")
        # the tool completes the work and stores the answer although its caller is gone
        h.wait_for(lambda: stats()["executions"] == 1, 15, "the first execution to commit")
        first = get(url, "/ledger?task_id=" + tid)["entries"]
        h.eq(len(first), 1, "one ledger entry")
        key1 = first[0]["idempotency_key"]
        h.eq((key1, first[0]["epoch"], first[0]["arguments"]), ("%s:1:0" % tid, 1, {"step": 1}),
             "the first entry: step 1's key, w1's epoch, the model's arguments")

        # w2 takes the task over (the scheduler requeues it when w1's lease expires) and re-runs step 1
        w2 = env.start_worker("w2", LONGRUN_AGENTS_FILE=agents)
        h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (tid,)) == "succeeded", 90,
                   "w2 finishes the task")
        h.log("task finished %.1f s after the kill" % (time.time() - t_kill))
        row = env.sql("select step, lease_epoch, result->>'answer' as answer from tasks where id = %s", (tid,))[0]
        h.eq((row["step"], row["answer"]), (3, "done after 3 steps"), "the task's row")
        h.check(row["lease_epoch"] >= 2, "w2 claimed the task with a newer epoch: %r" % row)
        h.check(w2.events("task.finished"), "w2 finished it")

        s = stats()
        entries = get(url, "/ledger?task_id=" + tid)["entries"]
        keys = [e["idempotency_key"] for e in entries]
        h.eq(keys, ["%s:1:0" % tid, "%s:2:0" % tid], "one ledger entry per idempotency key, steps 1 and 2")
        h.eq(entries[1]["epoch"], row["lease_epoch"], "step 2 executed by w2")
        h.eq((s["executions"], s["replays"], s["refused_stale_epoch"], s["aborted_stale_epoch"]), (2, 1, 0, 0),
             "exactly one execution per key; the re-run step 1 was a replay (%r)" % s)
        calls = [e for e in tool.events("tool.call") if e.get("key") == key1]
        h.eq([(c["epoch"], c["status"], c["outcome"]) for c in calls],
             [(1, 200, "executed"), (row["lease_epoch"], 200, "replayed")], "the calls with step 1's key")

        # the checkpointed step 1 holds the stored answer (entry 1), written by w2
        step1 = env.sql("select epoch, worker, messages from task_steps where task_id = %s and step_no = 1", (tid,))[0]
        h.eq((step1["epoch"], step1["worker"]), (row["lease_epoch"], "w2"), "step 1 checkpointed by w2")
        results = [m for m in step1["messages"] if m.get("role") == "tool"]
        h.eq(len(results), 1, "one tool result in step 1: %r" % step1["messages"])
        stored = json.loads(results[0]["content"])
        h.eq(stored, {"entry": 1, "task_id": tid, "recorded": {"step": 1}}, "step 1's result is the stored answer")

        # -- direct checks against the server --
        epoch = row["lease_epoch"]
        # a zombie (lower epoch): refused, with or without a stored answer for its key, nothing executed
        for key in (key1, "%s:9:0" % tid):
            st, body, hdr = post(url, key, tid, epoch - 1, {"step": 1})
            h.eq((st, body["error"]), (409, "stale_epoch"), "a lower epoch is refused (key %s)" % key)
            h.check("older than epoch %d" % epoch in body["message"], body["message"])
            h.eq(hdr.get("x-should-retry"), "false", "a refusal is not to be retried")
        # the current epoch: the stored answer, byte for byte the same; other arguments: 422
        st, body, hdr = post(url, key1, tid, epoch, None, raw=b'{ "step" : 1 }')
        h.eq((st, body, hdr.get("Idempotent-Replayed")), (200, stored, "true"), "same key, same arguments: replayed")
        st, body, hdr = post(url, key1, tid, epoch, {"step": 7})
        h.eq((st, body["error"]), (422, "idempotency_key_reused"), "same key, other arguments")
        # malformed calls: 400, nothing executed
        for headers_epoch, raw in (("x", b"{}"), (epoch, b"[1]"), (epoch, b"{nope")):
            st, body, _ = post(url, "%s:8:0" % tid, tid, headers_epoch, None, raw=raw)
            h.eq(st, 400, "a malformed call (%r, %r): %r" % (headers_epoch, raw, body))
        h.eq(stats()["executions"], 2, "none of the direct calls executed anything")

        # a retry while the first call with its key still works: waits, gets the same answer
        t1, r1 = in_thread(post, url, "retry:1:0", "t-retry", 1, {"n": 1})
        h.wait_for(lambda: stats()["in_progress"] == 1, 10, "the first call working")
        t2, r2 = in_thread(post, url, "retry:1:0", "t-retry", 1, {"n": 1})
        t1.join(30)
        t2.join(30)
        h.eq((r1["r"][0], r2["r"][0]), (200, 200), "both calls answered")
        h.eq(r2["r"][1], r1["r"][1], "the retry got the first call's answer")
        h.eq(r2["r"][2].get("Idempotent-Replayed"), "true", "the retry was a replay")
        h.eq(len(get(url, "/ledger?task_id=t-retry")["entries"]), 1, "one execution for the two calls")

        # a newer worker's call while a zombie's call with the same key works: the zombie's
        # work is not committed (409) and the newer call does it, once
        ta, ra = in_thread(post, url, "overlap:1:0", "t-overlap", 1, {"n": 2})
        h.wait_for(lambda: stats()["in_progress"] == 1, 10, "the zombie's call working")
        tb, rb = in_thread(post, url, "overlap:1:0", "t-overlap", 2, {"n": 2})
        ta.join(30)
        tb.join(30)
        h.eq((ra["r"][0], ra["r"][1]["error"]), (409, "stale_epoch"), "the zombie's call")
        h.check("not committed" in ra["r"][1]["message"], ra["r"][1]["message"])
        h.eq(rb["r"][0], 200, "the newer call")
        ov = get(url, "/ledger?task_id=t-overlap")["entries"]
        h.eq([(e["idempotency_key"], e["epoch"]) for e in ov], [("overlap:1:0", 2)], "one entry, the newer epoch's")
        s = stats()
        h.eq((s["executions"], s["aborted_stale_epoch"], s["in_progress"]), (4, 1, 0), "final counts %r" % s)

        # the tool server stops cleanly on SIGTERM
        tool.signal(15)
        h.eq(tool.wait(10), 0, "tool server exit code after SIGTERM")


h.run(test)

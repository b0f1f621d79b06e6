"""Issue 3: results reach the producer without polling (AMQP reply_to).

A producer (pika) publishes full task bodies with `reply_to` = its own
exclusive queue (named reply.<hex>, an allowed reply queue) and a `correlation_id`.  It must receive, for every task,
exactly one outcome message with the same correlation_id and message_id = the
task id, whose body is exactly the documented outcome object:

    {"id": "<task id>", "status": "succeeded|failed|dead|cancelled",
     "result": <JSON or null>, "error": "<text>" | null,
     "stop_reason": "<reason>" | null,
     "usage": {"steps": N, "tokens_in": N, "tokens_out": N, "cost_usd": X}}

Covered: tasks that succeed in one delivery and across slices (the outcome is
sent by whichever worker finishes, from the row's reply_to), tasks that
are dead-lettered (unknown agent, permanent tool error, attempts exhausted),
and a task the scheduler kills past its deadline (the scheduler sends it).
"""
import json
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

N = int(os.environ.get("LONGRUN_TEST_TASKS", "30"))
KEYS = {"id", "status", "result", "error", "stop_reason", "usage"}
USAGE_KEYS = {"steps", "tokens_in", "tokens_out", "cost_usd"}


def test():
    with h.Env("reply-to") as env:
        env.start_fixture()
        env.start_scheduler()
        env.start_worker("w1", LONGRUN_SLICE_STEPS=2, LONGRUN_RETRY_BASE_MS=50, LONGRUN_RETRY_MAX_MS=200)
        env.start_worker("w2", LONGRUN_SLICE_STEPS=2, LONGRUN_RETRY_BASE_MS=50, LONGRUN_RETRY_MAX_MS=200)
        env.wait_queue("longrun.q.default", consumers=2)

        conn = env.amqp()
        ch = conn.channel()
        # a reply queue: its name starts with LONGRUN_REPLY_TO_PREFIX (default "reply.")
        q = ch.queue_declare("reply.%s" % uuid.uuid4().hex, exclusive=True).method.queue

        expect = {}  # id -> (correlation_id, expected status, steps, stop_reason, error substring, result)
        bodies, props = [], []

        def add(body, status, steps, stop_reason=None, err=None, result=None):
            tid = str(uuid.uuid4())
            body = dict(body, id=tid)
            corr = "corr-%d-%s" % (len(bodies), tid[:8])
            expect[tid] = (corr, status, steps, stop_reason, err, result)
            bodies.append(json.dumps(body))
            props.append({"reply_to": q, "correlation_id": corr, "message_id": tid,
                          "content_type": "application/json"})

        for i in range(N):
            steps = 1 + i % 5  # 1..5 steps; with slices of 2, up to three deliveries
            add({"agent": "http-steps", "input": {"steps": steps}}, "succeeded", steps, result={"steps": steps})
        add({"agent": "no-such-agent", "input": {}}, "dead", 0, "unknown_agent", "unknown agent 'no-such-agent'")
        add({"agent": "http-steps", "input": {"steps": 2, "path": "/tools/fail-400"}}, "dead", 0,
            "permanent_error", "HTTP 400")
        add({"agent": "http-steps", "input": {"steps": 2, "path": "/tools/fail-503"}, "max_attempts": 2}, "dead", 0,
            "exhausted", "HTTP 503")
        # killed by the scheduler past its deadline while its step still runs: the scheduler sends the outcome
        soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3))
        add({"agent": "http-steps", "input": {"steps": 1, "path": "/tools/slow-8000"}, "deadline": soon}, "dead", 0,
            "deadline", "deadline passed")
        env.publish(bodies, props=lambda i, b: props[i], conn=conn)
        h.log("published %d tasks with reply_to %s" % (len(bodies), q))

        got = {}
        extra = []
        deadline = time.time() + 60 * h.TIMEOUT_MULT
        while len(got) < len(expect) and time.time() < deadline:
            method, pr, body = ch.basic_get(q, auto_ack=True)
            if method is None:
                conn.process_data_events(0.2)
                continue
            o = json.loads(body)
            if o.get("id") in got:
                extra.append(o)
            got[o.get("id")] = (pr, o)
        h.eq(len(got), len(expect), "outcomes received (missing: %r)" % [t for t in expect if t not in got][:5])
        # nothing more arrives (exactly one outcome per task)
        t_end = time.time() + 2
        while time.time() < t_end:
            method, pr, body = ch.basic_get(q, auto_ack=True)
            if method is None:
                conn.process_data_events(0.2)
                continue
            extra.append(json.loads(body))
        h.eq(extra, [], "duplicate outcomes")

        # an operator cancels a task that is not running: `longrun cancel` sends its outcome
        cid = str(uuid.uuid4())
        env.sql("insert into tasks (id, agent, input, status, step, suspend_reason, reply_to, correlation_id)"
                " values (%s, 'http-steps', '{\"steps\": 3}', 'suspended', 1, 'approval', %s, 'corr-cancel')",
                (cid, q))
        r = env.cli("cancel", cid, "--reason", "not needed", "--json")
        h.eq(r.returncode, 0, r.stderr)
        h.eq(json.loads(r.stdout), {"id": cid, "status": "cancelled", "outcome_sent": True}, "cancel --json")
        msg = None
        deadline = time.time() + 10
        while msg is None and time.time() < deadline:
            method, pr, body = ch.basic_get(q, auto_ack=True)
            if method is None:
                conn.process_data_events(0.2)
                continue
            msg = (pr, json.loads(body))
        h.check(msg is not None, "the cancelled task's outcome reached reply_to")
        h.eq(msg[1], {"id": cid, "status": "cancelled", "result": None, "error": "not needed",
                      "stop_reason": "cancelled", "usage": {"steps": 1, "tokens_in": 0, "tokens_out": 0, "cost_usd": 0}},
             "cancel outcome")
        h.eq((msg[0].correlation_id, msg[0].message_id), ("corr-cancel", cid), "cancel outcome properties")
        conn.close()

        rows = {r["id"]: r for r in env.sql("select id::text, status, step, stop_reason, result, error, tokens_in, "
                                             "tokens_out, cost_usd from tasks")}
        for tid, (corr, status, steps, stop_reason, err, result) in expect.items():
            pr, o = got[tid]
            h.eq(set(o), KEYS, "outcome keys of %s" % tid)
            h.eq(set(o["usage"]), USAGE_KEYS, "usage keys of %s" % tid)
            h.eq(pr.correlation_id, corr, "correlation_id of %s" % tid)
            h.eq(pr.message_id, tid, "message_id of %s" % tid)
            h.eq(pr.content_type, "application/json", "content_type of %s" % tid)
            h.eq(o["id"], tid, "outcome id")
            h.eq(o["status"], status, "status of %s (%r)" % (tid, o))
            h.eq(o["status"], rows[tid]["status"], "outcome status matches the row")
            h.eq(o["usage"]["steps"], steps, "usage.steps of %s" % tid)
            h.eq(o["usage"]["steps"], rows[tid]["step"], "usage.steps matches the row")
            h.eq(o["usage"]["tokens_in"], rows[tid]["tokens_in"], "usage.tokens_in")
            h.eq(o["usage"]["tokens_out"], rows[tid]["tokens_out"], "usage.tokens_out")
            h.eq(o["result"], result, "result of %s" % tid)
            h.eq(o["stop_reason"], stop_reason, "stop_reason of %s" % tid)
            if err is None:
                h.eq(o["error"], None, "error of %s" % tid)
            else:
                h.check(err in (o["error"] or ""), "error of %s: %r should mention %r" % (tid, o["error"], err))
            if status == "dead":
                h.eq(rows[tid]["stop_reason"], stop_reason, "row stop_reason")
        h.log("%d outcomes received, each exactly once, as documented" % len(got))

        # a clean exit (and, under ASan, no leak report) for every process
        for p in env.procs:
            if p.name != "fixture" and p.alive():
                p.signal(15)
        for p in env.procs:
            if p.name != "fixture":
                h.eq(p.wait(30), 0, "%s exit code after SIGTERM" % p.name)


h.run(test)

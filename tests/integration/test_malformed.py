"""Issue 3: malformed messages interleaved with good tasks.

A foreign producer (pika) publishes straight to exchange longrun.tasks,
routing key `default`: LONGRUN_TEST_BAD (default 100) malformed messages of
many kinds, interleaved with good tasks.  Proves:

- every good task succeeds;
- every bad message becomes exactly one `dead_letters` row whose raw_body is
  the exact bytes sent, with a reason (bad_json, invalid, oversized,
  unknown_task) and an error that names the problem (the field, the limit);
  the copy the worker publishes to longrun.dlx is ingested by the scheduler
  into the same row (no second row);
- nothing is left in the task queue (no requeue loop), and the worker never
  restarted (one process, one `worker.started`, no failed dead-letter record);
- a full-body task naming an unknown agent becomes a task row with status
  `dead`, stop_reason `unknown_agent`, and a dead letter pointing at it.

What the worker does with a body without `id` (decided here, see worker.c
on_delivery): if the AMQP message_id property is a UUID, that is the task id
(the contract says message_id = task id), so the task runs; otherwise the
message is dead-lettered as `invalid` ("id: required ..."), because without an
id a redelivery could not be recognised and the task would run twice.
"""
import json
import os
import sys
import uuid

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

N_BAD = int(os.environ.get("LONGRUN_TEST_BAD", "100"))
GOOD_EVERY = 2  # one good task after every GOOD_EVERY bad messages


def uid():
    return str(uuid.uuid4())


def good(i):
    return {"id": uid(), "agent": "http-steps", "input": {"steps": 2, "n": i}}


# Each kind: (name, builder(i) -> (body bytes, extra props), reason, error substring).
def kinds():
    def j(o):
        return json.dumps(o).encode()

    return [
        ("not_json", lambda i: (b"this is not json #%d" % i, {}), "bad_json", "not valid JSON"),
        ("binary", lambda i: (b"\xff\x00\xfe" + os.urandom(40) + b"%d" % i, {}), "bad_json", "not valid JSON"),
        ("truncated", lambda i: (b'{"id":"%s","agent":"http-steps","input":{"steps":' % uid().encode(), {}),
         "bad_json", "not valid JSON"),
        ("trailing", lambda i: (j({"id": uid()}) + b" trailing%d" % i, {}), "bad_json", "trailing data"),
        # empty (the first time), then whitespace only: "empty" / "not valid JSON"
        ("empty", lambda i: (b" " * (i // 25), {"message_id": uid()}), "bad_json", "JSON"),
        ("array", lambda i: (j([i, "agent", "http-steps"]), {}), "invalid", "must be a JSON object"),
        ("scalar", lambda i: (j("task %d" % i), {}), "invalid", "must be a JSON object"),
        ("no_agent", lambda i: (j({"id": uid(), "input": {"steps": 1}}), {}), "invalid", "agent: required"),
        ("bad_agent", lambda i: (j({"id": uid(), "agent": "Bad Agent %d" % i, "input": {}}), {}), "invalid",
         "agent: must be"),
        ("no_input", lambda i: (j({"id": uid(), "agent": "http-steps"}), {}), "invalid", "input: required"),
        ("bad_id", lambda i: (j({"id": "not-a-uuid-%d" % i, "agent": "http-steps", "input": {}}), {}), "invalid",
         "id: must be a UUID"),
        ("unknown_field", lambda i: (j({"id": uid(), "agent": "http-steps", "input": {}, "colour": i}), {}),
         "invalid", 'unknown field "colour"'),
        # a long non-ASCII field name: the error quotes at most 64 bytes of it
        ("unknown_field_utf8", lambda i: (j({"id": uid(), "agent": "http-steps", "input": {},
                                            "\u00fc" * 40 + str(i): 1}), {}), "invalid", "unknown field"),
        ("oversized", lambda i: (j({"id": uid(), "agent": "http-steps",
                                    "input": {"steps": 1, "pad": "x" * (300 * 1024), "n": i}}), {}),
         "oversized", "over the limit of 262144 bytes"),
        ("too_deep", lambda i: (j({"id": uid(), "agent": "http-steps", "input": {"n": i, "d": json.loads(
            "[" * 40 + "]" * 40)}}), {}), "oversized", "deeper than 32"),
        ("budget_range", lambda i: (j({"id": uid(), "agent": "http-steps", "input": {"n": i},
                                       "budgets": {"max_steps": 0}}), {}), "invalid", "budgets.max_steps"),
        ("budget_unknown", lambda i: (j({"id": uid(), "agent": "http-steps", "input": {"n": i},
                                         "budgets": {"max_bananas": 3}}), {}), "invalid", "budgets.max_bananas"),
        ("budget_type", lambda i: (j({"id": uid(), "agent": "http-steps", "input": {"n": i},
                                      "budgets": {"max_tokens": "many"}}), {}), "invalid", "budgets.max_tokens"),
        ("max_attempts", lambda i: (j({"id": uid(), "agent": "http-steps", "input": {"n": i},
                                       "max_attempts": 0}), {}), "invalid", "max_attempts"),
        ("deadline_shape", lambda i: (j({"id": uid(), "agent": "http-steps", "input": {"n": i},
                                         "deadline": "tomorrow"}), {}), "invalid", "deadline"),
        # RFC 3339 shaped but not a real time: PostgreSQL refuses it
        ("deadline_range", lambda i: (j({"id": uid(), "agent": "http-steps", "input": {"n": i},
                                         "deadline": "2026-13-45T25:61:61Z"}), {}),
         "invalid", "deadline: PostgreSQL cannot store it"),
        # valid JSON that PostgreSQL's jsonb cannot store
        ("nul_escape", lambda i: (j({"id": uid(), "agent": "http-steps", "input": {"steps": 1, "s": "a\u0000b",
                                                                                   "n": i}}), {}),
         "invalid", "\\u0000"),
        ("bad_utf8", lambda i: (b'{"id":"%s","agent":"http-steps","input":{"s":"\xc3\x28\xff","n":%d}}'
                                % (uid().encode(), i), {}), "invalid", "input: PostgreSQL cannot store it"),
        ("no_id", lambda i: (j({"agent": "http-steps", "input": {"steps": 1, "n": i}}), {}), "invalid",
         "id: required"),
        ("unknown_task", lambda i: (j({"id": uid()}), {}), "unknown_task", "unknown task"),
    ]


def test():
    with h.Env("malformed") as env:
        env.start_fixture()
        sched = env.start_scheduler()
        w = env.start_worker("w1")
        env.wait_queue("longrun.q.default")
        env.wait_queue("longrun.dead")

        ks = kinds()
        bad = []      # (kind, body, reason, substring, props)
        goods = []
        msgs = []     # (body, props)
        for i in range(N_BAD):
            name, build, reason, sub = ks[i % len(ks)]
            body, props = build(i)
            bad.append((name, body, reason, sub, props))
            msgs.append((body, props))
            if i % GOOD_EVERY == GOOD_EVERY - 1:
                g = good(i)
                goods.append(g["id"])
                msgs.append((json.dumps(g).encode(), {"message_id": g["id"], "content_type": "application/json"}))
        # a body without id whose message_id is a UUID: the message_id is the task id
        mid_task = uid()
        msgs.append((json.dumps({"agent": "http-steps", "input": {"steps": 1}}).encode(), {"message_id": mid_task}))
        goods.append(mid_task)
        # an unknown agent in a well-formed full body: a task row, dead-lettered
        unknown = uid()
        msgs.append((json.dumps({"id": unknown, "agent": "no-such-agent", "input": {}}).encode(), {}))
        h.eq(len(set(b for b, _ in msgs)), len(msgs), "every message body is unique")

        env.publish([b for b, _ in msgs], props=lambda i, b: dict(msgs[i][1]))
        h.log("published %d bad and %d good messages" % (len(bad), len(goods) + 1))

        def settled():
            rows = env.scalar("select count(*) from dead_letters where task_id is null or task_id <> %s", (unknown,))
            st = env.status_counts()
            return rows >= len(bad) and st.get("succeeded", 0) >= len(goods) and st.get("dead", 0) >= 1 and (rows, st)
        h.wait_for(settled, 90, "dead letters and good tasks")

        # the DLX copies are ingested by the scheduler into the same rows (the
        # ingest stores the DLX message's headers in x_death; these producers
        # sent none, so a NULL x_death means "not ingested yet")
        h.wait_for(lambda: env.scalar("select count(*) from dead_letters where x_death is null") == 0, 30,
                   "every DLX copy ingested by the scheduler")
        h.wait_for(lambda: (env.queue_counts("longrun.dead") or (1,))[0] == 0, 30, "longrun.dead drained")

        st = {r["id"]: r["status"] for r in env.sql("select id::text, status from tasks")}
        for t in goods:
            h.eq(st.get(t), "succeeded", "good task %s" % t)
        env.check_step_log()

        rows = env.sql("select id, reason, error, raw_body, message_id, source, task_id::text, x_death "
                       "from dead_letters where task_id is null or task_id <> %s", (unknown,))
        by_body = {}
        for r in rows:
            by_body.setdefault(bytes(r["raw_body"]) if r["raw_body"] is not None else None, []).append(r)
        h.eq(len(rows), len(bad), "one dead_letters row per bad message (rows: %r)" %
             [(r["reason"], r["error"]) for r in rows if r["raw_body"] is None][:5])
        for name, body, reason, sub, props in bad:
            found = by_body.get(body)
            h.check(found is not None and len(found) == 1, "%s: exactly one dead letter with the raw body (%r)"
                    % (name, body[:80]))
            r = found[0]
            h.eq(r["reason"], reason, "%s: reason (error %r)" % (name, r["error"]))
            h.check(sub in (r["error"] or ""), "%s: error %r should mention %r" % (name, r["error"], sub))
            if props.get("message_id"):
                h.eq(r["message_id"], props["message_id"], "%s: message_id kept" % name)
        ingested = sum(1 for r in rows if r["x_death"] is not None)
        h.log("dead letters: %d rows, %d also seen on longrun.dead; reasons %r" % (
            len(rows), ingested, sorted({(n, r) for n, _, r, _, _ in bad})[:3]))

        t = env.sql("select status, stop_reason, error from tasks where id = %s", (unknown,))
        h.eq(t[0]["status"], "dead", "unknown agent task status")
        h.eq(t[0]["stop_reason"], "unknown_agent", "unknown agent stop reason")
        dl = env.sql("select reason, error from dead_letters where task_id = %s", (unknown,))
        h.eq(len(dl), 1, "unknown agent: one dead letter")
        h.eq(dl[0]["reason"], "unknown_agent", "unknown agent dead letter reason")
        h.check("no-such-agent" in dl[0]["error"], "unknown agent error names it: %r" % dl[0]["error"])

        h.eq(env.queue_counts("longrun.q.default")[0], 0, "task queue empty (no requeue loop)")
        h.check(w.alive(), "worker alive")
        h.eq(len(w.events("worker.started")), 1, "worker started once")
        h.eq(w.events("dead_letter.record_failed"), [], "no failed dead-letter records")
        h.eq(sched.events("dlq.ingest_failed"), [], "no failed ingests")
        h.check(sched.alive(), "scheduler alive")

        # a clean exit (and, under ASan, no leak report) for every process
        for p in env.procs:
            if p.name != "fixture" and p.alive():
                p.signal(15)
        for p in env.procs:
            if p.name != "fixture":
                h.eq(p.wait(30), 0, "%s exit code after SIGTERM" % p.name)


h.run(test)

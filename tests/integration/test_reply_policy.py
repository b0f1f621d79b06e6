"""Issue 15, item 2: reply_to cannot make a worker publish into any queue.

A producer sets reply_to on its task; the outcome goes there only if it is an
allowed reply queue: RabbitMQ's direct reply-to (amq.rabbitmq.reply-to) or a
name starting with LONGRUN_REPLY_TO_PREFIX (default "reply."), and never one
of longrun's own queues.  Anything else is refused: nothing is published, the
worker logs task.reply_refused, counts longrun_replies_total{outcome=
"refused"}, and records a task_events row (reason reply_to_refused); the task
itself still succeeds.  Replies are mandatory: an allowed name without a
queue comes back from the broker and is logged (task.reply_failed).

Checked for the worker (task queue longrun.q.default, an arbitrary queue, a
server-named queue refused; reply.* and direct reply-to delivered; a reply.*
name without a queue returned), the scheduler (a task it kills past its
deadline) and `longrun cancel`; and the prefix setting's validation.
"""
import json
import os
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402


def metric(text, name, **labels):
    want = name + "{" + ",".join('%s="%s"' % kv for kv in sorted(labels.items())) + "}"
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def test():
    with h.Env("reply-policy") as env:
        import pika
        env.start_fixture()
        port = h.free_port()
        # The worker consumes queue "work" only: longrun.q.default has no
        # consumer, so anything published into it stays there.
        env.start_worker("w1", LONGRUN_QUEUES="work", LONGRUN_HTTP_PORT=port)
        env.start_scheduler(LONGRUN_QUEUES="work")
        env.wait_queue("longrun.q.work", consumers=1)

        conn = env.amqp()
        ch = conn.channel()
        # longrun.q.default is declared with longrun's own arguments when missing
        if env.queue_counts("longrun.q.default") is None:
            ch.queue_declare("longrun.q.default", durable=True,
                             arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": "longrun.dlx",
                                        "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish",
                                        "x-delivery-limit": 20})
        h.eq(env.queue_counts("longrun.q.default"), (0, 0), "longrun.q.default: empty, no consumer")
        tag = uuid.uuid4().hex[:8]
        allowed = ch.queue_declare("reply." + tag, exclusive=True).method.queue
        victim = ch.queue_declare("victim." + tag, durable=False).method.queue
        server_named = ch.queue_declare("", exclusive=True).method.queue  # amq.gen-...
        missing = "reply.missing-" + tag  # allowed name, no such queue

        expect = {}  # id -> reply_to
        bodies, props = [], []

        def add(reply_to, steps=2, **extra):
            tid = str(uuid.uuid4())
            expect[tid] = reply_to
            bodies.append(json.dumps(dict({"id": tid, "agent": "http-steps", "input": {"steps": steps}}, **extra)))
            props.append({"reply_to": reply_to, "correlation_id": "c-" + tid[:8], "message_id": tid,
                          "content_type": "application/json"})
            return tid

        t_allowed = add(allowed)
        t_default = add("longrun.q.default")
        t_victim = add(victim)
        t_server = add(server_named)
        t_missing = add(missing)
        env.publish(bodies, routing_key="work", props=lambda i, b: props[i])

        # direct reply-to: consume the pseudo-queue and publish on the same channel
        direct_got = []
        ch.basic_consume("amq.rabbitmq.reply-to", lambda c, m, p, b: direct_got.append((p, json.loads(b))),
                         auto_ack=True)
        t_direct = str(uuid.uuid4())
        ch.basic_publish("longrun.tasks", "work",
                         json.dumps({"id": t_direct, "agent": "http-steps", "input": {"steps": 1}}),
                         pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id="c-direct",
                                              message_id=t_direct, delivery_mode=2))
        expect[t_direct] = "amq.rabbitmq.reply-to"

        # the scheduler's refusal: killed past its deadline while its step runs
        soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3))
        t_deadline = str(uuid.uuid4())
        env.publish([{"id": t_deadline, "agent": "http-steps", "input": {"steps": 1, "path": "/tools/slow-8000"},
                      "deadline": soon}], routing_key="work",
                    props={"reply_to": victim, "message_id": t_deadline})

        def finished():
            conn.process_data_events(0.1)
            rows = env.sql("select id::text, status from tasks")
            return len(rows) == len(expect) + 1 and all(r["status"] in ("succeeded", "dead") for r in rows) and rows
        rows = h.wait_for(finished, 60 * h.TIMEOUT_MULT, "every task to finish")
        status = {r["id"]: r["status"] for r in rows}
        for tid in expect:
            h.eq(status[tid], "succeeded", "task %s with reply_to %s still succeeds" % (tid, expect[tid]))
        h.eq(status[t_deadline], "dead", "the deadline task")

        # the allowed reply queue and direct reply-to got their outcomes
        def got_allowed():
            conn.process_data_events(0.1)
            m = ch.basic_get(allowed, auto_ack=True)
            return m if m[0] is not None else None
        m = h.wait_for(got_allowed, 15, "the outcome in %s" % allowed)
        o = json.loads(m[2])
        h.eq((o["id"], o["status"], m[1].correlation_id), (t_allowed, "succeeded", "c-" + t_allowed[:8]),
             "outcome in the reply.* queue")
        h.wait_for(lambda: conn.process_data_events(0.1) or direct_got, 15, "the direct reply-to outcome")
        h.eq((direct_got[0][1]["id"], direct_got[0][1]["status"], direct_got[0][0].correlation_id),
             (t_direct, "succeeded", "c-direct"), "direct reply-to outcome")

        # the refused ones: recorded on the task, nothing published anywhere
        refused = {t_default: "longrun.q.default", t_victim: victim, t_server: server_named, t_deadline: victim}

        def recorded():
            ev = env.sql("select task_id::text, from_status, to_status, actor, detail from task_events"
                         " where reason = 'reply_to_refused'")
            return len(ev) >= len(refused) and ev
        ev = {e["task_id"]: e for e in h.wait_for(recorded, 15, "reply_to_refused events")}
        h.eq(sorted(ev), sorted(refused), "the tasks with a refused reply_to")
        for tid, q in refused.items():
            e = ev[tid]
            h.eq(e["detail"]["reply_to"], q, "detail.reply_to of %s" % tid)
            h.check("not an allowed reply queue" in e["detail"]["error"] or "longrun's own" in e["detail"]["error"],
                    "detail.error of %s: %r" % (tid, e["detail"]["error"]))
            h.eq((e["from_status"], e["to_status"]), (status[tid], status[tid]), "statuses of the event")
        h.eq(ev[t_default]["actor"], "w1", "the worker recorded its refusal")
        h.check(ev[t_deadline]["actor"].startswith("scheduler:"), "the scheduler recorded its refusal: %r" %
                ev[t_deadline]["actor"])
        conn.process_data_events(1)
        for q in ("longrun.q.default", victim):
            h.eq(env.queue_counts(q)[0], 0, "messages published into %s" % q)
        h.eq(ch.basic_get(server_named, auto_ack=True)[0], None, "a message published into %s" % server_named)
        h.eq(env.sql("select count(*) as n from dead_letters where source = 'worker'")[0]["n"], 0,
             "no outcome came back to a worker as a malformed task")

        w = [p for p in env.procs if p.name == "w1"][0]
        for tid in (t_default, t_victim, t_server):
            h.check(any(tid in e.get("msg", "") for e in w.events("task.reply_refused")),
                    "task.reply_refused logged for %s" % tid)
        h.wait_for(lambda: any(t_missing in e.get("msg", "") for e in w.events("task.reply_failed")), 15,
                   "task.reply_failed for the reply queue that does not exist")

        want = {"refused": 3.0, "sent": 2.0, "failed": 1.0}

        def counted():
            st, text = h.http_get(port, "/metrics")
            got = {k: metric(text, "longrun_replies_total", outcome=k) for k in want} if st == 200 else None
            if got != want:
                h.log("replies in /metrics: %r" % got)
            return got == want or None
        # (a confirm reaches the worker after the reply reached its consumer)
        h.wait_for(counted, 10, "longrun_replies_total %r in /metrics" % want)

        # longrun cancel: an operator cancels a suspended task whose reply_to is a task queue
        cid = str(uuid.uuid4())
        env.sql("insert into tasks (id, agent, input, status, step, suspend_reason, reply_to)"
                " values (%s, 'http-steps', '{\"steps\": 3}', 'suspended', 1, 'approval', 'longrun.q.default')",
                (cid,))
        r = env.cli("cancel", cid, "--actor", "ops", "--json")
        h.eq(r.returncode, 0, r.stderr)
        h.eq(json.loads(r.stdout), {"id": cid, "status": "cancelled", "outcome_sent": False}, "cancel --json")
        h.check("not sent" in r.stderr and "longrun.q.default" in r.stderr, "cancel warns: %r" % r.stderr)
        e = env.sql("select actor, detail from task_events where task_id = %s and reason = 'reply_to_refused'",
                    (cid,))
        h.eq([(x["actor"], x["detail"]["reply_to"]) for x in e], [("ops", "longrun.q.default")], "cancel's record")
        h.eq(env.queue_counts("longrun.q.default")[0], 0, "messages in longrun.q.default after the cancel")
        conn.close()

        # the prefix setting names reply queues only
        def check_config(prefix):
            return subprocess.run([os.path.join(h.BUILD, "longrun-worker"), "--check-config"],
                                  env=env.base_env(LONGRUN_REPLY_TO_PREFIX=prefix), capture_output=True, text=True,
                                  timeout=30)
        for bad in ("longrun.", "longrun.q.", "l", "reply.,,x.", ","):
            r = check_config(bad)
            h.eq(r.returncode, 2, "LONGRUN_REPLY_TO_PREFIX=%s: %s" % (bad, r.stderr))
            h.check("LONGRUN_REPLY_TO_PREFIX" in r.stderr, r.stderr)
        for good in ("reply.", "reply.,rpc-", "none"):
            r = check_config(good)
            h.eq(r.returncode, 0, "LONGRUN_REPLY_TO_PREFIX=%s: %s" % (good, r.stderr))


h.run(test)

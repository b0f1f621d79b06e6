"""Issue 5: the scheduler (real servers, two scheduler instances).

1. Broker-made dead letter: a message on a quorum queue with a low
   x-delivery-limit is rejected with requeue by a foreign consumer until the
   broker dead-letters it to longrun.dlx; the scheduler records it in
   dead_letters with the broker's reason (x-death: delivery_limit), the queue,
   the raw body and source `broker`.
2. Timers: a durable sleep (a `suspended` row with resume_at = now() + 2 s)
   resumes on time (within a second); retry backoff is honoured: tasks whose
   tool fails with 503 for the first 2 calls of each step (/tools/flaky-2) go
   running -> retry_wait (resume_at set) -> queued (retry_due) no earlier than
   resume_at and promptly after it, then succeed.
3. Leader failover: kill -9 of the leading scheduler; the standby logs
   scheduler.leader within seconds and carries on (everything below runs
   under the new leader).
4. Lease recovery: kill -9 of a worker holding leased tasks; the other worker
   resumes each of them within its lease expiry plus one sweep (+ slack);
   they all finish with contiguous step logs.
5. Mass resume: LONGRUN_TEST_RESUME (CI: 2,000; the issue's figure: 10,000)
   suspended tasks due at once are resumed in bounded batches (at most
   LONGRUN_SWEEP_BATCH per statement) while new tasks keep flowing through the
   same queue; prints the resume rate and the new tasks' latency.
"""
import json
import os
import signal
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

N_RESUME = int(os.environ.get("LONGRUN_TEST_RESUME", "2000"))
SWEEP_MS = 200
BATCH = 500
LEASE = 4
WENV = dict(LONGRUN_LEASE_SECONDS=LEASE, LONGRUN_RETRY_BASE_MS=1500, LONGRUN_RETRY_MAX_MS=4000,
            LONGRUN_SLICE_STEPS=100)


def sched_id(p):
    return p.events("scheduler.started")[0]["worker"]


def part_broker_dead_letter(env):
    import pika
    conn = env.amqp()
    ch = conn.channel()
    q = "test.delivery-limit"
    ch.queue_declare(q, durable=True, arguments={
        "x-queue-type": "quorum", "x-delivery-limit": 2, "x-dead-letter-exchange": "longrun.dlx",
        "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
    mid = str(uuid.uuid4())
    body = json.dumps({"poison": True, "n": mid}).encode()
    ch.confirm_delivery()
    ch.basic_publish("", q, body, pika.BasicProperties(message_id=mid, delivery_mode=2,
                                                       content_type="application/json"), mandatory=True)
    nacks = 0
    deadline = time.time() + 20
    while time.time() < deadline:
        method, _, _ = ch.basic_get(q)
        if method is None:
            if ch.queue_declare(q, passive=True).method.message_count == 0:
                break
            time.sleep(0.05)
            continue
        ch.basic_nack(method.delivery_tag, requeue=True)
        nacks += 1
    conn.close()
    row = h.wait_for(lambda: env.sql("select reason, queue, source, raw_body, death_count, message_id, x_death "
                                     "from dead_letters where message_id = %s", (mid,)), 20,
                     "the broker's dead letter recorded")
    r = row[0]
    h.eq(r["reason"], "delivery_limit", "broker's reason")
    h.eq(r["queue"], q, "queue it died in")
    h.eq(r["source"], "broker", "source")
    h.eq(bytes(r["raw_body"]), body, "raw body")
    h.check("x-death" in (r["x_death"] or {}), "x-death headers kept: %r" % r["x_death"])
    h.log("broker dead letter after %d rejections: reason %s, death_count %r" % (nacks, r["reason"], r["death_count"]))


def part_timers(env, leader):
    # a durable sleep due in 2 s
    sid = str(uuid.uuid4())
    due = env.scalar("insert into tasks (id, agent, input, status, step, suspend_reason, resume_at) values "
                     "(%s, 'http-steps', '{\"steps\": 1}', 'suspended', 0, 'sleep', now() + interval '2 seconds') "
                     "returning resume_at", (sid,))
    # retries with backoff
    ids = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 1, "path": "/tools/flaky-2"},
                             "max_attempts": 5} for _ in range(6)])
    seen = {}  # (task, attempt) -> resume_at while in retry_wait
    t_end = time.time() + 60 * h.TIMEOUT_MULT
    while time.time() < t_end:
        for r in env.sql("select id::text, attempt, resume_at, status from tasks where id = any(%s::uuid[])", (ids,)):
            if r["status"] == "retry_wait" and r["resume_at"] is not None:
                seen.setdefault((r["id"], r["attempt"]), r["resume_at"])
        done = env.scalar("select count(*) from tasks where (id = any(%s::uuid[]) or id = %s) and status = 'succeeded'",
                          (ids, sid))
        if done == len(ids) + 1:
            break
        time.sleep(0.05)
    h.eq(env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and status = 'succeeded'", (ids,)),
         len(ids), "retried tasks succeeded")
    ev = env.sql("select at, actor from task_events where task_id = %s and reason = 'resumed:sleep'", (sid,))
    h.eq(len(ev), 1, "sleep resumed once")
    late = (ev[0]["at"] - due).total_seconds()
    h.check(0 <= late <= 1.0 * h.TIMEOUT_MULT, "sleep(2) resumed %.3f s after it was due" % late)
    h.eq(ev[0]["actor"], sched_id(leader), "resumed by the leader")
    h.log("sleep(2) resumed %.0f ms after its due time" % (late * 1000))
    # each retry_wait -> queued happened at or after resume_at, promptly
    waits = env.sql("select task_id::text, count(*) as n from task_events where task_id = any(%s::uuid[]) "
                    "and to_status = 'retry_wait' group by task_id", (ids,))
    h.check(all(w["n"] == 2 for w in waits) and len(waits) == len(ids), "two retry_waits per task: %r" % waits)
    checked = []
    for (tid, attempt), resume_at in seen.items():
        # the resume of attempt `attempt` is the attempt-th retry_due event of the task
        dues = env.sql("select at from task_events where task_id = %s and reason = 'retry_due' order by id", (tid,))
        at = dues[attempt - 1]["at"]
        d = (at - resume_at).total_seconds()
        checked.append(d)
        h.check(d >= 0, "retry resumed %.3f s BEFORE its resume_at" % -d)
        h.check(d <= 1.0 * h.TIMEOUT_MULT, "retry resumed %.3f s after its resume_at" % d)
    h.check(len(checked) >= 6, "backoffs observed in retry_wait: %d" % len(checked))
    delays = env.sql("select extract(epoch from (q.at - w.at)) as d from task_events w join lateral "
                     "(select at from task_events q where q.task_id = w.task_id and q.id > w.id and "
                     "q.reason = 'retry_due' order by q.id limit 1) q on true where w.task_id = any(%s::uuid[]) "
                     "and w.to_status = 'retry_wait'", (ids,))
    h.log("retry backoff honoured: %d resumes at +%.0f..%.0f ms after resume_at; backoffs %.2f..%.2f s "
          "(full jitter, base 1.5 s)" % (len(checked), min(checked) * 1000, max(checked) * 1000,
                                          min(float(x["d"]) for x in delays), max(float(x["d"]) for x in delays)))


def part_failover(env, s1, s2):
    h.eq(s2.events("scheduler.leader"), [], "the standby is not leading")
    t0 = time.time()
    s1.kill()
    s2.wait_event("scheduler.leader", 10)
    took = time.time() - t0
    h.check(took < 5, "standby took over in %.1f s" % took)
    h.log("leader killed (-9); standby leads after %.2f s" % took)


def part_lease_recovery(env, leader):
    wa = env.start_worker("lease-a", LONGRUN_MAX_IN_FLIGHT=50, **WENV)
    env.wait_queue(consumers=2)
    ids = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 3, "path": "/tools/slow-1500"}}
                            for _ in range(10)])
    h.wait_for(lambda: env.scalar("select count(*) from tasks where lease_owner = 'lease-a' and id = any(%s::uuid[])",
                                  (ids,)) >= 3, 20, "lease-a holds tasks")
    killed_at = env.scalar("select now()")
    wa.kill()
    # (read after the kill: no renewal can move these any more)
    held = env.sql("select id::text, lease_expires_at from tasks where lease_owner = 'lease-a' and status = 'running'")
    h.log("killed lease-a holding %d leased tasks" % len(held))

    def resumed():
        out = {}
        for t in held:
            r = env.sql("select at from task_events where task_id = %s and actor <> 'lease-a' and at > %s and "
                        "to_status = 'running' order by id limit 1", (t["id"], killed_at))
            if r:
                out[t["id"]] = r[0]["at"]
        return len(out) == len(held) and out
    got = h.wait_for(resumed, LEASE + 20, "every leased task resumed by another worker", interval=0.1)
    worst = 0
    for t in held:
        after_expiry = (got[t["id"]] - t["lease_expires_at"]).total_seconds()
        worst = max(worst, after_expiry)
        h.check(after_expiry <= SWEEP_MS / 1000.0 + 1.0 * h.TIMEOUT_MULT,
                "task %s resumed %.2f s after its lease expired" % (t["id"], after_expiry))
        h.check((got[t["id"]] - killed_at).total_seconds() <= LEASE + SWEEP_MS / 1000.0 + 1.0 * h.TIMEOUT_MULT,
                "resumed within lease + one sweep")
    h.wait_for(lambda: env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and status = 'succeeded'",
                                  (ids,)) == len(ids), 60, "recovered tasks finished")
    env.check_step_log()
    rec = env.scalar("select count(*) from task_events where reason = 'lease_expired' and actor = %s",
                     (sched_id(leader),))
    h.check(rec >= len(held), "the new leader recovered them (%d lease_expired events)" % rec)
    h.log("lease recovery: %d tasks resumed at most %.2f s after their lease expired (lease %d s, sweep %d ms)"
          % (len(held), worst, LEASE, SWEEP_MS))


def part_mass_resume(env, leader):
    stop = threading.Event()
    latencies = []
    errors = []
    # New work goes to its own queue and worker, so that its latency measures
    # what the burst does to the shared parts (PostgreSQL, the scheduler, the
    # broker), not the FIFO backlog of the burst's own queue (that is capacity:
    # more workers).
    env.start_worker("fresh", args=["--queue", "fresh"], LONGRUN_MAX_IN_FLIGHT=50, **WENV)
    env.wait_queue("longrun.q.fresh")

    def producer():
        while not stop.is_set():
            try:
                t0 = time.time()
                [tid] = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 1}, "metadata": {"new": True}}],
                                         queue="fresh")
                latencies.append((tid, t0, time.time() - t0))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
            stop.wait(0.2)

    th = threading.Thread(target=producer, daemon=True)
    th.start()
    time.sleep(1)
    env.sql("insert into tasks (id, agent, input, status, step, suspend_reason, resume_at) "
            "select gen_random_uuid(), 'http-steps', '{\"steps\": 1}', 'suspended', 0, 'sleep', now() "
            "from generate_series(1, %s)", (N_RESUME,))
    t_ins = env.scalar("select now()")
    h.log("inserted %d suspended tasks due now" % N_RESUME)

    def all_resumed():
        n = env.scalar("select count(*) from task_events where reason = 'resumed:sleep' and at >= %s", (t_ins,))
        return n >= N_RESUME and n
    h.wait_for(all_resumed, 120, "%d resumes" % N_RESUME, interval=0.5)
    ev = env.sql("select at, count(*) as n from task_events where reason = 'resumed:sleep' and at >= %s "
                 "group by at order by at", (t_ins,))
    last = ev[-1]["at"]
    span = (last - t_ins).total_seconds()
    rate = N_RESUME / max(span, 0.001)
    h.check(max(e["n"] for e in ev) <= BATCH, "each sweep resumed at most %d (saw %d)" % (
        BATCH, max(e["n"] for e in ev)))
    # new tasks keep coming until the resumed ones have all run
    h.wait_for(lambda: env.scalar("select count(*) from tasks where status not in ('succeeded', 'dead') "
                                  "and metadata is null") == 0, 300, "the resumed tasks finished", interval=0.5)
    stop.set()
    th.join(30)
    h.wait_for(lambda: env.scalar("select count(*) from tasks where status not in ('succeeded', 'dead')") == 0,
               60, "everything finished", interval=0.5)
    drained = env.scalar("select extract(epoch from max(finished_at) - %s) from tasks where metadata is null",
                         (t_ins,))
    h.eq(errors, [], "producer errors")
    new = env.sql("select id::text, extract(epoch from (finished_at - created_at)) as e2e from tasks "
                  "where metadata ? 'new'")
    h.check(len(new) >= 5, "new tasks flowed during the burst (%d)" % len(new))
    e2e = sorted(float(r["e2e"]) for r in new)
    enq = sorted(x[2] for x in latencies)
    h.eq(env.scalar("select count(*) from tasks where status = 'succeeded'"), env.scalar("select count(*) from tasks "
         "where status <> 'dead'"), "everything succeeded")
    env.check_step_log()
    h.log("RESULT mass resume: %d tasks due at once resumed in %.2f s = %.0f tasks/s, %d sweeps of <= %d, "
          "all run by one worker %.1f s after they were due; %d new tasks meanwhile: enqueue %.0f/%.0f ms "
          "(median/max), end-to-end %.2f/%.2f s (median/max)" % (
              N_RESUME, span, rate, len(ev), BATCH, float(drained), len(new), enq[len(enq) // 2] * 1000,
              enq[-1] * 1000, e2e[len(e2e) // 2], e2e[-1]))
    h.check(e2e[-1] < 5 * h.TIMEOUT_MULT, "new tasks' latency stayed bounded (max %.1f s)" % e2e[-1])
    h.check(enq[-1] < 5 * h.TIMEOUT_MULT, "enqueue never stalled behind the resume burst (max %.1f s)" % enq[-1])


def test():
    with h.Env("scheduler") as env:
        env.start_fixture()
        s1 = env.start_scheduler("s1", LONGRUN_SWEEP_INTERVAL_MS=SWEEP_MS, LONGRUN_SWEEP_BATCH=BATCH)
        s1.wait_event("scheduler.leader", 10)
        s2 = env.start_scheduler("s2", LONGRUN_SWEEP_INTERVAL_MS=SWEEP_MS, LONGRUN_SWEEP_BATCH=BATCH)
        s2.wait_event("amqp.connected", 10)
        env.start_worker("w1", LONGRUN_MAX_IN_FLIGHT=256, **WENV)
        env.wait_queue()
        part_broker_dead_letter(env)
        part_timers(env, s1)
        part_failover(env, s1, s2)
        part_lease_recovery(env, s2)
        part_mass_resume(env, s2)
        h.check(s2.alive(), "the new leader is alive")
        # clean exits (under ASan: no leak report) of everything still running
        live = [p for p in env.procs if p.name != "fixture" and p.alive()]
        for p in live:
            p.signal(signal.SIGTERM)
        for p in live:
            h.eq(p.wait(30), 0, "%s exit code after SIGTERM" % p.name)


h.run(test)

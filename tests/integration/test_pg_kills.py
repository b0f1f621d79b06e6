"""Issue 16 (3): a connection lost after COMMIT was sent does not drop a
task's follow-ups.

Phase 1, deterministic: a worker talks to PostgreSQL through a proxy that
lets each of the first TRIPS transitions to `dead` reach the server, drops
the answer and resets the connection.  The transition committed; the worker
sends it again after reconnecting, changes nothing, and must find from the
row that its first attempt committed: every task still gets its dead letter
and its one reply.

Phase 2, random: two workers run tasks with reply_to set on every one of them, while a killer
terminates one of the workers' PostgreSQL backends (pg_terminate_backend)
every few tens of milliseconds.  Some of the kills land between a terminal
write (a checkpoint or a transition to dead) and its answer: the worker sends
the statement again, finds nothing to change, and must decide from the row
that the first attempt committed -- and then still send the outcome and the
dead letter.  Every producer gets exactly one reply per task, with the status
of the task's final row.
"""
import json
import os
import random
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

N = int(os.environ.get("LONGRUN_TEST_TASKS", "120"))


def killer(env, stop, kills):
    import psycopg2
    db = psycopg2.connect(env.db_url)
    db.autocommit = True
    cur = db.cursor()
    while not stop.is_set():
        cur.execute("select pid from pg_stat_activity where datname = current_database()"
                    " and application_name = 'longrun-worker' and pid <> pg_backend_pid()")
        pids = [r[0] for r in cur.fetchall()]
        if pids:
            cur.execute("select pg_terminate_backend(%s)", (random.choice(pids),))
            kills.append(time.time())
        time.sleep(random.uniform(0.02, 0.08))
    db.close()


TRIPS = 6


def collect(conn, ch, q, n, timeout):
    """Replies from q until n distinct task ids or timeout, then 2 s more for
    duplicates.  Returns ({id: outcome}, [duplicates])."""
    got, dup = {}, []
    deadline = time.time() + timeout * h.TIMEOUT_MULT
    settle = None
    while time.time() < deadline and (settle is None or time.time() < settle):
        method, pr, body = ch.basic_get(q, auto_ack=True)
        if method is None:
            conn.process_data_events(0.2)
            continue
        o = json.loads(body)
        (dup.append(o) if o["id"] in got else got.__setitem__(o["id"], o))
        if len(got) >= n and settle is None:
            settle = time.time() + 2
    return got, dup


def tasks(q, kinds):
    bodies, props, ids = [], [], []
    for kind in kinds:
        tid = str(uuid.uuid4())
        if kind == "dead":  # dead by a transition (permanent tool error)
            body = {"agent": "http-steps", "input": {"steps": 2, "path": "/tools/fail-400"}}
        else:               # 1..3 steps, succeeded by a checkpoint
            body = {"agent": "http-steps", "input": {"steps": kind, "path": "/tools/slow-150"}}
        body["id"] = tid
        ids.append(tid)
        bodies.append(json.dumps(body))
        props.append({"reply_to": q, "correlation_id": "c-" + tid, "message_id": tid,
                      "content_type": "application/json"})
    return bodies, props, ids


def phase_trips(env):
    import urllib.parse
    p = urllib.parse.urlparse(env.db_url)
    proxy = h.Proxy(p.hostname, p.port or 5432)
    proxied = env.db_url.replace(":%d/" % (p.port or 5432), ":%d/" % proxy.port)
    proxy.trip("UPDATE tasks SET status = CASE WHEN (cancel_requested", TRIPS)  # SQL_TRANSITION
    w0 = env.start_worker("w0", LONGRUN_DATABASE_URL=proxied, LONGRUN_PG_POOL_SIZE=1)
    env.wait_queue("longrun.q.default", consumers=1)
    conn = env.amqp()
    ch = conn.channel()
    q = ch.queue_declare("reply.%s" % uuid.uuid4().hex, exclusive=True).method.queue
    bodies, props, ids = tasks(q, ["dead"] * TRIPS)
    env.publish(bodies, props=lambda i, b: props[i], conn=conn)
    got, dup = collect(conn, ch, q, len(ids), 60)
    conn.close()
    h.eq(proxy.tripped, TRIPS, "every transition to dead lost its answer once")
    h.eq(sorted(set(ids) - set(got)), [], "a reply for every task whose transition's answer was lost")
    h.eq(dup, [], "exactly one reply per task")
    h.eq(sorted(o["status"] for o in got.values()), ["dead"] * TRIPS, "the replies say dead")
    h.eq(env.scalar("select count(*) from dead_letters where task_id = any(%s::uuid[])", (ids,)), TRIPS,
         "dead letters recorded")
    recovered = len(w0.events("task.transition_recovered"))
    h.check(recovered >= 1, "the worker found committed transitions after the lost answers (%d)" % recovered)
    h.log("phase 1: %d answers dropped, %d transitions found committed, %d replies" % (proxy.tripped, recovered,
                                                                                     len(got)))
    w0.signal(__import__("signal").SIGTERM)
    h.eq(w0.wait(30), 0, "w0 exits 0")


def phase_kills(env):
    for name in ("w1", "w2"):
        env.start_worker(name, LONGRUN_SLICE_STEPS=2, LONGRUN_RETRY_BASE_MS=50, LONGRUN_RETRY_MAX_MS=200,
                         LONGRUN_PG_POOL_SIZE=2)
    env.wait_queue("longrun.q.default", consumers=2)
    conn = env.amqp()
    ch = conn.channel()
    q = ch.queue_declare("reply.%s" % uuid.uuid4().hex, exclusive=True).method.queue
    bodies, props, ids = tasks(q, [("dead" if i % 4 == 3 else 1 + i % 4) for i in range(N)])
    stop, kills = threading.Event(), []
    t = threading.Thread(target=killer, args=(env, stop, kills), daemon=True)
    t.start()
    env.publish(bodies, props=lambda i, b: props[i], conn=conn)
    got, dup = collect(conn, ch, q, len(ids), 150)
    stop.set()
    t.join(10)
    conn.close()
    h.log("phase 2: %d backend kills; %d replies" % (len(kills), len(got)))
    h.check(len(kills) >= 10, "the killer really killed (%d)" % len(kills))
    rows = {r["id"]: r for r in env.sql("select id::text, status from tasks")}
    missing = [(i, rows.get(i, {}).get("status")) for i in ids if i not in got]
    h.eq(missing, [], "a reply for every task (missing, with their status)")
    h.eq(dup, [], "exactly one reply per task")
    for tid in ids:
        h.eq(got[tid]["status"], rows[tid]["status"], "reply status = the final row's status (%s)" % tid)


def test():
    with h.Env("pg-kills") as env:
        env.start_fixture()
        env.start_scheduler(LONGRUN_SWEEP_INTERVAL_MS=200)
        phase_trips(env)
        phase_kills(env)
        env.check_step_log()


h.run(test)

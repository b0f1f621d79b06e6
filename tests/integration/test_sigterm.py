"""Issue 3: graceful shutdown.

1. Drain: two workers run tasks of K short steps (slow-300 tool calls, so
   many steps are in flight).  w1 gets SIGTERM mid-run.  It must exit 0 well
   within LONGRUN_DRAIN_SECONDS; each task ends succeeded with exactly K
   contiguous step rows; every step's idempotency key reached the tool exactly
   once (no step lost or repeated: in-flight steps finished and were
   checkpointed, the rest was handed back with a continuation); w2 finished
   everything.  No scheduler runs in this phase, so nothing can be rescued by
   an outbox or lease sweep: the drain itself must hand every task back.
2. Deadline: steps longer than the drain deadline (slow-4000, drain 1 s) are
   abandoned without a checkpoint at the deadline and their leases released;
   the worker still exits 0 promptly; the other worker reruns those steps
   (same idempotency key: the only keys seen twice are the abandoned steps).
3. A second SIGTERM during the drain exits at once.
"""
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

N = int(os.environ.get("LONGRUN_TEST_TASKS", "120"))
K = 6


def keys_for(env, ids, prefix):
    ids = set(ids)
    return Counter(r["headers"].get("idempotency-key") for r in env.fixture_requests(prefix)
                   if r["headers"].get("x-longrun-task-id") in ids)


def wait_done(env, ids, timeout):
    def done():
        n = env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and status = 'succeeded'", (list(ids),))
        return n == len(ids) and n
    h.wait_for(done, timeout, "%d tasks succeeded" % len(ids), interval=0.3)


def phase_drain(env, w2):
    drain = 5
    w1 = env.start_worker("w1", LONGRUN_MAX_IN_FLIGHT=20, LONGRUN_SLICE_STEPS=100, LONGRUN_DRAIN_SECONDS=drain)
    env.wait_queue(consumers=2)
    ids = env.enqueue_many([{"agent": "http-steps", "input": {"steps": K, "path": "/tools/slow-300"}}
                            for _ in range(N)])
    h.wait_for(lambda: env.scalar("select count(*) from task_steps where worker = 'w1'") >= 20, 30,
               "w1 has done some steps")
    t0 = time.time()
    w1.signal(signal.SIGTERM)
    rc = w1.wait(drain + 10)
    took = time.time() - t0
    h.eq(rc, 0, "w1 exit code after SIGTERM")
    h.check(took < drain + 2, "w1 exited in %.1f s (drain %d s)" % (took, drain))
    h.check(w1.events("worker.drained"), "w1 drained cleanly")
    h.eq(w1.events("worker.drain_deadline"), [], "no step needed abandoning")
    h.log("w1 drained and exited 0 in %.2f s" % took)
    wait_done(env, ids, 90)
    env.check_step_log()
    h.eq(env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and step <> %s", (ids, K)), 0,
         "K steps each")
    keys = keys_for(env, ids, "/tools/slow-300")
    h.eq(len(keys), N * K, "every step called the tool")
    h.eq([k for k, n in keys.items() if n != 1], [], "idempotency keys called more than once")
    drained = env.scalar("select count(*) from task_events where reason = 'drain' and actor = 'w1' "
                         "and task_id = any(%s::uuid[])", (ids,))
    h.log("phase 1: %d tasks handed back by w1's drain; %d steps by w1, %d by w2" % (
        drained, env.scalar("select count(*) from task_steps where worker = 'w1'"),
        env.scalar("select count(*) from task_steps where worker = 'w2'")))
    h.check(drained > 0, "w1 handed tasks back")
    h.check(w2.alive(), "w2 alive")


def phase_drain_claiming(env, w2):
    """SIGTERM while claims are in flight: a run whose claim commits after the
    drain began is handed back untouched, and its task must be published again
    (there is no scheduler here to find it).  The test holds row locks on the
    tasks so that the workers' claims wait, signals w5, then lets them go."""
    import psycopg2
    w5 = env.start_worker("w5", LONGRUN_MAX_IN_FLIGHT=50, LONGRUN_SLICE_STEPS=100, LONGRUN_DRAIN_SECONDS=10)
    env.wait_queue(consumers=2)
    ids = [str(uuid.uuid4()) for _ in range(40)]
    env.sql("insert into tasks (id, agent, input, published_at) select x::uuid, 'http-steps', "
            "'{\"steps\": 1}'::jsonb, now() from unnest(%s::text[]) x", (ids,))
    lock = psycopg2.connect(env.db_url)
    cur = lock.cursor()
    cur.execute("select id from tasks where id = any(%s::uuid[]) for update", (ids,))
    env.publish([json.dumps({"id": t}) for t in ids], props=lambda i, b: {"message_id": ids[i]})
    h.wait_for(lambda: env.scalar("select count(*) from pg_stat_activity where wait_event_type = 'Lock' "
                                  "and datname = current_database()") >= 2, 20, "claims waiting on the row locks")
    w5.signal(signal.SIGTERM)
    w5.wait_event("worker.draining", 5)
    lock.rollback()
    lock.close()
    h.eq(w5.wait(15), 0, "w5 exit code")
    untouched = env.scalar("select count(*) from task_events where actor = 'w5' and reason = 'drain'")
    h.check(untouched > 0, "w5 handed back tasks it claimed while draining")
    wait_done(env, ids, 30)
    h.eq(env.scalar("select count(*) from task_steps where worker = 'w5'"), 0, "w5 ran no step while draining")
    h.log("claims during drain: %d tasks handed back untouched by w5 and finished by w2" % untouched)


def phase_deadline(env, w2):
    drain = 1
    w3 = env.start_worker("w3", LONGRUN_MAX_IN_FLIGHT=10, LONGRUN_SLICE_STEPS=100, LONGRUN_DRAIN_SECONDS=drain)
    env.wait_queue(consumers=2)
    # w2 is busy with nothing; give the tasks to w3 by publishing while w2 is
    # still running: some land on each.  Wait until w3 is inside a step.
    ids = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 2, "path": "/tools/slow-4000"}}
                            for _ in range(10)])
    h.wait_for(lambda: env.scalar("select count(*) from tasks where lease_owner = 'w3'") >= 1, 20,
               "w3 holds a task")
    time.sleep(0.5)
    t0 = time.time()
    w3.signal(signal.SIGTERM)
    rc = w3.wait(drain + 15)
    took = time.time() - t0
    h.eq(rc, 0, "w3 exit code")
    h.check(took < drain + 4, "w3 exited in %.1f s (drain %d s)" % (took, drain))
    h.check(w3.events("worker.drain_deadline"), "w3 reached its drain deadline")
    abandoned = env.sql("select task_id::text from task_events where reason = 'abandoned' and actor = 'w3'")
    h.check(abandoned, "w3 abandoned its running steps")
    h.eq(env.scalar("select count(*) from task_steps where worker = 'w3'"), 0,
         "no checkpoint by w3 (its steps were cut at the deadline)")
    h.log("w3 abandoned %d step(s) at its %d s deadline and exited 0 in %.2f s" % (len(abandoned), drain, took))
    wait_done(env, ids, 60)
    env.check_step_log()
    keys = keys_for(env, ids, "/tools/slow-4000")
    twice = {k for k, n in keys.items() if n > 1}
    h.check(all(n <= 2 for n in keys.values()), "a step ran at most twice")
    h.check({k.split(":")[0] for k in twice} <= {a["task_id"] for a in abandoned},
            "only abandoned steps ran twice")
    h.check(w2.alive(), "w2 alive")


def phase_second_signal(env):
    w4 = env.start_worker("w4", LONGRUN_MAX_IN_FLIGHT=5, LONGRUN_DRAIN_SECONDS=60, LONGRUN_LEASE_SECONDS=3)
    env.wait_queue(consumers=2)
    env.enqueue_many([{"agent": "http-steps", "input": {"steps": 1, "path": "/tools/slow-10000"}}
                      for _ in range(4)])
    h.wait_for(lambda: env.scalar("select count(*) from tasks where lease_owner = 'w4'") >= 1, 20,
               "w4 holds a task")
    w4.signal(signal.SIGTERM)
    w4.wait_event("worker.draining", 5)
    t0 = time.time()
    w4.signal(signal.SIGTERM)
    rc = w4.wait(5)
    took = time.time() - t0
    h.check(rc is not None, "w4 exited after the second SIGTERM")
    h.check(took < 1.5, "second SIGTERM exits at once (%.2f s)" % took)
    h.check(w4.events("worker.exit_now"), "w4 says it exits now")
    h.log("second SIGTERM: exit code %d after %.2f s" % (rc, took))


def test():
    with h.Env("sigterm") as env:
        env.start_fixture()
        w2 = env.start_worker("w2", LONGRUN_MAX_IN_FLIGHT=20, LONGRUN_SLICE_STEPS=100)
        phase_drain(env, w2)
        phase_drain_claiming(env, w2)
        phase_deadline(env, w2)
        phase_second_signal(env)


h.run(test)

"""Issue 16 (1): infrastructure hand-backs do not spend the poison budget.

One long task is drained DRAINS times in a row: each time a fresh worker
claims it, gets SIGTERM while the task's step (longer than the drain
deadline) runs, abandons the step at the deadline and hands the task back.
The quorum queue dead-letters a message after x-delivery-limit (20) requeues,
so if a hand-back gave the delivery back to the broker (nack/requeue), the
21st drain would turn a healthy task into `broker:delivery_limit`.  A
hand-back is a confirmed continuation plus an ack instead; the task must
finish `succeeded` with contiguous steps, no dead letter, no attempt spent.
"""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

DRAINS = int(os.environ.get("LONGRUN_TEST_DRAINS", "30"))
STEPS = 2


def test():
    with h.Env("drains") as env:
        env.start_fixture()
        env.start_scheduler()
        tid = env.enqueue_many([{"agent": "http-steps", "input": {"steps": STEPS, "path": "/tools/slow-2500"}}])[0]
        t0 = time.time()
        for i in range(DRAINS):
            w = env.start_worker("d%d" % i, LONGRUN_DRAIN_SECONDS=1)
            h.wait_for(lambda: env.scalar("select lease_owner from tasks where id = %s", (tid,)) == "d%d" % i, 30,
                       "drain %d: d%d holds the task" % (i + 1, i))
            w.signal(signal.SIGTERM)
            rc = w.wait(20)
            h.eq(rc, 0, "drain %d: d%d exits 0" % (i + 1, i))
            h.check(w.events("worker.drain_deadline"), "drain %d: the step outlived the drain deadline" % (i + 1))
            h.eq(env.scalar("select status from tasks where id = %s", (tid,)), "queued",
                 "drain %d: the task is queued again" % (i + 1))
        h.log("%d drains in %.1f s" % (DRAINS, time.time() - t0))
        h.eq(env.scalar("select count(*) from task_events where task_id = %s and reason = 'abandoned'", (tid,)),
             DRAINS, "one abandoned hand-back per drain")
        env.start_worker("last")
        h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (tid,)) in
                   ("succeeded", "dead", "failed"), 60, "the task finishes")
        row = env.sql("select status, stop_reason, attempt, step from tasks where id = %s", (tid,))[0]
        h.eq(row["status"], "succeeded", "succeeded after %d drains (%r)" % (DRAINS, row))
        h.eq(row["attempt"], 0, "no attempt spent")
        h.eq(env.scalar("select count(*) from dead_letters"), 0, "no dead letter")
        env.check_step_log(STEPS)


h.run(test)

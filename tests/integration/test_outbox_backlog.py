"""Issue 16 item 2: the outbox does not multiply a backlog.

N tasks (LONGRUN_TEST_BACKLOG, CI 3,000; the issue's figure 20,000) are
enqueued with `longrun enqueue` (each confirmed, then marked published) while
no worker runs and a scheduler sweeps with LONGRUN_OUTBOX_GRACE_SECONDS=1.
They wait 15 s, more than 10 x the grace (after which the old outbox
republished every confirmed task still queued, batch after batch), then one
worker drains them.  Asserted: the number of messages published to the queue
(management API, message_stats.publish) equals N, the queue depth (ready +
unacknowledged, sampled while waiting and draining) never exceeds N, every
task succeeded and none is dead.  Printed: enqueue and drain rates.

A second part checks the outbox still does its job: a task recorded with
published_at NULL (its publish never confirmed) is dispatched after the grace,
exactly once.
"""
import os
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

N = int(os.environ.get("LONGRUN_TEST_BACKLOG", "3000"))
Q = "longrun.q.default"


def main():
    with h.Env("outbox") as env:
        env.start_fixture("--record", "0")
        sched = env.start_scheduler(LONGRUN_OUTBOX_GRACE_SECONDS=1, LONGRUN_SWEEP_INTERVAL_MS=200)
        sched.wait_event("scheduler.leader", 30)

        t0 = time.time()
        env.enqueue_many([{"agent": "http-steps", "input": {"steps": 1}} for _ in range(N)])
        t_enq = time.time() - t0
        h.log("enqueued %d tasks in %.1f s (%.0f/s)" % (N, t_enq, N / t_enq))
        h.eq(env.scalar("SELECT count(*) FROM tasks WHERE published_at IS NULL"), 0, "every enqueue confirmed")

        peak = {"depth": 0, "samples": 0}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                c = env.queue_counts(Q)  # ready, exact and current
                qi = env.queue_info(Q) or {}  # ready + unacked, lags a few seconds
                depth = max(c[0] if c else 0, qi.get("messages", 0) or 0)
                peak["depth"] = max(peak["depth"], depth)
                peak["samples"] += 1
                stop.wait(0.5)
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            time.sleep(15)  # a fixed wait on purpose: the backlog must age past 10 x the grace
            h.check(peak["depth"] <= N, "queue depth %d exceeded the %d tasks while no worker ran"
                    % (peak["depth"], N))
            t1 = time.time()
            env.start_worker(LONGRUN_MAX_IN_FLIGHT=200)
            env.wait_all_terminal(N, 300)
            t_drain = time.time() - t1
        finally:
            stop.set()
            th.join(5)
        h.log("one worker drained %d tasks in %.1f s (%.0f/s); peak depth %d over %d samples"
              % (N, t_drain, N / t_drain, peak["depth"], peak["samples"]))

        counts = env.status_counts()
        h.eq(counts.get("succeeded", 0), N, "all succeeded: %r" % counts)
        h.eq(env.scalar("SELECT count(*) FROM dead_letters"), 0, "no dead letters")
        h.check(peak["depth"] <= N, "queue depth never exceeded the task count: peak %d" % peak["depth"])

        # the management API's publish counter lags (statistics every 5 s): wait until it is steady
        def published():
            qi = env.queue_info(Q) or {}
            return (qi.get("message_stats") or {}).get("publish", 0)
        last = [None, time.time()]

        def steady():
            p = published()
            if p != last[0]:
                last[0], last[1] = p, time.time()
            return p >= N and time.time() - last[1] > 6 and p
        pub = h.wait_for(steady, 60, "the publish counter to settle", interval=1)
        h.log("messages published to %s: %d for %d tasks (outbox republished %s)"
              % (Q, pub, N, sched.events("scheduler.dispatched")[-1:]))
        h.eq(pub, N, "one message per task, nothing republished")

        # The outbox still dispatches what was never confirmed, once.
        tid = str(uuid.uuid4())
        env.sql("INSERT INTO tasks (id, queue, agent, input) VALUES (%s, 'default', 'http-steps',"
                " '{\"steps\": 1}'::jsonb)", (tid,))
        h.wait_for(lambda: env.scalar("SELECT status FROM tasks WHERE id = %s", (tid,)) == "succeeded", 30,
                   "the unconfirmed task dispatched by the outbox")
        h.wait_for(lambda: published() >= N + 1, 30, "its publish counted")
        time.sleep(7)
        h.eq(published(), N + 1, "dispatched once")


if __name__ == "__main__":
    h.run(main)

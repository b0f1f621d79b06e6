"""Issue 3 chaos: the worker-run workload while one worker is kill -9'ed and
restarted every few seconds.

Two workers (LONGRUN_MAX_IN_FLIGHT=20 each, slices of 4 steps, 3 s leases) and
a scheduler (expired-lease recovery) run N tasks x 10 steps against a fixture
with 100 ms of tool latency; worker `chaos-K` is SIGKILLed every KILL_EVERY
seconds and a fresh one started.  Proves: every task succeeds with exactly 10
contiguous step rows; the only steps that ran twice are ones in flight at a
kill (same idempotency key), so their number is at most kills x in-flight;
the stable worker never died.  Prints the number of steps that ran twice.
"""
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

N = int(os.environ.get("LONGRUN_TEST_TASKS", "400"))
STEPS = 10
IN_FLIGHT = 20
KILL_EVERY = float(os.environ.get("LONGRUN_TEST_KILL_EVERY", "2"))
WORKER_ENV = dict(LONGRUN_MAX_IN_FLIGHT=IN_FLIGHT, LONGRUN_SLICE_STEPS=4, LONGRUN_LEASE_SECONDS=3)


def test():
    with h.Env("chaos-kill") as env:
        env.start_fixture("--tool-latency-ms", "100", "--record", str(N * STEPS * 3))
        # a kill between a slice's release and its continuation's confirm leaves
        # a queued, unpublished task: the outbox sweep republishes it after the grace
        env.start_scheduler(LONGRUN_OUTBOX_GRACE_SECONDS=3)
        stable = env.start_worker("stable", **WORKER_ENV)
        gen = 0
        victim = env.start_worker("chaos-0", **WORKER_ENV)
        env.wait_queue(consumers=2)
        t0 = time.time()
        ids = env.enqueue_many([{"agent": "http-steps", "input": {"steps": STEPS}} for _ in range(N)])
        h.eq(len(ids), N, "enqueued")
        kills = 0
        in_flight_at_kills = []
        next_kill = time.time() + KILL_EVERY
        while True:
            c = env.status_counts()
            if c.get("succeeded", 0) + c.get("dead", 0) + c.get("failed", 0) >= N:
                break
            h.check(time.time() - t0 < 240 * h.TIMEOUT_MULT, "workload did not finish: %r" % c)
            h.check(stable.alive(), "the stable worker died")
            if time.time() >= next_kill and c.get("succeeded", 0) < N * 0.95:
                running = env.scalar("select count(*) from tasks where lease_owner = %s and status = 'running'",
                                     ("chaos-%d" % gen,))
                victim.kill()
                kills += 1
                in_flight_at_kills.append(running)
                gen += 1
                victim = env.start_worker("chaos-%d" % gen, **WORKER_ENV)
                next_kill = time.time() + KILL_EVERY
            time.sleep(0.2)
        el = time.time() - t0
        c = env.status_counts()
        h.eq(c.get("succeeded"), N, "all succeeded: %r" % c)
        env.check_step_log(expect_steps=STEPS)
        h.eq(env.scalar("select count(*) from task_steps"), N * STEPS, "step rows")
        h.check(kills >= 2, "the run outlived at least two kills (%d)" % kills)

        reqs = env.fixture_requests("/step")
        keys = Counter(r["headers"].get("idempotency-key") for r in reqs)
        h.eq(len(keys), N * STEPS, "every step reached the tool")
        twice = sum(n - 1 for n in keys.values() if n > 1)
        h.check(max(keys.values()) <= 1 + kills, "no step ran more often than there were kills")
        bound = kills * IN_FLIGHT
        h.log("RESULT chaos: %d tasks x %d steps in %.1f s with %d kill -9 (tasks leased by the victim at each "
              "kill: %r); steps that ran twice: %d (bound: kills x in-flight = %d)" % (
                  N, STEPS, el, kills, in_flight_at_kills, twice, bound))
        h.check(twice <= bound, "steps run twice (%d) exceed kills x in-flight (%d)" % (twice, bound))
        # the repeated steps were attempted under different epochs (a new claim each time)
        epochs = {}
        for r in reqs:
            k = r["headers"].get("idempotency-key")
            if keys[k] > 1:
                epochs.setdefault(k, set()).add(r["headers"].get("x-longrun-epoch"))
        h.check(all(len(v) == keys[k] for k, v in epochs.items()), "each repeat of a step came from a new claim")
        h.check(stable.alive(), "stable worker alive")
        h.eq(len(stable.events("worker.started")), 1, "stable worker never restarted")


h.run(test)

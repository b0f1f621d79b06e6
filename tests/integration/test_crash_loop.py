"""Issue 3: a poison task that crashes its worker every time is dead-lettered
with reason crash_loop after the configured number of claims.

Workers run with LONGRUN_TEST_HOOKS=1 (the http-steps input `crash_at_step`
makes the worker abort() when it reaches that step), LONGRUN_MAX_CLAIMS=4 and
3 s leases; a scheduler recovers expired leases; the test restarts every
worker that dies.  The poison task checkpoints step 1 (progress: its claim
count goes back to 0), then crashes whoever runs step 2: the claim that made
progress crashes, then MAX_CLAIMS claims without progress crash, and the next
claim (MAX_CLAIMS + 1 without progress) dead-letters it: status dead,
stop_reason crash_loop, a dead_letters row, no step 2 row.

Good tasks share the workers and die with them at every crash.  They must all
succeed: a task whose last two claims made no progress is a "suspect", and a
worker runs at most one suspect at a time until it checkpoints (the others
wait unclaimed), so the poison cannot drag the claim counts of its bystanders
up to the limit with it.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

MAX_CLAIMS = 4  # >= 4: see the bystander bound in docs/architecture.md ("Suspects")
GOOD = int(os.environ.get("LONGRUN_TEST_TASKS", "60"))
WENV = dict(LONGRUN_TEST_HOOKS=1, LONGRUN_MAX_CLAIMS=MAX_CLAIMS, LONGRUN_LEASE_SECONDS=3, LONGRUN_SLICE_STEPS=3,
            LONGRUN_MAX_IN_FLIGHT=20)


def test():
    with h.Env("crash-loop") as env:
        env.start_fixture("--tool-latency-ms", "50")
        env.start_scheduler()
        workers = {}
        gens = {"a": 0, "b": 0}

        def start(slot):
            name = "%s%d" % (slot, gens[slot])
            workers[slot] = env.start_worker(name, **WENV)

        start("a")
        start("b")
        env.wait_queue(consumers=2)
        [poison] = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 3, "crash_at_step": 2}}])
        good = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 8}} for _ in range(GOOD)])
        t0 = time.time()
        crashes = 0
        while True:
            st = env.scalar("select status from tasks where id = %s", (poison,))
            if st in ("dead", "succeeded", "failed"):
                break
            h.check(time.time() - t0 < 90 * h.TIMEOUT_MULT, "poison task still %s after %d crashes" % (st, crashes))
            for slot, w in list(workers.items()):
                if not w.alive():
                    crashes += 1
                    gens[slot] += 1
                    start(slot)
            time.sleep(0.2)
        h.log("poison task %s after %.1f s and %d worker crashes" % (st, time.time() - t0, crashes))
        row = env.sql("select status, stop_reason, error, step, claims, claims_total from tasks where id = %s",
                      (poison,))[0]
        h.eq(row["status"], "dead", "poison status")
        h.eq(row["stop_reason"], "crash_loop", "poison stop_reason")
        h.eq(row["step"], 1, "step 1 stays checkpointed, step 2 never was")
        dl = env.sql("select reason, error, source from dead_letters where task_id = %s", (poison,))
        h.eq(len(dl), 1, "one dead letter")
        h.eq(dl[0]["reason"], "crash_loop", "dead letter reason")
        h.check("(limit %d)" % MAX_CLAIMS in dl[0]["error"], "error states the limit: %r" % dl[0]["error"])
        # every worker crash is the poison task's doing
        crash_lines = [e for w in env.procs if w.name[0] in "ab" for e in w.events("test.crash")]
        h.eq(len(crash_lines), MAX_CLAIMS + 1, "crashes caused by the poison task after its last progress")
        h.check(all(poison in e["msg"] for e in crash_lines), "only the poison task crashed workers")
        h.eq(crashes, MAX_CLAIMS + 1, "workers that died")
        # claims: 1 (step 1, then step 2 crashed) + MAX_CLAIMS crashed + the claim that dead-letters it
        h.eq(row["claims_total"], MAX_CLAIMS + 2, "claims in total")
        suspects = [e for w in env.procs if w.name[0] in "ab" for e in w.events("task.suspect")]
        h.log("%d suspect claims (tasks whose last two claims made no progress) were run one per worker at a "
              "time; %d of them were the poison task" % (len(suspects),
                                                         sum(1 for e in suspects if e.get("task_id") == poison)))
        env.wait_all_terminal(GOOD + 1, 90)
        c = env.status_counts()
        h.eq(c.get("succeeded"), GOOD, "good tasks all succeeded: %r" % c)
        env.check_step_log()
        h.eq(env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and step <> 8", (good,)), 0,
             "good tasks: 8 steps each")


h.run(test)

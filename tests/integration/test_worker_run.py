"""Issue 3: N tasks x 10 steps through two workers: every task succeeded, exactly
10 contiguous step rows each; the same idempotency key per step."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

N = int(os.environ.get("LONGRUN_TEST_TASKS", "1000"))
STEPS = 10


def test():
    with h.Env("worker-run") as env:
        env.start_fixture()
        env.start_scheduler()
        w1 = env.start_worker("w1", LONGRUN_SLICE_STEPS=4)
        w2 = env.start_worker("w2", LONGRUN_SLICE_STEPS=4)
        t0 = time.time()
        ids = env.enqueue_many([{"agent": "http-steps", "input": {"steps": STEPS}} for _ in range(N)])
        h.eq(len(ids), N, "enqueued")
        h.log("enqueued %d tasks in %.1f s" % (N, time.time() - t0))
        c = env.wait_all_terminal(N, 600)
        el = time.time() - t0
        h.eq(c.get("succeeded"), N, "all succeeded: %r" % c)
        env.check_step_log(expect_steps=STEPS)
        h.eq(env.scalar("select count(*) from task_steps"), N * STEPS, "step rows")
        # slices: every task was handed over between workers at least twice (10 steps, slice 4)
        h.check(env.scalar("select count(*) from task_events where reason = 'slice_end'") >= 2 * N,
                "slices recorded")
        # every step called the tool with its idempotency key exactly as specified
        reqs = env.fixture("/_requests?limit=%d&path_prefix=/step" % min(10000, N * STEPS))
        for r in reqs["requests"][:200]:
            hd = r["headers"]
            k = hd.get("idempotency-key", "")
            h.check(k.startswith(hd.get("x-longrun-task-id", "?") + ":") and k.endswith(":0"), "idempotency key %r" % k)
        both = env.scalar("select count(distinct worker) from task_steps")
        h.eq(both, 2, "both workers did steps")
        h.log("RESULT %d tasks x %d steps in %.1f s: %.0f steps/s" % (N, STEPS, el, N * STEPS / el))
        for w in (w1, w2):
            h.check(w.alive(), "worker still running")


h.run(test)

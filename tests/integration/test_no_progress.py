"""Issue 5: progress-based liveness.  A task whose worker keeps renewing its
lease but writes no checkpoint (a step that never ends) is flagged in the
metrics and, after twice LONGRUN_STEP_TIMEOUT_SECONDS, dead-lettered with
reason no_progress; the worker's late checkpoint is then fenced out."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402


def test():
    with h.Env("no-progress") as env:
        env.start_fixture()
        env.start_scheduler(LONGRUN_STEP_TIMEOUT_SECONDS=5)
        env.start_worker("w1", LONGRUN_LEASE_SECONDS=3)
        stuck = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 2, "path": "/tools/slow-20000"}}])[0]
        ok = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 2}}])[0]
        h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (ok,)) == "succeeded", 20,
                   "a healthy task is not affected")
        t = h.wait_for(lambda: (lambda r: r["status"] == "dead" and r)(
            env.sql("select * from tasks where id = %s", (stuck,))[0]), 40, "stuck task dead-lettered")
        h.eq(t["stop_reason"], "no_progress", "reason")
        h.eq(t["step"], 0, "no step was written")
        h.eq(env.scalar("select count(*) from dead_letters where task_id = %s and reason = 'no_progress'", (stuck,)), 1,
             "one dead letter")
        # the worker's late checkpoint (the slow step ends at 20 s) is fenced out: still no step row
        h.wait_for(lambda: any("task.fenced" in p.log_text() and stuck in p.log_text() for p in env.procs if p.name == "w1"),
                   30, "late checkpoint fenced")
        h.eq(env.scalar("select count(*) from task_steps where task_id = %s", (stuck,)), 0, "row intact")
        h.eq(env.scalar("select status from tasks where id = %s", (stuck,)), "dead", "still dead")


h.run(test)

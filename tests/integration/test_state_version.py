"""Issue 8: rolling deploys and state versions.

A worker that meets a task whose state was written by a newer version (a
higher state_version than it reads) hands the task back untouched rather
than corrupting it: no step is written, the row is intact, the event says
why, and the claim does not count towards crash_loop.  A task at the
current version runs normally on the same worker.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402


def test():
    with h.Env("state-version") as env:
        env.start_fixture()
        env.start_worker("w1")
        # a task half-done by a "newer" worker: 2 steps, state version 2
        new = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 4}}])[0]
        old = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 3}}])[0]
        h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (old,)) == "succeeded", 30,
                   "current-version task runs")
        h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (new,)) == "succeeded", 30,
                   "first task done too")
        # A task whose state was written by version N+1: two steps, state_version 2, dead-lettered; an
        # operator requeue publishes its continuation, and this (version 1) worker receives it.
        import uuid
        tid = str(uuid.uuid4())
        env.sql("insert into tasks (id, agent, input, status, step, state_version, stop_reason) values"
                " (%s, 'http-steps', '{\"steps\": 5}', 'dead', 2, 2, 'max_steps')", (tid,))
        for n in (1, 2):
            env.sql("insert into task_steps (task_id, step_no, epoch, state_version, messages) values"
                    " (%s, %s, 1, 2, '[{\"v2\": true}]')", (tid, n))
        steps_before = 2
        r = env.cli("dlq", "requeue", tid)
        h.eq(r.returncode, 0, r.stderr)
        h.wait_for(lambda: env.scalar("select count(*) from task_events where task_id = %s and reason = "
                                      "'state_version_too_new'", (tid,)) >= 1, 30, "handed back as too new")
        row = env.sql("select status, step, claims, state_version from tasks where id = %s", (tid,))[0]
        h.eq(row["status"], "queued", "handed back to queued")
        h.eq(row["state_version"], 2, "state version untouched")
        h.eq(env.scalar("select count(*) from task_steps where task_id = %s", (tid,)), steps_before,
             "no step written by the older worker")
        h.eq(row["claims"], 0, "a hand-back is not a crash claim")


h.run(test)

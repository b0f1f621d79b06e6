"""Issue 3: fencing epochs.  Two workers forced onto the same task.

Worker A (queue `default`) runs a task whose steps are slow HTTP calls.  While
A is in the middle of step 2, the test plays "another claimer": it bumps the
task's lease_epoch in the database (exactly what a claim does), lets the lease
look expired, and sends a continuation to worker B (queue `fence-b`), which
claims the task for real (a third epoch) and finishes it.

1. Checkpoint fencing (long lease and heartbeat, so no renewal happens
   during the test): A's checkpoint of step 2 is rejected (log event task.fenced);
   no step row was written under A's epoch after the bump; the row keeps B's
   epoch and owner; B writes steps 2..N; the task ends succeeded with N
   contiguous rows.  Step 2 ran twice (A, then B) with the same idempotency key
   and different X-Longrun-Epoch headers: that is the at-least-once step
   contract, fenced writes keep the log single.
2. Renewal fencing (LONGRUN_LEASE_SECONDS=3, renewals every second, 8 s
   steps): the zombie learns it was fenced from its next lease renewal and
   abandons the step within about a second, long before the step would end.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402


def step_requests(env, tid):
    return [r for r in env.fixture_requests("/tools/") if r["headers"].get("x-longrun-task-id") == tid]


def force_second_owner(env, tid):
    """Bumps the epoch like a claim by someone else; returns the new epoch."""
    return env.scalar("update tasks set lease_epoch = lease_epoch + 1, lease_owner = 'intruder', "
                      "lease_expires_at = now() - interval '1 second' where id = %s and status = 'running' "
                      "returning lease_epoch", (tid,))


def scenario_checkpoint(env):
    # long lease and heartbeat: no renewal runs during the test, so the
    # checkpoint is the first write that meets the new epoch
    slow = dict(LONGRUN_SLICE_STEPS=100, LONGRUN_LEASE_SECONDS=300, LONGRUN_HEARTBEAT_SECONDS=120)
    a = env.start_worker("fa", **slow)
    b = env.start_worker("fb", args=["--queue", "fence-b"], **slow)
    env.wait_queue("longrun.q.default")
    env.wait_queue("longrun.q.fence-b")
    steps = 4
    [tid] = env.enqueue_many([{"agent": "http-steps", "input": {"steps": steps, "path": "/tools/slow-2500"}}])
    # A has checkpointed step 1 and is inside step 2
    h.wait_for(lambda: env.scalar("select step from tasks where id = %s", (tid,)) == 1, 30, "step 1 checkpointed")
    h.wait_for(lambda: any(r["headers"].get("x-longrun-step") == "2" for r in step_requests(env, tid)), 10,
               "A inside step 2")
    a_epoch = env.scalar("select lease_epoch from tasks where id = %s", (tid,))
    bumped = force_second_owner(env, tid)
    h.check(bumped == a_epoch + 1, "epoch bumped while A runs step 2")
    env.publish([json.dumps({"id": tid})], routing_key="fence-b", props={"message_id": tid})
    h.log("task %s: A holds epoch %d in step 2; epoch bumped to %d, continuation sent to B" % (tid, a_epoch, bumped))

    ev = a.wait_event("task.fenced", 20, task_id=tid)
    h.check("checkpoint" in ev[0]["msg"], "A's checkpoint was the write rejected: %r" % ev[0]["msg"])
    row = env.sql("select lease_epoch, lease_owner, status from tasks where id = %s", (tid,))[0]
    h.check(row["lease_epoch"] > bumped, "B claimed after the bump: %r" % row)
    h.check(row["lease_owner"] in ("fb", None), "row owned by B, not by the zombie: %r" % row)
    stale = env.sql("select step_no, worker from task_steps where task_id = %s and epoch = %s and step_no >= 2",
                    (tid, a_epoch))
    h.eq(stale, [], "no step row written by A after it was fenced")

    h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (tid,)) == "succeeded", 30,
               "task finished by B")
    rows = env.sql("select step_no, epoch, worker from task_steps where task_id = %s order by step_no", (tid,))
    h.eq([r["step_no"] for r in rows], list(range(1, steps + 1)), "contiguous step rows")
    h.eq(rows[0]["worker"], "fa", "step 1 by A")
    h.eq(rows[0]["epoch"], a_epoch, "step 1 under A's epoch")
    for r in rows[1:]:
        h.eq(r["worker"], "fb", "steps 2.. by B")
        h.check(r["epoch"] > bumped, "steps 2.. under B's epoch")
    step2 = [r for r in step_requests(env, tid) if r["headers"].get("x-longrun-step") == "2"]
    h.eq(len(step2), 2, "step 2 attempted by A and by B")
    h.eq(len({r["headers"]["idempotency-key"] for r in step2}), 1, "the same idempotency key both times")
    h.eq(sorted(int(r["headers"]["x-longrun-epoch"]) for r in step2), [a_epoch, rows[1]["epoch"]],
         "epochs of the two attempts")
    h.check(a.alive() and b.alive(), "both workers alive")
    h.eq(env.queue_counts("longrun.q.default")[0], 0, "A acked its delivery")
    a.signal(15)
    b.signal(15)
    h.eq(a.wait(15), 0, "A exits 0")
    h.eq(b.wait(15), 0, "B exits 0")


def scenario_renewal(env):
    a = env.start_worker("ra", LONGRUN_SLICE_STEPS=100, LONGRUN_LEASE_SECONDS=3)
    b = env.start_worker("rb", args=["--queue", "fence-b"], LONGRUN_SLICE_STEPS=100, LONGRUN_LEASE_SECONDS=3)
    env.wait_queue("longrun.q.default")
    env.wait_queue("longrun.q.fence-b")
    [tid] = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 1, "path": "/tools/slow-8000"}}])
    h.wait_for(lambda: step_requests(env, tid), 15, "A inside step 1")
    time.sleep(0.3)
    a_epoch = env.scalar("select lease_epoch from tasks where id = %s", (tid,))
    t0 = time.time()
    bumped = force_second_owner(env, tid)
    h.check(bumped == a_epoch + 1, "epoch bumped")
    ev = a.wait_event("task.fenced", 8, task_id=tid)
    took = time.time() - t0
    h.check("lease renewal" in ev[0]["msg"], "fenced by the lease renewal: %r" % ev[0]["msg"])
    h.check(took < 5, "the zombie stopped %.1f s after the bump, before its 8 s step ended" % took)
    h.log("zombie A stopped its step %.1f s after being fenced" % took)
    # B takes over and finishes
    env.publish([json.dumps({"id": tid})], routing_key="fence-b", props={"message_id": tid})
    h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (tid,)) == "succeeded", 40,
               "task finished by B")
    rows = env.sql("select step_no, epoch, worker from task_steps where task_id = %s order by step_no", (tid,))
    h.eq([(r["step_no"], r["worker"]) for r in rows], [(1, "rb")], "the step row is B's")
    h.eq(env.scalar("select count(*) from task_steps where epoch = %s and task_id = %s", (a_epoch, tid)), 0,
         "nothing under A's epoch")
    h.check(a.alive() and b.alive(), "both workers alive")


def test():
    with h.Env("fencing") as env:
        env.start_fixture()
        scenario_checkpoint(env)
        scenario_renewal(env)


h.run(test)

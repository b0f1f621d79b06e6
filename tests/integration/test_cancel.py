"""Issue 17 (4): immediate cancellation.

`longrun cancel ID` of a running task sends NOTIFY longrun_cancel with the
cancel; the worker that holds the task aborts the step in flight (curl
removal) and writes the cancellation through its fenced transition, instead
of waiting for the step to end.  With real servers and the fixture model:

(a) a task blocked in a 30 s tool call (the second step: an approved call)
    and (b) a task blocked in a hanging model call (fixture-hang, 600 s) each
    reach `cancelled` well within a generous bound (the measured latency is
    printed: client side, from before `longrun cancel` to the status seen,
    and server side, between the two task_events rows); exactly one outcome
    reaches each one's reply_to; the step log stays contiguous (the aborted
    step leaves no row); a task running beside them on the same worker
    finishes untouched, and so does one started afterwards; notifications
    for tasks the worker does not hold (unknown, finished, not an id) change
    nothing.
(c) `--after-step` keeps the cooperative form: the current step (a 3 s tool
    call) finishes and is checkpointed, the task stops at that boundary, and
    no further model call is made.
(d) cancelling a queued or a suspended task still cancels it at once (the
    CLI sends the suspended one's outcome to its reply_to).
(f) a step that fails transiently after a --after-step cancel does not park
    the task in retry_wait: the transition writes `cancelled` instead.
(e) a task whose worker died mid-step is cancelled (immediate: nobody gets
    the notification) and is then claimed by another worker once its lease
    expired: the claim sees cancel_requested and cancels it without running
    a step.
At the end the worker exits 0 on SIGTERM (LSan-clean under ASan).
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

BOUND = 5.0  # seconds from the cancel to `cancelled`: generous, for ASan runs
FX = "${LONGRUN_FIXTURE_URL}"


def agents_file(env):
    def model(name, **kw):
        return dict({"provider": "openai", "base_url": FX + "/v1", "model": name}, **kw)
    return env.write_json("agents.json", {
        "tools": {
            "slow30": {"description": "takes 30 s, needs approval", "url": FX + "/tools/slow-30000",
                       "timeout_ms": 60000, "retries": 0, "requires_approval": True},
            "slow30b": {"description": "takes 30 s", "url": FX + "/tools/slow-30000", "timeout_ms": 60000,
                        "retries": 0},
            "slow3": {"description": "takes 3 s", "url": FX + "/tools/slow-3000", "timeout_ms": 60000,
                      "retries": 0},
            "lookup": {"description": "look up", "url": FX + "/tools/lookup"},
        },
        "agents": [
            {"name": "slowtool", "models": [model("fixture-steps-5")], "tools": ["slow30"]},
            {"name": "slowtool2", "models": [model("fixture-steps-5")], "tools": ["slow30b"]},
            {"name": "hang", "models": [model("fixture-hang", timeout_ms=700000, retries=0)], "tools": ["lookup"]},
            {"name": "boundary", "models": [model("fixture-steps-4")], "tools": ["slow3"]},
            {"name": "timeout", "models": [model("fixture-hang", timeout_ms=2000, retries=0)], "tools": ["lookup"]},
            {"name": "bystander", "models": [model("fixture-slow-300-12")], "tools": ["lookup"]},
            {"name": "quick", "models": [model("fixture-steps-3")], "tools": ["lookup"]},
            {"name": "approver", "models": [model("fixture-tool:request_approval-2")], "tools": ["request_approval"]},
        ],
    })


def task(env, tid):
    rows = env.sql("select * from tasks where id = %s", (tid,))
    return rows[0] if rows else {}  # (a task published to the broker has no row until a worker takes it)


def events(env, tid):
    return env.sql("select from_status, to_status, reason, actor, detail, at from task_events where task_id = %s"
                   " order by id", (tid,))


def step_nos(env, tid):
    return [r["step_no"] for r in env.sql("select step_no from task_steps where task_id = %s order by step_no",
                                          (tid,))]


def requests_of(env, tid, path_prefix=None, model=None):
    q = "/_requests?limit=100000"
    if path_prefix:
        q += "&path_prefix=" + path_prefix
    if model:
        q += "&model=" + model
    return [r for r in env.fixture(q)["requests"] if r["headers"].get("x-longrun-task-id") == tid]


def publish(env, reply_to, agent):
    """Publishes a task straight to the broker with a reply_to (the worker creates its row)."""
    tid = str(uuid.uuid4())
    env.publish([{"id": tid, "agent": agent, "input": "go"}],
                props={"reply_to": reply_to, "correlation_id": "corr-" + tid[:8], "message_id": tid,
                       "content_type": "application/json"})
    return tid


def cancel(env, tid, *args):
    r = env.cli("cancel", tid, "--reason", "operator says stop", "--json", *args)
    h.eq(r.returncode, 0, "cancel %s: %s" % (tid, r.stderr))
    return json.loads(r.stdout)


def wait_cancelled(env, tid, t0, what):
    h.wait_for(lambda: task(env, tid)["status"] == "cancelled", 60, "%s cancelled" % what, interval=0.02)
    took = time.time() - t0
    ev = events(env, tid)
    asked = [e["at"] for e in ev if e["reason"] == "cancel_requested" and e["to_status"] == "running"]
    done = [e["at"] for e in ev if e["to_status"] == "cancelled"]
    server = (done[-1] - asked[-1]).total_seconds() if asked and done else float("nan")
    h.log("%s: cancelled %.3f s after `longrun cancel` started (server side, cancel committed to cancelled: "
          "%.3f s)" % (what, took, server))
    print("CANCEL_LATENCY %s client=%.3f server=%.3f" % (what, took, server), flush=True)
    return took, server


def check_cancelled_row(env, tid, steps):
    t = task(env, tid)
    h.eq(t["status"], "cancelled", "status")
    h.eq(t["stop_reason"], "cancelled", "stop_reason")
    h.eq(t["error"], "operator says stop", "the operator's reason is the task's error")
    h.eq(t["step"], steps, "steps checkpointed")
    h.eq(step_nos(env, tid), list(range(1, steps + 1)), "step log contiguous, the aborted step not written")
    h.eq(t["lease_owner"], None, "lease released")
    h.check(t["finished_at"] is not None, "finished_at set")


def read_replies(env, q):
    conn = env.amqp()
    try:
        ch = conn.channel()
        out = []
        while True:
            method, pr, body = ch.basic_get(q, auto_ack=True)
            if method is None:
                return out
            out.append((pr, json.loads(body)))
    finally:
        conn.close()


def test():
    with h.Env("cancel") as env:
        env.start_fixture()
        env.start_scheduler()
        agents = agents_file(env)
        w = env.start_worker("w1", LONGRUN_AGENTS_FILE=agents)
        env.wait_queue("longrun.q.default", consumers=1)
        conn = env.amqp()
        q = conn.channel().queue_declare("reply.%s" % uuid.uuid4().hex, durable=True).method.queue
        conn.close()

        # a task that runs on the same worker through all of (a) and (b)
        by = env.enqueue_many([{"agent": "bystander", "input": "carry on"}])[0]
        h.wait_for(lambda: task(env, by)["step"] >= 1, 30, "bystander running")

        # ---- (a) blocked in a 30 s tool call (step 2: the call approved after step 1)
        a = publish(env, q, "slowtool")
        h.wait_for(lambda: task(env, a).get("status") == "suspended", 30, "(a) waits for approval")
        h.eq(env.cli("approve", a).returncode, 0, "approve (a)")
        h.wait_for(lambda: requests_of(env, a, "/tools/slow-30000"), 30, "(a) tool call in flight")
        time.sleep(0.5)
        h.eq(task(env, a)["status"], "running", "(a) still in its tool call")
        t0 = time.time()
        out = cancel(env, a)
        h.eq(out, {"id": a, "status": "running", "mode": "immediate"}, "cancel --json (a)")
        lat_a, srv_a = wait_cancelled(env, a, t0, "(a) tool call")
        h.check(lat_a < BOUND, "(a) cancelled within %.0f s (took %.2f s; the call had 29 s to go)" % (BOUND, lat_a))
        check_cancelled_row(env, a, 1)
        ev = events(env, a)
        h.eq([(e["from_status"], e["to_status"], e["reason"], e["actor"]) for e in ev[-2:]],
             [("running", "running", "cancel_requested", ev[-2]["actor"]), ("running", "cancelled", "cancelled", "w1")],
             "(a) events")
        h.eq(ev[-2]["detail"], {"reason": "operator says stop", "mode": "immediate"}, "(a) the cancel's record")
        h.check(w.events("task.cancelling", task_id=a), "(a) the worker logged the abort")

        # ---- (b) blocked in a model call that hangs for 600 s
        b = publish(env, q, "hang")
        h.wait_for(lambda: requests_of(env, b, "/v1/chat/completions"), 30, "(b) model call in flight")
        time.sleep(0.5)
        h.eq(task(env, b)["status"], "running", "(b) still in its model call")
        t0 = time.time()
        h.eq(cancel(env, b), {"id": b, "status": "running", "mode": "immediate"}, "cancel --json (b)")
        lat_b, srv_b = wait_cancelled(env, b, t0, "(b) model call")
        h.check(lat_b < BOUND, "(b) cancelled within %.0f s (took %.2f s; the call hangs 600 s)" % (BOUND, lat_b))
        check_cancelled_row(env, b, 0)

        # notifications for tasks this worker does not hold change nothing
        for payload in (str(uuid.uuid4()), a, "not-a-task-id"):
            env.sql("select pg_notify('longrun_cancel', %s)", (payload,))
        h.eq(env.cli("cancel", a).returncode, 2, "cancelling a cancelled task is refused")

        # the worker goes on: the bystander finishes, and so does a task started now
        h.wait_for(lambda: task(env, by)["status"] == "succeeded", 60, "bystander finished")
        h.eq(step_nos(env, by), list(range(1, 13)), "bystander's steps")
        qk = env.enqueue_many([{"agent": "quick", "input": "after"}])[0]
        h.wait_for(lambda: task(env, qk)["status"] == "succeeded", 30, "a task started after the cancels")

        # ---- (c) --after-step: the step in flight (a 3 s tool call) finishes, the task stops at its boundary
        c = env.enqueue_many([{"agent": "boundary", "input": "go"}])[0]
        h.wait_for(lambda: requests_of(env, c, "/tools/slow-3000"), 30, "(c) tool call in flight")
        t0 = time.time()
        h.eq(cancel(env, c, "--after-step"), {"id": c, "status": "running", "mode": "after_step"},
             "cancel --after-step --json")
        time.sleep(1.0)
        h.eq(task(env, c)["status"], "running", "(c) the step goes on after --after-step")
        lat_c, _ = wait_cancelled(env, c, t0, "(c) --after-step")
        h.check(lat_c > 1.5, "(c) stopped only once its step ended (%.2f s)" % lat_c)
        check_cancelled_row(env, c, 1)
        h.eq(len(requests_of(env, c, "/v1/chat/completions")), 1, "(c) no model call after the boundary")
        h.eq(events(env, c)[-2]["detail"], {"reason": "operator says stop", "mode": "after_step"}, "(c) record")
        h.eq(events(env, c)[-1]["reason"], "cancel_requested", "(c) cancelled by the checkpoint")

        # ---- (f) --after-step, then the step fails (a 2 s model timeout): the retry_wait it would
        # park in becomes the cancellation (no notification involved)
        f = publish(env, q, "timeout")
        h.wait_for(lambda: requests_of(env, f, "/v1/chat/completions"), 30, "(f) model call in flight")
        h.eq(cancel(env, f, "--after-step")["mode"], "after_step", "(f) cancel --after-step")
        h.wait_for(lambda: task(env, f)["status"] != "running", 30, "(f) the step ended")
        check_cancelled_row(env, f, 0)
        h.eq(events(env, f)[-1]["reason"], "cancel_requested", "(f) cancelled by the transition")
        h.check(w.events("task.cancelled_meanwhile", task_id=f), "(f) the worker saw its retry_wait become cancelled")
        h.eq(len(requests_of(env, f, "/v1/chat/completions")), 1, "(f) not retried")

        # ---- (d) queued and suspended tasks: cancelled at once, as before
        d1 = env.enqueue_many([{"agent": "quick", "input": "never"}], queue="idle")[0]
        h.eq(task(env, d1)["status"], "queued", "(d) queued (no worker on its queue)")
        h.eq(cancel(env, d1), {"id": d1, "status": "cancelled"}, "cancel --json of a queued task")
        d2 = publish(env, q, "approver")
        h.wait_for(lambda: task(env, d2).get("status") == "suspended", 30, "(d) suspended")
        h.eq(cancel(env, d2), {"id": d2, "status": "cancelled", "outcome_sent": True}, "cancel of a suspended task")
        for d in (d1, d2):
            t = task(env, d)
            h.eq((t["status"], t["stop_reason"], t["error"]), ("cancelled", "cancelled", "operator says stop"),
                 "(d) cancelled row")

        # ---- (e) the owner died mid-step: the next claim sees cancel_requested and runs no step
        w2 = env.start_worker("w2", LONGRUN_AGENTS_FILE=agents, LONGRUN_QUEUES="solo", LONGRUN_LEASE_SECONDS=3)
        env.wait_queue("longrun.q.solo", consumers=1)
        e = env.enqueue_many([{"agent": "slowtool2", "input": "go"}], queue="solo")[0]
        h.wait_for(lambda: requests_of(env, e, "/tools/slow-30000"), 30, "(e) tool call in flight")
        w2.kill()
        h.eq(cancel(env, e), {"id": e, "status": "running", "mode": "immediate"}, "(e) cancel")
        t0 = time.time()
        env.start_worker("w3", LONGRUN_AGENTS_FILE=agents, LONGRUN_QUEUES="solo", LONGRUN_LEASE_SECONDS=3)
        h.wait_for(lambda: task(env, e)["status"] == "cancelled", 60, "(e) cancelled at the next claim")
        h.log("(e) cancelled %.1f s after the new worker started (the old lease had to expire)" % (time.time() - t0))
        check_cancelled_row(env, e, 0)
        h.eq(len(requests_of(env, e, "/tools/slow-30000")), 1, "(e) the tool was not called again")
        h.eq(events(env, e)[-1]["actor"], "w3", "(e) cancelled by the claiming worker")

        # ---- exactly one outcome per task with a reply_to
        time.sleep(1.0)
        got = read_replies(env, q)
        per = Counter(o["id"] for _, o in got)
        h.eq(dict(per), {a: 1, b: 1, d2: 1, f: 1}, "one outcome each")
        for pr, o in got:
            h.eq((o["status"], o["stop_reason"], o["error"], o["result"]),
                 ("cancelled", "cancelled", "operator says stop", None), "outcome of %s" % o["id"])
            h.eq(pr.correlation_id, "corr-" + o["id"][:8], "correlation_id")
        h.eq([o for _, o in got if o["id"] == a][0]["usage"]["steps"], 1, "(a) outcome's steps")

        env.check_step_log()
        # nothing in flight is left behind: the worker drains and exits 0 (LSan-clean under ASan)
        w.signal(signal.SIGTERM)
        h.eq(w.wait(40), 0, "w1 exit code after SIGTERM")
        h.check(not w.events("worker.drain_deadline"), "no step was left to abandon")
        h.log("latencies: (a) %.3f s (server %.3f s), (b) %.3f s (server %.3f s)" % (lat_a, srv_a, lat_b, srv_b))


h.run(test)

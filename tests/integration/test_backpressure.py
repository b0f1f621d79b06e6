"""Issue 16 item 6: backpressure that applies.

1. LONGRUN_QUEUE_MAX_LENGTH=5, no worker: `longrun enqueue` succeeds until
   the queue is full (a quorum queue checks the limit before it appends, so
   it takes one message past it: 6 here), then is refused by the broker (x-max-length with x-overflow=reject-publish:
   a publisher nack): exit 75 (EX_TEMPFAIL), "queue full" on stderr, and the
   task is not recorded.  A batch on stdin into the full queue: exit 75, each
   line reported with state queue_full in --json.
2. --wait-for-room 60 waits while the queue is full; a worker is started,
   drains the queue, the waiting enqueue gets its room (exit 0) and every
   recorded task succeeds.
3. An existing queue declared without x-max-length (an older deployment) is
   used as it is, with the warning amqp.queue_max_length on stderr (stdout
   stays valid JSON); the policy the warning names applies the limit to it.
"""
import json
import os
import subprocess
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

MAX = 5
TASK = ["--agent", "http-steps", "--input", '{"steps": 1}']


def part_limit(env):
    lim = {"LONGRUN_QUEUE_MAX_LENGTH": str(MAX)}
    accepted = 0
    for i in range(MAX + 2):
        r = env.cli("enqueue", *TASK, env=lim)
        if r.returncode != 0:
            break
        accepted += 1
    h.log("a queue with x-max-length %d took %d messages" % (MAX, accepted))
    h.check(accepted in (MAX, MAX + 1), "the limit applies at %d (+1 for a quorum queue): took %d"
            % (MAX, accepted))
    h.eq(r.returncode, 75, "a full queue: EX_TEMPFAIL; stderr: %s" % r.stderr)
    h.check("queue full" in r.stderr and "longrun.q.default" in r.stderr, "says queue full: %s" % r.stderr)
    h.eq(env.scalar("SELECT count(*) FROM tasks"), accepted, "the refused task is not recorded")
    lines = "".join(json.dumps({"agent": "http-steps", "input": {"steps": 1}}) + "\n" for _ in range(3))
    r = env.cli("enqueue", "--json", input=lines, env=lim)
    h.eq(r.returncode, 75, "a batch into a full queue: EX_TEMPFAIL; stderr: %s" % r.stderr)
    h.eq([o["state"] for o in json.loads(r.stdout)], ["queue_full"] * 3, "each line reported")
    h.eq(env.scalar("SELECT count(*) FROM tasks"), accepted, "none recorded")
    h.eq((env.queue_counts("longrun.q.default") or (None,))[0], accepted, "the queue holds its maximum")

    # --wait-for-room: blocks while full, succeeds once a worker made room
    e = env.base_env(**lim)
    p = subprocess.Popen([os.path.join(h.BUILD, "longrun"), "enqueue", "--wait-for-room", "60"] + TASK, env=e,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)  # a fixed wait on purpose: it must still be waiting with no worker
    h.check(p.poll() is None, "--wait-for-room waits while the queue is full")
    env.start_worker(LONGRUN_QUEUE_MAX_LENGTH=MAX)
    out, err = p.communicate(timeout=90)
    h.eq(p.returncode, 0, "room was made: %s" % err)
    env.wait_all_terminal(accepted + 1, 60)
    h.eq(env.status_counts(), {"succeeded": accepted + 1}, "every recorded task ran")


def part_existing_queue(env):
    ch = env.amqp().channel()
    ch.queue_declare("longrun.q.old", durable=True, arguments={
        "x-queue-type": "quorum", "x-delivery-limit": 20, "x-dead-letter-exchange": "longrun.dlx",
        "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
    lim = {"LONGRUN_QUEUE_MAX_LENGTH": "2"}
    r = env.cli("enqueue", "--json", "--queue", "old", *TASK, env=lim)
    h.eq(r.returncode, 0, "an existing queue without x-max-length is used: %s" % r.stderr)
    h.eq(json.loads(r.stdout)[0]["state"], "queued", "stdout is still JSON")
    h.check("amqp.queue_max_length" in r.stderr and "set_policy" in r.stderr, "warned: %s" % r.stderr)
    vh = urllib.parse.quote(env.vhost, safe="")
    env.mgmt_call("PUT", "/api/policies/%s/longrun-max-length" % vh, {
        "pattern": "^longrun\\.q\\.", "apply-to": "queues",
        "definition": {"max-length": 2, "overflow": "reject-publish"}})

    def enq():
        return env.cli("enqueue", "--queue", "old", *TASK, env=lim).returncode
    h.eq(enq(), 0, "second: room")
    # the policy reaches the queue's members asynchronously: wait for the first refusal
    h.wait_for(lambda: enq() == 75, 30, "the policy's limit refuses a publish", interval=0.5)
    h.check((env.queue_counts("longrun.q.old") or (0,))[0] in (2, 3), "the queue holds the policy's maximum")


def main():
    with h.Env("backpressure") as env:
        env.start_fixture()
        part_limit(env)
        part_existing_queue(env)


if __name__ == "__main__":
    h.run(main)

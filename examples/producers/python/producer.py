#!/usr/bin/python3
"""A longrun producer in Python (pika): publish N tasks, wait for every outcome.

    LONGRUN_AMQP_URL=amqp://user:pass@host:5672/vhost /usr/bin/python3 producer.py N [options]

What it does, in the order a real producer should do it (docs/task-contract.md):

1. declares its own reply queue: exclusive to this connection, named
   <first prefix of LONGRUN_REPLY_TO_PREFIX, default "reply.">py-<random hex> -- workers
   only publish outcomes to queues with that prefix (a server-named amq.gen-* queue
   would be refused) -- and starts consuming it *before* publishing anything;
2. publishes N tasks to exchange longrun.tasks with publisher confirms and mandatory
   routing: persistent, message_id = task id = body "id" (the idempotency key: publish
   the same id again and it is the same task), reply_to = the reply queue, and a
   correlation id of its own per task; a nack is retried with backoff, an unroutable
   task (no such queue) is an error;
3. waits (at most --timeout seconds) for one outcome per task, matching each by its
   correlation id and checking that message_id and the body's "id" are that task's id;
4. prints one line per task and a summary as its last line, and exits
   0 every task succeeded, 1 some task ended otherwise (dead, cancelled) or a reply did
   not match, 2 bad usage or configuration, 3 could not connect or publish,
   4 timed out with outcomes missing (they stay in PostgreSQL: `longrun status ID`).

pika's BlockingConnection waits for each confirm in turn, which is fine for an example;
a high-volume producer would use pika's SelectConnection (or another client) and keep
many publishes in flight.
"""
import argparse
import json
import os
import sys
import time
import uuid

try:
    import pika
except ImportError:
    print("producer.py: pika is not installed (Debian: apt-get install python3-pika; run with /usr/bin/python3)",
          file=sys.stderr)
    sys.exit(2)

EXCHANGE = "longrun.tasks"
PUBLISH_TRIES = 4  # a nack can be transient (a quorum queue changing leader, a full queue draining)


def reply_prefix():
    """The first prefix of LONGRUN_REPLY_TO_PREFIX (the workers' setting), default "reply."."""
    raw = os.environ.get("LONGRUN_REPLY_TO_PREFIX", "reply.").strip()
    if raw == "none":
        die(2, "LONGRUN_REPLY_TO_PREFIX=none: workers reply only to direct reply-to; this example needs a reply "
               "queue prefix")
    prefix = raw.split(",")[0].strip()
    if not prefix or prefix.startswith("longrun."):
        die(2, "LONGRUN_REPLY_TO_PREFIX=%r: need a prefix that does not start with longrun." % raw)
    return prefix


def die(code, msg):
    print("producer.py: " + msg, file=sys.stderr)
    sys.exit(code)


def follow_events(task_id):
    """TODO(issue 18 item 2, the task event stream): follow one task live.

    When workers publish task events to the RabbitMQ stream, consume it here from
    offset "first" (x-stream-offset), keep the events whose task id is task_id, print
    them, and stop at the task's outcome.  The stream does not exist yet, so this does
    nothing; the reply below is the outcome."""
    return None


def main():
    ap = argparse.ArgumentParser(description="Publish N longrun tasks and wait for their outcomes.")
    ap.add_argument("n", type=int, help="number of tasks (1-10000)")
    ap.add_argument("--agent", default="example", help="agent name (default: example, from examples/agents.json)")
    ap.add_argument("--input", default='{"question": "Weather in Oslo?"}', help="task input, JSON")
    ap.add_argument("--queue", default="default", help="task queue short name, the routing key (default: default)")
    ap.add_argument("--max-steps", type=int, default=None, help="budgets.max_steps of each task")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all outcomes (default 120)")
    args = ap.parse_args()
    if not 1 <= args.n <= 10000:
        die(2, "N must be 1..10000, not %d" % args.n)
    try:
        task_input = json.loads(args.input)
    except ValueError as e:
        die(2, "--input is not JSON: %s" % e)
    url = os.environ.get("LONGRUN_AMQP_URL")
    if not url:
        die(2, "LONGRUN_AMQP_URL is not set (e.g. amqp://longrun:longrun@127.0.0.1:55672/)")
    prefix = reply_prefix()

    t0 = time.monotonic()
    try:
        conn = pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPError as e:
        die(3, "cannot connect to LONGRUN_AMQP_URL: %r" % e)

    # 1. The reply queue, consumed before the first publish.  Exclusive: only this
    # connection may use it, and the broker deletes it when the connection closes (an
    # outcome that arrives after that is returned to the worker, which logs
    # task.reply_failed; the outcome is still in PostgreSQL).
    replies = conn.channel()
    reply_q = prefix + "py-" + uuid.uuid4().hex
    replies.queue_declare(reply_q, exclusive=True)
    pending = {}   # correlation id -> task id
    outcome = {}   # task id -> status
    unexpected = []  # correlation ids of replies to no task of ours

    def on_reply(ch, method, props, body):
        corr = props.correlation_id
        tid = pending.pop(corr, None)
        if tid is None:
            unexpected.append(corr)
            print("unexpected reply correlation_id=%s message_id=%s" % (corr, props.message_id))
            return
        try:
            o = json.loads(body)
        except ValueError:
            o = {}
        if props.message_id != tid or o.get("id") != tid:
            print("mismatch correlation_id=%s: sent task %s, reply says message_id=%s id=%s"
                  % (corr, tid, props.message_id, o.get("id")))
            outcome[tid] = "mismatch"
            return
        outcome[tid] = o.get("status")
        line = "reply %s %s correlation_id=%s steps=%s" % (tid, o.get("status"), corr, (o.get("usage") or {}).get("steps"))
        if o.get("status") != "succeeded":
            line += " stop_reason=%s error=%s" % (o.get("stop_reason") or "null", json.dumps(o.get("error")))
        print(line, flush=True)

    replies.basic_consume(reply_q, on_reply, auto_ack=True)
    print("reply queue %s" % reply_q, flush=True)

    # 2. Publish with confirms: basic_publish raises NackError or UnroutableError.
    pub = conn.channel()
    pub.confirm_delivery()
    sent = []
    for i in range(args.n):
        tid = str(uuid.uuid4())
        corr = str(uuid.uuid4())
        body = {"id": tid, "agent": args.agent, "input": task_input}
        if args.max_steps is not None:
            body["budgets"] = {"max_steps": args.max_steps}
        props = pika.BasicProperties(message_id=tid, correlation_id=corr, reply_to=reply_q, delivery_mode=2,
                                     content_type="application/json")
        pending[corr] = tid
        for attempt in range(PUBLISH_TRIES):
            try:
                pub.basic_publish(EXCHANGE, args.queue, json.dumps(body).encode(), props, mandatory=True)
                break
            except pika.exceptions.UnroutableError:
                die(3, "task %s came back unroutable: no queue longrun.q.%s (start a worker with that queue first); "
                       "%d task(s) were published before it" % (tid, args.queue, len(sent)))
            except pika.exceptions.NackError:
                if attempt + 1 == PUBLISH_TRIES:
                    die(3, "task %s nacked %d times (queue full?); %d task(s) were published before it"
                        % (tid, PUBLISH_TRIES, len(sent)))
                time.sleep(0.25 * 2 ** attempt)
            except pika.exceptions.AMQPError as e:
                die(3, "publishing task %s failed: %r; %d task(s) were published before it" % (tid, e, len(sent)))
        sent.append(tid)
        print("published %s correlation_id=%s" % (tid, corr), flush=True)
    if sent:
        follow_events(sent[0])

    # 3. Wait for the outcomes (the consumer callback runs inside process_data_events).
    deadline = time.monotonic() + args.timeout
    try:
        while pending and time.monotonic() < deadline:
            conn.process_data_events(time_limit=min(1.0, max(0.0, deadline - time.monotonic())))
    except pika.exceptions.AMQPError as e:
        print("connection lost while waiting: %r" % e, file=sys.stderr)
    for corr, tid in pending.items():
        print("missing %s correlation_id=%s (no outcome within %.0f s; see longrun status %s)"
              % (tid, corr, args.timeout, tid))
    try:
        conn.close()
    except pika.exceptions.AMQPError:
        pass

    # 4. The summary, always the last line.
    ok = sum(1 for s in outcome.values() if s == "succeeded")
    failed = len(outcome) - ok
    print("summary: published=%d succeeded=%d failed=%d missing=%d unexpected=%d seconds=%.1f"
          % (len(sent), ok, failed, len(pending), len(unexpected),
             time.monotonic() - t0), flush=True)
    if pending:
        return 4
    return 0 if ok == len(sent) and not unexpected else 1


if __name__ == "__main__":
    sys.exit(main())

"""Issue 18, item 2 (without token deltas): a durable, resumable event stream per task.  Workers
publish each task's events (claimed, steps with usage, tool calls, suspensions, outcome) to the
RabbitMQ stream longrun.events, numbered from durable state; `longrun watch` follows one task from
the stream, in sequence order, and exits with its outcome.  Real RabbitMQ and PostgreSQL, the
fixture model server."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402
import jsonschema  # noqa: E402

AGENTS = os.path.join(h.SOURCE, "tests", "fixtures", "agents.test.json")
FORBIDDEN = ("arguments", "result", "messages", "input", "content")
SCHEMA = jsonschema.Draft202012Validator(json.load(open(os.path.join(h.SOURCE, "docs", "events.schema.json"))))


def start_cli(env, *args):
    return subprocess.Popen([os.path.join(h.BUILD, "longrun")] + list(args), env=env.base_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def watch(env, tid, *args, timeout=90):
    p = start_cli(env, "watch", tid, "--json", *args)
    out, err = p.communicate(timeout=timeout * h.TIMEOUT_MULT)
    return p.returncode, [json.loads(x) for x in out.splitlines() if x.strip()], err


def check_against_log(env, tid, evs, first=1):
    """Contiguous sequence numbers from first; the step events match the step log."""
    h.eq([e["seq"] for e in evs], list(range(first, first + len(evs))), "contiguous sequence numbers")
    h.check(all(e["task_id"] == tid for e in evs), "only this task's events")
    for e in evs:
        errors = [x.message for x in SCHEMA.iter_errors(e)]
        h.check(not errors, "event %s fits docs/events.schema.json: %s" % (e, errors))
        for k in FORBIDDEN:
            h.check(k not in e, "no %s in an event: %s" % (k, e))
    steps = env.sql("select step_no, tokens_in, tokens_out, model,"
                    " coalesce(jsonb_array_length(case when jsonb_typeof(tool_calls) = 'array' then tool_calls end), 0) as calls"
                    " from task_steps where task_id = %s order by step_no", (tid,))
    steps = [(s["step_no"], s["tokens_in"], s["tokens_out"], s["model"], s["calls"]) for s in steps]
    fin = [e for e in evs if e["type"] == "step_finished"]
    want = [s for s in steps if s[0] >= (fin[0]["step"] if fin else 1)]
    h.eq([(e["step"], e["usage"]["tokens_in"], e["usage"]["tokens_out"], e["model"], e["tool_calls"]) for e in fin],
         [tuple(s) for s in want], "step_finished events match the step log")
    for s in want:
        calls = [e for e in evs if e["type"].startswith("tool_call_") and e["step"] == s[0]]
        h.eq(len(calls), 2 * s[4], "a started and a finished event per tool call of step %d" % s[0])
    return steps


def test():
    with h.Env("events") as env:
        env.start_fixture()
        env.start_scheduler()
        w1 = env.start_worker("w1", LONGRUN_AGENTS_FILE=AGENTS, LONGRUN_LEASE_SECONDS=3)
        env.wait_queue()

        # 1. a task of several steps with tool calls, watched live from before its first step
        tid = env.enqueue_many([{"agent": "slow3", "input": "q"}])[0]
        rc, evs, err = watch(env, tid)
        h.eq(rc, 0, "watch exits 0 for a succeeded task (%s)" % err)
        h.eq(evs[0]["type"], "claimed", "first event: claimed")
        h.eq((evs[-1]["type"], evs[-1]["status"]), ("outcome", "succeeded"), "last event: the outcome")
        steps = check_against_log(env, tid, evs)
        h.check(len(steps) >= 3 and any(s[4] > 0 for s in steps), "several steps with tool calls: %s" % steps)
        h.eq(env.scalar("select event_seq from tasks where id = %s", (tid,)), len(evs), "tasks.event_seq = events")
        h.check(all("ms" in e and "status" in e for e in evs if e["type"] == "tool_call_finished"), evs)
        first_run = evs

        # the same task again, human output, and from a sequence number
        r = env.cli("watch", tid)
        h.eq(r.returncode, 0, r.stderr)
        h.check("step 1:" in r.stdout and "succeeded" in r.stdout, r.stdout)
        rc, evs, err = watch(env, tid, "--from-seq", "4")
        h.eq(rc, 0, err)
        h.eq(evs, first_run[3:], "--from-seq 4: the same events from the 4th on")

        # a task published straight to RabbitMQ (its row is created by the claim)
        tid = str(uuid.uuid4())
        env.publish([{"id": tid, "agent": "steps3", "input": "raw"}])
        h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (tid,)) == "succeeded", 60,
                   "the published task succeeds")
        rc, evs, err = watch(env, tid)
        h.eq(rc, 0, err)
        h.eq((evs[0]["seq"], evs[0]["type"]), (1, "claimed"), "the inserting claim is event 1")
        check_against_log(env, tid, evs)

        # 2. a consumer that goes away mid-way and comes back resumes without gaps or duplicates
        tid = env.enqueue_many([{"agent": "slow3", "input": "again"}])[0]
        p = start_cli(env, "watch", tid, "--json")
        seen = []
        deadline = time.time() + 60 * h.TIMEOUT_MULT
        while len(seen) < 3 and time.time() < deadline:
            line = p.stdout.readline()
            if line.strip():
                seen.append(json.loads(line))
        p.kill()
        p.wait()
        h.check(len(seen) >= 3 and seen[-1]["type"] != "outcome", "the first watch saw part of the task: %s" % seen)
        rc, rest, err = watch(env, tid, "--from-seq", str(seen[-1]["seq"] + 1))
        h.eq(rc, 0, err)
        check_against_log(env, tid, seen + rest)
        h.eq(rest[-1]["type"], "outcome", "the second watch saw the end")

        # 3. kill -9 of the worker mid-task: the resumed task's events continue the sequence
        tid = env.enqueue_many([{"agent": "slow3", "input": "crash"}])[0]
        h.wait_for(lambda: (env.scalar("select step from tasks where id = %s", (tid,)) or 0) >= 1, 60,
                   "the first step")
        w1.kill()
        port = h.free_port()
        w2 = env.start_worker("w2", LONGRUN_AGENTS_FILE=AGENTS, LONGRUN_LEASE_SECONDS=3, LONGRUN_HTTP_PORT=port)
        rc, evs, err = watch(env, tid, timeout=120)
        h.eq(rc, 0, err)
        check_against_log(env, tid, evs)
        claims = [e for e in evs if e["type"] in ("claimed", "resumed")]
        h.eq([e["worker"] for e in claims][0], "w1", "claimed by w1 first")
        h.eq(claims[-1]["worker"], "w2", "then resumed by w2")
        h.check(claims[-1]["type"] == "resumed" and claims[-1]["epoch"] > claims[0]["epoch"], claims)
        h.eq(env.scalar("select event_seq from tasks where id = %s", (tid,)), evs[-1]["seq"], "no event after the end")

        # 4. bad input: clear errors, exit 2
        r = env.cli("watch", "not-a-uuid")
        h.eq(r.returncode, 2, r.stderr)
        h.check("not a task id" in r.stderr, r.stderr)
        r = env.cli("watch", "00000000-0000-4000-8000-000000000000")
        h.eq(r.returncode, 2, r.stderr)
        h.check("no task with id" in r.stderr, r.stderr)
        r = env.cli("watch", tid, "--from-seq", "1000")
        h.eq(r.returncode, 2, r.stderr)
        h.check("past the end" in r.stderr, r.stderr)
        r = env.cli("watch", tid, "--from-seq", "zero")
        h.eq(r.returncode, 2, r.stderr)

        # 5. a dead task: the outcome's exit code (as longrun wait)
        tid = env.enqueue_many([{"agent": "runaway", "input": "loop"}])[0]
        rc, evs, err = watch(env, tid)
        h.eq(rc, 4, "a dead task: exit 4 (%s)" % err)
        h.eq((evs[-1]["type"], evs[-1]["status"], evs[-1]["stop_reason"]), ("outcome", "dead", "max_steps"), evs[-1])
        check_against_log(env, tid, evs)

        # the stream is a stream, with retention
        q = env.queue_info("longrun.events")
        h.eq(q["arguments"].get("x-queue-type"), "stream", q["arguments"])
        h.check("x-max-age" in q["arguments"] and "x-max-length-bytes" in q["arguments"], q["arguments"])

        # the worker counted what it published, and dropped nothing
        metrics = h.http_get(port, "/metrics")[1]
        h.check('longrun_events_published_total{type="outcome"}' in metrics, metrics[-2000:])
        h.check("longrun_events_dropped_total{" not in metrics, "no event dropped")

        # 6. SIGTERM: exit 0 (LSan clean under ASan)
        w2.signal(signal.SIGTERM)
        h.eq(w2.wait(60), 0, "the worker exits 0 on SIGTERM")

        # 7. events off (LONGRUN_EVENTS=0): the stream has nothing for the task, watch fills
        # every step in from the step log and still exits with the outcome
        w4 = env.start_worker("w4", LONGRUN_AGENTS_FILE=AGENTS, LONGRUN_EVENTS="0")
        tid = env.enqueue_many([{"agent": "steps3", "input": "quiet"}])[0]
        rc, evs, err = watch(env, tid)
        h.eq(rc, 0, err)
        h.check("filling in from the step log" in err, err)
        h.eq([(e["type"], e["seq"], e["reconciled"]) for e in evs],
             [("step_finished", None, True)] * 3 + [("outcome", None, True)],
             "three steps from the step log, then the outcome from the row")
        h.eq(evs[-1]["status"], "succeeded", evs[-1])
        check_steps = env.sql("select step_no from task_steps where task_id = %s order by step_no", (tid,))
        h.eq([e["step"] for e in evs[:-1]], [x["step_no"] for x in check_steps], "the step log's steps")
        for e in evs:
            h.check(not list(SCHEMA.iter_errors(e)), "a reconciled event fits the schema: %s" % e)
        want = env.scalar("select 2 + sum(2 + 2 * coalesce(jsonb_array_length(case when jsonb_typeof(tool_calls)"
                          " = 'array' then tool_calls end), 0)) from task_steps where task_id = %s", (tid,))
        h.eq(env.scalar("select event_seq from tasks where id = %s", (tid,)), want, "the sequence still advances")
        w4.signal(signal.SIGTERM)
        h.eq(w4.wait(60), 0, "exit 0 on SIGTERM")


def test_retention():
    """A stream that no longer holds a task's start (retention): watch says so and fills the
    steps in from the step log.  The stream is declared first with a tiny retention (and small
    segments: RabbitMQ drops whole segments), which the worker uses as it is, with a warning."""
    import pika
    with h.Env("events-retention") as env:
        conn = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
        conn.channel().queue_declare("longrun.events", durable=True, arguments={
            "x-queue-type": "stream", "x-max-length-bytes": 20000, "x-stream-max-segment-size-bytes": 4000})
        conn.close()
        env.start_fixture()
        w = env.start_worker("w1", LONGRUN_AGENTS_FILE=AGENTS)
        env.wait_queue()
        h.check(w.events("amqp.events_retention"), "the worker warns that the stream has other arguments")
        first = env.enqueue_many([{"agent": "steps3", "input": "first"}])[0]
        env.wait_all_terminal(1, 60)
        env.enqueue_many([{"agent": "steps3", "input": "more %d" % i} for i in range(30)])
        env.wait_all_terminal(31, 120)
        rc, evs, err = watch(env, first)
        h.eq(rc, 0, err)
        h.check("not in longrun.events" in err and "retention" in err, err)
        steps = env.scalar("select count(*) from task_steps where task_id = %s", (first,))
        fin = [e for e in evs if e["type"] == "step_finished"]
        h.eq([e["step"] for e in fin], list(range(1, steps + 1)), "every step, from the step log")
        h.check(all(e.get("reconciled") for e in fin), "all of them reconciled: the stream lost them: %s" % evs)
        h.eq(evs[-1]["type"], "outcome", evs[-1])
        w.signal(signal.SIGTERM)
        h.eq(w.wait(60), 0, "exit 0 on SIGTERM")


if __name__ == "__main__":
    h.run(lambda: (test(), test_retention()))

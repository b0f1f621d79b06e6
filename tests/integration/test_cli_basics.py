"""Issue 2: migrations, enqueue, status, list, and bad input against real servers."""
import json
import os
import subprocess
import sys
import threading
import uuid

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

import pika  # noqa: E402


def get_message(env, queue):
    params = pika.URLParameters(env.amqp_url)
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        method, props, body = ch.basic_get(queue, auto_ack=False)
        if method is not None:
            ch.basic_nack(method.delivery_tag, requeue=True)
        return method, props, body
    finally:
        conn.close()


def test():
    with h.Env("cli", migrate=False) as env:
        # --- help everywhere, bad usage exit 2
        for cmd in ([], ["migrate"], ["enqueue"], ["status"], ["list"]):
            r = env.cli(*(cmd + ["--help"]))
            h.eq(r.returncode, 0, "%s --help exit" % cmd)
            h.check("usage:" in r.stdout, "%s --help prints usage" % cmd)
        r = env.cli("frobnicate")
        h.eq(r.returncode, 2, "unknown command exit")
        h.check("unknown command" in r.stderr, "unknown command message")
        r = env.cli("list", "--limit", "zero")
        h.eq(r.returncode, 2, "bad --limit")
        h.check("--limit" in r.stderr and "not an integer" in r.stderr, r.stderr)
        r = env.cli("list", "--status", "sleeping")
        h.eq(r.returncode, 2, "bad --status")
        r = env.cli("status", "not-a-uuid")
        h.eq(r.returncode, 2, "bad id")
        r = env.cli("migrate", "--status", "--dry-run")
        h.eq(r.returncode, 2, "conflicting flags")
        r = env.cli("list", env={"LONGRUN_MAX_IN_FLIGHT": "lots"})
        h.eq(r.returncode, 2, "invalid env")
        h.check("LONGRUN_MAX_IN_FLIGHT=lots" in r.stderr, "env error names the variable and value: " + r.stderr)

        # --- migrations: dry run changes nothing, two concurrent migrators, twice is a no-op
        r = env.cli("migrate", "--dry-run")
        h.eq(r.returncode, 0, "dry run: " + r.stderr)
        h.check("would apply" in r.stdout, r.stdout)
        h.eq(env.scalar("select count(*) from schema_migrations"), 0, "dry run applied nothing")
        results = []

        def mig():
            results.append(env.cli("migrate"))
        ts = [threading.Thread(target=mig) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        for r in results:
            h.eq(r.returncode, 0, "concurrent migrate: " + r.stderr)
        applied = sum(1 for r in results if "applied 0001" in r.stdout)
        h.eq(applied, 1, "exactly one migrator applied 0001: %r" % [r.stdout for r in results])
        nmig = env.scalar("select count(*) from schema_migrations")
        h.check(nmig >= 1, "migrations recorded")
        r = env.cli("migrate")
        h.eq(r.returncode, 0, "second migrate")
        h.check("up to date" in r.stdout, r.stdout)
        h.eq(env.scalar("select count(*) from schema_migrations"), nmig, "no-op")
        r = env.cli("migrate", "--status", "--json")
        st = json.loads(r.stdout)
        h.check(all(m["state"] == "applied" for m in st), st)
        # a tampered checksum is refused
        good = env.scalar("select checksum from schema_migrations where version = 1")
        env.sql("update schema_migrations set checksum = 'x' where version = 1")
        r = env.cli("migrate")
        h.eq(r.returncode, 1, "tampered checksum refused")
        h.check("changed after it was applied" in r.stderr, r.stderr)
        env.sql("update schema_migrations set checksum = %s where version = 1", (good,))
        # a newer database is refused
        env.sql("insert into schema_migrations (version, name, checksum) values (9999, '9999_future', 'f')")
        r = env.cli("migrate")
        h.eq(r.returncode, 1, "newer schema refused")
        h.check("newer than this binary" in r.stderr, r.stderr)
        env.sql("delete from schema_migrations where version = 9999")
        h.eq(env.cli("migrate").returncode, 0, "migrate ok again")

        # --- enqueue one task: row queued, message in the quorum queue with the right properties
        tid = str(uuid.uuid4())
        r = env.cli("enqueue", "--agent", "http-steps", "--input", '{"steps": 3}', "--id", tid,
                    "--max-steps", "40", "--tenant", "acme", "--json")
        h.eq(r.returncode, 0, "enqueue: " + r.stderr)
        out = json.loads(r.stdout)
        h.eq(out[0]["id"], tid, "enqueue prints the id")
        h.eq(out[0]["state"], "queued", "state")
        row = env.sql("select status, agent, queue, tenant, budgets, published_at from tasks where id = %s", (tid,))[0]
        h.eq(row["status"], "queued", "row status")
        h.eq(row["budgets"], {"max_steps": 40}, "budgets stored")
        h.check(row["published_at"] is not None, "published_at set after the confirm")
        h.eq(env.scalar("select count(*) from task_events where task_id = %s and to_status = 'queued'", (tid,)), 1,
             "enqueue event")
        q = h.wait_for(lambda: (env.queue_info("longrun.q.default") or {}).get("messages") == 1 and
                       env.queue_info("longrun.q.default"), 15, "message in longrun.q.default")
        h.eq(q["type"], "quorum", "quorum queue")
        h.eq(q["arguments"].get("x-dead-letter-exchange"), "longrun.dlx", "DLX argument")
        h.eq(q["arguments"].get("x-dead-letter-strategy"), "at-least-once", "at-least-once")
        method, props, body = get_message(env, "longrun.q.default")
        h.check(method is not None, "message present")
        h.eq(props.message_id, tid, "message_id = task id")
        h.eq(props.delivery_mode, 2, "persistent")
        h.eq(props.content_type, "application/json", "content type")
        h.eq(json.loads(body)["id"], tid, "body carries the id")
        h.eq(json.loads(body)["agent"], "http-steps", "body carries the agent")

        # --- the same id again: reported, not published again
        r = env.cli("enqueue", "--agent", "http-steps", "--input", '{"steps": 3}', "--id", tid, "--json")
        h.eq(r.returncode, 0, "duplicate enqueue exit")
        h.eq(json.loads(r.stdout)[0]["state"], "exists", "duplicate reported")
        h.eq(env.queue_info("longrun.q.default")["messages"], 1, "nothing published twice")

        # --- status and list
        r = env.cli("status", tid, "--json")
        h.eq(r.returncode, 0, r.stderr)
        h.eq(json.loads(r.stdout)["status"], "queued", "status --json")
        r = env.cli("status", tid)
        h.check("queued" in r.stdout and "http-steps" in r.stdout, r.stdout)
        r = env.cli("status", str(uuid.uuid4()))
        h.eq(r.returncode, 2, "unknown id exit 2")
        h.check("no task with id" in r.stderr, r.stderr)
        r = env.cli("list", "--status", "queued", "--json")
        h.eq([t["id"] for t in json.loads(r.stdout)], [tid], "list --status queued")
        r = env.cli("list", "--tenant", "nobody", "--json")
        h.eq(json.loads(r.stdout), [], "list --tenant filter")
        r = env.cli("list", "--since", "1h")
        h.eq(r.returncode, 0, r.stderr)
        h.check(tid in r.stdout, "human list shows the task")

        # --- bad input: precise error, exit 2, nothing recorded or published
        before = env.scalar("select count(*) from tasks")
        bad = [
            (["--agent", "Bad Agent!", "--input", "{}"], "agent"),
            (["--agent", "a", "--input", "{not json"], "--input"),
            (["--agent", "a", "--input", "{}", "--max-steps", "0"], "max_steps"),
            (["--agent", "a", "--input", "{}", "--max-steps", "many"], "max-steps"),
            (["--agent", "a", "--input", "{}", "--id", "1234"], "id"),
            (["--agent", "a", "--input", "{}", "--deadline", "tomorrow"], "deadline"),
            (["--agent", "a", "--input", "{}", "--callback-url", "ftp://x"], "callback_url"),
            (["--agent", "a"], "--input"),
            (["--agent", "a", "--input", "{}", "--queue", "Q!"], "--queue"),
        ]
        for args, word in bad:
            r = env.cli("enqueue", *args)
            h.eq(r.returncode, 2, "bad enqueue %r (stderr %s)" % (args, r.stderr))
            h.check(word in r.stderr, "message for %r mentions %s: %s" % (args, word, r.stderr))
        big = os.path.join(env.dir, "big.json")
        with open(big, "w") as f:
            f.write(json.dumps({"blob": "x" * 300000}))
        r = env.cli("enqueue", "--agent", "a", "--input", "@" + big)
        h.eq(r.returncode, 2, "oversized input")
        h.check("limit" in r.stderr, r.stderr)
        h.eq(env.scalar("select count(*) from tasks"), before, "nothing recorded by bad input")
        h.eq(env.queue_info("longrun.q.default")["messages"], 1, "nothing published by bad input")

        # --- many from stdin, with one invalid line: partial (exit 3), the valid ones enqueued
        lines = "\n".join([json.dumps({"agent": "http-steps", "input": {"steps": 1}}),
                           "{broken",
                           json.dumps({"agent": "http-steps", "input": {"steps": 2}, "budgets": {"max_tokens": 5}})])
        r = env.cli("enqueue", input=lines + "\n")
        h.eq(r.returncode, 3, "partial batch exit 3: " + r.stderr)
        h.check("line 2" in r.stderr and "not valid JSON" in r.stderr, r.stderr)
        h.eq(len([l for l in r.stdout.splitlines() if l.strip()]), 2, "two ids printed")
        h.eq(env.scalar("select count(*) from tasks"), before + 2, "two recorded")

        # --- RabbitMQ unreachable: clear message, exit 1, no task left behind
        r = env.cli("enqueue", "--agent", "http-steps", "--input", "{}",
                    env={"LONGRUN_AMQP_URL": "amqp://longrun:longrun@127.0.0.1:1/"})
        h.eq(r.returncode, 1, "broker down exit 1")
        h.check("cannot connect to RabbitMQ" in r.stderr and "nothing was enqueued" in r.stderr, r.stderr)
        h.check("longrun:longrun@" not in r.stderr, "password masked: " + r.stderr)
        h.eq(env.scalar("select count(*) from tasks"), before + 2, "no task recorded with the broker down")
        # PostgreSQL unreachable
        r = env.cli("list", env={"LONGRUN_DATABASE_URL": "postgresql://longrun@127.0.0.1:1/longrun"})
        h.eq(r.returncode, 1, "db down exit 1")
        h.check("cannot connect to PostgreSQL" in r.stderr, r.stderr)


h.run(test)

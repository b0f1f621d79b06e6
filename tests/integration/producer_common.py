"""Shared body of the producer tests (issue 18, item 5): test_producer_python.py,
test_producer_node.py and test_producer_go.py each run one of examples/producers/ as a
subprocess against a fleet (fixture server, scheduler, worker with examples/agents.json)
in the test's own vhost, and check the producer's exit codes and output against the
replies and the tasks' rows in PostgreSQL.

Every producer prints, one per line,

    reply queue <name>
    published <task id> correlation_id=<id>
    reply <task id> <status> correlation_id=<id> steps=<n> [stop_reason=... error=...]
    missing <task id> correlation_id=<id> (...)
    summary: published=N succeeded=N failed=N missing=N unexpected=N seconds=S   (last line)

and exits 0 (all succeeded), 1 (some task did not succeed), 2 (usage), 3 (connect or
publish failed), 4 (timed out with outcomes missing).

A missing toolchain: with CI set, the test fails, saying why on its last line; without CI
it is skipped (77), saying why on its last line.
"""
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

EXAMPLES = os.path.join(h.SOURCE, "examples")
AGENTS = os.path.join(EXAMPLES, "agents.json")
SUMMARY = re.compile(r"^summary: published=(\d+) succeeded=(\d+) failed=(\d+) missing=(\d+) unexpected=(\d+) "
                     r"seconds=[0-9.]+$")


def missing_toolchain(why):
    """The producer's toolchain is not there: fail in CI, skip elsewhere; why is the last line either way."""
    if os.environ.get("CI"):
        print("FAIL: %s" % why, flush=True)
        sys.exit(1)
    h.skip(why)


class Run:
    """One run of a producer: exit code, output and what the output says."""

    def __init__(self, argv, proc):
        self.argv, self.rc, self.out, self.err = argv, proc.returncode, proc.stdout, proc.stderr
        lines = self.out.splitlines()
        self.reply_queue = None
        self.published = {}  # task id -> correlation id
        self.replies = {}    # task id -> (status, correlation id, steps)
        self.missing = []
        for line in lines:
            f = line.split()
            if line.startswith("reply queue "):
                self.reply_queue = f[2]
            elif f and f[0] == "published":
                self.published[f[1]] = f[2].split("=", 1)[1]
            elif f and f[0] == "reply" and len(f) >= 5:
                self.replies[f[1]] = (f[2], f[3].split("=", 1)[1], f[4].split("=", 1)[1])
            elif f and f[0] == "missing":
                self.missing.append(f[1])
        m = SUMMARY.match(lines[-1]) if lines else None
        self.summary = tuple(int(x) for x in m.groups()) if m else None

    def describe(self):
        return "%s exited %s\n--- stdout\n%s\n--- stderr\n%s" % (" ".join(self.argv), self.rc, self.out[-3000:],
                                                                 self.err[-3000:])


def run_producer(env, cmd, args, timeout=120, **extra_env):
    """Runs cmd + args (the producer and its arguments) to the end; returns a Run."""
    e = env.base_env(**extra_env)
    p = subprocess.run(cmd + args, env=e, capture_output=True, text=True, timeout=timeout * h.TIMEOUT_MULT)
    r = Run(cmd + args, p)
    h.log("producer %s: exit %s, %s" % (" ".join(args), r.rc,
                                        r.out.splitlines()[-1] if r.out else r.err.strip()[-200:]))
    return r


def check_producer(lang, cmd, n=5):
    """The producer test: cmd is the argv prefix that runs the producer (before N)."""
    with h.Env("producer-" + lang) as env:
        env.start_fixture()
        env.start_scheduler()
        env.start_worker("w1", LONGRUN_AGENTS_FILE=AGENTS)
        env.wait_queue("longrun.q.default", consumers=1)

        # 1. N tasks of the example agent (4 steps, a tool call per step): every one succeeds
        r = run_producer(env, cmd, [str(n)])
        h.eq(r.rc, 0, "exit code when every task succeeds\n" + r.describe())
        h.eq(r.summary, (n, n, 0, 0, 0), "summary line (last line)\n" + r.describe())
        h.check(r.reply_queue and r.reply_queue.startswith("reply."), "reply queue named with the prefix: %r"
                % r.reply_queue)
        h.eq(len(r.published), n, "published lines")
        h.eq(len(set(r.published.values())), n, "a correlation id per task")
        h.eq(set(r.replies), set(r.published), "a reply line per published task")
        rows = {x["id"]: x for x in env.sql("select id::text, status, step, reply_to, correlation_id, "
                                             "result->>'answer' as answer from tasks where id = any(%s::uuid[])",
                                             (list(r.published),))}
        h.eq(set(rows), set(r.published), "a task row per published task")
        for tid, corr in r.published.items():
            row = rows[tid]
            h.eq((row["status"], row["step"], row["answer"]), ("succeeded", 4, "done after 4 steps"), "task %s" % tid)
            h.eq((row["reply_to"], row["correlation_id"]), (r.reply_queue, corr), "reply_to and correlation_id of %s"
                 % tid)
            h.eq(r.replies[tid], ("succeeded", corr, "4"), "reply line of %s" % tid)
        h.eq(env.queue_counts(r.reply_queue), None, "the exclusive reply queue is gone with the producer")

        # 2. tasks that end dead (an agent no worker knows): exit 1, the reply says why
        r = run_producer(env, cmd, ["2", "--agent", "no-such-agent"])
        h.eq(r.rc, 1, "exit code when tasks end dead\n" + r.describe())
        h.eq(r.summary, (2, 0, 2, 0, 0), "summary of dead tasks\n" + r.describe())
        for tid in r.published:
            h.eq(r.replies[tid][0], "dead", "reply status of %s" % tid)
            h.eq(env.scalar("select stop_reason from tasks where id = %s", (tid,)), "unknown_agent", "row of %s" % tid)
        h.check("stop_reason=unknown_agent" in r.out, "the reply line gives the stop reason\n" + r.describe())

        # 3. a queue nobody declared: the broker returns the task (mandatory), exit 3
        r = run_producer(env, cmd, ["1", "--queue", "nosuch"])
        h.eq(r.rc, 3, "exit code for an unroutable task\n" + r.describe())
        h.check("unroutable" in r.err, "says the task was unroutable\n" + r.describe())
        h.eq(env.scalar("select count(*) from tasks where queue = 'nosuch'"), 0, "no row for it")

        # 4. an outcome later than --timeout: exit 4, the task listed as missing
        r = run_producer(env, cmd, ["1", "--agent", "http-steps", "--input", '{"steps": 1, "path": "/tools/slow-4000"}',
                                     "--timeout", "1"])
        h.eq(r.rc, 4, "exit code on timeout\n" + r.describe())
        h.eq(r.summary[:4], (1, 0, 0, 1), "summary on timeout\n" + r.describe())
        h.eq(r.missing, list(r.published), "the late task is listed as missing")
        late = list(r.published)[0]
        # the task itself finishes; its outcome finds no reply queue (the producer left)
        h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (late,)) == "succeeded", 60,
                   "the late task succeeds anyway")

        # 5. usage errors: exit 2
        r = run_producer(env, cmd, ["0"])
        h.eq(r.rc, 2, "N = 0 is a usage error\n" + r.describe())
        r = run_producer(env, cmd, ["1"], LONGRUN_AMQP_URL="")
        h.eq(r.rc, 2, "no LONGRUN_AMQP_URL is a configuration error\n" + r.describe())
        h.check("LONGRUN_AMQP_URL" in r.err, "names the variable\n" + r.describe())
        for bad in ("none", "longrun.replies"):
            r = run_producer(env, cmd, ["1"], LONGRUN_REPLY_TO_PREFIX=bad)
            h.eq(r.rc, 2, "LONGRUN_REPLY_TO_PREFIX=%s: no reply queue a worker would use\n%s" % (bad, r.describe()))
            h.check("LONGRUN_REPLY_TO_PREFIX" in r.err, "names the variable\n" + r.describe())
        # the first of several prefixes names the reply queue
        r = run_producer(env, cmd, ["1"], LONGRUN_REPLY_TO_PREFIX=" reply.x-, other.")
        h.eq(r.rc, 0, "with LONGRUN_REPLY_TO_PREFIX=reply.x-,other.\n" + r.describe())
        h.check(r.reply_queue.startswith("reply.x-"), "reply queue %s from the first prefix" % r.reply_queue)

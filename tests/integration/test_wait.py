"""Issue 18, item 3: results without polling loops.  `longrun wait` blocks until tasks are final
(woken by PostgreSQL notifications from a trigger, with a poll fallback) and says how they ended
in its exit code; `longrun result` prints a task's output.  Real RabbitMQ and PostgreSQL, the
fixture model server."""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

AGENTS = os.path.join(h.SOURCE, "tests", "fixtures", "agents.test.json")


def task(env, tid):
    return env.sql("select * from tasks where id = %s", (tid,))[0]


def start_cli(env, *args, stdin=None):
    return subprocess.Popen([os.path.join(h.BUILD, "longrun")] + list(args), env=env.base_env(),
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test():
    with h.Env("wait") as env:
        env.start_fixture()
        env.start_scheduler()
        ok = env.enqueue_many([{"agent": "steps3", "input": "q%d" % i} for i in range(3)])
        dead = env.enqueue_many([{"agent": "runaway", "input": "loop"}])[0]

        # blocks while nothing runs the tasks
        w = start_cli(env, "wait", *ok, "--json")
        time.sleep(1.5)
        h.check(w.poll() is None, "wait blocks while the tasks are queued")
        env.start_worker("w1", LONGRUN_AGENTS_FILE=AGENTS)
        out, err = w.communicate(timeout=60 * h.TIMEOUT_MULT)
        ended = time.time()
        h.eq(w.returncode, 0, "every task succeeded: exit 0 (%s)" % err)
        lines = [json.loads(x) for x in out.splitlines()]
        h.eq(sorted(x["id"] for x in lines), sorted(ok), "one line per task")
        h.check(all(x["status"] == "succeeded" for x in lines), lines)
        last = env.scalar("select extract(epoch from max(finished_at)) from tasks where id = any(%s::uuid[])", (ok,))
        h.log("wait returned %.0f ms after the last task finished" % (1000 * (ended - float(last))))

        # a dead task: exit 4, for wait and result; result prints the error
        r = env.cli("wait", dead, "--timeout", "60")
        h.eq(r.returncode, 4, "a dead task: exit 4 (%s)" % r.stderr)
        h.check("dead" in r.stdout and "max_steps" in r.stdout, r.stdout)
        r = env.cli("result", dead)
        h.eq(r.returncode, 4, "result of a dead task: exit 4")
        h.check("max_steps" in r.stderr and "budget" in r.stderr, r.stderr)

        # result of a finished task: the answer, or JSON with usage and cost
        r = env.cli("result", ok[0])
        h.eq((r.returncode, r.stdout), (0, "done after 3 steps\n"), "result prints the answer")
        r = env.cli("result", ok[0], "--json")
        j = json.loads(r.stdout)
        h.eq((j["status"], j["result"]["answer"], j["usage"]["steps"]), ("succeeded", "done after 3 steps", 3), j)
        h.check(j["usage"]["tokens_in"] > 0 and j["usage"]["cost_usd"] > 0, j["usage"])

        # a cancelled task (queued where no worker listens): exit 5; ids from stdin
        lone = env.enqueue_many([{"agent": "steps3", "input": "nobody runs this"}], queue="nowhere")[0]
        w = start_cli(env, "wait", "-", stdin=True)
        w.stdin.write(lone + "\n")
        w.stdin.close()
        time.sleep(1)
        h.check(w.poll() is None, "waiting for the queued task")
        h.eq(env.cli("cancel", lone).returncode, 0, "cancelled")
        w.wait(30 * h.TIMEOUT_MULT)
        h.eq(w.returncode, 5, "a cancelled task: exit 5")
        h.eq(env.cli("result", lone).returncode, 5, "result of a cancelled task: exit 5")

        # the timeout: exit 6, and result of a task that is not final says so
        other = env.enqueue_many([{"agent": "steps3", "input": "still queued"}], queue="nowhere")[0]
        t0 = time.time()
        r = env.cli("wait", other, ok[1], "--timeout", "2")
        h.eq(r.returncode, 6, "timeout: exit 6 (%s)" % r.stderr)
        h.check(time.time() - t0 < 10, "gave up after about 2 s")
        h.check(ok[1] in r.stdout and "timed out" in r.stderr, (r.stdout, r.stderr))
        r = env.cli("result", other)
        h.eq(r.returncode, 6, "result of a queued task: exit 6")
        h.check("not final" in r.stderr, r.stderr)

        # the poll fallback: a task made final without a notification (the trigger off meanwhile)
        w = start_cli(env, "wait", other)
        time.sleep(1)
        env.sql("alter table tasks disable trigger tasks_done_notify; update tasks set status = 'succeeded', "
                "finished_at = now() where id = %s; alter table tasks enable trigger tasks_done_notify", (other,))
        w.wait(15 * h.TIMEOUT_MULT)
        h.eq(w.returncode, 0, "found by the poll fallback")

        # enqueue --wait: enqueue, then wait (the worker still runs)
        r = env.cli("enqueue", "--agent", "steps3", "--input", '"and wait"', "--wait", "--timeout", "60")
        h.eq(r.returncode, 0, "enqueue --wait: exit 0 once it succeeded (%s)" % r.stderr)
        lines = r.stdout.split()
        h.check(len(lines) >= 2 and lines[0] == lines[1] and lines[2] == "succeeded", r.stdout)
        r = env.cli("enqueue", "--agent", "runaway", "--input", '"loop"', "--wait")
        h.eq(r.returncode, 4, "enqueue --wait of a task that dies: exit 4")
        r = env.cli("enqueue", "--agent", "steps3", "--input", '"x"', "--timeout", "5")
        h.eq(r.returncode, 2, "--timeout without --wait: exit 2")

        # bad input
        for args, what in ((["wait"], "no id"), (["wait", "not-a-uuid"], "malformed id"),
                           (["wait", "00000000-0000-4000-8000-000000000000"], "unknown id"),
                           (["wait", ok[0], "--timeout", "0"], "timeout out of range"),
                           (["result"], "no id"), (["result", "00000000-0000-4000-8000-000000000000"], "unknown id")):
            r = env.cli(*args)
            h.eq(r.returncode, 2, "%s: exit 2 (%s)" % (what, r.stderr.strip()))
            h.check(r.stderr.strip(), "%s: a message" % what)
        h.eq(env.cli("wait", "--help").returncode, 0, "wait --help")


h.run(test)

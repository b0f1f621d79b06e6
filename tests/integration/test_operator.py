"""Issue 6: the operator CLI against a running fleet: dlq requeue with overrides
resumes from the last step, log --follow streams steps, approve / deny /
signal / cancel / replay / kill switches, and bad input (exit 2, nothing
changed)."""
import json
import os
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

AGENTS = os.path.join(h.SOURCE, "tests", "fixtures", "agents.test.json")


def task(env, tid):
    return env.sql("select * from tasks where id = %s", (tid,))[0]


def events(env, tid):
    return env.sql("select from_status, to_status, reason, actor, detail from task_events where task_id = %s order by id",
                   (tid,))


def test():
    with h.Env("operator") as env:
        env.start_fixture()
        env.start_scheduler()
        env.start_worker("w1", LONGRUN_AGENTS_FILE=AGENTS)

        # ---- every subcommand has --help and is listed in longrun --help
        top = env.cli("--help").stdout
        for cmd in ("log", "stats", "workers", "dlq", "approve", "deny", "signal", "cancel", "replay", "tools", "models"):
            h.check(cmd in top, "%s listed in longrun --help" % cmd)
            r = env.cli(cmd, "--help")
            h.eq(r.returncode, 0, "%s --help" % cmd)
            h.check("usage:" in r.stdout, "%s --help shows usage" % cmd)
        for sub in ("list", "show", "requeue", "purge"):
            h.eq(env.cli("dlq", sub, "--help").returncode, 0, "dlq %s --help" % sub)

        # ---- a task dead-lettered for max_steps finishes after requeue --max-steps 50, from its last step
        tid = env.enqueue_many([{"agent": "steps3", "input": "q", "budgets": {"max_steps": 1}}])[0]
        h.wait_for(lambda: task(env, tid)["status"] == "dead", 30, "dead on max_steps")
        h.eq(task(env, tid)["stop_reason"], "max_steps", "stop reason")
        r = env.cli("dlq", "list", "--reason", "max_steps", "--json")
        h.eq([d["task_id"] for d in json.loads(r.stdout)], [tid], "dlq list --reason")
        r = env.cli("dlq", "show", tid, "--json")
        shown = json.loads(r.stdout)
        h.eq(shown["dead_letter"]["reason"], "max_steps", "dlq show reason")
        h.eq(shown["task"]["step"], 1, "dlq show budget used")
        h.eq(len(shown["last_steps"]), 1, "dlq show last steps")
        # bad input: nothing changed
        for args, word in ((["dlq", "requeue", tid, "--max-steps", "0"], "max_steps"),
                           (["dlq", "requeue", tid, "--max-steps", "lots"], "not a number"),
                           (["dlq", "requeue", "--all", tid], "exactly one"),
                           (["dlq", "requeue", "--all", "--reason", "x"], "exactly one"),
                           (["dlq", "requeue", str(uuid.uuid4())], "not dead tasks"),
                           (["dlq", "requeue", tid, "--deadline", "soon"], "RFC 3339"),
                           (["dlq", "requeue", tid, "--max-seconds", "0"], "max_seconds"),
                           (["dlq", "show", "zzz"], "neither"),
                           (["dlq", "frob"], "unknown dlq command"),
                           (["dlq", "purge"], "--older-than")):
            r = env.cli(*args)
            h.eq(r.returncode, 2, "%r exit (stderr: %s)" % (args, r.stderr))
            h.check(word in r.stderr, "%r message mentions %r: %s" % (args, word, r.stderr))
        h.eq(task(env, tid)["status"], "dead", "bad requeues changed nothing")
        r = env.cli("dlq", "requeue", tid, "--max-steps", "50", "--dry-run")
        h.eq(r.returncode, 0, r.stderr)
        h.check("would requeue" in r.stdout and "from step 2" in r.stdout, r.stdout)
        h.eq(task(env, tid)["status"], "dead", "dry run changed nothing")
        calls_before = len(env.fixture("/_requests?limit=10000&model=fixture-steps-3")["requests"])
        r = env.cli("dlq", "requeue", tid, "--max-steps", "50", "--max-seconds", "900", "--actor", "alice")
        h.eq(r.returncode, 0, r.stderr)
        h.wait_for(lambda: task(env, tid)["status"] == "succeeded", 30, "requeued task finished")
        t = task(env, tid)
        h.eq(t["step"], 3, "three steps in all")
        h.eq(t["budgets"]["max_steps"], 50, "budget raised")
        h.eq(t["budgets"]["max_seconds"], 900, "time budget set by requeue --max-seconds")
        steps = env.sql("select step_no, epoch from task_steps where task_id = %s order by step_no", (tid,))
        h.eq([s["step_no"] for s in steps], [1, 2, 3], "no step re-run, no gap")
        h.eq(len(env.fixture("/_requests?limit=10000&model=fixture-steps-3")["requests"]) - calls_before, 2,
             "exactly two more model calls: steps 2 and 3")
        ev = events(env, tid)
        h.check(any(e["reason"] == "requeued" and e["actor"] == "alice" for e in ev), "requeue recorded with actor")
        h.check(env.sql("select requeued_at from dead_letters where task_id = %s", (tid,))[0]["requeued_at"],
                "dead letter marked requeued")

        # ---- log: steps and transitions; --follow streams a running task's steps
        r = env.cli("log", tid, "--json")
        log = json.loads(r.stdout)
        h.eq([e["step"] for e in log if e["type"] == "step"], [1, 2, 3], "log steps")
        h.check(any(e["type"] == "event" and e["to"] == "succeeded" for e in log), "log transitions")
        h.check(all(e["model"] == "fixture-steps-3" for e in log if e["type"] == "step"), "log shows the model")
        slow = env.enqueue_many([{"agent": "steps3", "input": "slowly"}])[0]
        env.fixture("/_reset", {})
        p = subprocess.Popen([os.path.join(h.BUILD, "longrun"), "log", slow, "--follow", "--json"],
                             env=env.base_env(), stdout=subprocess.PIPE, text=True)
        out, _ = p.communicate(timeout=60)
        lines = [json.loads(l) for l in out.splitlines() if l.strip()]
        h.eq([l["step"] for l in lines if l["type"] == "step"], [1, 2, 3], "--follow saw every step")
        h.check(lines[-1]["type"] == "event" and lines[-1]["to"] == "succeeded", "--follow ends with the outcome: %r" % lines[-3:])
        r = env.cli("log", str(uuid.uuid4()))
        h.eq(r.returncode, 2, "log of an unknown id")

        # ---- approve / deny / signal
        a1 = env.enqueue_many([{"agent": "approver", "input": "may I?"}])[0]
        a2 = env.enqueue_many([{"agent": "approver", "input": "may I?"}])[0]
        h.wait_for(lambda: task(env, a1)["status"] == "suspended" and task(env, a2)["status"] == "suspended", 30,
                   "both waiting for approval")
        t0 = time.time()
        r = env.cli("approve", a1, "--comment", "looks fine", "--actor", "bob")
        h.eq(r.returncode, 0, r.stderr)
        h.check("resumes now" in r.stdout, r.stdout)
        h.wait_for(lambda: task(env, a1)["status"] != "suspended", 10, "approval wakes the task")
        woke = time.time() - t0
        h.log("approval woke the task in %.2f s" % woke)
        h.check(woke < 2.0, "approval woke the task within about a second (%.2f s)" % woke)
        h.wait_for(lambda: task(env, a1)["status"] == "succeeded", 30, "approved task finished")
        r = env.cli("deny", a2, "--reason", "no way")
        h.eq(r.returncode, 0, r.stderr)
        h.wait_for(lambda: task(env, a2)["status"] == "succeeded", 30, "denied task goes on (the model sees the denial)")
        res = [m for s in env.sql("select messages from task_steps where task_id = %s order by step_no", (a2,))
               for m in s["messages"] if m["role"] == "tool"]
        h.check(any(m.get("is_error") and "no way" in m["content"] for m in res), "denial reached the model: %r" % res)
        h.check(any(e["reason"] == "approved" and e["actor"] == "bob" for e in events(env, a1)), "approve audited")
        r = env.cli("approve", a1)
        h.eq(r.returncode, 2, "approving a finished task is refused")
        r = env.cli("approve", a1, "--reason", "x")
        h.eq(r.returncode, 2, "conflicting flag")
        r = env.cli("signal", a1, "go", "--payload", "{bad")
        h.eq(r.returncode, 2, "bad payload")

        # ---- cancel: a waiting task at once; a running one at its next step boundary
        w = env.enqueue_many([{"agent": "approver", "input": "wait"}])[0]
        h.wait_for(lambda: task(env, w)["status"] == "suspended", 30, "waiting")
        r = env.cli("cancel", w, "--reason", "not needed")
        h.eq(r.returncode, 0, r.stderr)
        h.eq(task(env, w)["status"], "cancelled", "cancelled at once")
        h.eq(env.cli("cancel", w).returncode, 2, "cancel twice is refused")
        env.fixture("/_reset", {})
        run = env.enqueue_many([{"agent": "runaway", "input": "spin", "budgets": {"max_steps": 1000}}])[0]
        h.wait_for(lambda: task(env, run)["step"] >= 2, 30, "runaway running")
        r = env.cli("cancel", run)
        h.eq(r.returncode, 0, r.stderr)
        h.wait_for(lambda: task(env, run)["status"] == "cancelled", 15, "running task cancelled at a step boundary")
        n = task(env, run)["step"]
        time.sleep(1)
        h.eq(task(env, run)["step"], n, "no step after the cancel")
        env.check_step_log()

        # ---- replay: fork from step 2 copies step 1 and runs 2..3 again
        r = env.cli("replay", tid, "--from-step", "2", "--fork", "--json")
        h.eq(r.returncode, 0, r.stderr)
        fork = json.loads(r.stdout)["id"]
        h.check(fork != tid, "a new task")
        h.wait_for(lambda: task(env, fork)["status"] == "succeeded", 30, "fork finished")
        h.eq([s["step_no"] for s in env.sql("select step_no from task_steps where task_id = %s order by step_no", (fork,))],
             [1, 2, 3], "fork history")
        h.eq(task(env, tid)["status"], "succeeded", "original untouched")
        h.eq(env.cli("replay", tid, "--from-step", "9").returncode, 2, "from-step past the end")
        h.eq(env.cli("replay", tid).returncode, 2, "--from-step required")
        # in place
        r = env.cli("replay", tid, "--from-step", "3")
        h.eq(r.returncode, 0, r.stderr)
        h.wait_for(lambda: task(env, tid)["status"] == "succeeded" and task(env, tid)["step"] == 3, 30, "replayed in place")

        # ---- kill switch: a disabled tool returns an error result, fleet-wide, within seconds
        r = env.cli("tools", "disable", "lookup", "--reason", "incident 42")
        h.eq(r.returncode, 0, r.stderr)
        time.sleep(1.0)
        k = env.enqueue_many([{"agent": "steps3", "input": "kill"}])[0]
        h.wait_for(lambda: task(env, k)["status"] in ("succeeded", "dead"), 30, "task with a disabled tool ends")
        tool_msgs = [m for s in env.sql("select messages from task_steps where task_id = %s", (k,))
                     for m in s["messages"] if m["role"] == "tool"]
        h.check(tool_msgs and all("disabled" in m["content"] for m in tool_msgs), "disabled tool: %r" % tool_msgs)
        h.eq(env.cli("tools", "enable", "lookup").returncode, 0, "enable")
        r = env.cli("tools", "list", "--json")
        h.eq(json.loads(r.stdout)[0]["disabled"], False, "flag recorded")
        h.eq(env.cli("tools", "disable").returncode, 2, "missing NAME")

        # ---- stats and workers
        r = env.cli("stats", "--json")
        h.eq(r.returncode, 0, r.stderr)
        st = json.loads(r.stdout)
        h.check(st["tasks"].get("succeeded", 0) >= 5, st)
        h.check(any(q["queue"] == "longrun.q.default" and q["consumers"] >= 1 for q in st["queues"]), st)
        h.check(st["dead_letters"].get("max_steps", 0) >= 1, st)
        r = env.cli("workers", "--json")
        ws = json.loads(r.stdout)
        h.eq([w["id"] for w in ws], ["w1"], "live workers")


h.run(test)

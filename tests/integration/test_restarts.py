"""Issue 3: RabbitMQ restarted mid-run, and separately PostgreSQL restarted
mid-run (SERIAL in ctest: it restarts the shared test servers).

Each phase runs N tasks x 10 steps through two workers (slices of 4 steps, so
continuations must cross the outage) with a scheduler, restarts one server
with scripts/services.sh once work is under way (RabbitMQ: restart-rabbitmq;
PostgreSQL: kill-postgres, 3 s down, start-postgres), and then proves: every task
succeeds; each has exactly 10 contiguous step rows (nothing lost, nothing
duplicated); readiness (/readyz) went false during the outage and came back;
the workers never died.  Prints how many steps ran twice (a step whose
checkpoint was lost with the connection may run again; the row never
doubles).

Last, PostgreSQL goes away for longer than a worker's lease: the worker must
stop the steps it can no longer checkpoint (log event lease.lost), and the
tasks finish once the database is back.

Needs LONGRUN_HOME naming the services.sh instance of LONGRUN_DATABASE_URL
(scripts/dev test sets it); skips otherwise.
"""
import os
import sys
import time
import urllib.request
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

free_port = h.free_port

N = int(os.environ.get("LONGRUN_TEST_TASKS", "200"))
LEASE = 60
STEPS = 10




def ready(port):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/readyz" % port, timeout=2) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001
        return False


def phase(env, name, restart_cmd):
    ports = [free_port(), free_port()]
    # leases far longer than the outage: a task that waited for its lease to
    # expire (a hand-back lost with the connection) shows up in the timing
    ws = [env.start_worker("%s-w%d" % (name, i), LONGRUN_MAX_IN_FLIGHT=20, LONGRUN_SLICE_STEPS=4,
                           LONGRUN_HTTP_PORT=ports[i], LONGRUN_LEASE_SECONDS=LEASE) for i in range(2)]
    h.wait_for(lambda: all(ready(p) for p in ports), 30, "workers ready")
    env.wait_queue(consumers=2)
    ids = env.enqueue_many([{"agent": "http-steps", "input": {"steps": STEPS}} for _ in range(N)])
    h.wait_for(lambda: env.scalar("select count(*) from task_steps where task_id = any(%s::uuid[])", (ids,))
               >= N * STEPS // 5, 60, "work under way")
    done_before = env.scalar("select count(*) from task_steps where task_id = any(%s::uuid[])", (ids,))
    t0 = time.time()
    not_ready = []
    # restart in the background of our polling of /readyz
    import subprocess
    for i, cmd in enumerate(restart_cmd):
        if isinstance(cmd, (int, float)):
            t_end = time.time() + cmd
            while time.time() < t_end:
                if not any(ready(p) for p in ports):
                    not_ready.append(time.time() - t0)
                time.sleep(0.2)
            continue
        proc = subprocess.Popen([os.path.join(h.SOURCE, "scripts", "services.sh"), cmd],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None:
            if not any(ready(p) for p in ports):
                not_ready.append(time.time() - t0)
            time.sleep(0.2)
        h.check(proc.returncode == 0, "services.sh %s failed: %s" % (cmd, proc.stderr.read()[-2000:]))
    t_back = time.time()
    h.log("%s: %s took %.1f s (%d steps were done before)" % (name, " + ".join(map(str, restart_cmd)),
                                                            t_back - t0, done_before))
    h.wait_for(lambda: all(ready(p) for p in ports), 60, "workers ready again")
    h.check(not_ready, "readiness went false during the outage")

    def finished():
        n = env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and status in "
                       "('succeeded', 'failed', 'dead')", (ids,))
        return n == N and n
    h.wait_for(finished, 180, "every task finished", interval=0.5)
    el = time.time() - t0
    after = time.time() - t_back
    h.check(after < LEASE - 15, "finished %.1f s after the server was back: some task waited for its %d s lease "
            "to expire" % (after, LEASE))
    h.eq(env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and status = 'succeeded'", (ids,)), N,
         "all succeeded")
    env.check_step_log()
    h.eq(env.scalar("select count(*) from task_steps where task_id = any(%s::uuid[])", (ids,)), N * STEPS,
         "step rows")
    h.eq(env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and step <> %s", (ids, STEPS)), 0,
         "10 steps each")
    idset = set(ids)
    keys = Counter(r["headers"].get("idempotency-key") for r in env.fixture_requests("/step")
                   if r["headers"].get("x-longrun-task-id") in idset)
    h.eq(len(keys), N * STEPS, "every step reached the tool")
    twice = sum(n - 1 for n in keys.values() if n > 1)
    h.log("RESULT %s: %d tasks x %d steps finished %.1f s after the restart began; readiness false for ~%.1f s; "
          "steps run twice: %d" % (name, N, STEPS, el, len(not_ready) * 0.2, twice))
    for w in ws:
        h.check(w.alive(), "%s alive" % w.name)
        h.eq(len(w.events("worker.started")), 1, "%s never restarted" % w.name)
    for w in ws:
        w.signal(15)
    for w in ws:
        h.eq(w.wait(30), 0, "%s exits 0" % w.name)


def phase_lease_lost(env):
    """PostgreSQL gone for longer than the lease: the worker stops its running
    steps (it can no longer prove it owns their tasks) instead of finishing
    work nobody can checkpoint; once the database is back the tasks resume
    from their last checkpoint and finish."""
    w = env.start_worker("lost-w", LONGRUN_LEASE_SECONDS=3, LONGRUN_SLICE_STEPS=100)
    env.wait_queue(consumers=1)
    ids = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 2, "path": "/tools/slow-8000"}}
                            for _ in range(5)])
    h.wait_for(lambda: env.scalar("select count(*) from tasks where lease_owner = 'lost-w' and "
                                  "id = any(%s::uuid[])", (ids,)) == len(ids), 30, "lost-w holds the tasks")
    env.services("kill-postgres")
    t0 = time.time()
    ev = w.wait_event("lease.lost", 15)
    took = time.time() - t0
    env.services("start-postgres")
    h.check(took < 3 + 3, "steps stopped %.1f s after the database went away (lease 3 s)" % took)
    h.log("database gone: lost-w stopped its running steps after %.1f s: %s" % (took, ev[0]["msg"]))
    h.wait_for(lambda: env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and status = 'succeeded'",
                                  (ids,)) == len(ids), 120, "the tasks finished after the database came back")
    env.check_step_log()
    h.check(w.alive(), "lost-w alive")
    w.signal(15)
    h.eq(w.wait(30), 0, "lost-w exits 0")


def test():
    with h.Env("restarts") as env:
        env.check_services_home()
        env.start_fixture("--tool-latency-ms", "100", "--record", str(N * STEPS * 4))
        env.start_scheduler(LONGRUN_OUTBOX_GRACE_SECONDS=5)
        phase(env, "rabbitmq", ["restart-rabbitmq"])
        # a crash (immediate shutdown: open transactions are lost) and 3 s of
        # outage, then a start: longer than a fast restart, so that readiness
        # is seen going false, and harsher on in-flight checkpoints
        phase(env, "postgres", ["kill-postgres", 3, "start-postgres"])
        phase_lease_lost(env)


h.run(test)

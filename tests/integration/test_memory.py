"""Issue 16 (4): memory under load.  A worker with a memory budget stops
claiming and holds back model calls and answers instead of growing, and an
answer over LONGRUN_MAX_RESPONSE_BYTES fails its step for good.

1. response_too_large: a worker limited to 1 MiB answers meets a 2 MiB one:
   the task is dead-lettered at attempt 0 with the reason in its error, and
   the model was called once (not retried).
2. The load: N tasks in flight at once (LONGRUN_MAX_IN_FLIGHT=N), each
   answered with 4 MiB, in a worker whose memory is limited to half of
   N x 4 MiB: a memory cgroup of its own (v2 or v1, as a pod's limit), or
   where this machine cannot make one, its address space (RLIMIT_AS, through
   prlimit).  No budget is configured: the worker derives it from the limit
   (half of it).  Every task succeeds, the worker
   never runs out of memory (no crash, no out-of-memory error), the budget
   really bound (calls waited, deliveries were held), and the peak RSS is
   printed.  Without the budget the worker reads 500 answers at once and
   exhausts its address space.
   Under ASan (which reserves terabytes of shadow memory, so RLIMIT_AS cannot
   apply) the budget is set explicitly (LONGRUN_MEMORY_BUDGET_MB) on fewer tasks.
"""
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

MIB = 1024 * 1024
ANSWER_KIB = 4096


def sanitized():
    try:
        with open(os.path.join(h.BUILD, "CMakeCache.txt")) as f:
            return re.search(r"^LONGRUN_SANITIZE:BOOL=ON$", f.read(), re.M) is not None
    except OSError:
        return False


def agents_file(env):
    with open(os.path.join(h.SOURCE, "tests", "fixtures", "agents.test.json")) as f:
        d = json.load(f)
    base = "${LONGRUN_FIXTURE_URL}/v1"
    d["agents"] += [
        {"name": "big4m", "models": [{"provider": "openai", "base_url": base, "timeout_ms": 600000,
                                       "model": "fixture-big-%d-1" % ANSWER_KIB}], "tools": ["lookup"]},
        {"name": "big2m", "models": [{"provider": "openai", "base_url": base, "model": "fixture-big-2048-1"}],
         "tools": ["lookup"]},
    ]
    return env.write_json("agents.json", d)


def make_cgroup(limit):
    """A memory cgroup limited to limit bytes: (dir, procs file), or None."""
    name = "longrun-test-memory-%d" % os.getpid()
    for base, limit_file, extra in (("/sys/fs/cgroup/unified", "memory.max", "memory.swap.max"),
                                    ("/sys/fs/cgroup", "memory.max", "memory.swap.max"),
                                    ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", None)):
        d = os.path.join(base, name)
        try:
            os.mkdir(d)
        except OSError:
            continue
        if not os.path.exists(os.path.join(d, limit_file)):
            os.rmdir(d)  # a cgroup without the memory controller (or not a cgroup file system)
            continue
        try:
            with open(os.path.join(d, limit_file), "w") as f:
                f.write(str(limit))
            if extra and os.path.exists(os.path.join(d, extra)):
                with open(os.path.join(d, extra), "w") as f:
                    f.write("0")
            return d
        except OSError:
            os.rmdir(d)
    return None


def remove_cgroup(d):
    for _ in range(50):
        try:
            os.rmdir(d)
            return
        except OSError:
            time.sleep(0.1)


def metric(port, name):
    status, body = h.http_get(port, "/metrics")
    h.check(status == 200, "/metrics answered %s" % status)
    m = re.search(r"^%s(?:\{\})? ([0-9.e+]+)$" % re.escape(name), body, re.M)
    h.check(m is not None, "metric %s is exported" % name)
    return float(m.group(1))


def vm_hwm_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def too_large(env, agents):
    w = env.start_worker("small", LONGRUN_AGENTS_FILE=agents, LONGRUN_MAX_RESPONSE_BYTES=MIB)
    env.wait_queue("longrun.q.default", consumers=1)
    tid = env.enqueue_many([{"agent": "big2m", "input": "answer at length"}])[0]
    h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (tid,)) in ("dead", "failed"), 60,
               "the task with a 2 MiB answer ends")
    row = env.sql("select status, attempt, error from tasks where id = %s", (tid,))[0]
    h.eq(row["status"], "dead", "a too-large answer dead-letters the task (%r)" % row)
    h.eq(row["attempt"], 0, "not retried")
    h.check("response_too_large" in (row["error"] or ""), "the error names response_too_large: %r" % row["error"])
    calls = [r for r in env.fixture_requests("/v1/") if r["headers"].get("x-longrun-task-id") == tid]
    h.eq(len(calls), 1, "the model was called once")
    h.check(env.scalar("select count(*) from dead_letters where task_id = %s", (tid,)) == 1, "one dead letter")
    w.signal(15)
    h.check(w.wait(30) == 0, "the worker drained and exited 0")


def test():
    asan = sanitized()
    n = 100 if asan else 500
    with h.Env("memory") as env:
        env.start_fixture()
        agents = agents_file(env)
        too_large(env, agents)

        port = h.free_port()
        extra = {}
        worker = os.path.join(h.BUILD, "longrun-worker")
        argv = [worker]
        cg = None
        limit = n * ANSWER_KIB * 1024 // 2
        if asan:
            extra["LONGRUN_MEMORY_BUDGET_MB"] = 96
            mode = "LONGRUN_MEMORY_BUDGET_MB (ASan: no limit applies)"
        else:
            cg = make_cgroup(limit)
            if cg is not None:
                mode = "cgroup " + cg
                argv = ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$1"', cg, worker]
            else:
                mode = "RLIMIT_AS"
                argv = ["prlimit", "--as=%d" % limit, "--", worker]
        h.log("limit %d MiB through %s" % (limit // MIB, mode))
        try:
            run_load(env, agents, argv, n, port, extra, asan, cg, limit)
        finally:
            if cg is not None:
                remove_cgroup(cg)


def run_load(env, agents, argv, n, port, extra, asan, cg, limit):
    w = env.start("worker", argv, LONGRUN_WORKER_ID="worker", LONGRUN_AGENTS_FILE=agents,
                  LONGRUN_MAX_IN_FLIGHT=n, LONGRUN_HTTP_PORT=port, **extra)
    h.wait_for(lambda: not w.alive() or h.http_get(port, "/readyz")[0] == 200, 30, "worker ready")
    h.check(w.alive(), "the worker started under its limit:\n" + w.tail())
    budget = metric(port, "longrun_memory_budget_bytes")
    if asan:
        h.eq(budget, 96 * MIB, "the configured budget")
    elif cg is not None:
        h.eq(budget, limit // 2, "the budget derived from the cgroup's limit: half")
    else:
        h.check(limit // 4 <= budget < limit // 2, "the budget derived from RLIMIT_AS: half of what is left")
    t0 = time.time()
    ids = env.enqueue_many([{"agent": "big4m", "input": "answer at length %d" % i} for i in range(n)])


    def finished():
        h.check(w.alive(), "the worker died (out of memory?):\n" + w.tail())
        c = env.status_counts()
        return sum(c.get(s, 0) for s in ("succeeded", "failed", "dead", "cancelled")) >= n + 1 and c
    c = h.wait_for(finished, 900, "%d tasks to finish" % n, interval=0.5)
    took = time.time() - t0
    h.eq(c.get("succeeded", 0), n, "every task succeeded (%r)" % c)
    peak_rss = vm_hwm_kib(w.pid) * 1024
    cg_peak = 0
    for f in ("memory.peak", "memory.max_usage_in_bytes"):
        if cg is not None and os.path.exists(os.path.join(cg, f)):
            with open(os.path.join(cg, f)) as fh:
                cg_peak = int(fh.read().split()[0])
    charged_peak = metric(port, "longrun_memory_charged_peak_bytes")
    waits = metric(port, "longrun_memory_waits_total")
    holds = metric(port, "longrun_memory_holds_total")
    h.log("%d tasks x %d KiB answers in %.1f s; budget %d MiB, charged peak %.0f MiB, peak RSS %.0f MiB, "
          "cgroup peak %.0f MiB, %d calls waited, %d deliveries held"
          % (n, ANSWER_KIB, took, budget // MIB, charged_peak / MIB, peak_rss / MIB, cg_peak / MIB, waits, holds))
    # any failed model call is a defect here: the fixture answers every call
    h.eq([e.get("msg") for e in w.events("model.call_failed")][:5], [], "no model call failed (out of memory)")
    h.eq([e.get("msg") for e in w.events("pg.conn_failed")][:5], [], "no PostgreSQL send failed (out of memory)")
    h.check(waits > 0 or holds > 0, "the budget bound (calls waited or deliveries were held)")
    h.check(charged_peak <= budget + 8 * ANSWER_KIB * 1024, "charged at most one answer over the budget")
    h.eq(env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and attempt > 0", (ids,)), 0,
         "no task needed a retry")
    big = env.scalar("select min(length(result::text)) from tasks where id = any(%s::uuid[])", (ids,))
    h.check(big > ANSWER_KIB * 1024, "every result holds the whole answer (%s bytes)" % big)
    w.signal(15)
    h.check(w.wait(60) == 0, "the worker drained and exited 0:\n" + w.tail())


if __name__ == "__main__":
    h.run(test)

"""Issue 16 (5): a worker paused past its lease makes no zombie side effects.

Worker A runs an agent task whose model calls take 3 s.  While a model call
is in flight A is frozen (SIGSTOP) for more than twice its lease; the
scheduler sees the lease expire and republishes the task, and worker B takes
it over (epoch 2).  Then A resumes (SIGCONT) and receives the answer of its
old model call, which asks for a tool call.  A must not start it: a worker
checks its own lease deadline before every model and tool call, and stops
steps whose lease ran out.  Checked at the fixture (every tool call carries
X-Longrun-Epoch) and in the step log: after the takeover no tool call
carries epoch 1 and A writes no step row; B finishes the task.
"""
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

LEASE = 3


def agents_file(env):
    with open(os.path.join(h.SOURCE, "tests", "fixtures", "agents.test.json")) as f:
        d = json.load(f)
    d["agents"].append({"name": "zombie", "models": [{"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1",
                                                      "model": "fixture-slow-3000-4", "timeout_ms": 30000}],
                        "tools": ["lookup"]})
    return env.write_json("agents.json", d)


def stale_tool_calls(env, tid, after):
    return [r for r in env.fixture_requests("/tools/")
            if r["headers"].get("x-longrun-task-id") == tid and r["headers"].get("x-longrun-epoch") == "1"
            and r["ts"] > after]


def test():
    with h.Env("zombie") as env:
        env.start_fixture()
        env.start_scheduler(LONGRUN_SWEEP_INTERVAL_MS=200)
        agents = agents_file(env)
        # prefetch 1: while A is frozen its one slot holds the old delivery, so
        # the broker gives the republished task to B (a frozen VM's connection
        # would die at the heartbeat timeout instead)
        # A reaches PostgreSQL through a proxy that turns slow while A is
        # frozen (a VM that resumes into a slow network): its lease renewal
        # cannot tell it in time that it lost the task, its own clock must
        import urllib.parse
        p = urllib.parse.urlparse(env.db_url)
        proxy = h.Proxy(p.hostname, p.port or 5432)
        a_db = env.db_url.replace(":%d/" % (p.port or 5432), ":%d/" % proxy.port)
        a = env.start_worker("A", LONGRUN_AGENTS_FILE=agents, LONGRUN_LEASE_SECONDS=LEASE, LONGRUN_MAX_IN_FLIGHT=1,
                             LONGRUN_DATABASE_URL=a_db)
        env.wait_queue("longrun.q.default", consumers=1)
        tid = env.enqueue_many([{"agent": "zombie", "input": "go"}])[0]
        h.wait_for(lambda: env.scalar("select step from tasks where id = %s", (tid,)) >= 1, 30, "A checkpointed step 1")
        time.sleep(0.8)  # the next model call (3 s) is in flight
        steps_a = env.scalar("select count(*) from task_steps where task_id = %s and epoch = 1", (tid,))
        a.signal(signal.SIGSTOP)
        t_stop = time.time()
        proxy.delay(2.5)
        try:
            b = env.start_worker("B", LONGRUN_AGENTS_FILE=agents, LONGRUN_LEASE_SECONDS=LEASE)
            h.wait_for(lambda: env.scalar("select lease_owner from tasks where id = %s and lease_epoch >= 2",
                                          (tid,)) == "B", 30, "B takes the task over")
            t_take = time.time()
            paused = t_take - t_stop
            if paused < 2 * LEASE:
                time.sleep(2 * LEASE - paused)
        finally:
            a.signal(signal.SIGCONT)
        h.log("A paused %.1f s; B took over %.1f s after the pause" % (time.time() - t_stop, t_take - t_stop))
        time.sleep(6)  # A's old model call has answered by now
        stale = stale_tool_calls(env, tid, t_take)
        h.eq(stale, [], "no tool call with the stale epoch after the takeover")
        h.eq(env.scalar("select count(*) from task_steps where task_id = %s and epoch = 1", (tid,)), steps_a,
             "A wrote no step row after it was paused")
        a.wait_event("lease.expired_locally", 10)
        proxy.restore()
        h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (tid,)) == "succeeded", 60,
                   "B finishes the task")
        h.check(a.alive(), "A still runs (it stopped the step, not itself)")
        h.check(b.events("task.finished"), "B finished it")
        env.check_step_log()


h.run(test)

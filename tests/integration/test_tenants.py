"""Issue 4: one tenant's burst cannot starve the others.

With LONGRUN_TENANT_MAX_RUNNING=2, a burst of 12 slow tasks from tenant
`big` runs at most 2 at a time fleet-wide (the cap is counted again after
each claim commits, so claims racing on different connections and workers
see each other), while tenant `small`'s 2 tasks finish long before the
burst does.  Bounced claims burn no attempt and no crash
claim.
"""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

AGENTS = os.path.join(h.SOURCE, "tests", "fixtures", "agents.test.json")


def test():
    with h.Env("tenants") as env:
        env.start_fixture()
        env.start_scheduler()
        for w in ("w1", "w2"):
            env.start_worker(w, LONGRUN_AGENTS_FILE=AGENTS, LONGRUN_TENANT_MAX_RUNNING=2)
        big = env.enqueue_many([{"agent": "slow3", "input": "burst", "tenant": "big"} for _ in range(12)])
        small = env.enqueue_many([{"agent": "slow3", "input": "hello", "tenant": "small"} for _ in range(2)])
        peak = [0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                n = env.scalar("select count(*) from tasks where tenant = 'big' and status = 'running'")
                peak[0] = max(peak[0], n)
                time.sleep(0.05)
        t = threading.Thread(target=sample)
        t.start()
        try:
            h.wait_for(lambda: env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and status = "
                                          "'succeeded'", (small,)) == 2, 60, "small tenant's tasks finished")
            small_done = time.time()
            big_left = env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and status <> 'succeeded'",
                                  (big,))
            env.wait_all_terminal(14, 180)
        finally:
            stop.set()
            t.join()
        # Work actually running at once: overlap of the big tenant's step intervals
        # (a claim bounced by the cap is 'running' for a moment but runs nothing).
        rows = env.sql("select extract(epoch from s.created_at) as end_s, s.latency_ms from task_steps s"
                       " join tasks t on t.id = s.task_id where t.tenant = 'big'")
        ev = sorted([(float(r["end_s"]) - r["latency_ms"] / 1000.0, 1) for r in rows] +
                    [(float(r["end_s"]), -1) for r in rows])
        cur = overlap = 0
        for _, d in ev:
            cur += d
            overlap = max(overlap, cur)
        h.log("tenant big: %d steps ran at once at most (rows 'running' peaked at %d, incl. bounces); "
              "%d big tasks were left when small finished" % (overlap, peak[0], big_left))
        # (+1: step rows are timestamped at their group-commit batch's start, which can make
        # two steps that ran one after the other look overlapping by a few milliseconds)
        h.check(overlap <= 3, "tenant big ran at most 2 steps at a time (+1 for timestamps): %d" % overlap)
        h.check(big_left >= 4, "the small tenant was not queued behind the burst (%d big tasks left)" % big_left)
        h.eq(env.scalar("select count(*) from tasks where status = 'succeeded'"), 14, "all succeeded")
        h.eq(env.scalar("select max(attempt) from tasks"), 0, "no attempt burned by the cap")
        h.check(env.scalar("select count(*) from task_events where reason = 'tenant_limit'") > 0,
                "claims over the cap were bounced")
        h.eq(env.scalar("select count(*) from tasks where stop_reason = 'crash_loop'"), 0, "no crash_loop")
        del small_done


h.run(test)

"""Issue 16 item 7: a provider outage parks tasks instead of killing them.

- outage: N one-step tasks whose only model answers 503 for OUTAGE seconds
  (fixture-outage-S-1, from its first request), two workers: every task
  succeeds, none is dead, no attempt is spent (attempt stays 0), and tasks
  were parked (suspended, provider_unavailable) meanwhile.  Before the fix the
  same run burned attempts (retry_wait) and dead-lettered tasks `exhausted`.
- bound: an agent with max_outage_seconds 2 whose model never recovers: the
  task is dead-lettered with stop_reason provider_unavailable, attempt 0.

LONGRUN_TEST_OUTAGE_TASKS (default 120) and LONGRUN_TEST_OUTAGE_SECONDS
(default 15) size the run (the issue's figures: 300 tasks, 120 s).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

N = int(os.environ.get("LONGRUN_TEST_OUTAGE_TASKS", "120"))
OUTAGE = int(os.environ.get("LONGRUN_TEST_OUTAGE_SECONDS", "15"))


def agents_file(env):
    model = {"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1", "max_tokens": 64}
    doc = {"agents": [
        {"name": "outage", "models": [dict(model, model="fixture-outage-%d-1" % OUTAGE)]},
        {"name": "outage_short", "max_outage_seconds": 2,
         "models": [dict(model, model="fixture-outage-100000-1")]},
    ]}
    return env.write_json("agents.json", doc)


def test():
    with h.Env("provider_outage") as env:
        env.start_fixture()
        agents = agents_file(env)
        wenv = {"LONGRUN_AGENTS_FILE": agents, "LONGRUN_BREAKER_OPEN_SECONDS": "2",
                # a task's own three tries (retries 2) open a circuit: even a lone task parks at once
                "LONGRUN_BREAKER_FAILURES": "3", "LONGRUN_RETRY_BASE_MS": "500"}
        env.start_scheduler()
        env.start_worker("w1", **wenv)
        env.start_worker("w2", **wenv)
        env.wait_queue(consumers=2)

        # the bound: parked, then dead-lettered past max_outage_seconds
        short = env.enqueue_many([{"agent": "outage_short", "input": "never recovers"}])[0]

        t0 = time.time()
        ids = env.enqueue_many([{"agent": "outage", "input": "task %d" % i} for i in range(N)])

        row = h.wait_for(lambda: (lambda r: r if r["status"] == "dead" else None)(
            env.sql("select status, stop_reason, attempt, error from tasks where id = %s", (short,))[0]),
            60, "the never-recovering task dead-lettered")
        h.eq(row["stop_reason"], "provider_unavailable", "stop reason of the bound (%r)" % row)
        h.eq(row["attempt"], 0, "no attempt spent before the bound")
        h.eq(env.scalar("select reason from dead_letters where task_id = %s", (short,)), "provider_unavailable",
             "dead-letter reason")
        h.check(env.scalar("select count(*) from task_events where task_id = %s and to_status = 'suspended' "
                           "and reason = 'provider_unavailable'", (short,)) >= 1, "parked before dead-lettered")

        env.wait_all_terminal(N + 1, 60 + 3 * OUTAGE, statuses=("succeeded", "dead"))
        took = time.time() - t0
        counts = dict((r["status"], r["n"]) for r in env.sql(
            "select status, count(*) as n from tasks where id = any(%s::uuid[]) group by status", (ids,)))
        parked = env.scalar("select count(distinct task_id) from task_events where task_id = any(%s::uuid[]) "
                            "and to_status = 'suspended' and reason = 'provider_unavailable'", (ids,))
        parks = env.scalar("select count(*) from task_events where task_id = any(%s::uuid[]) "
                           "and to_status = 'suspended' and reason = 'provider_unavailable'", (ids,))
        retries = env.scalar("select count(*) from task_events where task_id = any(%s::uuid[]) "
                             "and reason = 'transient_error'", (ids,))
        h.log("%d tasks, %d s outage: %r in %.1f s; %d parked (%d parks), %d retry_wait" %
              (N, OUTAGE, counts, took, parked, parks, retries))
        h.eq(counts.get("succeeded", 0), N, "every task succeeded (%r)" % counts)
        h.eq(env.scalar("select count(*) from dead_letters where task_id = any(%s::uuid[])", (ids,)), 0,
             "no dead letter")
        h.eq(env.scalar("select max(attempt) from tasks where id = any(%s::uuid[])", (ids,)), 0,
             "no attempt spent")
        h.check(parked > 0, "some tasks were parked (provider_unavailable)")
        h.eq(env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and outage_since is not null",
                        (ids,)), 0, "outage_since cleared by the answered step")
        # step 1 may be a park that stored the task's first message; later parks write no step row
        h.check(env.scalar("select max(step) from tasks where id = any(%s::uuid[])", (ids,)) <= 2,
                "parks write no step row (max_steps is not used up)")


h.run(test)

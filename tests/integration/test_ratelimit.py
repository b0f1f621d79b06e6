"""Issue 4: fleet-wide rate limits and 429 storms.

- a model limited to 10 requests per minute in the agents file: two workers
  running 8 tasks x 2 steps (16 requests) never send more than 10 in any
  calendar minute, nor more than 10 (+1 for the spread between a
  reservation and the request's arrival) in any 60-second interval (the
  limiter's window slides; counted at the fixture), and no attempt is
  burned;
- a provider answering 429 with a long Retry-After: the task is suspended
  (rate_limited, resume_at) without counting an attempt, and resumes.
"""
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

AGENTS = os.path.join(h.SOURCE, "tests", "fixtures", "agents.test.json")


def test():
    with h.Env("ratelimit") as env:
        env.start_fixture()
        env.start_scheduler()
        env.start_worker("w1", LONGRUN_AGENTS_FILE=AGENTS)
        env.start_worker("w2", LONGRUN_AGENTS_FILE=AGENTS)
        ids = env.enqueue_many([{"agent": "limited", "input": "go"} for _ in range(8)])
        storm = env.enqueue_many([{"agent": "ratelimited", "input": "storm"}])[0]
        env.wait_all_terminal(8, 150)
        reqs = env.fixture("/_requests?limit=10000&model=fixture-steps-2")["requests"]
        h.eq(len(reqs), 16, "16 model requests in all (tasks: %r)" % env.sql("select status, stop_reason, error, step from tasks"))
        per_min = collections.Counter(int(r["ts"] // 60) for r in reqs)
        h.log("requests per minute window: %r" % dict(per_min))
        h.check(max(per_min.values()) <= 10, "at most 10 per minute fleet-wide: %r" % dict(per_min))
        h.check(len(per_min) >= 2, "the limit made the run span two minutes")
        ts = sorted(r["ts"] for r in reqs)
        sliding = max(sum(1 for u in ts if t <= u < t + 60) for t in ts)
        h.log("requests in any 60 s: at most %d; first to last %.1f s" % (sliding, ts[-1] - ts[0]))
        h.check(sliding <= 11, "at most 10 (+1) in any 60 s: %d" % sliding)
        h.check(ts[-1] - ts[0] >= 59, "the 11th request waited for the window (%.1f s)" % (ts[-1] - ts[0]))
        h.eq(env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and status = 'succeeded'", (ids,)), 8,
             "all limited tasks succeeded")
        h.eq(env.scalar("select max(attempt) from tasks where id = any(%s::uuid[])", (ids,)), 0, "no attempt burned")
        h.eq(env.scalar("select count(*) from task_events where task_id = any(%s::uuid[]) and reason = 'transient_error'",
                        (ids,)), 0, "no task retry")

        # 429 storm with Retry-After 45 s: suspended, not retried, no attempt
        t = h.wait_for(lambda: (lambda r: r["status"] == "suspended" and r)(
            env.sql("select * from tasks where id = %s", (storm,))[0]), 20, "429 storm suspends the task")
        h.eq(t["suspend_reason"], "rate_limited", "suspend reason")
        h.eq(t["attempt"], 0, "no attempt counted")
        wait = env.scalar("select extract(epoch from resume_at - updated_at) from tasks where id = %s", (storm,))
        h.check(25 < wait <= 46, "resume_at honours Retry-After (%.1f s)" % wait)
        # wake it now: it calls again (one request), gets 429 again, suspends again, still no attempt
        before = len(env.fixture("/_requests?limit=10000&model=fixture-error-429-retry-after-45")["requests"])
        env.sql("update tasks set resume_at = now() where id = %s", (storm,))
        env.sql("notify longrun_wakeup")
        h.wait_for(lambda: len(env.fixture("/_requests?limit=10000&model=fixture-error-429-retry-after-45")
                               ["requests"]) > before, 20, "resumed and called again")
        h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (storm,)) == "suspended" and
                   env.scalar("select resume_at > now() + interval '20 seconds' from tasks where id = %s", (storm,)),
                   20, "suspended again")
        h.eq(env.scalar("select attempt from tasks where id = %s", (storm,)), 0, "still no attempt burned")
        env.cli("cancel", storm)


h.run(test)

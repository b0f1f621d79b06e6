"""Issue 8 item 6: `longrun eval SUITE.json`, the release gate, against the
fixture server: a passing suite exits 0 with p95 and error rate; a failing
case, a missed threshold and a bad suite are reported with exits 1, 1 and 2."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

AGENTS = os.path.join(h.SOURCE, "examples", "agents.json")


def test():
    with h.Env("eval") as env:
        env.start_fixture()
        env.start_scheduler()
        env.start_worker("w1", LONGRUN_AGENTS_FILE=AGENTS)
        suite = os.path.join(h.SOURCE, "examples", "eval-suite.json")
        r = env.cli("eval", suite, "--json", "--max-error-rate", "0", "--timeout", "60")
        h.eq(r.returncode, 0, "passing suite: " + r.stderr + r.stdout)
        out = json.loads(r.stdout)
        h.eq(out["runs_total"], 4, "every repeat ran")
        h.eq(out["failed"], 0, "all passed")
        h.eq(out["error_rate"], 0, "no errors")
        h.check(out["p95_seconds"] > 0, "p95 measured")
        # a failing case: the answer lacks a text; and a budget that kills the task
        bad = os.path.join(env.dir, "bad.json")
        json.dump({"cases": [
            {"name": "wrong text", "agent": "example", "input": "x", "contains": ["bonjour"]},
            {"name": "too small", "agent": "example", "input": "y", "budgets": {"max_steps": 1}, "contains": ["done"]},
        ]}, open(bad, "w"))
        r = env.cli("eval", bad, "--timeout", "60")
        h.eq(r.returncode, 1, "failing suite exit 1")
        h.check("FAIL" in r.stdout and "lacks \"bonjour\"" in r.stdout and "status dead" in r.stdout, r.stdout)
        h.check("0/2 passed" in r.stdout, r.stdout)
        # a threshold missed
        r = env.cli("eval", suite, "--max-p95-seconds", "0.001", "--timeout", "60")
        h.eq(r.returncode, 1, "p95 threshold missed")
        h.check("above --max-p95-seconds" in r.stderr, r.stderr)
        # bad suites and options: exit 2, nothing enqueued
        before = env.scalar("select count(*) from tasks")
        for content, word in (("{not json", "not valid JSON"), ('{"cases": []}', "non-empty"),
                              ('{"cases": [{"input": 1}]}', "agent"),
                              ('{"cases": [{"agent": "example", "input": 1, "contains": "x"}]}', "array of strings")):
            open(bad, "w").write(content)
            r = env.cli("eval", bad)
            h.eq(r.returncode, 2, "bad suite %r" % content)
            h.check(word in r.stderr, r.stderr)
        h.eq(env.cli("eval", suite, "--max-error-rate", "2").returncode, 2, "bad threshold")
        h.eq(env.cli("eval").returncode, 2, "no suite")
        h.eq(env.scalar("select count(*) from tasks"), before, "nothing enqueued by bad input")


h.run(test)

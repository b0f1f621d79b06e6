"""Issue 15 (1): model and tool URLs from the agents file pass the connect-time
address check (LONGRUN_EGRESS_ALLOW).

A tool whose URL is the cloud metadata address and a model whose base_url is
one are refused when curl is about to connect -- before any packet leaves
(this test never sends traffic anywhere but loopback) -- with a log line and
a metric: the tool's call becomes an error result for the model and the task
still succeeds; the model falls back to the next one of its chain.  Loopback
(the fixture) stays reachable by default.  An invalid LONGRUN_EGRESS_ALLOW
stops the worker with exit 2.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

METADATA = "http://169.254.169.254"


def agents_file(env):
    with open(os.path.join(h.SOURCE, "tests", "fixtures", "agents.test.json")) as f:
        d = json.load(f)
    d["tools"]["meta"] = {"description": "Reads instance metadata", "url": METADATA + "/latest/meta-data/"}
    d["agents"].append({"name": "metatool", "models": [{"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1",
                                                        "model": "fixture-tool:meta-2"}], "tools": ["meta"]})
    d["agents"].append({"name": "metamodel", "models": [
        {"provider": "openai", "base_url": METADATA + "/v1", "model": "fixture-steps-2"},
        {"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1", "model": "fixture-steps-2"}],
        "tools": ["lookup"]})
    return env.write_json("agents.json", d)


def test():
    with h.Env("egress") as env:
        env.start_fixture()
        agents = agents_file(env)
        bad = env.start_worker("bad", LONGRUN_AGENTS_FILE=agents, LONGRUN_EGRESS_ALLOW="not-an-address")
        h.eq(bad.wait(20), 2, "an invalid LONGRUN_EGRESS_ALLOW stops the worker")
        h.check("LONGRUN_EGRESS_ALLOW" in bad.log_text(), "and says which setting")
        w, port = env.start_worker_http("w1", LONGRUN_AGENTS_FILE=agents)
        ids = env.enqueue_many([{"agent": "metatool", "input": "go"}, {"agent": "metamodel", "input": "go"}])
        env.wait_all_terminal(2, 60)
        rows = {r["agent"]: r for r in env.sql("select agent, status, attempt from tasks where id = any(%s::uuid[])",
                                               (ids,))}
        h.eq(rows["metatool"]["status"], "succeeded", "the tool's refusal is an error result, the task goes on")
        h.eq(rows["metamodel"]["status"], "succeeded", "the refused model falls back to the next one")
        msgs = json.dumps(env.sql("select s.messages from task_steps s join tasks t on t.id = s.task_id"
                                  " where t.agent = 'metatool'"))
        h.check("169.254.169.254 is metadata" in msgs, "the tool's error result says why: %s" % msgs[:600])
        refused = w.events("egress.refused")
        h.check(len(refused) >= 2, "refusals logged (%d)" % len(refused))
        h.check(all("169.254.169.254" in e["msg"] for e in refused), "the refused address is named")
        st, text = h.http_get(port, "/metrics")
        h.eq(st, 200, "/metrics")
        line = [ln for ln in text.splitlines() if ln.startswith('longrun_egress_refused_total{reason="metadata"}')]
        h.check(line and float(line[0].split()[-1]) >= 2, "metric counts the refusals: %r" % line)
        h.check(env.fixture_requests("/tools/lookup"), "loopback (the fixture) is reachable by default")


h.run(test)

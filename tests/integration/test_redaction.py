"""Issue 19 (3): redacted payload logs.

A sampled agent task (LONGRUN_LOG_PAYLOADS=1) whose input holds an e-mail address, a card
number, API keys and a ticket number, and whose tool results (the fixture's /tools/pii)
hold more of them, runs on a worker with the default redaction (LONGRUN_LOG_REDACT=all)
and a custom pattern (ticket=TICK-[0-9]{4,}):

- its payload lines are logged (model requests, model responses, tool results) with
  [redacted:email], [redacted:card], [redacted:api_key] and [redacted:ticket] markers,
  and no trace of any of the values is anywhere in that worker's log;
- longrun_payloads_redacted_total counts the markers per class;
- the database keeps the step log whole (redaction is for the log only);
- a control worker with LONGRUN_LOG_REDACT=none (and no pattern) on its own queue logs the
  same task's values, so the checks above look at lines that held them;
- a bad class or pattern stops the worker at --check-config (exit 2, naming the variable).
"""
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

AGENTS = {
    "tools": {
        "pii": {"description": "Look up the customer", "url": "${LONGRUN_FIXTURE_URL}/tools/pii"},
    },
    "agents": [
        {"name": "support", "system": "Help the customer.",
         "models": [{"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1", "model": "fixture-steps-3"}],
         "tools": ["pii"]},
        {"name": "support-anthropic",
         "models": [{"provider": "anthropic", "base_url": "${LONGRUN_FIXTURE_URL}/v1", "model": "fixture-steps-3"}],
         "tools": ["pii"]},
    ],
}

# In the task's input ...
INPUT = ("Refund the order of jane.roe@example.com, card 4111 1111 1111 1111 (exp 12/27). "
         "My key is sk-ant-api03-INPUTsecret0123456789abcdef and my GitHub token "
         "ghp_INPUT0123456789abcdefghijklmnopqrstuvwx; see TICK-20931. Authorization: Bearer tok3nINPUT98765xyz")
# ... and in the tool results (tests/fixtures/fixture_server.py PII_RECORD): none of these may be logged
SECRETS = ["jane.roe", "example.com", "4111 1111 1111 1111", "INPUTsecret", "ghp_INPUT", "tok3nINPUT",
           "TICK-20931", "ada.lovelace", "analytical.example", "4000 0566 5566 5556", "FIXTUREpii",
           "AKIAFIXTURE", "TICK-77120"]
CLASSES = ("email", "card", "api_key", "ticket")


def metric(port, name, **labels):
    st, text = h.http_get(port, "/metrics")
    h.eq(st, 200, "/metrics")
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def payload_lines(proc, tid):
    return [e for e in proc.events(task_id=tid) if str(e.get("event", "")).startswith("payload.")]


def check_config_refused(env, var, value, why):
    e = env.base_env(**{var: value})
    r = subprocess.run([os.path.join(h.BUILD, "longrun-worker"), "--check-config"], env=e, capture_output=True,
                       text=True, timeout=30)
    h.eq(r.returncode, 2, "%s=%r refused at --check-config (%s%s)" % (var, value, r.stdout, r.stderr))
    h.check(var in r.stdout + r.stderr and why in r.stdout + r.stderr, "the error names %s and says %r: %s%s" %
            (var, why, r.stdout, r.stderr))


def test():
    with h.Env("redaction") as env:
        agents = env.write_json("agents.json", AGENTS)
        env.start_fixture()
        check_config_refused(env, "LONGRUN_LOG_REDACT", "email,phone", "unknown class 'phone'")
        check_config_refused(env, "LONGRUN_LOG_REDACT_PATTERNS", "ok=TICK\nbad=(unclosed", "(unclosed")
        check_config_refused(env, "LONGRUN_LOG_REDACT_PATTERNS", "x*", "matches the empty string")

        w, port = env.start_worker_http("w1", LONGRUN_AGENTS_FILE=agents, LONGRUN_LOG_PAYLOADS=1,
                                        LONGRUN_LOG_REDACT_PATTERNS="ticket=TICK-[0-9]{4,}")
        started = w.wait_event("worker.payloads", 10)[0]["msg"]
        h.check("100%" in started and "email, api_key, card + 1 custom class" in started, started)
        ctl = env.start_worker("ctl", LONGRUN_AGENTS_FILE=agents, LONGRUN_LOG_PAYLOADS=1, LONGRUN_LOG_REDACT="none",
                               LONGRUN_QUEUES="control")
        env.wait_queue("longrun.q.control")
        tids = env.enqueue_many([{"agent": a, "input": INPUT} for a in ("support", "support-anthropic")])
        ctl_tid = env.enqueue_many([{"agent": "support", "input": INPUT}], queue="control")[0]
        h.wait_for(lambda: env.scalar("select count(*) from tasks where status = 'succeeded'") == 3, 60,
                   "the three tasks succeeded")

        # the control worker logged the values: the lines do carry them when nothing is redacted
        ctl_lines = payload_lines(ctl, ctl_tid)
        ctl_text = "\n".join(e["msg"] for e in ctl_lines)
        for s in SECRETS:
            h.check(s in ctl_text, "the unredacted control log holds %r" % s)
        h.check("[redacted:" not in ctl_text, "LONGRUN_LOG_REDACT=none redacts nothing")

        log = w.log_text()
        for tid in tids:
            lines = payload_lines(w, tid)
            kinds = {e["event"] for e in lines}
            h.eq(kinds, {"payload.model_request", "payload.model_response", "payload.tool_result"},
                 "payload lines of %s" % tid)
            text = "\n".join(e["msg"] for e in lines)
            for c in CLASSES:
                h.check("[redacted:%s]" % c in text, "a [redacted:%s] marker in the payloads of %s" % (c, tid))
            h.check(all(re.search(r"\(\d+ bytes(, cut at 4096)?, \d+ redacted\)", e["msg"]) for e in lines
                        if "[redacted:" in e["msg"]), "each line says how many it redacted")
        leaked = [s for s in SECRETS if s in log]
        h.check(not leaked, "values in the redacted worker's log: %r" % leaked)
        h.log("%d payload lines, none with a value of the input or the tool results" %
              sum(len(payload_lines(w, t)) for t in tids))

        # counted per class
        for c in CLASSES:
            n = metric(port, "longrun_payloads_redacted_total", **{"class": c})
            h.check(n > 0, "longrun_payloads_redacted_total{class=%r} = %r" % (c, n))
        h.eq(metric(port, "longrun_payloads_logged_total"), sum(len(payload_lines(w, t)) for t in tids),
             "payload lines counted")

        # the step log is whole: redaction is for the log only
        stored = json.dumps([s["messages"] for s in env.sql("select messages from task_steps where task_id = %s",
                                                               (tids[0],))])
        for s in ("jane.roe@example.com", "ada.lovelace@analytical.example", "FIXTUREpii"):
            h.check(s in stored, "task_steps keeps %r" % s)


h.run(test)

"""Issue 7: /healthz, /readyz, /health and /metrics of the worker.

- the exposition parses with the Prometheus text parser and its counters
  agree with the database after a run;
- readiness goes false during a RabbitMQ outage (a TCP proxy in front of the
  broker is cut) and comes back after it;
- liveness stays true during a 30-second model call.
"""
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

get = h.http_get
free_port = h.free_port

AGENTS = os.path.join(h.SOURCE, "tests", "fixtures", "agents.test.json")






def metrics(port):
    st, text = get(port, "/metrics")
    h.eq(st, 200, "/metrics status")
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return fams, text


def sample(fams, name, **labels):
    total = 0.0
    for fam in fams.values():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test():
    with h.Env("health") as env:
        env.start_fixture()
        sport = free_port()
        env.start_scheduler(LONGRUN_HTTP_PORT=sport)
        h.wait_for(lambda: get(sport, "/readyz")[0] == 200, 30, "scheduler ready")
        hs = h.wait_for(lambda: json.loads(get(sport, "/health")[1])["status"].get("leader") and
                        json.loads(get(sport, "/health")[1]), 20, "scheduler leader in /health")
        h.eq(hs["status"]["dependencies"]["postgres"]["status"], "up", "scheduler postgres")
        p = urllib.parse.urlparse(env.amqp_url)
        proxy = h.Proxy(p.hostname, p.port)
        proxied = env.amqp_url.replace(":%d/" % p.port, ":%d/" % proxy.port)
        w1, port = env.start_worker_http("w1", LONGRUN_AGENTS_FILE=AGENTS, LONGRUN_AMQP_URL=proxied)
        h.wait_for(lambda: get(port, "/readyz")[0] == 200, 30, "worker ready")
        st, body = get(port, "/healthz")
        h.eq(st, 200, "/healthz")
        st, body = get(port, "/health")
        hj = json.loads(body)
        h.eq(hj["ready"], True, "/health ready")
        h.eq(hj["status"]["dependencies"]["rabbitmq"]["status"], "up", "/health rabbitmq")
        h.check(hj["status"]["dependencies"]["postgres"]["usable_connections"] >= 1, hj)
        h.eq(hj["status"]["dependencies"]["schema"]["status"], "ok", "schema compatible")
        mem = hj["status"]["memory"]
        if os.environ.get("LONGRUN_SANITIZE") != "1":  # (ASan's allocator is not malloc's: no arena figures)
            h.check(mem["heap_in_use_bytes"] > 100000 and mem["heap_free_bytes"] >= 0, "heap figures: %r" % mem)
        h.eq(get(port, "/nope")[0], 404, "unknown path")

        # a run, then the counters agree with the database
        names = ["steps3"] * 6 + ["anthropic3"] * 3 + ["runaway"] * 2 + ["notools"] * 2
        env.enqueue_many([{"agent": n, "input": "m"} for n in names])
        env.wait_all_terminal(len(names), 60)
        time.sleep(1.5)
        fams, text = metrics(port)
        db_steps = env.scalar("select count(*) from task_steps")
        h.eq(sample(fams, "longrun_steps_total"), db_steps, "steps counter = step rows")
        h.eq(sample(fams, "longrun_tasks_finished_total", outcome="succeeded"),
             env.scalar("select count(*) from tasks where status = 'succeeded'"), "succeeded counter")
        h.eq(sample(fams, "longrun_tasks_finished_total", outcome="dead"),
             env.scalar("select count(*) from tasks where status = 'dead'"), "dead counter")
        h.eq(sample(fams, "longrun_dead_letters_total", reason="max_steps"),
             env.scalar("select count(*) from dead_letters where reason = 'max_steps'"), "dead letters by reason")
        h.eq(sample(fams, "longrun_step_duration_seconds_count"), db_steps, "step histogram count")
        h.eq(sample(fams, "longrun_tokens_total", direction="input"),
             env.scalar("select sum(tokens_in) from tasks"), "input tokens")
        h.eq(sample(fams, "longrun_tool_calls_total", tool="lookup", outcome="ok"),
             env.scalar("select sum(tool_calls) from tasks"), "tool calls")
        h.eq(sample(fams, "longrun_model_requests_total", provider="anthropic", status="200"),
             env.scalar("select count(*) from task_steps s join tasks t on t.id = s.task_id where t.agent = 'anthropic3'"),
             "anthropic requests")
        h.check(sample(fams, "longrun_process_resident_memory_bytes") > 1e6, "process memory")
        h.eq(sample(fams, "longrun_ready"), 1, "ready gauge")
        import re
        h.check(not re.search(r'="[0-9a-f]{8}-[0-9a-f]{4}-', text), "no task id as a label value")
        h.log("metrics agree with the database (%d steps)" % db_steps)
        sf = h.wait_for(lambda: (lambda f: sample(f, "longrun_queue_consumers", queue="longrun.q.default") >= 1 and f)(
            metrics(sport)[0]), 30, "scheduler queue metrics")
        h.eq(sample(sf, "longrun_scheduler_leader"), 1, "leader gauge")
        h.eq(sample(sf, "longrun_queue_depth", queue="longrun.q.default"), 0, "queue drained")

        # every metric the dashboard and the alerts reference exists in an exposition
        import glob
        import re
        exposed = set()
        for f in list(fams.values()) + list(sf.values()):
            exposed.update(smp.name for smp in f.samples)
            exposed.add(f.name)
        refs = {}
        for path in glob.glob(os.path.join(h.SOURCE, "k8s", "**", "*.json"), recursive=True) + \
                glob.glob(os.path.join(h.SOURCE, "k8s", "**", "*.yaml"), recursive=True):
            if not re.search(r"monitoring|dashboard|alert|rule|autoscal|hpa|keda", path):
                continue
            for name in re.findall(r"\blongrun_[a-z_]+[a-z]", open(path).read()):
                refs.setdefault(name, path)
        h.check(len(refs) >= 10, "the dashboard and alerts reference metrics (%d found)" % len(refs))
        missing = {n: p for n, p in refs.items() if n not in exposed}
        h.check(not missing, "referenced but not exposed: %r" % missing)
        h.log("all %d metrics referenced in k8s/ exist in the exposition" % len(refs))

        # RabbitMQ outage: readiness false, then back
        proxy.cut()
        h.wait_for(lambda: get(port, "/readyz")[0] == 503, 20, "not ready during the outage")
        st, body = get(port, "/readyz")
        h.check("RabbitMQ" in body, body)
        h.eq(get(port, "/healthz")[0], 200, "still live during the outage")
        proxy.restore()
        h.wait_for(lambda: get(port, "/readyz")[0] == 200, 40, "ready again after the outage")
        # and tasks flow again
        tid = env.enqueue_many([{"agent": "steps3", "input": "after"}])[0]
        h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (tid,)) == "succeeded", 30,
                   "a task after the outage")

        # liveness during a 30-second model call
        slow = env.enqueue_many([{"agent": "slow30", "input": "take your time"}])[0]
        h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (slow,)) == "running", 20, "slow call running")
        t0 = time.time()
        while time.time() - t0 < 31:
            st, _ = get(port, "/healthz")
            h.eq(st, 200, "liveness during a long model call")
            time.sleep(1)
        h.wait_for(lambda: env.scalar("select status from tasks where id = %s", (slow,)) == "succeeded", 60,
                   "slow task finished")
        # readiness goes false while draining
        pr = w1
        pr.signal(__import__("signal").SIGTERM)
        h.wait_for(lambda: get(port, "/readyz")[0] in (503, None), 10, "not ready while draining")
        # and, with nothing in flight, it exits 0 on its own (a second SIGTERM
        # from the teardown while it closes would mean "exit now")
        rc = pr.wait(30)
        h.eq(rc, 0, "w1 exits 0 after draining")


h.run(test)

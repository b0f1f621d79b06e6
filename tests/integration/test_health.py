"""Issue 7: /healthz, /readyz, /health and /metrics of the worker.

- the exposition parses with the Prometheus text parser and its counters
  agree with the database after a run;
- readiness goes false during a RabbitMQ outage (a TCP proxy in front of the
  broker is cut) and comes back after it;
- liveness stays true during a 30-second model call;
- docs/metrics.md lists exactly the series a worker and a scheduler expose
  (their # TYPE lines), the process metrics have their standard names and
  longrun_build_info the build's version and commit; the dashboard and the
  alert rules use only exposed series;
- the histograms of queue wait, task and step duration count what the
  database holds, per agent.
"""
import json
import os
import re
import sys
import subprocess
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






def documented():
    """{section: set of series} from the tables of docs/metrics.md: the first cell of each row
    under "## Worker", "## Scheduler" and "## Both" (the upgrade notes are not a section of these)."""
    out, section = {}, None
    for line in open(os.path.join(h.SOURCE, "docs", "metrics.md")):
        if line.startswith("## "):
            section = line[3:].strip()
            continue
        m = re.match(r"\| `([a-z_:]+)` \|", line)
        if m and section in ("Worker", "Scheduler", "Both"):
            h.check(m.group(1) not in out.get(section, set()), "docs/metrics.md lists %s twice" % m.group(1))
            out.setdefault(section, set()).add(m.group(1))
    return out


def typed(text):
    """The series of an exposition: the names of its # TYPE lines."""
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def check_documented(name, text, want):
    got = typed(text)
    h.check(got - want == set(), "%s exposes series docs/metrics.md does not list: %s" % (name, sorted(got - want)))
    h.check(want - got == set(), "docs/metrics.md lists series %s does not expose: %s" % (name, sorted(want - got)))


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
        w1_t0 = time.time()
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
        h.check(mem["heap_source"] in ("mallinfo2", "none (sanitizer allocator)"), "heap source: %r" % mem)
        if mem["heap_source"] == "mallinfo2":  # (ASan's allocator is not malloc's: no arena figures)
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
        h.check(sample(fams, "process_resident_memory_bytes") > 1e6, "process memory")
        h.check("longrun_process_" not in text, "the old longrun_process_* names are gone")
        for n in ("process_virtual_memory_bytes", "process_open_fds", "process_max_fds"):
            h.check(sample(fams, n) > 0, "%s in /metrics" % n)
        h.check(w1_t0 - 2 <= sample(fams, "process_start_time_seconds") <= time.time(), "process start time")
        ver = subprocess.run([os.path.join(h.BUILD, "longrun-worker"), "--version"], capture_output=True, text=True)
        m = re.fullmatch(r"longrun-worker (\S+) \(commit (\S+)\)\n", ver.stdout)
        h.check(m, "--version: %r" % ver.stdout)
        h.eq(sample(fams, "longrun_build_info", version=m.group(1), commit=m.group(2)), 1, "build info = --version")
        h.eq(json.loads(get(port, "/health")[1])["commit"], m.group(2), "/health commit")
        # the histograms, per agent: every task enqueued with a row waited once, finished once
        n_tasks = len(names)
        h.eq(sample(fams, "longrun_queue_wait_seconds_count", queue="longrun.q.default"), n_tasks, "queue waits")
        h.eq(sample(fams, "longrun_task_duration_seconds_count"), n_tasks, "task durations")
        h.eq(sample(fams, "longrun_task_duration_seconds_count", agent="runaway", outcome="dead"), 2,
             "task durations of the dead-lettered runaway tasks")
        h.eq(sample(fams, "longrun_task_duration_seconds_bucket", agent="steps3", le="+Inf"), 6, "steps3 tasks")
        h.eq(sample(fams, "longrun_task_duration_seconds_bucket", le="604800"), n_tasks, "task duration buckets to 7 days")
        age = env.scalar("select max(extract(epoch from finished_at - created_at)) from tasks")
        h.check(sample(fams, "longrun_task_duration_seconds_sum") <= n_tasks * float(age) + 1,
                "task durations within the database's")
        for agent in ("steps3", "anthropic3"):
            h.eq(sample(fams, "longrun_step_duration_seconds_count", agent=agent),
                 env.scalar("select count(*) from task_steps s join tasks t on t.id = s.task_id where t.agent = %s",
                            (agent,)), "step durations of %s" % agent)
            h.eq(sample(fams, "longrun_tokens_total", agent=agent, direction="input"),
                 env.scalar("select sum(tokens_in) from tasks where agent = %s", (agent,)), "input tokens of %s" % agent)
        h.check(sample(fams, "longrun_step_duration_seconds_bucket", le="14400") == db_steps, "step buckets to 4 h")
        h.eq(sample(fams, "longrun_ready"), 1, "ready gauge")
        h.check(not re.search(r'="[0-9a-f]{8}-[0-9a-f]{4}-', text), "no task id as a label value")
        h.log("metrics agree with the database (%d steps)" % db_steps)
        sf = h.wait_for(lambda: (lambda f: sample(f, "longrun_queue_consumers", queue="longrun.q.default") >= 1 and f)(
            metrics(sport)[0]), 30, "scheduler queue metrics")
        h.eq(sample(sf, "longrun_scheduler_leader"), 1, "leader gauge")
        h.eq(sample(sf, "longrun_queue_depth", queue="longrun.q.default"), 0, "queue drained")

        # docs/metrics.md lists exactly what each daemon exposes
        doc = documented()
        stext = get(sport, "/metrics")[1]
        check_documented("the worker", text, doc["Worker"] | doc["Both"])
        check_documented("the scheduler", stext, doc["Scheduler"] | doc["Both"])
        h.log("docs/metrics.md lists the %d series of the worker and the %d of the scheduler, and no other" %
              (len(typed(text)), len(typed(stext))))

        # every metric the dashboard and the alerts reference exists in an exposition
        import glob
        exposed = typed(text) | typed(stext)
        refs = {}
        for path in glob.glob(os.path.join(h.SOURCE, "k8s", "**", "*.json"), recursive=True) + \
                glob.glob(os.path.join(h.SOURCE, "k8s", "**", "*.yaml"), recursive=True):
            if not re.search(r"monitoring|dashboard|alert|rule|autoscal|hpa|keda", path):
                continue
            for name in re.findall(r"\b(?:longrun|process)_[a-z_]+[a-z]", open(path).read()):
                refs.setdefault(re.sub(r"_(bucket|sum|count)$", "", name), path)
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

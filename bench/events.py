#!/usr/bin/python3
"""bench/events.py - the cost and the rate of the task event stream (docs/bench.md, "Task events").

    source /tmp/testenv.sh   # or any LONGRUN_DATABASE_URL / LONGRUN_AMQP_URL / LONGRUN_AMQP_MGMT_URL
    LONGRUN_BUILD_DIR=build /usr/bin/python3 bench/events.py on:zero off:zero on:lat off:lat

Each argument is one run, EVENTS:LATENCY: events on (LONGRUN_EVENTS=1) or off, W-zero (model
and tool latency 0) or W-lat (50 ms / 20 ms).  A run: the test harness's own database and vhost
on the given servers (tests/integration/harness.py), the C fixture server
(longrun-bench-fixture), one worker (256 in flight for W-zero, 1,000 for W-lat), then
EVB_TASKS (default 500) tasks of 5 steps with a tool call in each of the first 4, enqueued
with `longrun enqueue` while the worker waits.  Prints one JSON line per run: steps/s (first
claim to last finish), the worker's CPU per step (utime + stime over the run), events
published (confirmed) and dropped (/metrics), events/s over the run, and the whole stream
read back from "first" with a prefetch of 500 (count and events/s).
"""
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
import harness as h  # noqa: E402
import pika  # noqa: E402

N = int(os.environ.get("EVB_TASKS", "500"))
K = 5
HZ = os.sysconf("SC_CLK_TCK")

def cpu_s(pid):
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / HZ

def run(events, model_ms, tool_ms, in_flight):
    with h.Env("evb") as env:
        portfile = os.path.join(env.dir, "fx.port")
        fx = env.start("fixture", [os.path.join(h.BUILD, "longrun-bench-fixture"), "--port", "0", "--port-file",
                                   portfile, "--record", "0", "--model-latency-ms", str(model_ms),
                                   "--tool-latency-ms", str(tool_ms)])
        h.wait_for(lambda: os.path.exists(portfile) and open(portfile).read().strip(), 20, "fixture")
        url = "http://127.0.0.1:%s" % open(portfile).read().strip()
        agents = env.write_json("agents.json", {
            "models": {"fixture-steps-%d" % K: {"input_per_mtok": 0.1, "output_per_mtok": 0.2}},
            "tools": {"lookup": {"description": "Look something up", "url": url + "/tools/lookup",
                                 "parameters": {"type": "object", "properties": {"step": {"type": "integer"}}}}},
            "agents": [{"name": "bench", "system": "Be brief.",
                        "models": [{"provider": "openai", "base_url": url + "/v1", "model": "fixture-steps-%d" % K,
                                    "max_tokens": 256}], "tools": ["lookup"],
                        "budgets": {"max_steps": K + 5, "max_tool_calls": K + 5}}]})
        port = h.free_port()
        w = env.start_worker("bw", LONGRUN_AGENTS_FILE=agents, LONGRUN_EVENTS="1" if events else "0",
                             LONGRUN_MAX_IN_FLIGHT=in_flight, LONGRUN_SLICE_STEPS=1000, LONGRUN_HTTP_PORT=port,
                             LONGRUN_PG_POOL_SIZE=4, LONGRUN_LOG_LEVEL="warn")
        env.wait_queue()
        time.sleep(1.0)
        c0 = cpu_s(w.pid)
        lines = "".join(json.dumps({"agent": "bench", "input": {"i": i}}) + "\n" for i in range(N))
        r = subprocess.run([os.path.join(h.BUILD, "longrun"), "enqueue", "--json"], input=lines,
                           env=env.base_env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        env.wait_all_terminal(N, 300)
        c1 = cpu_s(w.pid)
        steps = env.scalar("select count(*) from task_steps")
        span = env.scalar("select extract(epoch from max(finished_at) - min(started_at)) from tasks")
        seq = env.scalar("select sum(event_seq) from tasks")
        metrics = h.http_get(port, "/metrics")[1]
        dropped = sum(float(m) for m in re.findall(r'^longrun_events_dropped_total\{[^}]*\} ([0-9.e+]+)$', metrics, re.M))
        pub = sum(float(m) for m in re.findall(r'^longrun_events_published_total\{[^}]*\} ([0-9.e+]+)$', metrics, re.M))
        # read the whole stream back
        got = 0
        t0 = time.time()
        if events:
            conn = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
            ch = conn.channel()
            ch.basic_qos(prefetch_count=500)
            def on(ch_, m, p, b):
                nonlocal got
                got += 1
                ch_.basic_ack(m.delivery_tag)
            ch.basic_consume("longrun.events", on, arguments={"x-stream-offset": "first"})
            end = time.time() + 30
            while got < pub and time.time() < end:
                conn.process_data_events(time_limit=0.2)
            try:
                conn.close()
            except Exception:
                pass  # pika rejects what it still holds: streams refuse basic.reject
        read_s = time.time() - t0
        res = {"events": events, "model_ms": model_ms, "tool_ms": tool_ms, "tasks": N, "steps": steps,
               "span_s": round(float(span), 2), "steps_per_s": round(steps / float(span), 1),
               "worker_cpu_s": round(c1 - c0, 2), "cpu_us_per_step": round(1e6 * (c1 - c0) / steps, 1),
               "event_seq_sum": int(seq), "published": pub, "dropped": dropped, "stream_messages": got,
               "events_per_s": round(pub / float(span), 1) if events else 0,
               "read_back_events_per_s": round(got / read_s, 1) if events and read_s > 0 else None}
        print(json.dumps(res), flush=True)
        w.signal(15); w.wait(30)
        return res

if __name__ == "__main__":
    for spec in sys.argv[1:]:
        ev, lat = spec.split(":")
        run(ev == "on", 50 if lat == "lat" else 0, 20 if lat == "lat" else 0, 1000 if lat == "lat" else 256)

#!/usr/bin/python3
"""Soak mode of the reliability suite (issue 16, item 10).  Opt-in, not a
ctest test: it restarts the shared PostgreSQL and RabbitMQ, and it runs for
LONGRUN_SOAK_MINUTES (default 60).

    eval "$(LONGRUN_HOME=.longrun-test LONGRUN_DEV_PG_PORT=56432 LONGRUN_DEV_AMQP_PORT=56672 \
            scripts/services.sh up)"
    LONGRUN_HOME=.longrun-test LONGRUN_SERVICES=scripts/services.sh LONGRUN_SOAK_MINUTES=60 \
        /usr/bin/python3 tests/integration/soak.py

A producer enqueues tasks at LONGRUN_SOAK_RATE tasks/s (default 20: about
half of what this fleet sustains on a 2-core machine with 5-step tasks and a
20 ms tool) while, every LONGRUN_SOAK_PERIOD seconds (default 60), one fault
from the cycle below hits the fleet:

    kill -9 of a worker (restarted), a drain (SIGTERM, restarted), a RabbitMQ
    restart, a PostgreSQL restart, a provider outage (the fixture's
    fixture-outage model answers 503 for 20 s to the agent tasks).

Worker "steady" is never killed or drained: its RSS and open file
descriptors are sampled every 30 s and must stay flat.  At the end the
producer stops, the fleet drains the backlog, and the figures are printed:
tasks, steps, lost (not terminal), duplicated or missing step rows, dead
healthy tasks, and the RSS / fd series.  Exit 0 when lost = duplicated =
dead = 0 and RSS and fds grew by less than 20 % from the first sample after
the warm-up.
"""
import os
import random
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

MINUTES = float(os.environ.get("LONGRUN_SOAK_MINUTES", "60"))
RATE = float(os.environ.get("LONGRUN_SOAK_RATE", "20"))
PERIOD = float(os.environ.get("LONGRUN_SOAK_PERIOD", "60"))
STEPS = 5
WENV = dict(LONGRUN_LEASE_SECONDS=5, LONGRUN_SLICE_STEPS=3, LONGRUN_DRAIN_SECONDS=10, LONGRUN_MAX_IN_FLIGHT=200,
            LONGRUN_BREAKER_FAILURES=3, LONGRUN_BREAKER_OPEN_SECONDS=5)


def proc_stats(pid):
    """(RSS MiB, open fds, of which sockets).  Sockets are told apart because curl keeps idle
    connections to the model and tool endpoints cached (up to the peak concurrency, closed after
    118 s unused); every other fd (files, pipes, eventfds, timers) must stay flat."""
    rss = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) // 1024
    fds = sockets = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        fds += 1
        try:
            sockets += os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:")
        except OSError:
            pass
    return rss, fds, sockets


def heap_in_use(port):
    """The steady worker's heap in use (MiB, mallinfo2 via /health): a leak grows it; RSS can also
    grow after a peak (malloc keeps freed memory in its arenas) without anything leaking."""
    try:
        import json
        mem = json.loads(h.http_get(port, "/health")[1])["status"]["memory"]
        return mem.get("heap_in_use_bytes", -1048576.0) / 1048576.0
    except (ValueError, KeyError, TypeError):
        return -1.0


def main():
    with h.Env("soak") as env:
        env.start_fixture("--tool-latency-ms", "20", "--record", "1000")
        with open(os.path.join(h.SOURCE, "tests", "fixtures", "agents.test.json")) as f:
            import json
            d = json.load(f)
        # (fixture-outage-S-N asks for many parallel tool calls once its
        # outage is over: a tool-call budget above the default of 12)
        d["agents"].append({"name": "soak", "max_outage_seconds": 3600, "budgets": {"max_tool_calls": 1000},
                            "models": [
            {"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1", "model": "fixture-outage-20-3"}],
            "tools": ["lookup"]})
        agents = env.write_json("agents.json", d)
        env.start_scheduler("s1")
        steady, steady_port = env.start_worker_http("steady", LONGRUN_AGENTS_FILE=agents, **WENV)
        gen = {"w": 0}
        churn = [None]

        def start_churn():
            gen["w"] += 1
            churn[0] = env.start_worker("churn_%d" % gen["w"], LONGRUN_AGENTS_FILE=agents, **WENV)
        start_churn()
        env.wait_queue(consumers=2)

        stop = threading.Event()
        produced = [0]
        errors = []

        def produce():
            while not stop.is_set():
                t = time.time()
                n = max(1, int(RATE))
                bodies = [{"agent": "soak", "input": "go"} if random.random() < 0.1 else
                          {"agent": "http-steps", "input": {"steps": STEPS}} for _ in range(n)]
                try:
                    env.enqueue_many(bodies)
                    produced[0] += n
                except Exception as e:  # the broker or the database restarting: counted, retried next second
                    errors.append(str(e)[:200])
                time.sleep(max(0.0, 1.0 - (time.time() - t)))
        prod = threading.Thread(target=produce, daemon=True)
        prod.start()

        faults = ["kill_worker", "drain_worker", "restart_rabbitmq", "restart_postgres", "provider_outage"]
        counts = {k: 0 for k in faults}
        samples = []
        t0 = time.time()
        next_fault = t0 + PERIOD
        next_sample = t0 + 30
        k = 0
        while time.time() - t0 < MINUTES * 60:
            now = time.time()
            if now >= next_sample:
                rss, fds, socks = proc_stats(steady.pid)
                heap = heap_in_use(steady_port)
                samples.append((round(now - t0), rss, fds, socks, heap))
                h.log("t=%ds steady: RSS %d MiB, heap in use %.1f MiB, %d fds (%d sockets); produced %d" % (
                    now - t0, rss, heap, fds, socks, produced[0]))
                next_sample += 30
            if now >= next_fault:
                f = faults[k % len(faults)]
                k += 1
                counts[f] += 1
                h.log("fault: %s" % f)
                if f == "kill_worker":
                    churn[0].kill()
                    start_churn()
                elif f == "drain_worker":
                    churn[0].signal(signal.SIGTERM)
                    rc = churn[0].wait(40)
                    h.check(rc == 0, "a drained worker exits 0 (%r)" % rc)
                    start_churn()
                elif f == "restart_rabbitmq":
                    env.services("restart-rabbitmq")
                elif f == "restart_postgres":
                    env.services("restart-postgres")
                else:
                    env.fixture("/_reset", {})
                next_fault += PERIOD
            time.sleep(1)
        stop.set()
        prod.join(30)
        h.log("producer stopped: %d tasks enqueued, %d enqueue errors; draining the backlog" % (produced[0],
                                                                                                len(errors)))
        total = env.scalar("select count(*) from tasks")
        h.wait_for(lambda: env.scalar("select count(*) from tasks where status not in "
                                      "('succeeded', 'dead', 'cancelled')") == 0, 600, "the backlog drains")
        el = time.time() - t0
        lost = env.scalar("select count(*) from tasks where status not in ('succeeded', 'dead', 'cancelled')")
        dead = env.scalar("select count(*) from tasks where status = 'dead'")
        steps = env.scalar("select count(*) from task_steps")
        bad = env.scalar("""select count(*) from tasks t where t.agent = 'http-steps' and (t.step <> %s or
                            (select count(*) from task_steps s where s.task_id = t.id) <> %s)""", (STEPS, STEPS))
        samples.append((round(time.time() - t0),) + proc_stats(steady.pid) + (heap_in_use(steady_port),))
        warm = samples[2] if len(samples) > 2 else samples[0]
        last = samples[-1]
        rss_growth = (last[1] - warm[1]) / max(1, warm[1])
        fd_growth = (last[2] - warm[2]) / max(1, warm[2])
        other = [s[2] - s[3] for s in samples]
        other_growth = (other[-1] - other[samples.index(warm)]) / max(1, other[samples.index(warm)])
        socket_bound = WENV["LONGRUN_MAX_IN_FLIGHT"] + 20
        print("soak: %.1f min; tasks %d (enqueued %d), steps %d; faults %r" % (el / 60, total, produced[0], steps,
                                                                               counts))
        print("soak: lost %d, wrong or duplicated step rows %d, dead %d" % (lost, bad, dead))
        print("soak: steady RSS MiB %s" % [s[1] for s in samples])
        print("soak: steady fds %s" % [s[2] for s in samples])
        print("soak: steady sockets %s" % [s[3] for s in samples])
        print("soak: steady heap in use MiB %s" % [round(s[4], 1) for s in samples])
        heap_growth = (last[4] - warm[4]) / max(0.1, warm[4])
        print("soak: RSS growth %.0f %%, fd growth %.0f %%, non-socket fd growth %.0f %% (from t=%ds); "
              "sockets at most %d (bound %d)" % (100 * rss_growth, 100 * fd_growth, 100 * other_growth, warm[0],
                                                 max(s[3] for s in samples), socket_bound))
        h.eq((lost, bad, dead), (0, 0, 0), "lost, wrong step rows, dead healthy tasks")
        print("soak: heap in use growth %.0f %%" % (100 * heap_growth))
        h.check(warm[4] >= 0 and last[4] >= 0, "heap figures in /health (not a sanitizer build, worker answering)")
        h.check(heap_growth < 0.2 and other_growth < 0.2, "heap in use and non-socket fds flat")
        h.check(rss_growth < 0.5, "RSS within 50 %% of its warm value (%.0f %%)" % (100 * rss_growth))
        h.check(max(s[3] for s in samples) <= socket_bound, "sockets bounded by the concurrency")


h.run(main)

"""Issue 9: the reliability suite.  A run of LONGRUN_RELIABILITY_TASKS tasks
(CI scale 800; full scale: LONGRUN_RELIABILITY_TASKS=5000) while the fleet is
attacked in rounds until every task is done:

  - kill -9 of a random worker (restarted),
  - kill -9 of the scheduler leader (restarted; the standby takes over),
  - network faults through TCP proxies: between worker w1 and PostgreSQL
    (connections reset for 2 s; then 300 ms of added latency per packet for
    3 s) and between worker w2 and RabbitMQ (a silent partition for 3 s, then
    connections reset),
  - a rolling SIGTERM of every worker (each must exit 0 and is replaced).

Then an invariant checker: every task succeeded (none is stuck), step rows
are contiguous and unique per task with exactly K rows each, epochs never go
backwards along a task's steps and never exceed the task's current epoch (no
two owners wrote at once), and nothing was dead-lettered.  The counts are
printed: tasks, kills, restarts, faults, violations.
"""
import os
import random
import signal
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

N = int(os.environ.get("LONGRUN_RELIABILITY_TASKS", "800"))
K = 8
WENV = dict(LONGRUN_LEASE_SECONDS=3, LONGRUN_SLICE_STEPS=3, LONGRUN_DRAIN_SECONDS=10, LONGRUN_MAX_IN_FLIGHT=100)


def test():
    with h.Env("reliability") as env:
        env.start_fixture("--tool-latency-ms", "20", "--record", str(max(10000, 2 * N * K)))
        p = urllib.parse.urlparse(env.db_url)
        pg_proxy = h.Proxy(p.hostname, p.port)
        proxied_db = env.db_url.replace(":%d/" % p.port, ":%d/" % pg_proxy.port)
        a = urllib.parse.urlparse(env.amqp_url)
        amqp_proxy = h.Proxy(a.hostname, a.port)
        proxied_amqp = env.amqp_url.replace(":%d/" % a.port, ":%d/" % amqp_proxy.port)
        gen = {"w1": 0, "w2": 0, "s1": 0, "s2": 0}
        procs = {}
        counts = {"worker_kills": 0, "leader_kills": 0, "restarts": 0, "network_faults": 0, "sigterms": 0}

        def start(slot):
            gen[slot] += 1
            name = "%s_%d" % (slot, gen[slot])
            if slot.startswith("s"):
                procs[slot] = env.start_scheduler(name, LONGRUN_SWEEP_INTERVAL_MS=200)
            elif slot == "w1":
                procs[slot] = env.start_worker(name, LONGRUN_DATABASE_URL=proxied_db, **WENV)
            else:
                procs[slot] = env.start_worker(name, LONGRUN_AMQP_URL=proxied_amqp, **WENV)
            if gen[slot] > 1:
                counts["restarts"] += 1

        for slot in ("s1", "s2", "w1", "w2"):
            start(slot)
        t0 = time.time()
        # enqueue from a thread: the attacks start while tasks are still arriving
        import threading
        enq_err = []

        def enqueue():
            try:
                env.enqueue_many([{"agent": "http-steps", "input": {"steps": K}} for _ in range(N)])
            except Exception as e:  # reported below
                enq_err.append(e)
        enq = threading.Thread(target=enqueue)
        enq.start()

        def done():
            return not enq.is_alive() and env.scalar("select count(*) from tasks where status = 'succeeded'") == N

        deadline = time.time() + 300 * h.TIMEOUT_MULT
        rnd = 0
        while not done() and time.time() < deadline:
            rnd += 1
            # 1. kill -9 a random worker, restart it
            victim = random.choice(["w1", "w2"])
            procs[victim].kill()
            counts["worker_kills"] += 1
            start(victim)
            time.sleep(1.5)
            # 2. kill -9 the scheduler leader, restart it
            leader = None
            for slot in ("s1", "s2"):
                if procs[slot].alive() and procs[slot].events("scheduler.leader"):
                    leader = slot
            if leader is not None:
                procs[leader].kill()
                counts["leader_kills"] += 1
                start(leader)
            time.sleep(1.5)
            # 3. network faults: w1 <-> PostgreSQL reset, then slow; w2 <-> RabbitMQ silent, then reset
            pg_proxy.cut()
            amqp_proxy.partition()
            counts["network_faults"] += 2
            time.sleep(2)
            pg_proxy.restore()
            pg_proxy.delay(0.3)
            time.sleep(1)
            amqp_proxy.cut()
            counts["network_faults"] += 2
            time.sleep(2)
            pg_proxy.restore()
            amqp_proxy.restore()
            time.sleep(1.5)
            # 4. rolling SIGTERM of every worker (each must exit 0)
            if rnd % 2 == 1:
                for slot in ("w1", "w2"):
                    old = procs[slot]
                    old.signal(signal.SIGTERM)
                    rc = old.wait(40)
                    h.eq(rc, 0, "%s exits 0 on SIGTERM" % old.name)
                    counts["sigterms"] += 1
                    start(slot)
                    time.sleep(0.5)
        enq.join()
        h.check(not enq_err, "enqueue: %r" % enq_err)
        h.check(done(), "every task succeeded within the time limit: %r" % env.status_counts())
        el = time.time() - t0

        # ---- invariants
        violations = {}
        violations["not_succeeded"] = env.scalar("select count(*) from tasks where status <> 'succeeded'")
        violations["wrong_step_count"] = env.scalar(
            "select count(*) from tasks t where t.step <> %s or (select count(*) from task_steps s where s.task_id = t.id) <> %s",
            (K, K))
        violations["gaps"] = env.scalar(
            "select count(*) from tasks t where (select max(step_no) from task_steps s where s.task_id = t.id) <> "
            "(select count(*) from task_steps s where s.task_id = t.id)")
        violations["epoch_backwards"] = env.scalar(
            "select count(*) from task_steps s join task_steps p on p.task_id = s.task_id and p.step_no = s.step_no - 1"
            " where p.epoch > s.epoch")
        violations["epoch_above_owner"] = env.scalar(
            "select count(*) from task_steps s join tasks t on t.id = s.task_id where s.epoch > t.lease_epoch")
        violations["dead_letters"] = env.scalar("select count(*) from dead_letters")
        twice = sum(1 for k, n in __import__("collections").Counter(
            r["headers"].get("idempotency-key") for r in env.fixture_requests("/step")).items() if n > 1)
        total = sum(violations.values())
        h.log("RELIABILITY %d tasks x %d steps in %.0f s; %d worker kills, %d leader kills, %d network faults, "
              "%d rolling SIGTERMs, %d restarts; steps run twice %d; invariant violations %d %r" % (
                  N, K, el, counts["worker_kills"], counts["leader_kills"], counts["network_faults"],
                  counts["sigterms"], counts["restarts"], twice, total, violations))
        h.eq(total, 0, "invariant violations")
        h.check(counts["worker_kills"] >= 1 and counts["network_faults"] >= 1, "the fleet was attacked")


h.run(test)

#!/usr/bin/python3
"""bench/bench.py - the standard workloads against a local fleet (docs/bench.md).

    /usr/bin/python3 bench/bench.py                 # everything, ~5-8 minutes
    /usr/bin/python3 bench/bench.py --quick         # 200 tasks per run, a smoke check of the script

What one invocation does:

1. Starts its own PostgreSQL and RabbitMQ with scripts/services.sh
   (LONGRUN_HOME=<repo>/.longrun-bench, ports 57432 / 57672: never the dev or
   test instances) and stops them at the end (unless --keep-services).
2. For each run (workload x number of workers): a fresh database and vhost,
   two fixture servers (model calls go to one, tool calls to the other):
   --fixture fast (the default when built) runs <build>/longrun-bench-fixture
   (bench/fixture_fast.c, a few microseconds of CPU per request), --fixture
   python tests/fixtures/fixture_server.py (the reference fixture of the
   tests, 0.5-0.9 ms of CPU per step, which on a small machine competes with
   PostgreSQL and the worker); an agents file with one agent (model
   fixture-steps-K, one HTTP tool), N tasks enqueued with `longrun enqueue`
   *before* the workers start, then the workers, until every task is terminal.
     W-zero: model and tool latency 0   (pure orchestration overhead)
     W-lat:  model 50 ms, tool 20 ms    (concurrency hiding latency)
3. Measures, per run: tasks/s and steps/s (from the first claim to the last
   finish, database clock), worker CPU seconds per 1,000 steps
   (/proc/<pid>/stat utime+stime, minus the CPU an idle worker spends starting),
   peak RSS of each worker (VmHWM), the peak number of tasks in flight,
   per-step orchestration overhead p50/p99 (task_steps.latency_ms minus the
   configured model + tool latency of that step), fsyncs (pg_stat_wal) and
   commits per step, and correctness: every task succeeded, exactly K step
   rows each numbered 1..K, no duplicate step, and exactly the expected number
   of model and tool calls at the fixture servers (a step that ran twice would
   call the model twice).
4. PostgreSQL's ceiling in the same run: pgbench running the worker's own
   checkpoint statement (SQL_CHECKPOINT, read from worker/sql.h, one
   transaction per checkpoint, extended protocol like the worker) against
   prepared task rows, at the same concurrency (the workers' PostgreSQL
   connections); steps/s is reported as a ratio of it.

Prints a table and writes the raw figures to <build>/bench-results.json.
Needs /usr/bin/python3 with psycopg2, the binaries in --build (default
build-bench: cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release), pgbench
(/usr/lib/postgresql/15/bin/pgbench).
"""
import argparse
import base64
import json
import os
import random
import re
import resource
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import psycopg2

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
PY = "/usr/bin/python3"
PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FAST_FIXTURE = "longrun-bench-fixture"  # bench/fixture_fast.c, in the build directory
WORKLOADS = {
    # name: (model latency ms, tool latency ms)
    "zero": (0, 0),
    "lat": (50, 20),
}


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- processes

class Procs:
    """Every process this script starts, so that all are stopped on exit."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.procs = []

    def start(self, name, argv, env):
        f = open(os.path.join(self.logdir, name + ".log"), "ab")
        p = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT)
        p.name = name
        p.logf = f
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=30):
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        p.logf.close()
        if p in self.procs:
            self.procs.remove(p)
        return p.returncode

    def stop_all(self):
        for p in list(self.procs):
            self.stop(p, timeout=10)


def proc_cpu_s(pid):
    """utime + stime of a live process, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_stat_fields(pid):
    with open("/proc/%d/stat" % pid) as f:
        s = f.read()
    return s[s.rindex(")") + 2:].split()


def tree_cpu_s(pid):
    """CPU seconds of a process, its reaped children (cutime/cstime) and its
    live children: the whole of a PostgreSQL cluster (the postmaster forks a
    backend per connection) or of a RabbitMQ node."""
    try:
        f = proc_stat_fields(pid)
    except OSError:
        return 0.0
    ticks = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            c = proc_stat_fields(int(d))
        except (OSError, IndexError):
            continue
        if c[1] == str(pid):
            ticks += int(c[11]) + int(c[12])
    return ticks / CLK_TCK


def machine_cpu_s():
    """(busy, idle) CPU seconds of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / CLK_TCK, idle / CLK_TCK


def service_pids(home):
    pids = {}
    try:
        with open(os.path.join(home, "postgres", "data", "postmaster.pid")) as f:
            pids["postgres"] = int(f.readline())
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(home, "rabbitmq", "rabbitmq.pid")) as f:
            pids["rabbitmq"] = int(f.read().strip())
    except (OSError, ValueError):
        pass
    return pids


def proc_status_kb(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def wait_for(cond, timeout, what, interval=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise BenchError("timed out after %.0f s waiting for %s" % (timeout, what))


def http_json(url, data=None, method=None, auth=None, timeout=10):
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 method=method or ("POST" if data is not None else "GET"))
    req.add_header("Content-Type", "application/json")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=timeout) as r:
        txt = r.read()
        return json.loads(txt) if txt else None


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------- services

def services(cmd, home, pg_port, amqp_port, timeout=300):
    env = dict(os.environ, LONGRUN_HOME=home, LONGRUN_DEV_PG_PORT=str(pg_port),
               LONGRUN_DEV_AMQP_PORT=str(amqp_port))
    for k in ("LONGRUN_DATABASE_URL", "LONGRUN_AMQP_URL", "LONGRUN_AMQP_MGMT_URL"):
        env.pop(k, None)
    r = subprocess.run([os.path.join(ROOT, "scripts", "services.sh"), cmd], env=env, capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise BenchError("scripts/services.sh %s failed:\n%s" % (cmd, r.stderr[-3000:]))
    out = {}
    for line in r.stdout.splitlines():
        m = re.match(r"export (\w+)=(.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip("'\"")
    return out


def with_db(url, db):
    p = urllib.parse.urlparse(url)
    return urllib.parse.urlunparse(p._replace(path="/" + db))


def with_vhost(url, vhost):
    p = urllib.parse.urlparse(url)
    return urllib.parse.urlunparse(p._replace(path="/" + urllib.parse.quote(vhost, safe="")))


# ---------------------------------------------------------------- the checkpoint for pgbench

def checkpoint_sql():
    """SQL_CHECKPOINT as the worker sends it: the C string literals of the
    macro in worker/sql.h, concatenated."""
    src = open(os.path.join(ROOT, "worker", "sql.h")).read()
    m = re.search(r"#define SQL_CHECKPOINT\s*\\\n(.*?)\n\s*\n", src, re.S)
    if not m:
        raise BenchError("SQL_CHECKPOINT not found in worker/sql.h")
    parts = re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(1))
    sql = "".join(parts).replace('\\"', '"')
    if "$25" not in sql or "task_steps" not in sql:
        raise BenchError("SQL_CHECKPOINT in worker/sql.h has changed shape; update bench.py's parameter map")
    return sql


# What each parameter of a mid-task checkpoint is (status running, lease kept);
# NULL where the worker sends NULL for such a step.
PGBENCH_PARAMS = {
    1: "(:idprefix || lpad(:client_id::text, 12, '0'))::uuid",
    2: ":epoch", 3: ":next", 4: ":st", 5: ":worker", 6: ":messages", 7: ":toolcalls", 8: ":model",
    9: ":tin", 10: ":tout", 11: ":tcached", 12: ":cost", 13: ":lat", 14: ":release",
    15: "NULL", 16: "NULL", 17: "NULL", 18: "NULL", 19: "NULL", 20: "NULL", 21: "NULL",
    22: ":tc", 23: ":active", 24: ":lease", 25: "1", 26: "NULL",
    27: "4",  # the step's events (worker/events.h): started, a tool call's two, finished
}
ID_PREFIX = "00000000-0000-4000-8000-"


def pgbench_script(path):
    sql = re.sub(r"\$(\d+)", lambda m: PGBENCH_PARAMS[int(m.group(1))], checkpoint_sql())
    with open(path, "w") as f:
        f.write("-- SQL_CHECKPOINT of worker/sql.h, one transaction per checkpoint (generated by bench/bench.py)\n")
        f.write("\\set next :step_no + 1\n")
        f.write(sql + " \\gset\n")


def run_pgbench(db_url, clients, seconds, workdir, sample_step, home):
    """tps of the checkpoint statement with `clients` connections, each
    advancing its own task row one step per transaction."""
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("DELETE FROM tasks WHERE id::text LIKE %s", (ID_PREFIX + "%",))
    for c in range(clients):
        cur.execute("INSERT INTO tasks (id, queue, agent, input, status, lease_epoch, lease_owner, lease_expires_at,"
                    " started_at) VALUES (%s, 'pgbench', 'bench', '{\"i\":0}', 'running', 1, 'pgbench',"
                    " now() + interval '1 hour', now())", (ID_PREFIX + "%012d" % c,))
    conn.close()
    script = os.path.join(workdir, "checkpoint.pgbench")
    pgbench_script(script)
    p = urllib.parse.urlparse(db_url)
    env = dict(os.environ, PGHOST=p.hostname, PGPORT=str(p.port), PGUSER=p.username or "longrun",
               PGDATABASE=p.path.lstrip("/"))
    defs = {"idprefix": ID_PREFIX, "epoch": "1", "step_no": "0", "st": "running", "worker": "pgbench",
            "messages": sample_step["messages"], "toolcalls": sample_step["tool_calls"],
            "model": sample_step["model"], "tin": "55", "tout": "7", "tcached": "27", "cost": "0.000000",
            "lat": "1", "release": "false", "tc": "1", "active": "1", "lease": "30"}
    argv = [PGBENCH, "-n", "-M", "extended", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds),
            "-f", script]
    for k, v in defs.items():
        argv += ["-D", "%s=%s" % (k, v)]
    pg = service_pids(home).get("postgres")
    pg0, (busy0, idle0) = tree_cpu_s(pg) if pg else 0.0, machine_cpu_s()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, idle1 = machine_cpu_s()
    # let the postmaster reap pgbench's backends (their CPU moves to its cutime)
    time.sleep(1.0)
    pg1 = tree_cpu_s(pg) if pg else 0.0
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", r.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", r.stdout)
    if r.returncode != 0 or not m:
        raise BenchError("pgbench failed (%d):\n%s\n%s" % (r.returncode, r.stdout[-2000:], r.stderr[-2000:]))
    lat = re.search(r"latency average = ([0-9.]+) ms", r.stdout)
    tx = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
    ntx = int(tx.group(1)) if tx else 0
    return {"clients": clients, "seconds": seconds, "tps": float(m.group(1)),
            "latency_ms": float(lat.group(1)) if lat else None,
            "failed": int(failed.group(1)) if failed else 0, "transactions": ntx,
            "pg_cpu_ms_per_tx": 1000.0 * (pg1 - pg0) / ntx if ntx else None,
            "pgbench_cpu_s": round((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime), 2),
            "machine_busy_s": round(busy1 - busy0, 2), "machine_idle_s": round(idle1 - idle0, 2)}


# ---------------------------------------------------------------- one run

class Run:
    def __init__(self, args, svc, procs, workload, nworkers, in_flight):
        self.args, self.svc, self.procs = args, svc, procs
        self.workload, self.nworkers, self.in_flight = workload, nworkers, in_flight
        self.model_ms, self.tool_ms = WORKLOADS[workload]
        suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
        self.tag = "bench_%s_%dw_%s" % (workload, nworkers, suffix)
        self.dir = tempfile.mkdtemp(prefix="longrun-%s-" % self.tag)
        self.db_url = with_db(svc["LONGRUN_DATABASE_URL"], self.tag)
        self.amqp_url = with_vhost(svc["LONGRUN_AMQP_URL"], self.tag)
        mg = urllib.parse.urlparse(svc["LONGRUN_AMQP_MGMT_URL"])
        self.mgmt = "http://%s:%d" % (mg.hostname, mg.port)
        self.mgmt_auth = "%s:%s" % (mg.username, mg.password)
        self.fixtures = []
        self.workers = []
        self.scheduler = None
        self.failed = False

    def name(self):
        return "W-%s %dw" % (self.workload, self.nworkers)

    # -- environment
    def setup(self):
        admin = psycopg2.connect(self.svc["LONGRUN_DATABASE_URL"])
        admin.autocommit = True
        admin.cursor().execute('CREATE DATABASE "%s"' % self.tag)
        admin.close()
        vh = urllib.parse.quote(self.tag, safe="")
        http_json(self.mgmt + "/api/vhosts/" + vh, {}, "PUT", self.mgmt_auth)
        user = self.mgmt_auth.split(":")[0]
        http_json(self.mgmt + "/api/permissions/%s/%s" % (vh, user), {"configure": ".*", "write": ".*", "read": ".*"},
                  "PUT", self.mgmt_auth)
        r = subprocess.run([os.path.join(self.args.build, "longrun"), "migrate"], env=self.env(), capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            raise BenchError("migrate failed: %s" % r.stderr[-2000:])

    def teardown(self):
        for p in self.workers + self.fixtures:
            self.procs.stop(p, timeout=30)
        if getattr(self, "_conn", None) is not None:
            self._conn.close()
        if self.args.keep_data or self.failed:
            log("%s: kept database %s and vhost %s, logs in %s" % (self.name(), self.tag, self.tag, self.dir))
            return
        try:
            admin = psycopg2.connect(self.svc["LONGRUN_DATABASE_URL"])
            admin.autocommit = True
            admin.cursor().execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % self.tag)
            admin.close()
            http_json(self.mgmt + "/api/vhosts/" + urllib.parse.quote(self.tag, safe=""), None, "DELETE",
                      self.mgmt_auth)
        except Exception as e:  # pragma: no cover
            log("cleanup: %s" % e)
        shutil.rmtree(self.dir, ignore_errors=True)

    def env(self, **extra):
        env = dict(os.environ)
        for k in list(env):
            if k.startswith("LONGRUN_"):
                del env[k]
        env.update({"LONGRUN_DATABASE_URL": self.db_url, "LONGRUN_AMQP_URL": self.amqp_url,
                    "LONGRUN_LOG_LEVEL": "info"})
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start_fixture(self, i):
        portfile = os.path.join(self.dir, "fixture%d.port" % i)
        # Both fixtures take the same flags; see --fixture.
        if self.args.fixture == "fast":
            argv = [os.path.join(self.args.build, FAST_FIXTURE)]
        else:
            argv = [PY, os.path.join(ROOT, "tests", "fixtures", "fixture_server.py")]
        p = self.procs.start("%s-fixture%d" % (self.tag, i),
                             argv + ["--port", "0", "--port-file", portfile, "--record", "0",
                                     "--model-latency-ms", str(self.model_ms), "--tool-latency-ms", str(self.tool_ms)],
                             self.env())
        wait_for(lambda: os.path.exists(portfile) and open(portfile).read().strip(), 20, "fixture port")
        p.url = "http://127.0.0.1:%s" % open(portfile).read().strip()
        self.fixtures.append(p)
        return p

    def agents_file(self, model_fx, tool_fx):
        k = self.args.steps
        doc = {
            "$comment": "generated by bench/bench.py",
            "models": {"fixture-steps-%d" % k: {"input_per_mtok": 0.1, "output_per_mtok": 0.2}},
            "tools": {"lookup": {"description": "Look something up", "url": tool_fx.url + "/tools/lookup",
                                 "parameters": {"type": "object", "properties": {"step": {"type": "integer"}}},
                                 "timeout_ms": 60000, "retries": 2}},
            "agents": [{"name": "bench", "system": "Be brief.",
                        "models": [{"provider": "openai", "base_url": model_fx.url + "/v1",
                                    "model": "fixture-steps-%d" % k, "max_tokens": 256, "timeout_ms": 120000,
                                    "retries": 2}],
                        "tools": ["lookup"],
                        "budgets": {"max_steps": k + 5, "max_tool_calls": k + 5, "max_seconds": 3600}}],
        }
        path = os.path.join(self.dir, "agents-%s.json" % model_fx.name)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
        return path

    def db(self):
        c = psycopg2.connect(self.db_url)
        c.autocommit = True
        return c

    def q(self, sql, args=None):
        """One query on the run's polling connection (kept open: a connection
        per poll would add backend start-ups to PostgreSQL's CPU figures)."""
        if getattr(self, "_conn", None) is None or self._conn.closed:
            self._conn = self.db()
        cur = self._conn.cursor()
        cur.execute(sql, args)
        return cur.fetchall() if cur.description else []

    def enqueue(self, n):
        lines = "".join(json.dumps({"agent": "bench", "input": {"i": i}}) + "\n" for i in range(n))
        t0 = time.time()
        r = subprocess.run([os.path.join(self.args.build, "longrun"), "enqueue", "--queue", "default", "--json"],
                           input=lines, env=self.env(), capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise BenchError("enqueue failed (%d): %s" % (r.returncode, r.stderr[-2000:]))
        return time.time() - t0

    def start_worker(self, i, agents_path):
        port = free_port()
        p = self.procs.start("%s-worker%d" % (self.tag, i), [os.path.join(self.args.build, "longrun-worker")],
                             self.env(LONGRUN_WORKER_ID="bench-worker-%d" % i, LONGRUN_AGENTS_FILE=agents_path,
                                      LONGRUN_MAX_IN_FLIGHT=self.in_flight, LONGRUN_SLICE_STEPS=1000,
                                      LONGRUN_SLICE_SECONDS=3600, LONGRUN_HTTP_PORT=port,
                                      LONGRUN_PG_POOL_SIZE=self.args.pg_pool))
        p.health = "http://127.0.0.1:%d/health" % port  # also /readyz
        self.workers.append(p)
        return p

    def worker_health(self, p):
        try:
            return http_json(p.health, timeout=2)
        except Exception:
            return None

    def worker_metrics(self, p):
        """Sums over label sets of the _sum and _count series of /metrics."""
        out = {}
        try:
            with urllib.request.urlopen(p.health.replace("/health", "/metrics"), timeout=5) as r:
                text = r.read().decode()
        except (urllib.error.URLError, OSError):
            return out
        for line in text.splitlines():
            m = re.match(r"^([a-z_]+_(?:sum|count))(?:\{[^}]*\})? ([0-9.eE+-]+)$", line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        return out

    def ready(self, p):
        """The worker answers /readyz with 200 (connected, schema checked, consuming)."""
        if p.poll() is not None:
            raise BenchError("%s exited with %s during start-up (log: %s)" % (p.name, p.returncode, self.procs.logdir))
        try:
            with urllib.request.urlopen(p.health.replace("/health", "/readyz"), timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def pg_counters(self):
        (wal_sync, wal_write, wal_bytes), = self.q("SELECT wal_sync, wal_write, wal_bytes FROM pg_stat_wal")
        (commits,), = self.q("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        return {"wal_sync": int(wal_sync), "wal_write": int(wal_write), "wal_bytes": int(wal_bytes),
                "commits": int(commits)}

    # -- the run itself
    def execute(self):
        n, k = self.args.tasks, self.args.steps
        log("%s: setting up (database and vhost %s)" % (self.name(), self.tag))
        self.setup()
        for i in range(2 * self.args.fixture_pairs):
            self.start_fixture(i)
        pairs = [(self.fixtures[2 * j], self.fixtures[2 * j + 1]) for j in range(self.args.fixture_pairs)]
        agents = [self.agents_file(mf, tf) for mf, tf in pairs]

        # CPU an idle worker spends starting (connect, declare, consume): measured
        # once on an empty queue, subtracted from the run's worker CPU.
        idle = self.start_worker(99, agents[0])
        wait_for(lambda: self.ready(idle), 60, "the idle worker to be ready", 0.1)
        time.sleep(0.5)
        startup_cpu = proc_cpu_s(idle.pid)
        self.procs.stop(idle)
        self.workers.remove(idle)

        load_before = os.getloadavg()[0]
        log("%s: enqueueing %d tasks" % (self.name(), n))
        enq_s = self.enqueue(n)
        # The scheduler is part of the fleet: it resumes tasks whose lease
        # expired (e.g. after a worker gave up its steps) and runs the sweeps.
        self.workers.append(self.procs.start("%s-scheduler" % self.tag,
                                             [os.path.join(self.args.build, "longrun-scheduler")], self.env()))
        self.scheduler = self.workers[-1]
        before = self.pg_counters()
        svc_pids = service_pids(self.args.home)
        cpu0 = {k: tree_cpu_s(v) for k, v in svc_pids.items()}
        cpu0["fixtures"] = sum(proc_cpu_s(f.pid) for f in self.fixtures)
        cpu0["scheduler"] = proc_cpu_s(self.scheduler.pid)
        busy0, idle0 = machine_cpu_s()
        for i in range(self.nworkers):
            self.start_worker(i, agents[i % len(agents)])
        workers = [p for p in self.workers if p is not self.scheduler]
        perf = None
        if self.args.perf:
            os.makedirs(self.args.perf, exist_ok=True)
            self.perf_data = os.path.join(self.args.perf, "%s-%dw.perf.data" % (self.workload, self.nworkers))
            cg = ["--call-graph", "dwarf,16384", "-F", "299"] if self.args.perf_callgraph else ["-F", "999"]
            perf = subprocess.Popen(["perf", "record"] + cg + ["-o", self.perf_data, "-p", str(workers[0].pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak_in_flight = 0
        t_start = time.time()
        deadline = t_start + self.args.timeout
        done = 0
        while time.time() < deadline:
            for p in self.workers:
                if p.poll() is not None:
                    self.failed = True
                    raise BenchError("%s exited with %s (logs: %s)" % (p.name, p.returncode, self.procs.logdir))
            hs = [self.worker_health(p) or {} for p in workers]
            peak_in_flight = max(peak_in_flight, sum(h.get("status", {}).get("in_flight", 0) for h in hs))
            (done,), = self.q("SELECT count(*) FROM tasks WHERE status IN ('succeeded','failed','dead','cancelled')")
            if done >= n:
                break
            time.sleep(0.25)
        wall = time.time() - t_start
        if done < n:
            self.failed = True
            raise BenchError("%s: only %d of %d tasks finished within %d s (logs: %s)" % (
                self.name(), done, n, self.args.timeout, self.procs.logdir))
        after = self.pg_counters()
        busy1, idle1 = machine_cpu_s()
        cpu1 = {k: tree_cpu_s(v) for k, v in svc_pids.items()}
        cpu1["fixtures"] = sum(proc_cpu_s(f.pid) for f in self.fixtures)
        cpu1["scheduler"] = proc_cpu_s(self.scheduler.pid)
        split = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu1}
        split["workers"] = round(sum(proc_cpu_s(p.pid) for p in workers), 2)
        split["machine_busy"] = round(busy1 - busy0, 2)
        split["machine_idle"] = round(idle1 - idle0, 2)
        split["other_processes"] = round(split["machine_busy"] - sum(
            v for k, v in split.items() if k not in ("machine_busy", "machine_idle")), 2)
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
            if self.args.perf_callgraph:
                # inclusive time per function: who calls malloc, cJSON, libpq...
                rep = subprocess.run(["perf", "report", "-i", self.perf_data, "--stdio", "--children",
                                      "--sort", "symbol", "-g", "none", "--percent-limit", "2"],
                                     capture_output=True, text=True)
            else:
                rep = subprocess.run(["perf", "report", "-i", self.perf_data, "--stdio", "--no-children",
                                      "--sort", "dso,symbol", "--percent-limit", "0.7"], capture_output=True, text=True)
            with open(self.perf_data.replace(".data", ".txt"), "w") as f:
                f.write(rep.stdout)
            log("%s: perf profile of worker 0 in %s" % (self.name(), self.perf_data.replace(".data", ".txt")))
        cpu = [proc_cpu_s(p.pid) - startup_cpu for p in workers]
        hwm = [proc_status_kb(p.pid, "VmHWM") for p in workers]
        sched_cpu = proc_cpu_s(self.scheduler.pid)
        fx_stats = [http_json(f.url + "/_stats") for f in self.fixtures]
        metrics = {}
        for p in workers:
            for key, v in self.worker_metrics(p).items():
                metrics[key] = metrics.get(key, 0.0) + v
        rcs = [self.procs.stop(p, timeout=60) for p in workers]
        events = {}
        for p in workers:
            with open(os.path.join(self.procs.logdir, p.name + ".log"), errors="replace") as f:
                for line in f:
                    if '"level":"warn"' in line or '"level":"error"' in line:
                        m = re.search(r'"event":"([^"]+)"', line)
                        key = m.group(1) if m else "?"
                        if "deadlock detected" in line:
                            key += " (deadlock)"
                        events[key] = events.get(key, 0) + 1
        self.procs.stop(self.scheduler, timeout=60)
        self.workers = []

        res = {"run": self.name(), "workload": self.workload, "workers": self.nworkers, "tasks": n, "steps_per_task": k,
               "max_in_flight": self.in_flight, "pg_pool": self.args.pg_pool, "model_ms": self.model_ms,
               "tool_ms": self.tool_ms, "enqueue_s": round(enq_s, 2), "wall_s": round(wall, 2),
               "peak_in_flight": peak_in_flight, "worker_exit_codes": rcs, "worker_warnings": events,
               "loadavg_1m": [load_before, os.getloadavg()[0]],
               "startup_cpu_s": startup_cpu, "scheduler_cpu_s": round(sched_cpu, 2), "cpu_split_s": split}
        # means of the worker's own histograms (seconds -> ms): how long the
        # model and tool calls took as the worker saw them (a fixture server
        # that cannot keep up shows here), and the checkpoint round trip.
        for h in ("step_duration", "checkpoint_duration", "model_request_duration", "tool_duration"):
            c = metrics.get("longrun_%s_seconds_count" % h, 0)
            res["%s_mean_ms" % h] = 1000.0 * metrics.get("longrun_%s_seconds_sum" % h, 0) / c if c else None
        (t0, t1), = self.q("SELECT extract(epoch FROM min(started_at)), extract(epoch FROM max(finished_at)) FROM tasks")
        elapsed = float(t1) - float(t0)
        (nsteps,), = self.q("SELECT count(*) FROM task_steps")
        res.update({"elapsed_s": round(elapsed, 3), "steps": int(nsteps), "tasks_per_s": n / elapsed,
                    "steps_per_s": nsteps / elapsed, "worker_cpu_s": [round(c, 3) for c in cpu],
                    "cpu_ms_per_step": 1000.0 * sum(cpu) / max(nsteps, 1),
                    "cpu_s_per_1000_steps": 1000.0 * sum(cpu) / max(nsteps, 1),
                    "peak_rss_mib": [round(h / 1024.0, 1) for h in hwm]})
        # orchestration overhead: step latency minus the configured latency of that step
        # (steps 1..K-1: model + tool; step K: the model only)
        (p50, p99, mx), = self.q(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY o), percentile_cont(0.99) WITHIN GROUP (ORDER BY o),"
            " max(o) FROM (SELECT latency_ms - CASE WHEN step_no < %s THEN %s ELSE %s END AS o FROM task_steps) x",
            (k, self.model_ms + self.tool_ms, self.model_ms))
        res.update({"overhead_p50_ms": float(p50), "overhead_p99_ms": float(p99), "overhead_max_ms": float(mx)})
        # correctness
        status = dict(self.q("SELECT status, count(*) FROM tasks GROUP BY status"))
        (bad_steps,), = self.q(
            "SELECT count(*) FROM (SELECT t.id FROM tasks t LEFT JOIN task_steps s ON s.task_id = t.id"
            " GROUP BY t.id, t.step HAVING count(s.step_no) <> %s OR count(DISTINCT s.step_no) <> count(s.step_no)"
            " OR min(s.step_no) <> 1 OR max(s.step_no) <> %s OR t.step <> %s) x", (k, k, k))
        (claims,), = self.q("SELECT coalesce(max(claims_total), 0) FROM tasks")
        model_calls = sum(s.get("by_kind", {}).get("openai", 0) for s in fx_stats)
        tool_calls = sum(s.get("by_kind", {}).get("tool", 0) for s in fx_stats)
        http_errors = sum(v for s in fx_stats for st, v in s.get("by_status", {}).items() if not st.startswith("2"))
        # Correct = every task succeeded with exactly K step rows numbered 1..K.
        # Extra model calls are reported apart: a step interrupted before its
        # checkpoint (e.g. a worker giving up its leases) runs again by design.
        ok = status.get("succeeded", 0) == n and bad_steps == 0 and int(nsteps) == n * k
        res.update({"status": status, "tasks_with_wrong_steps": int(bad_steps), "max_claims_per_task": int(claims),
                    "model_calls": model_calls, "tool_calls": tool_calls, "fixture_http_errors": http_errors,
                    "extra_model_calls": model_calls - n * k, "extra_tool_calls": tool_calls - n * (k - 1),
                    "correct": ok})
        # PostgreSQL side
        d = {key: after[key] - before[key] for key in after}
        res.update({"pg": d, "fsyncs_per_step": d["wal_sync"] / max(nsteps, 1),
                    "commits_per_step": d["commits"] / max(nsteps, 1)})
        (hot, upd), = self.q("SELECT n_tup_hot_upd, n_tup_upd FROM pg_stat_user_tables WHERE relname = 'tasks'")
        res["tasks_hot_update_ratio"] = (hot / upd) if upd else None
        # every UPDATE of a tasks row: claims, checkpoints, lease renewals, ...
        res["tasks_row_updates"] = int(upd)
        res["tasks_row_updates_per_step"] = upd / max(int(nsteps), 1)
        sample = self.q("SELECT messages::text, tool_calls::text, model FROM task_steps WHERE step_no = 2 LIMIT 1")
        res["sample_step"] = {"messages": sample[0][0], "tool_calls": sample[0][1] or "[]", "model": sample[0][2]}
        return res


# ---------------------------------------------------------------- report

def table(results, ceilings):
    head = ["run", "in-flight", "tasks/s", "steps/s", "PG ceiling", "ratio", "CPU s/1k steps", "peak RSS MiB",
            "ovh p50 ms", "ovh p99 ms", "fsync/step", "correct"]
    rows = []
    for r in results:
        c = ceilings.get(r["workers"] * r["pg_pool"])
        rows.append([r["run"], "%d (peak %d)" % (r["max_in_flight"] * r["workers"], r["peak_in_flight"]),
                     "%.1f" % r["tasks_per_s"], "%.0f" % r["steps_per_s"],
                     "%.0f tps @%d" % (c["tps"], c["clients"]) if c else "-",
                     "%.2f" % (r["steps_per_s"] / c["tps"]) if c else "-",
                     "%.3f" % r["cpu_s_per_1000_steps"], "/".join("%.1f" % m for m in r["peak_rss_mib"]),
                     "%.0f" % r["overhead_p50_ms"], "%.0f" % r["overhead_p99_ms"], "%.3f" % r["fsyncs_per_step"],
                     "yes" if r["correct"] else "NO"])
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    out = ["  ".join(str(x).ljust(w[i]) for i, x in enumerate(head)),
           "  ".join("-" * w[i] for i in range(len(head)))]
    for row in rows:
        out.append("  ".join(str(x).ljust(w[i]) for i, x in enumerate(row)))
    return "\n".join(out)


def fixture_desc(kind):
    return "fast (%s)" % FAST_FIXTURE if kind == "fast" else "python (fixture_server.py)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build-bench"), help="directory with the binaries")
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=10, help="K: steps per task (model fixture-steps-K)")
    ap.add_argument("--runs", default="zero:1,zero:2,lat:1,lat:2",
                    help="comma-separated WORKLOAD:WORKERS (workloads: zero, lat)")
    ap.add_argument("--zero-in-flight", type=int, default=256, help="LONGRUN_MAX_IN_FLIGHT for W-zero (per worker)")
    ap.add_argument("--lat-in-flight", type=int, default=1000, help="LONGRUN_MAX_IN_FLIGHT for W-lat (per worker)")
    ap.add_argument("--pg-pool", type=int, default=4, help="LONGRUN_PG_POOL_SIZE per worker")
    ap.add_argument("--fixture", choices=("fast", "python"),
                    help="model and tool servers: fast = <build>/%s (bench/fixture_fast.c), python = "
                         "tests/fixtures/fixture_server.py [fast if built, else python]" % FAST_FIXTURE)
    ap.add_argument("--fixture-pairs", type=int, default=1,
                    help="fixture server pairs (model + tool); workers are spread over them")
    ap.add_argument("--pgbench-seconds", type=int, default=15)
    ap.add_argument("--pgbench-extra", default="32",
                    help="comma-separated extra pgbench client counts, to show how PostgreSQL scales ('' = none)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds a run may take")
    ap.add_argument("--quick", action="store_true", help="200 tasks per run, 5 s pgbench")
    ap.add_argument("--keep-services", action="store_true", help="leave the bench PostgreSQL and RabbitMQ running")
    ap.add_argument("--keep-data", action="store_true", help="keep each run's database, vhost and logs")
    ap.add_argument("--home", default=os.path.join(ROOT, ".longrun-bench"))
    ap.add_argument("--pg-port", type=int, default=57432)
    ap.add_argument("--amqp-port", type=int, default=57672)
    ap.add_argument("--perf", metavar="DIR", help="record worker 0 of each run with perf (flat profile) into DIR")
    ap.add_argument("--perf-callgraph", action="store_true",
                    help="with --perf: DWARF call graphs, report inclusive time per function (slower)")
    ap.add_argument("--json", help="write the results here [<build>/bench-results.json]")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.pgbench_seconds = 200, 5
    args.build = os.path.abspath(args.build)
    for b in ("longrun", "longrun-worker"):
        if not os.access(os.path.join(args.build, b), os.X_OK):
            sys.exit("bench: %s/%s not found; build first: cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release "
                     "&& cmake --build build-bench -j2" % (args.build, b))
    fast = os.path.join(args.build, FAST_FIXTURE)
    if args.fixture is None:
        args.fixture = "fast" if os.access(fast, os.X_OK) else "python"
        if args.fixture == "python":
            log("note: %s not found, using the Python fixture servers (tests/fixtures/fixture_server.py), whose "
                "CPU competes with PostgreSQL; build the target %s for the fast ones" % (fast, FAST_FIXTURE))
    elif args.fixture == "fast" and not os.access(fast, os.X_OK):
        sys.exit("bench: %s not found; build it (cmake --build %s --target %s) or use --fixture python" % (
            fast, args.build, FAST_FIXTURE))
    if not os.access(PGBENCH, os.X_OK):
        sys.exit("bench: %s not found (Debian package postgresql-15 / postgresql-contrib)" % PGBENCH)
    runs = []
    for spec in args.runs.split(","):
        wl, _, nw = spec.partition(":")
        if wl not in WORKLOADS or not nw.isdigit():
            sys.exit("bench: bad run %r (want WORKLOAD:WORKERS, workloads %s)" % (spec, ", ".join(WORKLOADS)))
        runs.append((wl, int(nw)))

    t_all = time.time()
    log("bench services: LONGRUN_HOME=%s, PostgreSQL %d, RabbitMQ %d; fixture servers: %s" % (
        args.home, args.pg_port, args.amqp_port, fixture_desc(args.fixture)))
    svc = services("up", args.home, args.pg_port, args.amqp_port)
    logdir = tempfile.mkdtemp(prefix="longrun-bench-")
    procs = Procs(logdir)
    results, ceilings = [], {}
    machine = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "kernel": os.uname().release}
    try:
        with open("/proc/cpuinfo") as f:
            machine["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        pass
    rc = 0
    try:
        for wl, nw in runs:
            r = Run(args, svc, procs, wl, nw, args.zero_in_flight if wl == "zero" else args.lat_in_flight)
            try:
                res = r.execute()
                clients = nw * args.pg_pool
                if clients not in ceilings:
                    log("%s: pgbench, the checkpoint statement with %d clients for %d s" % (
                        r.name(), clients, args.pgbench_seconds))
                    ceilings[clients] = run_pgbench(r.db_url, clients, args.pgbench_seconds, r.dir, res["sample_step"],
                                                    args.home)
                    for extra in [int(x) for x in args.pgbench_extra.split(",") if x.strip()]:
                        if ("extra", extra) not in ceilings:
                            log("%s: pgbench, the checkpoint statement with %d clients for %d s (scaling point)" % (
                                r.name(), extra, args.pgbench_seconds))
                            ceilings[("extra", extra)] = run_pgbench(r.db_url, extra, args.pgbench_seconds, r.dir,
                                                                     res["sample_step"], args.home)
                res["fixture"] = args.fixture
                res["pg_ceiling"] = ceilings[clients]
                res["ratio_to_ceiling"] = res["steps_per_s"] / ceilings[clients]["tps"]
                results.append(res)
                log("%s: %.0f steps/s, %.1f tasks/s, ceiling %.0f tps, correct=%s" % (
                    r.name(), res["steps_per_s"], res["tasks_per_s"], ceilings[clients]["tps"], res["correct"]))
                if not res["correct"]:
                    r.failed = True
                    rc = 1
            finally:
                r.teardown()
    except BenchError as e:
        log("bench: %s" % e)
        rc = 2
    finally:
        procs.stop_all()
        if not args.keep_services:
            log("stopping the bench services")
            try:
                services("down", args.home, args.pg_port, args.amqp_port)
            except BenchError as e:
                log(str(e))
    out = {"machine": machine, "fixture": args.fixture, "results": results, "pgbench": list(ceilings.values()),
           "total_s": round(time.time() - t_all, 1)}
    path = args.json or os.path.join(args.build, "bench-results.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print()
    print("longrun bench, %s, %d CPUs (%s); %d tasks x %d steps per run; fixture servers: %s" % (
        machine["date"], machine["cpus"], machine.get("cpu", "?"), args.tasks, args.steps, fixture_desc(args.fixture)))
    print(table(results, ceilings))
    for r in results:
        print("  %-10s CPU %.3f ms/step (worker CPU s %s, start-up %.2f s subtracted), fsyncs/step %.3f, "
              "commits/step %.2f, tasks row updates/step %.2f, HOT updates of tasks %.0f%%, max claims/task %d, fixture model/tool calls %d/%d, "
              "non-2xx %d, enqueue %.1f s" % (
                  r["run"], r["cpu_ms_per_step"], r["worker_cpu_s"], r["startup_cpu_s"], r["fsyncs_per_step"],
                  r["commits_per_step"], r["tasks_row_updates_per_step"], 100 * (r["tasks_hot_update_ratio"] or 0), r["max_claims_per_task"],
                  r["model_calls"], r["tool_calls"], r["fixture_http_errors"], r["enqueue_s"]))
    for c in sorted(ceilings.values(), key=lambda c: c["clients"]):
        print("  pgbench    %3d clients: %.0f tps, latency %.2f ms, PostgreSQL CPU %.2f ms per checkpoint, "
              "machine busy %.0f%%" % (c["clients"], c["tps"], c["latency_ms"] or 0, c["pg_cpu_ms_per_tx"] or 0,
                                       100.0 * c["machine_busy_s"] / max(c["machine_busy_s"] + c["machine_idle_s"], 1e-9)))
    for r in results:
        sp = r["cpu_split_s"]
        print("  %-10s CPU seconds during the run (%.1f s wall): workers %.1f, PostgreSQL %.1f (%.2f ms per step), "
              "RabbitMQ %.1f, fixtures %.1f, scheduler %.1f, other processes %.1f, idle %.1f" % (
                  r["run"], r["wall_s"], sp["workers"], sp.get("postgres", 0), 1000.0 * sp.get("postgres", 0) / r["steps"],
                  sp.get("rabbitmq", 0), sp["fixtures"], sp["scheduler"], sp["other_processes"], sp["machine_idle"]))
    for r in results:
        if r["worker_warnings"]:
            print("  %-10s worker warnings/errors: %s" % (r["run"], ", ".join(
                "%s x%d" % (k, v) for k, v in sorted(r["worker_warnings"].items()))))
    for r in results:
        f = lambda v: "-" if v is None else "%.1f" % v
        print("  %-10s worker-side means: step %s ms, model call %s ms, tool call %s ms, checkpoint %s ms; "
              "load average (1 min) before/after %.1f/%.1f" % (
                  r["run"], f(r["step_duration_mean_ms"]), f(r["model_request_duration_mean_ms"]),
                  f(r["tool_duration_mean_ms"]), f(r["checkpoint_duration_mean_ms"]), r["loadavg_1m"][0],
                  r["loadavg_1m"][1]))
    print("results: %s (total %.0f s)" % (path, out["total_s"]))
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""Integration-test harness: real PostgreSQL and RabbitMQ, real longrun processes.

Each test gets its own database (created from the server named by
LONGRUN_DATABASE_URL) and its own RabbitMQ vhost (created through the
management API at LONGRUN_AMQP_MGMT_URL), so tests run in parallel without
seeing each other's tasks or queues.  `scripts/dev test` starts the servers
and exports these variables; without them a test exits 77 (skipped) and says
why.

Processes (workers, schedulers, the fixture server) are started with their
output in a per-test directory, and killed at the end; on failure the tails
of their logs are printed.  Conditions are polled with wait_for(), never with
fixed sleeps.
"""
import base64
import json
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request

import socket
import threading

import psycopg2
import psycopg2.extras

BUILD = os.environ.get("LONGRUN_BUILD_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "build")
SOURCE = os.environ.get("LONGRUN_SOURCE_DIR") or os.path.join(os.path.dirname(__file__), "..", "..")
PY = "/usr/bin/python3"
TIMEOUT_MULT = float(os.environ.get("LONGRUN_TEST_TIMEOUT_MULTIPLIER", "1"))


def skip(msg):
    print("SKIP: " + msg)
    sys.exit(77)


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


class TestFailure(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def eq(a, b, msg=""):
    if a != b:
        raise TestFailure("%s: %r != %r" % (msg or "values differ", a, b))


def free_port():
    """A TCP port free on 127.0.0.1 right now (for LONGRUN_HTTP_PORT and the like), chosen at random
    below the kernel's ephemeral range: a port that bind(0) handed out could be taken, before the
    server binds it, by any outgoing connection on the host (PostgreSQL, RabbitMQ and HTTP clients of
    other tests), which made tests fail with "port in use"."""
    import random
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = min(low, 32768) - 1
    for _ in range(200):
        p = random.randint(max(1024, top - 12000), top)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            s.close()
        return p
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def http_get(port, path):
    """GET http://127.0.0.1:port/path: (status, body text); (None, "") when nothing answers."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return None, ""


def wait_for(cond, timeout, what, interval=0.1):
    """Polls cond() until it returns a truthy value; returns it.  Fails with `what`."""
    deadline = time.time() + timeout * TIMEOUT_MULT
    last = None
    while time.time() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise TestFailure("timed out after %.0f s waiting for %s (last: %r)" % (timeout * TIMEOUT_MULT, what, last))


def _with_db(url, dbname):
    p = urllib.parse.urlparse(url)
    return urllib.parse.urlunparse(p._replace(path="/" + dbname))


# Log events that only a bug produces (checked for every daemon at teardown).
BUG_EVENTS = ("task.bad_state", "task.bad_outcome", "task.bad_io")


class Proc:
    def __init__(self, name, argv, env, logdir):
        self.name = name
        self.logpath = os.path.join(logdir, name + ".log")
        self.logf = open(self.logpath, "ab")
        self.p = subprocess.Popen(argv, env=env, stdout=self.logf, stderr=subprocess.STDOUT)

    @property
    def pid(self):
        return self.p.pid

    def alive(self):
        return self.p.poll() is None

    def signal(self, sig):
        if self.alive():
            self.p.send_signal(sig)

    def kill(self):
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout):
        try:
            return self.p.wait(timeout * TIMEOUT_MULT)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self):
        self.logf.flush()
        with open(self.logpath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def tail(self, n=40):
        return "\n".join(self.log_text().splitlines()[-n:])

    def events(self, event=None, **match):
        """The process's JSON log lines (dicts), optionally only those with this
        event name and these field values (e.g. task_id=...)."""
        out = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if event is not None and e.get("event") != event:
                continue
            if any(e.get(k) != v for k, v in match.items()):
                continue
            out.append(e)
        return out

    def wait_event(self, event, timeout, **match):
        return wait_for(lambda: self.events(event, **match), timeout, "%s: log event %s %r" % (self.name, event, match))

    def returncode(self):
        return self.p.poll()


class Env:
    """One isolated test environment.  Use as a context manager."""

    def __init__(self, name, migrate=True):
        self.name = name
        base_db = os.environ.get("LONGRUN_DATABASE_URL")
        base_amqp = os.environ.get("LONGRUN_AMQP_URL")
        self.mgmt = os.environ.get("LONGRUN_AMQP_MGMT_URL")
        if not base_db or not base_amqp or not self.mgmt:
            skip("LONGRUN_DATABASE_URL, LONGRUN_AMQP_URL and LONGRUN_AMQP_MGMT_URL must name running servers "
                 "(scripts/dev test sets them)")
        suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(6))
        self.tag = "t_%s_%s" % (name.replace("-", "_"), suffix)
        self.base_db = base_db
        self.db_url = _with_db(base_db, self.tag)
        self.vhost = self.tag
        p = urllib.parse.urlparse(base_amqp)
        self.amqp_url = urllib.parse.urlunparse(p._replace(path="/" + self.vhost))
        self.amqp_host, self.amqp_port = p.hostname, p.port or 5672
        self.amqp_user, self.amqp_pass = p.username or "guest", p.password or "guest"
        self.dir = tempfile.mkdtemp(prefix="longrun-%s-" % name)
        self.procs = []
        self._db = None
        self.fixture_url = None
        self.do_migrate = migrate

    # -- setup / teardown
    def __enter__(self):
        admin = psycopg2.connect(self.base_db)
        admin.autocommit = True
        admin.cursor().execute('CREATE DATABASE "%s"' % self.tag)
        admin.close()
        self.mgmt_call("PUT", "/api/vhosts/" + urllib.parse.quote(self.vhost, safe=""), {})
        self.mgmt_call("PUT", "/api/permissions/%s/%s" % (urllib.parse.quote(self.vhost, safe=""), self.amqp_user),
                       {"configure": ".*", "write": ".*", "read": ".*"})
        if self.do_migrate:
            r = self.cli("migrate")
            check(r.returncode == 0, "migrate failed: %s" % r.stderr)
        log("env %s: db %s, vhost %s, dir %s" % (self.name, self.tag, self.vhost, self.dir))
        return self

    def __exit__(self, et, ev, tb):
        failed = et is not None
        exit_problems = []
        if not failed:
            # A clean stop: every longrun daemon still running gets SIGTERM and
            # must exit 0 -- under ASan/LSan a leak or a sanitizer report at
            # exit makes the exit code non-zero, so every test checks that too.
            daemons = [p for p in self.procs if p.alive() and p.name != "fixture" and not p.name.startswith("aux")]
            for p in daemons:
                p.signal(signal.SIGTERM)
            for p in daemons:
                rc = p.wait(40)
                if rc is None:
                    exit_problems.append("%s did not exit within 40 s of SIGTERM" % p.name)
                elif rc != 0:
                    exit_problems.append("%s exited %d after SIGTERM" % (p.name, rc))
            # The worker's state machines refuse and log an illegal move
            # (task.bad_state / bad_outcome / bad_io) instead of crashing, and
            # the daemons log a handle left open at exit: any of them is a bug.
            for p in self.procs:
                if p.name == "fixture" or p.name.startswith("aux"):
                    continue
                bad = [e for e in p.events() if e.get("event") in BUG_EVENTS or
                       str(e.get("event", "")).endswith(".open_at_exit")]
                if bad:
                    exit_problems.append("%s logged %d bug event(s), first: %r" % (p.name, len(bad), bad[0]))
            if exit_problems:
                failed = True
        for p in self.procs:
            if p.alive():
                p.signal(signal.SIGKILL)
        for p in self.procs:
            p.wait(10)
        if failed:
            for p in self.procs:
                print("----- %s (pid %d) last lines -----\n%s" % (p.name, p.pid, p.tail()))
        if self._db is not None:
            self._db.close()
        if os.environ.get("LONGRUN_KEEP_TEST_STATE") != "1":
            try:
                admin = psycopg2.connect(self.base_db)
                admin.autocommit = True
                admin.cursor().execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % self.tag)
                admin.close()
                self.mgmt_call("DELETE", "/api/vhosts/" + urllib.parse.quote(self.vhost, safe=""))
            except Exception as e:  # pragma: no cover
                print("cleanup: %s" % e)
            if not failed:
                shutil.rmtree(self.dir, ignore_errors=True)
        if exit_problems:
            raise TestFailure("; ".join(exit_problems))
        return False

    # -- RabbitMQ management API
    def mgmt_call(self, method, path, body=None):
        p = urllib.parse.urlparse(self.mgmt)
        url = "%s://%s:%d%s" % (p.scheme, p.hostname, p.port, path)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        auth = base64.b64encode(("%s:%s" % (p.username, p.password)).encode()).decode()
        req.add_header("Authorization", "Basic " + auth)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                txt = r.read()
                return json.loads(txt) if txt else None
        except urllib.error.HTTPError as e:
            if e.code == 404 and method == "GET":
                return None
            raise

    def queue_info(self, queue):
        return self.mgmt_call("GET", "/api/queues/%s/%s" % (urllib.parse.quote(self.vhost, safe=""),
                                                            urllib.parse.quote(queue, safe="")))

    # -- PostgreSQL
    @property
    def db(self):
        if self._db is None or self._db.closed:
            self._db = psycopg2.connect(self.db_url)
            self._db.autocommit = True
        return self._db

    def sql(self, q, args=None):
        for attempt in range(30):
            try:
                cur = self.db.cursor(cursor_factory=psycopg2.extras.RealDictCursor)
                cur.execute(q, args)
                return cur.fetchall() if cur.description else []
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                # the server may be restarting in a chaos test
                self._db = None
                time.sleep(0.5)
        raise TestFailure("database unreachable")

    def scalar(self, q, args=None):
        rows = self.sql(q, args)
        return list(rows[0].values())[0] if rows else None

    # -- processes
    def base_env(self, **extra):
        env = dict(os.environ)
        env.update({
            "LONGRUN_DATABASE_URL": self.db_url,
            "LONGRUN_AMQP_URL": self.amqp_url,
            "LONGRUN_LOG_LEVEL": "info",
        })
        if self.fixture_url:
            env["LONGRUN_HTTP_STEPS_URL"] = self.fixture_url
            env["LONGRUN_FIXTURE_URL"] = self.fixture_url
        for k, v in extra.items():
            env[k] = str(v)
        return env

    def write_json(self, name, doc):
        """Writes doc as JSON to a file of this test's directory (an agents file, ...); returns its path."""
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            json.dump(doc, f)
        return path

    def cli(self, *args, input=None, env=None, timeout=60):
        e = self.base_env(**(env or {}))
        return subprocess.run([os.path.join(BUILD, "longrun")] + list(args), input=input, env=e,
                              capture_output=True, text=True, timeout=timeout * TIMEOUT_MULT)

    def start(self, name, argv, **env):
        p = Proc(name, argv, self.base_env(**env), self.dir)
        self.procs.append(p)
        return p

    def start_worker(self, name="worker", args=(), **env):
        env.setdefault("LONGRUN_WORKER_ID", name)
        return self.start(name, [os.path.join(BUILD, "longrun-worker")] + list(args), **env)

    def start_worker_http(self, name="worker", timeout=30, **env):
        """Starts a worker with its health server on a free port and waits for
        /readyz to answer 200.  Another test on this host may take the port
        between free_port() and the worker's bind (the worker then exits 2):
        such a worker is started again on another port, three tries in all.
        Returns (proc, port)."""
        for attempt in range(3):
            port = free_port()
            w = self.start_worker(name if attempt == 0 else "%s-%d" % (name, attempt), LONGRUN_HTTP_PORT=port,
                                  LONGRUN_WORKER_ID=name, **env)
            wait_for(lambda: not w.alive() or http_get(port, "/readyz")[0] == 200, timeout, "%s ready" % name)
            if w.alive():
                return w, port
        raise TestFailure("%s did not start with a health port in 3 tries:\n%s" % (name, w.tail()))

    def start_scheduler(self, name="scheduler", **env):
        env.setdefault("LONGRUN_SWEEP_INTERVAL_MS", "200")
        return self.start(name, [os.path.join(BUILD, "longrun-scheduler")], **env)

    def start_fixture(self, *args):
        portfile = os.path.join(self.dir, "fixture.port")
        p = self.start("fixture", [PY, os.path.join(SOURCE, "tests", "fixtures", "fixture_server.py"),
                                   "--port", "0", "--port-file", portfile] + list(args))
        wait_for(lambda: os.path.exists(portfile) and open(portfile).read().strip(), 15, "fixture server port")
        self.fixture_url = "http://127.0.0.1:%s" % open(portfile).read().strip()
        return p

    def fixture(self, path, body=None):
        req = urllib.request.Request(self.fixture_url + path, data=json.dumps(body).encode() if body is not None else None,
                                     method="POST" if body is not None else "GET")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    # -- RabbitMQ (pika, for tests that act as a foreign producer or consumer)
    def amqp(self):
        """A pika BlockingConnection to this env's vhost."""
        import pika
        params = pika.ConnectionParameters(host=self.amqp_host, port=self.amqp_port, virtual_host=self.vhost,
                                           credentials=pika.PlainCredentials(self.amqp_user, self.amqp_pass),
                                           heartbeat=60, blocked_connection_timeout=60,
                                           connection_attempts=10, retry_delay=1)
        return pika.BlockingConnection(params)

    def publish(self, bodies, routing_key="default", exchange="longrun.tasks", props=None, conn=None):
        """Publishes raw bodies (bytes, str or JSON-able) with publisher confirms and
        mandatory routing.  props: dict of pika.BasicProperties fields, or a function
        (index, body) -> dict.  Returns nothing; raises on a nack or unroutable message."""
        import pika
        own = conn is None
        conn = conn or self.amqp()
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            for i, b in enumerate(bodies):
                if not isinstance(b, (bytes, str)):
                    b = json.dumps(b)
                if isinstance(b, str):
                    b = b.encode()
                pr = props(i, b) if callable(props) else dict(props or {})
                pr.setdefault("delivery_mode", 2)
                ch.basic_publish(exchange, routing_key, b, pika.BasicProperties(**pr), mandatory=True)
            ch.close()
        finally:
            if own:
                conn.close()

    def queue_counts(self, queue):
        """(messages ready, consumers) of a queue right now (passive declare, unlike
        the management API's statistics which lag by seconds), or None if absent."""
        import pika
        try:
            conn = self.amqp()
        except pika.exceptions.AMQPError:
            return None
        try:
            ok = conn.channel().queue_declare(queue, passive=True).method
            return ok.message_count, ok.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return None
        finally:
            try:
                conn.close()
            except Exception:
                pass

    def wait_queue(self, queue="longrun.q.default", consumers=1, timeout=30):
        """Waits until the queue exists with at least `consumers` consumers."""
        return wait_for(lambda: (self.queue_counts(queue) or (0, -1))[1] >= consumers, timeout,
                        "queue %s with %d consumer(s)" % (queue, consumers), interval=0.2)

    def fixture_requests(self, path_prefix=None, limit=1000000):
        q = "/_requests?limit=%d" % limit
        if path_prefix:
            q += "&path_prefix=" + urllib.parse.quote(path_prefix)
        return self.fixture(q)["requests"]

    # -- the shared servers (restart tests; they need LONGRUN_HOME of the instance)
    def services(self, *args, timeout=240):
        home = os.environ.get("LONGRUN_HOME")
        if not home:
            skip("LONGRUN_HOME must name the services.sh instance behind LONGRUN_DATABASE_URL "
                 "(scripts/dev test sets it)")
        env = dict(os.environ)
        r = subprocess.run([os.path.join(SOURCE, "scripts", "services.sh")] + list(args), env=env,
                           capture_output=True, text=True, timeout=timeout * TIMEOUT_MULT)
        check(r.returncode == 0, "services.sh %s failed: %s" % (" ".join(args), r.stderr[-2000:]))
        return r

    def check_services_home(self):
        """Skips unless LONGRUN_HOME's instance is the one the URLs point at."""
        home = os.environ.get("LONGRUN_HOME")
        if not home:
            skip("LONGRUN_HOME is not set: cannot restart the servers (scripts/dev test sets it)")
        r = subprocess.run([os.path.join(SOURCE, "scripts", "services.sh"), "env"], env=dict(os.environ),
                           capture_output=True, text=True, timeout=60)
        want = urllib.parse.urlparse(self.base_db).port
        if ":%d/" % want not in r.stdout:
            skip("LONGRUN_HOME=%s does not serve the database on port %d" % (home, want))

    # -- tasks
    def enqueue_many(self, bodies, queue="default"):
        lines = "".join(json.dumps(b) + "\n" for b in bodies)
        r = self.cli("enqueue", "--queue", queue, "--json", input=lines, timeout=600)
        check(r.returncode == 0, "enqueue failed (%d): %s" % (r.returncode, r.stderr[-2000:]))
        out = json.loads(r.stdout)
        return [o["id"] for o in out]

    def status_counts(self):
        return {r["status"]: r["n"] for r in self.sql("select status, count(*) as n from tasks group by status")}

    def wait_all_terminal(self, n, timeout, statuses=("succeeded",)):
        def done():
            c = self.status_counts()
            return sum(c.get(s, 0) for s in ("succeeded", "failed", "dead", "cancelled")) >= n and c
        c = wait_for(done, timeout, "%d tasks to finish" % n, interval=0.5)
        return c

    def check_step_log(self, expect_steps=None):
        """Step rows contiguous 1..step and unique per task (the PK makes duplicates impossible; gaps are checked)."""
        bad = self.sql("""select t.id, t.step, count(s.step_no) as n, coalesce(max(s.step_no),0) as mx
                          from tasks t left join task_steps s on s.task_id = t.id
                          group by t.id, t.step having count(s.step_no) <> t.step or coalesce(max(s.step_no),0) <> t.step""")
        check(not bad, "step log gaps or mismatches: %r" % bad[:5])
        if expect_steps is not None:
            wrong = self.sql("select id, step from tasks where step <> %s", (expect_steps,))
            check(not wrong, "tasks with other than %d steps: %r" % (expect_steps, wrong[:5]))


class Proxy:
    """A TCP proxy that injects network faults between a process and a server:
    cut() resets every connection and refuses new ones until restore();
    delay(s) holds every forwarded chunk s seconds; partition() stops
    forwarding without closing anything (a silent partition: peers see no
    reset, only silence) until restore(); trip(pattern, n) lets the next n
    client chunks that contain pattern reach the server, drops the server's
    answer and then resets that connection (a write that committed while its
    client never learns it did)."""

    def __init__(self, host, port):
        self.target = (host, port)
        self.lag = 0.0
        self.silent = False
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(64)
        self.port = self.srv.getsockname()[1]
        self.up = True
        self.conns = []
        self.lock = threading.Lock()
        self.trip_pattern, self.trips_left, self.tripped = None, 0, 0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            if not self.up:
                c.close()
                continue
            try:
                u = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, u]
            muted = threading.Event()  # the server's answers on this connection are dropped
            for a, b, up in ((c, u, True), (u, c, False)):
                threading.Thread(target=self.pipe, args=(a, b, up, muted), daemon=True).start()

    def pipe(self, a, b, upstream=True, muted=None):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                while self.silent and self.up:
                    time.sleep(0.05)
                if self.lag:
                    time.sleep(self.lag)
                trip = False
                if upstream and self.trip_pattern is not None and self.trip_pattern in d:
                    with self.lock:
                        if self.trips_left > 0:
                            self.trips_left -= 1
                            self.tripped += 1
                            trip = True
                    if trip:
                        muted.set()
                if not upstream and muted is not None and muted.is_set():
                    continue
                b.sendall(d)
                if trip:
                    time.sleep(0.3)  # the server runs and commits it; its answer is dropped
                    break
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass

    def cut(self):
        self.up = False
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.conns = []

    def delay(self, seconds):
        self.lag = seconds

    def trip(self, pattern, n):
        with self.lock:
            self.trip_pattern = pattern if isinstance(pattern, bytes) else pattern.encode()
            self.trips_left = n

    def partition(self):
        self.silent = True

    def restore(self):
        self.silent = False
        self.lag = 0.0
        self.up = True


def run(fn):
    """Runs a test function, printing a traceback and exiting 1 on failure."""
    t0 = time.time()
    try:
        fn()
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        print("FAILED after %.1f s" % (time.time() - t0))
        sys.exit(1)
    print("PASSED in %.1f s" % (time.time() - t0))
    sys.exit(0)

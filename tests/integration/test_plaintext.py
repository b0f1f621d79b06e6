"""Issue 15, item 5: no plain text across a network unless the operator says so.

The worker and the scheduler refuse, at start and before any connection is
attempted, a PostgreSQL conninfo with sslmode=disable (or allow) and a plain
amqp:// URL whose host is not this machine (loopback addresses, localhost,
a Unix socket directory), unless LONGRUN_ALLOW_PLAINTEXT=1: exit 2 with a
message naming the variable, what is wrong and the way out, and without the
password.  The refused addresses are non-routable (10.0.0.1, 192.0.2.1) and
are never connected to: the process exits before it opens a socket, well
within a second, and logs no connection attempt.

With LONGRUN_ALLOW_PLAINTEXT=1 the same configuration is accepted
(--check-config), and a worker on the real loopback servers with
sslmode=disable runs a task to success with or without the flag.
"""
import os
import subprocess
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

SECRET = "Kv8Qx2Lm"  # must never be printed


def run(env, prog, *args, **extra):
    e = env.base_env(**extra)
    t0 = time.time()
    r = subprocess.run([os.path.join(h.BUILD, prog)] + list(args), env=e, capture_output=True, text=True,
                       timeout=30 * h.TIMEOUT_MULT)
    return r, time.time() - t0


def refused(env, prog, var, what, **extra):
    r, took = run(env, prog, **extra)
    out = r.stdout + r.stderr
    h.eq(r.returncode, 2, "%s with %s: exit code (output: %s)" % (prog, what, out[-600:]))
    h.check(took < 5 * h.TIMEOUT_MULT, "%s refused %s in %.1f s: it must not try to connect first" % (prog, what, took))
    h.check(var in r.stderr, "%s: the message names %s: %r" % (prog, var, r.stderr))
    h.check("LONGRUN_ALLOW_PLAINTEXT=1" in r.stderr, "%s: the message says how to allow it: %r" % (prog, r.stderr))
    h.check(SECRET not in out, "%s: the password leaked: %r" % (prog, out))
    # no log line at all: nothing was started, nothing was connected to
    h.eq(r.stdout, "", "%s printed log lines before refusing %s" % (prog, what))
    # --check-config says the same
    c, _ = run(env, prog, "--check-config", **extra)
    h.eq(c.returncode, 2, "%s --check-config with %s" % (prog, what))
    h.check(var in c.stderr, "%s --check-config names %s: %r" % (prog, var, c.stderr))
    # and LONGRUN_ALLOW_PLAINTEXT=1 lets it through (checked without connecting)
    a, _ = run(env, prog, "--check-config", LONGRUN_ALLOW_PLAINTEXT=1, **extra)
    h.eq(a.returncode, 0, "%s --check-config with %s and LONGRUN_ALLOW_PLAINTEXT=1: %s" % (prog, what, a.stderr))
    h.log("%s refuses %s: %s" % (prog, what, r.stderr.strip()))


def with_query(url, q):
    p = urllib.parse.urlparse(url)
    return urllib.parse.urlunparse(p._replace(query=q))


def test():
    with h.Env("plaintext") as env:
        remote_pg = "postgresql://longrun:%s@10.0.0.1:5432/longrun?sslmode=disable" % SECRET
        cases = [
            ("LONGRUN_DATABASE_URL", "sslmode=disable to 10.0.0.1", {"LONGRUN_DATABASE_URL": remote_pg}),
            ("LONGRUN_DATABASE_URL", "key=value sslmode=allow", {
                "LONGRUN_DATABASE_URL": "host=db.example.com user=longrun password=%s sslmode=allow" % SECRET}),
            ("LONGRUN_DATABASE_URL", "PGSSLMODE=disable with a remote host", {
                "LONGRUN_DATABASE_URL": "postgresql://longrun:%s@192.0.2.1/longrun" % SECRET,
                "PGSSLMODE": "disable"}),
            ("LONGRUN_DATABASE_URL", "one remote host of two", {
                "LONGRUN_DATABASE_URL": "postgresql://longrun:%s@127.0.0.1:1,10.0.0.1:2/x?sslmode=disable" % SECRET}),
            ("LONGRUN_AMQP_URL", "amqp:// to 10.0.0.1", {
                "LONGRUN_AMQP_URL": "amqp://longrun:%s@10.0.0.1:5672/" % SECRET}),
            ("LONGRUN_AMQP_URL", "amqp:// to a host name", {
                "LONGRUN_AMQP_URL": "amqp://longrun:%s@rabbitmq.example.com/" % SECRET}),
            ("LONGRUN_AMQP_TLS_VERIFY", "amqps:// without verification", {
                "LONGRUN_AMQP_URL": "amqps://longrun:%s@10.0.0.1/" % SECRET, "LONGRUN_AMQP_TLS_VERIFY": "0"}),
        ]
        for prog in ("longrun-worker", "longrun-scheduler"):
            for var, what, extra in cases:
                refused(env, prog, var, what, **extra)
        # --database-url on the command line is checked too
        r, _ = run(env, "longrun-worker", "--database-url", remote_pg)
        h.eq(r.returncode, 2, "--database-url with sslmode=disable to 10.0.0.1: %s" % r.stderr)
        h.check(SECRET not in r.stdout + r.stderr, "the password leaked")

        # Loopback with sslmode=disable needs no flag; remote TLS modes pass the check.
        for url in (with_query(env.db_url, "sslmode=disable"),
                    "postgresql://longrun@db.example.com/longrun?sslmode=verify-full",
                    "postgresql://longrun@db.example.com/longrun",  # prefer
                    "host=/var/run/postgresql dbname=longrun sslmode=disable",
                    "postgresql://longrun@[::1]:5432/longrun?sslmode=disable",
                    "postgresql://longrun@localhost/longrun?sslmode=disable"):
            c, _ = run(env, "longrun-worker", "--check-config", LONGRUN_DATABASE_URL=url)
            h.eq(c.returncode, 0, "--check-config %s: %s" % (url, c.stderr))

        # The allowed path, for real: loopback servers in plain text run a task,
        # without the flag and with it.
        env.start_fixture()
        local_pg = with_query(env.db_url, "sslmode=disable")
        env.start_worker("w-plain", LONGRUN_DATABASE_URL=local_pg)
        env.start_worker("w-allowed", LONGRUN_DATABASE_URL=local_pg, LONGRUN_ALLOW_PLAINTEXT=1)
        env.wait_queue("longrun.q.default", consumers=2)
        ids = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 2}} for _ in range(6)])
        env.wait_all_terminal(len(ids), 60 * h.TIMEOUT_MULT)
        h.eq(env.status_counts(), {"succeeded": len(ids)}, "every task succeeded")
        for p in env.procs:
            h.check(p.alive() or p.name == "fixture", "%s is running" % p.name)


h.run(test)

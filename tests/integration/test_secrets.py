"""Issue 15, item 3: no secret of a DSN or URL reaches the log, /health,
`longrun --json` output or the database, whatever form it takes.

Workers run with each form of PostgreSQL DSN (the test server trusts
loopback, so any password connects): a URI with ?password=, a URI with a
userinfo password and ?sslpassword=, key=value with password and
sslpassword, key=value with a quoted password holding a space and an escaped
quote; and all with an AMQP URL whose password is real (a RabbitMQ user
made for this test).  Their agents call a model through a URL with a
userinfo password, a tool through a URL with ?api_key=, and a tool that
cannot be reached through a URL with both, so that URLs end up in error
paths.  One more worker gets servers that do not answer, so that its DSN and
URL end up in connection errors and in its not-ready reason.  The CLI runs
with such URLs too (--print-config, workers --json, stats --json, connection
errors), and every table of the database is dumped.

A secret leaks when any 4-character run of it shows up anywhere: the
secrets are random runs of letters that occur nowhere else.
"""
import json
import os
import random
import sys
import urllib.parse

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

RUN = 4
SECRETS = []


def secret():
    s = "".join(random.choice("GHJKMNPQRSTVWXYZ") for _ in range(14))
    SECRETS.append(s)
    return s


def no_leak(text, what):
    for s in SECRETS:
        for i in range(len(s) - RUN + 1):
            at = text.find(s[i:i + RUN])
            if at >= 0:
                raise h.TestFailure("%s: secret %s leaks (run %r): ...%s..." %
                                    (what, s, s[i:i + RUN], text[max(0, at - 120):at + 60]))


def test():
    with h.Env("secrets") as env:
        env.start_fixture()
        fport = urllib.parse.urlparse(env.fixture_url).port
        db = urllib.parse.urlparse(env.db_url)
        dbname = db.path.lstrip("/")

        # a RabbitMQ user whose password is a secret
        auser = "lr_" + env.tag
        apass = secret()
        env.mgmt_call("PUT", "/api/users/" + auser, {"password": apass, "tags": ""})
        try:
            env.mgmt_call("PUT", "/api/permissions/%s/%s" % (urllib.parse.quote(env.vhost, safe=""), auser),
                          {"configure": ".*", "write": ".*", "read": ".*"})
            amqp = "amqp://%s:%s@%s:%d/%s" % (auser, apass, env.amqp_host, env.amqp_port,
                                               urllib.parse.quote(env.vhost, safe=""))
            run(env, amqp, db, dbname, fport)
        finally:
            env.mgmt_call("DELETE", "/api/users/" + auser)


def run(env, amqp, db, dbname, fport):
    host, port, user = db.hostname, db.port, db.username or "longrun"
    forms = {
        "uri-query": "postgresql://%s@%s:%d/%s?password=%s" % (user, host, port, dbname, secret()),
        "uri-userinfo": "postgresql://%s:%s@%s:%d/%s?sslpassword=%s&application_name=w" %
                        (user, secret(), host, port, dbname, secret()),
        "keyvalue": "host=%s port=%d dbname=%s user=%s password=%s sslpassword=%s" %
                    (host, port, dbname, user, secret(), secret()),
        "keyvalue-quoted": "host=%s port=%d dbname=%s user=%s password='%s %s\\'x'" %
                           (host, port, dbname, user, secret(), secret()),
    }
    agents = {
        "tools": {
            "lookup": {"description": "Look something up",
                       "parameters": {"type": "object", "properties": {"step": {"type": "integer"}}},
                       "url": "${LONGRUN_FIXTURE_URL}/tools/lookup?api_key=${T_TOOL_KEY}"},
            "down": {"description": "Never answers", "url": "http://u:${T_DOWN_PASS}@127.0.0.1:1/x?token=${T_DOWN_TOKEN}",
                     "retries": 0},
        },
        "agents": [
            {"name": "secret-steps", "models": [{"provider": "openai", "model": "fixture-steps-3",
                                                 "base_url": "http://key:${T_MODEL_PASS}@127.0.0.1:%d/v1" % fport}],
             "tools": ["lookup"]},
            {"name": "secret-down", "models": [{"provider": "openai", "model": "fixture-tool:down-2",
                                                "base_url": "${LONGRUN_FIXTURE_URL}/v1"}],
             "tools": ["down"]},
        ],
    }
    agents_path = os.path.join(env.dir, "agents.json")
    with open(agents_path, "w") as f:
        json.dump(agents, f)
    tool_env = {"T_TOOL_KEY": secret(), "T_DOWN_PASS": secret(), "T_DOWN_TOKEN": secret(), "T_MODEL_PASS": secret()}

    # --print-config: every form masked, the rest shown
    for name, dsn in forms.items():
        r = h.subprocess.run([os.path.join(h.BUILD, "longrun-worker"), "--print-config"],
                             env=env.base_env(LONGRUN_DATABASE_URL=dsn, LONGRUN_AMQP_URL=amqp),
                             capture_output=True, text=True, timeout=30)
        h.eq(r.returncode, 0, "--print-config " + name)
        no_leak(r.stdout + r.stderr, "--print-config with the %s DSN" % name)
        h.check(host in r.stdout and dbname in r.stdout, "--print-config shows the host and database: " + r.stdout)
    h.log("--print-config masks %d DSN forms and the AMQP URL" % len(forms))

    # workers, one per form
    ports = {}
    for name, dsn in forms.items():
        ports[name] = h.free_port()
        env.start_worker("w-" + name, LONGRUN_DATABASE_URL=dsn, LONGRUN_AMQP_URL=amqp, LONGRUN_HTTP_PORT=ports[name],
                         LONGRUN_AGENTS_FILE=agents_path, **tool_env)
    for name, p in ports.items():
        h.wait_for(lambda p=p: h.http_get(p, "/readyz")[0] == 200, 40, "worker %s ready" % name)
    ids = env.enqueue_many([{"agent": "secret-steps", "input": "go"}] * 6 + [{"agent": "secret-down", "input": "go"}] * 3)
    env.wait_all_terminal(len(ids), 90)
    h.eq(env.scalar("select count(*) from tasks where agent = 'secret-steps' and status = 'succeeded'"), 6,
         "tasks through the secret model and tool URLs succeeded")
    h.check(env.scalar("select count(*) from task_steps") > 0, "steps were recorded")

    # a worker whose servers do not answer: DSN and URL in connection errors
    down_port = h.free_port()
    down = env.start_worker("w-down", LONGRUN_HTTP_PORT=down_port,
                            LONGRUN_DATABASE_URL="postgresql://u:%s@127.0.0.1:1/db?sslpassword=%s&connect_timeout=1" %
                            (secret(), secret()),
                            LONGRUN_AMQP_URL="amqp://u:%s@127.0.0.1:1/" % secret())
    h.wait_for(lambda: h.http_get(down_port, "/readyz")[0] == 503 and len(down.log_text().splitlines()) >= 3, 20,
               "the worker without servers reports not ready and logs why")
    for path in ("/healthz", "/readyz", "/health", "/metrics"):
        for name, p in list(ports.items()) + [("down", down_port)]:
            st, body = h.http_get(p, path)
            h.check(st is not None, "%s of w-%s answers" % (path, name))
            no_leak(body, "%s of w-%s" % (path, name))
    h.log("/healthz, /readyz, /health and /metrics of %d workers hold no secret" % (len(ports) + 1))

    # the CLI: --json output and errors
    some_dsn = forms["keyvalue-quoted"]
    r = env.cli("workers", "--json", env={"LONGRUN_DATABASE_URL": some_dsn, "LONGRUN_AMQP_URL": amqp})
    h.eq(r.returncode, 0, "workers --json: " + r.stderr)
    h.check(len(json.loads(r.stdout)) >= len(forms), "workers --json lists the workers")
    no_leak(r.stdout + r.stderr, "longrun workers --json")
    r = env.cli("stats", "--json", env={"LONGRUN_DATABASE_URL": forms["uri-query"],
                                        "LONGRUN_AMQP_URL": "amqp://u:%s@127.0.0.1:1/" % secret()})
    h.eq(r.returncode, 0, "stats --json: " + r.stderr)
    h.check("queues_error" in json.loads(r.stdout), "stats --json says RabbitMQ is unreachable: " + r.stdout)
    no_leak(r.stdout + r.stderr, "longrun stats --json")
    r = env.cli("status", ids[0], "--json", env={"LONGRUN_DATABASE_URL": forms["uri-userinfo"]})
    h.eq(r.returncode, 0, "status --json: " + r.stderr)
    no_leak(r.stdout + r.stderr, "longrun status --json")
    for dsn in ("host=127.0.0.1 port=1 connect_timeout=1 password='%s %s'" % (secret(), secret()),
                "postgresql://u@127.0.0.1:1/db?connect_timeout=1&password=%s" % secret()):
        r = env.cli("list", "--json", "--database-url", dsn)
        h.eq(r.returncode, 1, "list with an unreachable database: " + r.stderr)
        h.check("cannot connect to PostgreSQL" in r.stderr and "127.0.0.1" in r.stderr, r.stderr)
        no_leak(r.stdout + r.stderr, "longrun list --json with an unreachable database")
    r = env.cli("enqueue", "--agent", "secret-steps", "--input", "\"x\"", "--json",
                env={"LONGRUN_AMQP_URL": "amqps://u:%s@127.0.0.1:1/v" % secret()})
    h.eq(r.returncode, 1, "enqueue with an unreachable broker: " + r.stderr)
    h.check("cannot connect to RabbitMQ" in r.stderr, r.stderr)
    no_leak(r.stdout + r.stderr, "longrun enqueue with an unreachable broker")
    h.log("longrun --json output and errors hold no secret")

    # the logs of every process, then the database
    for p in env.procs:
        no_leak(p.log_text(), "log of " + p.name)
    h.check(down.events(), "the worker without servers logged")
    tables = [r["table_name"] for r in env.sql(
        "select table_name from information_schema.tables where table_schema = 'public' and table_type = 'BASE TABLE'")]
    dump = []
    for t in tables:
        dump.append(env.scalar('select coalesce(string_agg(x::text, E\'\\n\'), \'\') from "%s" x' % t))
    no_leak("\n".join(dump), "the database")
    h.log("%d secrets, none in %d logs or %d tables (%d bytes)" %
          (len(SECRETS), len(env.procs), len(tables), sum(len(d) for d in dump)))


h.run(test)

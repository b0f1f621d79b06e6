"""Issue 15 item 1: callback_url cannot make a worker reach what
LONGRUN_CALLBACK_ALLOW does not allow (server-side request forgery).

A real worker, RabbitMQ and PostgreSQL; the fixture server on 127.0.0.1 is
the callback receiver and counts every request it gets.  The rules allow

  - http://127.0.0.1:<port>/tools/callback      (an IP literal: names its address)
  - http://localhost:<port>/tools/cb-name       (a name only: its address is not named)
  - http://localhost:<port>/tools/cb-named 127.0.0.1   (a name, and the address named)

Legitimate callbacks (also through dot segments the worker normalises) must
arrive; every bypass form must be refused with its reason in the log and in
longrun_callbacks_refused_total{reason}, and must never reach the fixture:
`localhost` resolves to 127.0.0.1, so the cb-name rule shows the
connect-time check (the name matches, the connection is refused before any
packet).  All traffic stays on loopback.
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402


def refused_counts(port):
    st, text = h.http_get(port, "/metrics")
    h.eq(st, 200, "/metrics")
    out = {}
    for m in re.finditer(r'^longrun_callbacks_refused_total\{reason="([a-z_]+)"\} ([0-9.]+)$', text, re.M):
        out[m.group(1)] = int(float(m.group(2)))
    return out


def test():
    with h.Env("callback-guard") as env:
        env.start_fixture()
        fx = env.fixture_url
        port = int(fx.rsplit(":", 1)[1])
        lh = "http://localhost:%d" % port
        rules = ", ".join([fx + "/tools/callback", lh + "/tools/cb-name", lh + "/tools/cb-named 127.0.0.1"])
        hport = h.free_port()
        w = env.start_worker("w1", LONGRUN_CALLBACK_ALLOW=rules, LONGRUN_HTTP_PORT=hport)

        delivered = {  # callback_url -> the path the fixture must see
            fx + "/tools/callback": "/tools/callback",
            fx + "/tools/callback/../callback": "/tools/callback",
            lh + "/tools/cb-named": "/tools/cb-named",
        }
        refused = {  # callback_url -> reason
            lh + "/tools/cb-name": "loopback",                       # the name is allowed, its address is not
            lh + "/tools/cb-name?token=SECRET-TOKEN-1": "loopback",  # (and the query is never logged)
            fx + "/tools/callback/../cb-evil": "not_allowed",        # dot segments
            fx + "/tools/callback/%2e%2e/cb-evil": "not_allowed",    # encoded dot segments
            fx + "/tools/callback%2f..%2fcb-evil": "ambiguous_path",
            fx + "/tools/callbackevil": "not_allowed",               # prefix, not a path segment
            "http://127.0.0.1:%d@localhost:%d/tools/callback" % (port, port): "userinfo",
            "http://user:SECRET-PASS-2@127.0.0.1:%d/tools/callback" % port: "userinfo",
            "http://localhost.:%d/tools/cb-name" % port: "not_allowed",  # trailing dot
            "http://0.0.0.0:%d/tools/callback" % port: "not_allowed",
            "http://[::1]:%d/tools/callback" % port: "not_allowed",
            "http://127.0.0.2:%d/tools/callback" % port: "not_allowed",
            "http://127.0.0.1:%d/tools/callback" % (port + 1 if port < 65535 else port - 1): "not_allowed",
            "https://127.0.0.1:%d/tools/callback" % port: "not_allowed",
            "http://[fe80::1%%25lo]:%d/tools/callback" % port: "zone_id",
        }
        urls = list(delivered) + list(refused)
        ids = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 1}, "callback_url": u} for u in urls])
        by_url = dict(zip(urls, ids))
        env.wait_all_terminal(len(ids), 60)

        def deliveries():
            return env.fixture_requests(path_prefix="/tools/")

        def settled():  # every callback delivered, refused or given up
            n = sum(len(w.events(e)) for e in ("task.callback_delivered", "task.callback_refused",
                                               "task.callback_failed"))
            return n >= len(urls)
        h.wait_for(settled, 60, "every callback delivered or refused")
        got = deliveries()
        evs = w.events("task.callback_refused")

        # legitimate callbacks arrived, each once, at the normalised path
        seen = {}
        for r in got:
            seen.setdefault(r["headers"].get("x-longrun-task-id"), []).append(r["path"])
        h.eq(len(got), len(delivered), "the fixture got exactly the legitimate callbacks: %r" %
             [r["path"] for r in got])
        for u, path in delivered.items():
            h.eq(seen.get(by_url[u]), [path], "callback of %s" % u)

        # every refusal: one log line with the task id and the reason, no secret
        msgs = {}
        for e in evs:
            for u, tid in by_url.items():
                if tid in e.get("msg", ""):
                    msgs.setdefault(u, []).append(e["msg"])
        for u, reason in refused.items():
            h.eq(len(msgs.get(u, [])), 1, "one refusal line for %s" % u)
            h.check("(%s)" % reason in msgs[u][0], "reason %s for %s: %s" % (reason, u, msgs[u][0]))
        h.eq(len(w.events("task.callback_delivered")), len(delivered), "task.callback_delivered lines")
        log = w.log_text()
        for secret in ("SECRET-TOKEN-1", "SECRET-PASS-2"):
            h.check(secret not in log, "%s is not in the worker's log" % secret)
        h.check("is loopback, not named by LONGRUN_CALLBACK_ALLOW" in log, "the connect-time refusal says why")

        # counted by reason
        want = {}
        for reason in refused.values():
            want[reason] = want.get(reason, 0) + 1
        h.eq(refused_counts(hport), want, "longrun_callbacks_refused_total by reason")

        # no retries of refused callbacks: still nothing at the fixture a moment later
        h.eq(len(deliveries()), len(delivered), "refused callbacks are not retried")
        h.log("%d legitimate callbacks delivered, %d bypass forms refused, e.g. %s" %
              (len(delivered), len(refused), evs[0]["msg"]))

    # a bad rule is a start-up error naming the variable
    with h.Env("callback-guard-config") as env:
        w = env.start_worker("w1", LONGRUN_CALLBACK_ALLOW="https://hooks.example.com/ not-an-address")
        h.check(w.wait(30) is not None, "the worker exits on a bad LONGRUN_CALLBACK_ALLOW")
        h.check(w.returncode() != 0, "with a failure exit code")
        h.check("LONGRUN_CALLBACK_ALLOW" in w.log_text() and "not-an-address" in w.log_text(), w.tail(5))


if __name__ == "__main__":
    h.run(test)

"""Issue 16 item 9: the worker's durability self-check at start.

A database with `ALTER DATABASE ... SET synchronous_commit = off` (a
per-database setting: the shared test server is untouched):
1. the worker logs what it found, is never ready, consumes nothing and exits
   2 with worker.unsafe_durability naming the setting and the way out;
2. with LONGRUN_ALLOW_UNSAFE_DURABILITY=1 it logs the same as a warning,
   becomes ready and runs a task;
3. after RESET, a plain worker logs worker.durability (info) and runs.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402


def main():
    with h.Env("durability") as env:
        env.start_fixture()
        env.sql('ALTER DATABASE "%s" SET synchronous_commit = off' % env.tag)
        env._db.close()  # new sessions see the database's setting
        check_off = env.scalar("SELECT current_setting('synchronous_commit')")
        h.eq(check_off, "off", "the per-database setting applies to new sessions")
        ids = env.enqueue_many([{"agent": "http-steps", "input": {"steps": 1}}])

        port = h.free_port()
        w = env.start_worker("refuses", LONGRUN_HTTP_PORT=port)
        rc = w.wait(30)
        h.eq(rc, 2, "a worker on synchronous_commit=off exits 2; log:\n%s" % w.tail())
        ev = w.events("worker.unsafe_durability")
        h.check(ev and ev[0].get("level") == "error", "an error event names the problem: %r" % ev)
        msg = ev[0].get("msg", "")
        for want in ("synchronous_commit=off", "fsync=on", env.tag, "LONGRUN_ALLOW_UNSAFE_DURABILITY=1"):
            h.check(want in msg, "the message says %r: %s" % (want, msg))
        h.check(not w.events("worker.durability"), "no all-clear was logged")
        h.check(not w.events("amqp.connected"), "RabbitMQ was never started: nothing consumed")
        h.eq(env.scalar("SELECT status FROM tasks WHERE id = %s", (ids[0],)), "queued", "the task was not claimed")

        u = env.start_worker("unsafe", LONGRUN_ALLOW_UNSAFE_DURABILITY=1, LONGRUN_HTTP_PORT=port)
        u.wait_event("worker.unsafe_durability", 30)
        ev = u.events("worker.unsafe_durability")[0]
        h.eq(ev.get("level"), "warn", "allowed: a warning")
        h.wait_for(lambda: h.http_get(port, "/readyz")[0] == 200, 30, "the allowed worker becomes ready")
        env.wait_all_terminal(1, 60)
        h.eq(env.scalar("SELECT status FROM tasks WHERE id = %s", (ids[0],)), "succeeded", "it ran the task")
        u.signal(15)
        h.eq(u.wait(40), 0, "clean exit")

        env.sql('ALTER DATABASE "%s" RESET synchronous_commit' % env.tag)
        ok = env.start_worker("safe")
        ev = ok.wait_event("worker.durability", 30)[0]
        h.check("synchronous_commit=on" in ev.get("msg", "") and "fsync=on" in ev.get("msg", ""),
                "the settings found are logged: %r" % ev)
        env.wait_queue()


if __name__ == "__main__":
    h.run(main)

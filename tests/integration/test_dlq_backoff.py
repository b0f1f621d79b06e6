"""A dead letter PostgreSQL refuses to record is not a hot loop: the scheduler gives it back to
longrun.dead after a backoff (500 ms doubling to 30 s) instead of at once, and records it as
soon as the database accepts it again; at exit nothing held leaks.  Real RabbitMQ and
PostgreSQL (a trigger on dead_letters stands for a database that refuses the insert)."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402


def test():
    with h.Env("dlq-backoff") as env:
        s = env.start_scheduler()
        h.wait_for(lambda: env.queue_counts("longrun.dead") is not None, 30, "longrun.dead declared")
        env.sql("""create function test_refuse_dl() returns trigger language plpgsql as $$
                   begin raise exception 'test: dead_letters refuses the insert'; end $$;
                   create trigger test_refuse_dl before insert on dead_letters
                   for each row execute function test_refuse_dl()""")
        env.publish([b"not json at all"], routing_key="longrun.dead", exchange="",
                    props={"message_id": "backoff-test-1", "headers": {"x-longrun-reason": "bad_json"}})
        time.sleep(5)
        fails = len(s.events("dlq.ingest_failed"))
        h.log("in 5 s: %d failed attempts" % fails)
        h.check(1 <= fails <= 6, "the refused dead letter is retried with a backoff, not in a loop: %d" % fails)
        h.eq(env.scalar("select count(*) from dead_letters"), 0, "nothing recorded while refused")
        env.sql("drop trigger test_refuse_dl on dead_letters")
        h.wait_for(lambda: env.scalar("select count(*) from dead_letters") == 1, 40, "recorded once accepted")
        h.eq(env.scalar("select reason from dead_letters"), "bad_json", "with its reason")
        # refused again, then stopped while one is held: released, exit 0 (LSan: nothing leaks)
        env.sql("""create trigger test_refuse_dl before insert on dead_letters
                   for each row execute function test_refuse_dl()""")
        env.publish([b"another"], routing_key="longrun.dead", exchange="", props={"message_id": "backoff-test-2"})
        h.wait_for(lambda: len(s.events("dlq.ingest_failed")) > fails, 20, "the second one refused")
        s.signal(15)
        h.eq(s.wait(30), 0, "the scheduler exits 0 with a dead letter held")
        h.eq(env.queue_counts("longrun.dead")[0], 1, "the held dead letter is back in longrun.dead")


h.run(test)

#!/usr/bin/env python3
"""Watches a set of tasks until every one is terminal: a progress line, then a summary.

usage: watch.py --ids FILE [--timeout S]   (uses LONGRUN_DATABASE_URL)
"""
import argparse
import os
import sys
import time

try:
    import psycopg2
except ImportError:  # pragma: no cover
    sys.exit("watch.py: python3-psycopg2 is missing (scripts/dev deps installs it)")

TERMINAL = ("succeeded", "failed", "dead", "cancelled")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ids", required=True)
    ap.add_argument("--timeout", type=float, default=300)
    a = ap.parse_args()
    ids = [l.split()[0] for l in open(a.ids) if l.strip()]
    db = psycopg2.connect(os.environ.get("LONGRUN_DATABASE_URL", "postgresql://longrun@127.0.0.1:55432/longrun"))
    db.autocommit = True
    cur = db.cursor()
    t0 = time.time()
    tty = sys.stderr.isatty()
    while True:
        cur.execute("select status, count(*), coalesce(sum(step),0) from tasks where id = any(%s::uuid[]) group by status", (ids,))
        rows = {s: (c, st) for s, c, st in cur.fetchall()}
        done = sum(rows.get(s, (0, 0))[0] for s in TERMINAL)
        steps = sum(v[1] for v in rows.values())
        width = 40
        bar = "#" * int(width * done / max(1, len(ids)))
        line = "[%-40s] %d/%d tasks finished, %d steps checkpointed, %s" % (
            bar, done, len(ids), steps, ", ".join("%s=%d" % (s, c) for s, (c, _) in sorted(rows.items())))
        sys.stderr.write(("\r" + line) if tty else (line + "\n"))
        sys.stderr.flush()
        if done == len(ids):
            break
        if time.time() - t0 > a.timeout:
            sys.stderr.write("\nwatch.py: timed out after %.0f s\n" % a.timeout)
            return 1
        time.sleep(0.5 if tty else 2)
    el = time.time() - t0
    sys.stderr.write("\n")
    cur.execute("""select count(*), coalesce(sum(tokens_in),0), coalesce(sum(tokens_out),0), coalesce(sum(cost_usd),0)
                   from tasks where id = any(%s::uuid[])""", (ids,))
    n, tin, tout, cost = cur.fetchone()
    cur.execute("select count(*), coalesce(avg(latency_ms),0) from task_steps where task_id = any(%s::uuid[])", (ids,))
    nsteps, lat = cur.fetchone()
    print("summary: %d tasks in %.1f s: %s" % (n, el, ", ".join("%s %d" % (s, c) for s, (c, _) in sorted(rows.items()))))
    print("         %d steps (%.1f steps/s), mean step latency %.0f ms, tokens in/out %d/%d, cost $%.4f"
          % (nsteps, nsteps / max(el, 0.001), lat, tin, tout, cost))
    return 0 if rows.keys() <= {"succeeded"} else 3


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""An example HTTP tool for longrun, written the way a tool with side effects should be.

    /usr/bin/python3 examples/tools/tool_server.py --port 8088 --db /var/lib/ledger/tool.db

It serves one tool, `ledger_append`, whose side effect must happen once per tool call: it
appends the call's arguments (any JSON object) to a ledger and answers with the entry's
number. A longrun worker may send the same call more than once -- a step interrupted by a
crash runs again, a retry follows a timeout -- and a worker that was paused past its lease
may still send a call after another worker took its task over. What the tool does about it
(docs/agents.md, "Tools"):

1. Idempotency-Key (`<task id>:<step>:<call index>`, the same when a step runs again). The
   first call with a key does the work and stores its answer in the same SQLite transaction
   as the side effect. A later call with the same key and the same arguments gets the stored
   answer, byte for byte, with `Idempotent-Replayed: true`, and does nothing. The same key
   with other arguments is refused with 422 (a re-run step calls the model again, and its
   new reply may ask for something else at the same position: that is a new request, and
   the worker's next step will carry another key). A call that arrives while the first call
   with its key is still working waits for it (at most --wait-seconds, then 503 with
   Retry-After, which the worker retries with the same key).
   Arguments are compared as canonical JSON (sorted keys, no whitespace), so `{"a":1,"b":2}`
   and `{"b": 2, "a": 1}` are the same arguments.
2. X-Longrun-Epoch (the fencing epoch of the calling worker's claim) and X-Longrun-Task-Id.
   The highest epoch seen per task id is stored. A call with a lower one comes from a zombie
   worker whose task has a newer owner: 409, no work, no replay. The epoch is checked when a
   call arrives and again when its work commits: if a newer worker called meanwhile, the
   older call's work is not committed (409), and the newer call does it.
3. JSON in and out. Errors are `{"error": "<code>", "message": "<text>"}`; 4xx answers carry
   `x-should-retry: false` (the worker does not retry a 4xx anyway; the header says why).

Other endpoints: `GET /healthz`, `GET /stats` (counters: executions, replays, refused calls),
`GET /ledger?task_id=ID` (that task's entries, at most 1000). Everything is in the SQLite
file (--db; the default `:memory:` forgets it all at exit): the ledger, the stored answers
and the epochs, so a restart of the tool loses nothing that was answered.
Python 3 standard library only (http.server, sqlite3), one thread per connection.
SIGTERM or SIGINT: stop, exit 0 (work in progress is not committed, so a retry redoes it).
"""
import argparse
import hashlib
import json
import os
import signal
import sqlite3
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOOL_PATH = "/tools/ledger_append"
MAX_BODY = 64 * 1024       # bytes of arguments accepted
MAX_KEY = 200              # characters of Idempotency-Key (longrun's are about 45)
MAX_TASK_ID = 64
MAX_EPOCH = 2 ** 63 - 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS task_epochs (
    task_id  TEXT PRIMARY KEY,
    epoch    INTEGER NOT NULL,      -- the highest X-Longrun-Epoch seen for this task
    seen_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    key            TEXT PRIMARY KEY,  -- Idempotency-Key
    task_id        TEXT NOT NULL,
    epoch          INTEGER NOT NULL,  -- of the call that did the work
    request_sha256 TEXT NOT NULL,     -- of the canonical arguments
    status         INTEGER NOT NULL,
    response       TEXT NOT NULL,     -- the answer's body, replayed as it is
    created_at     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (   -- the side effect itself
    entry           INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id         TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    epoch           INTEGER NOT NULL,
    arguments       TEXT NOT NULL,
    created_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_task_idx ON ledger (task_id);
"""


class Refused(Exception):
    """An answer other than 200: status, error code, message, extra headers."""

    def __init__(self, status, code, message, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class InFlight:
    """A call doing the work for its key right now; later calls with the key wait on done."""

    def __init__(self, sha, epoch):
        self.sha, self.epoch = sha, epoch
        self.done = threading.Event()


class Tool:
    """The state: one SQLite connection, used only under self.lock, and the calls in flight."""

    def __init__(self, db_path, work_ms, wait_seconds, retention_days):
        self.lock = threading.Lock()
        self.db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a stored answer survives a crash of this server
        self.db.executescript(SCHEMA)
        self.work_ms = work_ms
        self.wait_seconds = wait_seconds
        self.retention = retention_days * 86400
        self.last_purge = 0.0
        self.inflight = {}  # key -> InFlight
        self.stats = {"calls": 0, "executions": 0, "replays": 0, "waited": 0, "refused_stale_epoch": 0,
                      "aborted_stale_epoch": 0, "refused_key_reused": 0, "refused_bad_request": 0,
                      "busy": 0}
        with self.lock:
            self.purge()

    def purge(self):
        """Forgets stored answers and epochs older than the retention (under self.lock). Keep them
        longer than any task can live, or a very late re-run would do its work again."""
        now = time.time()
        if now - self.last_purge < 3600:
            return
        self.last_purge = now
        self.db.execute("DELETE FROM idempotency WHERE created_at < ?", (now - self.retention,))
        self.db.execute("DELETE FROM task_epochs WHERE seen_at < ?", (now - self.retention,))

    def fence(self, task_id, epoch):
        """Returns the newer epoch already seen for the task if there is one (the call is a
        zombie's), else records this call's epoch and returns None (under self.lock)."""
        row = self.db.execute("SELECT epoch FROM task_epochs WHERE task_id = ?", (task_id,)).fetchone()
        if row is not None and epoch < row[0]:
            return row[0]
        if row is None or epoch > row[0]:
            self.db.execute("INSERT INTO task_epochs (task_id, epoch, seen_at) VALUES (?, ?, ?) "
                            "ON CONFLICT (task_id) DO UPDATE SET epoch = excluded.epoch, seen_at = excluded.seen_at",
                            (task_id, epoch, time.time()))
        return None

    @staticmethod
    def stale(task_id, epoch, newer, committed):
        return Refused(409, "stale_epoch", "X-Longrun-Epoch %d is older than epoch %d already seen for task %s: a newer "
                       "worker owns this task; this call's work was %s" % (epoch, newer, task_id,
                                                                          "not committed" if committed else "not done"))

    def call(self, key, task_id, epoch, args):
        """One tool call: (status, body bytes, replayed). Raises Refused."""
        canonical = json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        sha = hashlib.sha256(canonical.encode()).hexdigest()
        deadline = time.monotonic() + self.wait_seconds
        with self.lock:
            self.stats["calls"] += 1
            self.purge()
        while True:
            with self.lock:
                newer = self.fence(task_id, epoch)
                if newer is not None:
                    self.stats["refused_stale_epoch"] += 1
                    raise self.stale(task_id, epoch, newer, False)
                row = self.db.execute("SELECT request_sha256, status, response FROM idempotency WHERE key = ?",
                                      (key,)).fetchone()
                if row is not None:
                    if row[0] != sha:
                        self.stats["refused_key_reused"] += 1
                        raise Refused(422, "idempotency_key_reused", "Idempotency-Key %s was already used with other "
                                      "arguments; this call is not executed" % key)
                    self.stats["replays"] += 1
                    return row[1], row[2].encode(), True
                other = self.inflight.get(key)
                if other is None:
                    mine = self.inflight[key] = InFlight(sha, epoch)
                    break
                if other.sha != sha:
                    self.stats["refused_key_reused"] += 1
                    raise Refused(422, "idempotency_key_reused", "Idempotency-Key %s is in use by a call with other "
                                  "arguments; this call is not executed" % key)
                self.stats["waited"] += 1
            # Another call with this key is working: wait for it to end, then look again (its
            # answer is stored, or it was refused at commit and this call does the work).
            if not other.done.wait(max(0.0, deadline - time.monotonic())):
                with self.lock:
                    self.stats["busy"] += 1
                raise Refused(503, "in_progress", "a call with Idempotency-Key %s is still working; retry" % key,
                              {"Retry-After": "1"})
        try:
            return self.work_and_commit(key, task_id, epoch, sha, args, canonical)
        finally:
            with self.lock:
                del self.inflight[key]
            mine.done.set()

    def work_and_commit(self, key, task_id, epoch, sha, args, canonical):
        # The slow part, outside the lock: in a real tool, preparing the side effect (reading,
        # computing, calling a service that takes the Idempotency-Key too).
        if self.work_ms:
            time.sleep(self.work_ms / 1000.0)
        with self.lock:
            # The fence again, at commit: a newer worker may have called while this one worked.
            newer = self.fence(task_id, epoch)
            if newer is not None:
                self.stats["aborted_stale_epoch"] += 1
                raise self.stale(task_id, epoch, newer, True)
            now = time.time()
            self.db.execute("BEGIN IMMEDIATE")
            try:
                cur = self.db.execute("INSERT INTO ledger (task_id, idempotency_key, epoch, arguments, created_at) "
                                      "VALUES (?, ?, ?, ?, ?)", (task_id, key, epoch, canonical, now))
                body = json.dumps({"entry": cur.lastrowid, "task_id": task_id, "recorded": args},
                                  ensure_ascii=False)
                self.db.execute("INSERT INTO idempotency (key, task_id, epoch, request_sha256, status, response, "
                                "created_at) VALUES (?, ?, ?, ?, 200, ?, ?)", (key, task_id, epoch, sha, body, now))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.stats["executions"] += 1
            return 200, body.encode(), False

    def snapshot(self):
        with self.lock:
            s = dict(self.stats)
            s["in_progress"] = len(self.inflight)
            s["ledger_entries"] = self.db.execute("SELECT count(*) FROM ledger").fetchone()[0]
            return s

    def ledger(self, task_id):
        with self.lock:
            rows = self.db.execute("SELECT entry, idempotency_key, epoch, arguments, created_at FROM ledger "
                                   "WHERE task_id = ? ORDER BY entry LIMIT 1000", (task_id,)).fetchall()
        return [{"entry": r[0], "idempotency_key": r[1], "epoch": r[2], "arguments": json.loads(r[3]),
                 "created_at": r[4]} for r in rows]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length
    server_version = "longrun-example-tool/1"

    def log_message(self, fmt, *args):  # one JSON line per tool call instead (log_call)
        pass

    def send(self, status, body, headers=None):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the caller is gone (a worker killed mid-call); the answer is stored all the same

    def log_call(self, **fields):
        fields.update(ts=round(time.time(), 3), event="tool.call")
        print(json.dumps(fields), flush=True)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        tool = self.server.tool
        if url.path == "/healthz":
            self.send(200, {"ok": True})
        elif url.path == "/stats":
            self.send(200, tool.snapshot())
        elif url.path == "/ledger":
            task_id = urllib.parse.parse_qs(url.query).get("task_id", [""])[0]
            self.send(200, {"task_id": task_id, "entries": tool.ledger(task_id)})
        else:
            self.send(404, {"error": "not_found", "message": "no such endpoint: GET %s" % url.path})

    def do_POST(self):
        t0 = time.monotonic()
        key = self.headers.get("Idempotency-Key")
        task_id = self.headers.get("X-Longrun-Task-Id")
        epoch = self.headers.get("X-Longrun-Epoch")
        try:
            args = self.read_request(key, task_id, epoch)
            status, body, replayed = self.server.tool.call(key, task_id, int(epoch), args)
        except Refused as e:
            if e.status == 400:
                with self.server.tool.lock:
                    self.server.tool.stats["refused_bad_request"] += 1
            headers = dict(e.headers)
            if 400 <= e.status < 500:
                headers["x-should-retry"] = "false"
            self.send(e.status, {"error": e.code, "message": e.message}, headers)
            self.log_call(key=key, task_id=task_id, epoch=epoch, status=e.status, outcome=e.code,
                          ms=round(1000 * (time.monotonic() - t0)))
            return
        self.send(status, body, {"Idempotent-Replayed": "true"} if replayed else None)
        self.log_call(key=key, task_id=task_id, epoch=int(epoch), status=status,
                      outcome="replayed" if replayed else "executed", ms=round(1000 * (time.monotonic() - t0)))

    def read_request(self, key, task_id, epoch):
        """Checks the path, the headers and the body; returns the arguments (a dict). Raises Refused."""
        if urllib.parse.urlsplit(self.path).path != TOOL_PATH:
            self.drain()
            raise Refused(404, "not_found", "no such tool: POST %s (this server has %s)" % (self.path, TOOL_PATH))
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise Refused(411, "length_required", "a Content-Length header is required")
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise Refused(413, "too_large", "arguments over %d bytes" % MAX_BODY)
        raw = self.rfile.read(int(length))
        if not key or len(key) > MAX_KEY:
            raise Refused(400, "bad_idempotency_key", "an Idempotency-Key header of 1-%d characters is required" % MAX_KEY)
        if not task_id or len(task_id) > MAX_TASK_ID:
            raise Refused(400, "bad_task_id", "an X-Longrun-Task-Id header of 1-%d characters is required" % MAX_TASK_ID)
        if epoch is None or not epoch.isdigit() or int(epoch) > MAX_EPOCH:
            raise Refused(400, "bad_epoch", "an X-Longrun-Epoch header with a non-negative integer is required")
        try:
            args = json.loads(raw)
        except ValueError as e:
            raise Refused(400, "bad_json", "the arguments are not JSON: %s" % e)
        if not isinstance(args, dict):
            raise Refused(400, "bad_arguments", "the arguments must be a JSON object")
        return args

    def drain(self):
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= MAX_BODY:
            self.rfile.read(int(length))
        else:
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    ap = argparse.ArgumentParser(description="An example longrun tool server: idempotency keys and fencing epochs.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8088, help="0: any free port (see --port-file)")
    ap.add_argument("--port-file", help="write the bound port here (atomically)")
    ap.add_argument("--db", default=":memory:", help="SQLite file for the ledger, answers and epochs")
    ap.add_argument("--work-ms", type=int, default=int(os.environ.get("TOOL_WORK_MS", "0")),
                    help="how long each real execution takes, to show a slow tool (env TOOL_WORK_MS; default 0)")
    ap.add_argument("--wait-seconds", type=float, default=30.0,
                    help="how long a call waits for another call with its key before a 503 (default 30)")
    ap.add_argument("--retention-days", type=float, default=30.0,
                    help="keep stored answers and epochs this long (longer than any task lives; default 30)")
    args = ap.parse_args()

    tool = Tool(args.db, args.work_ms, args.wait_seconds, args.retention_days)
    srv = Server((args.host, args.port), Handler)
    srv.tool = tool
    port = srv.server_address[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.rename(tmp, args.port_file)
    print(json.dumps({"event": "tool.listening", "host": args.host, "port": port, "tool": TOOL_PATH,
                      "work_ms": args.work_ms, "db": args.db}), flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    stop.wait()
    srv.shutdown()
    srv.server_close()
    print(json.dumps({"event": "tool.stopped", **tool.snapshot()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

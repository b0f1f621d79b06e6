"""Issue 15, item 4: a worker's health server stays answerable under a flood.

2,000 idle connections from 20 loopback addresses (127.0.0.2-21), opened
again once a second whenever the server drops them, and 16 slow-loris
clients from 127.0.0.50 that send one header byte every 200 ms, for 12
seconds (past the server's 5-second idle timeout).  Meanwhile /healthz and
/readyz, asked from 127.0.0.1 as the kubelet would, must each answer 200
within a second, tasks enqueued during the flood must all succeed, the
refusals must show in /metrics, and the worker must exit 0 on SIGTERM
afterwards (the harness checks that).
"""
import os
import resource
import select
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

AGENTS = os.path.join(h.SOURCE, "tests", "fixtures", "agents.test.json")
N_IDLE = 2000
N_ADDRS = 20
N_LORIS = 16
FLOOD_SECONDS = 12
PROBE_MAX = 1.0


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        h.skip("RLIMIT_NOFILE hard limit %d < %d" % (hard, n))
    if soft == resource.RLIM_INFINITY or soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


class Flood:
    """Idle connections kept open, and slow-loris clients, on threads."""

    def __init__(self, port):
        self.port = port
        self.stop = threading.Event()
        self.idle = [None] * N_IDLE
        self.loris = [None] * N_LORIS
        self.dials = 0
        self.threads = [threading.Thread(target=self.run_idle, daemon=True),
                        threading.Thread(target=self.run_loris, daemon=True)]

    def dial(self, src):
        s = socket.socket()
        s.setblocking(False)
        s.bind(("127.0.0.%d" % src, 0))
        s.connect_ex(("127.0.0.1", self.port))
        self.dials += 1
        return s

    @staticmethod
    def dropped(socks):
        """Indexes of the sockets the server closed."""
        p = select.poll()
        for i, s in enumerate(socks):
            p.register(s.fileno(), select.POLLIN)
        fd_index = {s.fileno(): i for i, s in enumerate(socks)}
        out = []
        for fd, ev in p.poll(0):
            try:
                if socks[fd_index[fd]].recv(1, socket.MSG_PEEK) == b"":
                    out.append(fd_index[fd])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                out.append(fd_index[fd])
        return out

    def run_idle(self):
        for i in range(N_IDLE):
            self.idle[i] = self.dial(2 + i % N_ADDRS)
        while not self.stop.wait(1.0):
            for i in self.dropped(self.idle):
                self.idle[i].close()
                self.idle[i] = self.dial(2 + i % N_ADDRS)

    def run_loris(self):
        req = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 100000
        pos = 0
        for i in range(N_LORIS):
            self.loris[i] = self.dial(50)
        time.sleep(0.2)
        while not self.stop.wait(0.2):
            for i, s in enumerate(self.loris):
                try:
                    s.send(req[pos:pos + 1])
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    s.close()
                    self.loris[i] = self.dial(50)
            pos += 1

    def start(self):
        for t in self.threads:
            t.start()

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(10)
        for s in self.idle + self.loris:
            if s is not None:
                s.close()


def timed_get(port, path):
    t0 = time.monotonic()
    st, body = h.http_get(port, path)
    return st, time.monotonic() - t0, body


def refused(port):
    st, text = h.http_get(port, "/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith("longrun_http_connections_refused_total{"):
            total += float(line.split()[-1])
    return total


def test():
    raise_nofile(N_IDLE + N_LORIS + 1024)
    with h.Env("health-flood") as env:
        env.start_fixture()
        w, port = env.start_worker_http("w1", LONGRUN_AGENTS_FILE=AGENTS)
        quiet = [timed_get(port, "/healthz")[1] for _ in range(20)]

        flood = Flood(port)
        flood.start()
        h.wait_for(lambda: all(s is not None for s in flood.idle), 30, "the flood's connections opened")
        ids = env.enqueue_many([{"agent": "steps3", "input": "during the flood"}] * 10)
        lat = {"/healthz": [], "/readyz": []}
        t_end = time.monotonic() + FLOOD_SECONDS
        try:
            while time.monotonic() < t_end:
                for path in lat:
                    st, dt, body = timed_get(port, path)
                    if st != 200 or dt > PROBE_MAX:
                        raise h.TestFailure("%s during the flood: status %r after %.3f s (want 200 within %.1f s)"
                                            % (path, st, dt, PROBE_MAX))
                    lat[path].append(dt)
                time.sleep(0.1)
            h.wait_for(lambda: env.scalar("select count(*) from tasks where id = any(%s::uuid[]) and "
                                          "status = 'succeeded'", (ids,)) == len(ids), 60,
                       "the tasks enqueued during the flood succeed")
            n_refused = refused(port)
        finally:
            dials = flood.dials
            flood.close()
        h.check(w.alive(), "the worker is still running")
        h.check(n_refused > N_IDLE / 2, "refusals counted in /metrics: %r" % n_refused)
        for path, xs in lat.items():
            xs.sort()
            h.log("%s during the flood: %d probes, median %.1f ms, p99 %.1f ms, max %.1f ms" %
                  (path, len(xs), 1000 * xs[len(xs) // 2], 1000 * xs[int(len(xs) * 0.99)], 1000 * xs[-1]))
        quiet.sort()
        h.log("/healthz before the flood: median %.1f ms; %d connections dialled by the flood, %.0f refused; "
              "%d tasks succeeded meanwhile" % (1000 * quiet[len(quiet) // 2], dials, n_refused, len(ids)))


h.run(test)

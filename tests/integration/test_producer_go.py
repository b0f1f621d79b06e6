"""Issue 18, item 5: the Go producer (examples/producers/go, amqp091-go from Debian's
golang-github-rabbitmq-amqp091-go-dev, built offline in GOPATH mode by build.sh with
Debian's golang-go) against a real fleet: confirms, reply_to, correlation ids, exit codes;
see producer_common.py."""
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402
import producer_common as pc  # noqa: E402

DIR = os.path.join(pc.EXAMPLES, "producers", "go")
LIB = "/usr/share/gocode/src/github.com/rabbitmq/amqp091-go"


def test():
    go = shutil.which("go")
    if not go:
        pc.missing_toolchain("go not found in PATH (scripts/dev deps installs Debian's golang-go)")
    if not os.path.isdir(LIB):
        pc.missing_toolchain("%s is missing (scripts/dev deps installs golang-github-rabbitmq-amqp091-go-dev)" % LIB)
    r = subprocess.run([go, "version"], capture_output=True, text=True)
    h.log(r.stdout.strip())
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), "longrun-producer-go-%d" % os.getpid())
    t0 = time.time()
    r = subprocess.run([os.path.join(DIR, "build.sh"), out], capture_output=True, text=True, timeout=300)
    h.check(r.returncode == 0, "build.sh failed (%d):\n%s%s" % (r.returncode, r.stdout, r.stderr))
    h.log("built %s in %.1f s" % (out, time.time() - t0))
    try:
        pc.check_producer("go", [out])
    finally:
        os.unlink(out)


h.run(test)

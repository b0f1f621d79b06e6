"""Issue 18, item 5: the Python producer (examples/producers/python, pika from Debian's
python3-pika, run with /usr/bin/python3) against a real fleet: confirms, reply_to,
correlation ids, exit codes; see producer_common.py."""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402
import producer_common as pc  # noqa: E402

PRODUCER = os.path.join(pc.EXAMPLES, "producers", "python", "producer.py")


def test():
    r = subprocess.run([h.PY, "-c", "import pika; print(pika.__version__)"], capture_output=True, text=True)
    if r.returncode != 0:
        pc.missing_toolchain("%s cannot import pika (scripts/dev deps installs Debian's python3-pika)" % h.PY)
    h.log("pika %s" % r.stdout.strip())
    pc.check_producer("python", [h.PY, PRODUCER])


h.run(test)

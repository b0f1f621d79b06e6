"""Issue 18, item 5: the Node.js producer (examples/producers/node, amqplib from the npm
registry, pinned by package-lock.json) against a real fleet: confirms, reply_to,
correlation ids, exit codes; see producer_common.py.

`scripts/dev deps` runs `npm ci` in examples/producers/node; when node_modules is missing
(a checkout where deps did not run) this test runs `npm ci` itself first."""
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402
import producer_common as pc  # noqa: E402

DIR = os.path.join(pc.EXAMPLES, "producers", "node")


def test():
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pc.missing_toolchain("node or npm not found in PATH (scripts/dev deps installs Debian's nodejs and npm "
                             "when they are missing)")
    r = subprocess.run([node, "--version"], capture_output=True, text=True)
    h.log("node %s" % r.stdout.strip())
    if not os.path.exists(os.path.join(DIR, "node_modules", "amqplib", "package.json")):
        h.log("node_modules missing: npm ci in %s" % DIR)
        r = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=DIR, capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            pc.missing_toolchain("npm ci in examples/producers/node failed (%d): %s"
                                 % (r.returncode, r.stderr.strip().replace("\n", " ")[-300:]))
    pc.check_producer("node", [node, os.path.join(DIR, "producer.js")])


h.run(test)

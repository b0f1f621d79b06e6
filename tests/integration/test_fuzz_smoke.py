"""Issue 9: a short fuzz run in CI.

Builds the libFuzzer targets (tests/fuzz/) with clang in their own build
directory, replays every regression input of tests/fuzz/regressions/, then
fuzzes each target for LONGRUN_FUZZ_SMOKE_SECONDS (default 2; nine targets, so
about 18 s of fuzzing; fuzz_urlguard is the callback allow-list matcher) over the committed seed corpus.  Any crash, leak,
sanitizer report or broken property fails the test; the input is saved under
<fuzz build>/fuzz-artifacts/<target>/.

Skipped (exit 77) when clang or its libFuzzer runtime (libclang-rt-14-dev) is
missing.  The fuzz build goes to <build>/fuzz-smoke unless the ctest build
itself was configured with LONGRUN_FUZZ=ON (then its targets are used), or
LONGRUN_FUZZ_BUILD_DIR names another.  A first build takes about 30 s on two
cores; later runs rebuild incrementally.
"""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402


def test():
    build = os.path.abspath(h.BUILD)
    env = dict(os.environ)
    if os.path.exists(os.path.join(build, "fuzz", "fuzz_task")):
        env.setdefault("LONGRUN_FUZZ_BUILD_DIR", build)
    else:
        env.setdefault("LONGRUN_FUZZ_BUILD_DIR", os.path.join(build, "fuzz-smoke"))
    secs = env.get("LONGRUN_FUZZ_SMOKE_SECONDS", "2")
    t0 = time.time()
    r = subprocess.run([os.path.join(h.SOURCE, "tests", "fuzz", "run.sh"), secs], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600 * h.TIMEOUT_MULT)
    print(r.stdout)
    if r.returncode == 77:
        h.skip(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "clang/libFuzzer not available")
    h.eq(r.returncode, 0, "tests/fuzz/run.sh exit code (1 = a finding, 2 = build error)")
    h.log("fuzz smoke run took %.0f s" % (time.time() - t0))


if __name__ == "__main__":
    h.run(test)

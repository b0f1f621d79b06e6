#!/usr/bin/env bash
# tests/fuzz/run.sh — build the libFuzzer targets and run each one for a while.
#
#   tests/fuzz/run.sh [SECONDS]          every target SECONDS each (default 20)
#   tests/fuzz/run.sh 300 fuzz_task      one target, 5 minutes
#
# For each target: first replay tests/fuzz/regressions/<target>/* (inputs that
# once crashed or broke a property; each must now pass, checked with
# LR_FUZZ_STRICT=1), then fuzz for SECONDS over the committed
# seeds tests/fuzz/corpus/<target>/ (read only) plus a work corpus in the
# build directory (where new inputs go), with tests/fuzz/dict/<target>.dict
# (JSON tokens and the field names of that format: cJSON is not instrumented,
# so the fuzzer cannot discover them from coverage alone).  A crash, leak, sanitizer report,
# timeout or FUZZ_CHECK failure stops that target; its input is saved in
# <build>/fuzz-artifacts/<target>/ and the script exits 1 after the others ran.
# A table of executions per target is printed at the end.
#
# Options (environment):
#   LONGRUN_FUZZ_BUILD_DIR   build directory [<repo>/build-fuzz]; configured with
#                            clang + LONGRUN_FUZZ + LONGRUN_SANITIZE if it has no cache
#   LONGRUN_FUZZ_NO_BUILD=1  do not (re)build, use the binaries as they are
#   LONGRUN_FUZZ_ARGS        extra libFuzzer flags, e.g. "-jobs=2 -workers=2"
#   LR_FUZZ_STRICT=0         skip the switchable properties (see fuzz_util.h; default on)
#
# Exit: 0 all targets clean; 1 a finding (see above); 2 usage or build error;
# 77 clang or its libFuzzer runtime is missing (nothing was run).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
FUZZ_SRC=$ROOT/tests/fuzz
BUILD=${LONGRUN_FUZZ_BUILD_DIR:-$ROOT/build-fuzz}
SECS=${1:-20}
shift || true
ALL_TARGETS=(fuzz_task fuzz_agents fuzz_openai fuzz_anthropic fuzz_classify fuzz_retry_after fuzz_utf8_clean fuzz_jsonschema fuzz_urlguard)
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=("${ALL_TARGETS[@]}")

say() { printf '==> %s\n' "$*" >&2; }
[[ $SECS =~ ^[0-9]+$ ]] || { echo "usage: tests/fuzz/run.sh [SECONDS] [TARGET...]" >&2; exit 2; }

# Is clang with the libFuzzer runtime here?  (Debian: clang + libclang-rt-14-dev)
if ! command -v clang >/dev/null 2>&1; then
  echo "SKIP: clang not found (apt-get install clang libclang-rt-14-dev)"; exit 77
fi
probe=$(mktemp -d)
printf '#include <stdint.h>\n#include <stddef.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n);\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n' >"$probe/p.c"
if ! clang -fsanitize=fuzzer,address,undefined "$probe/p.c" -o "$probe/p" >"$probe/log" 2>&1; then
  echo "SKIP: clang cannot link -fsanitize=fuzzer (libFuzzer runtime missing: apt-get install libclang-rt-14-dev)"
  sed 's/^/    /' "$probe/log" | head -5
  rm -rf "$probe"; exit 77
fi
rm -rf "$probe"

if [[ ${LONGRUN_FUZZ_NO_BUILD:-0} != 1 ]]; then
  if [[ ! -f $BUILD/CMakeCache.txt ]]; then
    say "configure $BUILD (clang, LONGRUN_FUZZ=ON, LONGRUN_SANITIZE=ON)"
    cmake -S "$ROOT" -B "$BUILD" -DCMAKE_C_COMPILER=clang -DLONGRUN_FUZZ=ON -DLONGRUN_SANITIZE=ON \
      -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$BUILD.configure.log" 2>&1 ||
      { cat "$BUILD.configure.log" >&2; exit 2; }
  fi
  say "build fuzz targets in $BUILD"
  cmake --build "$BUILD" --target fuzz_all -j "$(nproc 2>/dev/null || echo 2)" >"$BUILD/fuzz-build.log" 2>&1 ||
    { tail -40 "$BUILD/fuzz-build.log" >&2; echo "build of the fuzz targets failed" >&2; exit 2; }
fi

# Sanitizer settings that make every finding fatal and readable.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:halt_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

max_len() {
  case $1 in
    fuzz_retry_after) echo 256 ;;
    fuzz_classify) echo 8192 ;;
    fuzz_urlguard) echo 4096 ;;
    *) echo 16384 ;;
  esac
}

rc=0
declare -a SUMMARY
for t in "${TARGETS[@]}"; do
  bin=$BUILD/fuzz/$t
  [[ -x $bin ]] || { echo "no binary $bin (build the fuzz_all target)" >&2; exit 2; }
  seeds=$FUZZ_SRC/corpus/$t
  work=$BUILD/fuzz-work/$t
  art=$BUILD/fuzz-artifacts/$t/
  log=$BUILD/fuzz-logs/$t.log
  mkdir -p "$work" "$art" "$(dirname "$log")"
  result=ok

  # 1) regressions: every saved input must pass now
  regs=()
  if [[ -d $FUZZ_SRC/regressions/$t ]]; then
    while IFS= read -r -d '' f; do regs+=("$f"); done < <(find "$FUZZ_SRC/regressions/$t" -type f ! -name '*.md' -print0 | sort -z)
  fi
  if [[ ${#regs[@]} -gt 0 ]]; then
    # Regressions are checked with every property on (LR_FUZZ_STRICT=1):
    # each was saved because it broke one of them.
    if ! LR_FUZZ_STRICT=1 "$bin" -artifact_prefix="$art" "${regs[@]}" >"$log.regressions" 2>&1; then
      result="REGRESSION"
      rc=1
      echo "---- $t: a regression input fails again (log: $log.regressions) ----" >&2
      grep -E 'ERROR|FUZZ_CHECK|runtime error|Running:' "$log.regressions" | head -10 >&2
    fi
  fi

  # 2) fuzz
  runs=0
  dict=()
  [[ -f $FUZZ_SRC/dict/$t.dict ]] && dict=(-dict="$FUZZ_SRC/dict/$t.dict")
  if [[ $SECS -gt 0 ]]; then
    # shellcheck disable=SC2086
    "$bin" "$work" "$seeds" "${dict[@]}" -max_total_time="$SECS" -max_len="$(max_len "$t")" -timeout=10 \
      -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$art" ${LONGRUN_FUZZ_ARGS:-} >"$log" 2>&1
    st=$?
    runs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
    [[ -n $runs ]] || runs=$(grep -oE '^Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' | tail -1)
    [[ -n $runs ]] || runs='?'
    if [[ $st -ne 0 ]]; then
      result="FINDING (exit $st)"
      rc=1
      echo "---- $t: finding, input saved in $art (log: $log) ----" >&2
      grep -E 'ERROR:|FUZZ_CHECK|runtime error|SUMMARY|Test unit written' "$log" | head -12 >&2
    fi
  fi
  corp=$(find "$work" -type f | wc -l)
  SUMMARY+=("$(printf '%-18s %10s runs %6s s %8s corpus   %s' "$t" "$runs" "$SECS" "$corp+$(find "$seeds" -type f | wc -l)" "$result")")
done

echo
echo "fuzz summary (work corpus + seeds; logs in $BUILD/fuzz-logs/)"
printf '%s\n' "${SUMMARY[@]}"
exit $rc

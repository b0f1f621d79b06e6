#!/usr/bin/env bash
# scripts/format.sh — clang-format (Debian 12's clang-format 14) over the C sources.
#
#   scripts/format.sh check [--diff] [FILE...]   exit 1 listing the files that differ from
#                                                .clang-format (--diff: show how); CI runs it
#   scripts/format.sh fix [FILE...]              format those files in place
#
# Without FILEs: every tracked or new (not ignored) *.c and *.h but the EXCLUDE paths below.
# The binary is Debian's /usr/bin/clang-format (package clang-format, installed by
# scripts/dev deps); another major version formats differently, so it is refused.
# CLANG_FORMAT=/path/to/clang-format-14 overrides the binary.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLANG_FORMAT=${CLANG_FORMAT:-/usr/bin/clang-format}
WANT_MAJOR=14
# Vendored or generated C files to leave alone (git pathspecs, relative to the root).
EXCLUDE=()

die() { printf 'scripts/format.sh: %s\n' "$*" >&2; exit 2; }

usage() { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

tool() {
  [[ -x $CLANG_FORMAT ]] || die "$CLANG_FORMAT not found: install Debian's clang-format (scripts/dev deps)"
  local v
  v=$("$CLANG_FORMAT" --version)
  [[ $v =~ version\ ([0-9]+)\. ]] || die "cannot read the version of $CLANG_FORMAT: $v"
  [[ ${BASH_REMATCH[1]} == "$WANT_MAJOR" ]] \
    || die "$CLANG_FORMAT is version ${BASH_REMATCH[1]}, .clang-format is for clang-format $WANT_MAJOR (Debian 12); set CLANG_FORMAT"
  [[ -f $ROOT/.clang-format ]] || die "$ROOT/.clang-format is missing"
  # A broken .clang-format must not read as "every file is unformatted".
  "$CLANG_FORMAT" --style=file --assume-filename="$ROOT/x.c" --dump-config >/dev/null \
    || die "$ROOT/.clang-format is not valid for $v"
}

# The files to work on, NUL-separated: the FILEs given, else the tracked ones (relative to ROOT).
files() {
  if (($# > 0)); then
    printf '%s\0' "$@"
  elif git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    local ex=() p
    for p in "${EXCLUDE[@]}"; do ex+=(":(exclude)$p"); done
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard -- '*.c' '*.h' "${ex[@]}"
  else
    die "not a git checkout: name the files"
  fi
}

cmd_check() {
  local diff=0
  if [[ ${1:-} == --diff ]]; then diff=1; shift; fi
  tool
  local f bad=() n=0
  while IFS= read -r -d '' f; do
    [[ -f $f ]] || continue # deleted but not yet staged
    n=$((n + 1))
    if ! "$CLANG_FORMAT" --style=file --fallback-style=none --dry-run -Werror "$f" 2>/dev/null; then
      bad+=("$f")
    fi
  done < <(files "$@")
  if ((${#bad[@]} == 0)); then
    printf 'scripts/format.sh: %d files formatted\n' "$n" >&2
    return 0
  fi
  printf 'scripts/format.sh: %d of %d files are not clang-formatted (scripts/format.sh fix formats them):\n' \
    "${#bad[@]}" "$n" >&2
  for f in "${bad[@]}"; do
    printf '  %s\n' "$f" >&2
    if ((diff)); then
      "$CLANG_FORMAT" --style=file --fallback-style=none "$f" | diff -u --label "$f" --label "$f (formatted)" "$f" - >&2 || true
    fi
  done
  return 1
}

cmd_fix() {
  tool
  local list=()
  mapfile -d '' list < <(files "$@")
  ((${#list[@]} > 0)) || return 0
  "$CLANG_FORMAT" --style=file --fallback-style=none -i "${list[@]}"
  printf 'scripts/format.sh: formatted %d files\n' "${#list[@]}" >&2
}

main() {
  local cmd=${1:-} args=() a
  [[ $# -gt 0 ]] && shift
  for a in "$@"; do # FILEs are relative to the caller's directory
    [[ $a == -* || $a == /* ]] && args+=("$a") || args+=("$PWD/$a")
  done
  cd "$ROOT"
  case "$cmd" in
    check) cmd_check "${args[@]}" ;;
    fix) cmd_fix "${args[@]}" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"

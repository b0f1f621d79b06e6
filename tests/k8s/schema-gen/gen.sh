#!/usr/bin/env bash
# tests/k8s/schema-gen/gen.sh — regenerate tests/k8s/schemas/ from the npm packages
# pinned in package.json / package-lock.json (needs the npm registry; the tests do not).
#
#   tests/k8s/schema-gen/gen.sh            # npm ci into a temporary directory, then generate
#
# The kubernetes-models packages ship TypeScript declarations generated from the
# Kubernetes OpenAPI spec and from each project's CRDs; ts-json-schema-generator turns the
# declaration of each kind into a JSON Schema that rejects unknown fields (what
# `kubeconform -strict` does).  gen.mjs lists the kinds and post-processes the schemas.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$(cd "$HERE/.." && pwd)/schemas
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$HERE/package.json" "$HERE/package-lock.json" "$HERE/gen.mjs" "$work/"
(cd "$work" && npm ci --no-audit --no-fund --loglevel=error)
(cd "$work" && node gen.mjs "$OUT")

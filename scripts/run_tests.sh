#!/usr/bin/env bash
# Runs the test suite. pytest exits 5 when it collects no test: that is a broken suite, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
fi
exit "$code"

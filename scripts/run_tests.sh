#!/usr/bin/env bash
# Runs the test suite. Without arguments: everything not marked `serial` on 2 pytest-xdist
# workers (one per core here; a file's tests stay on one worker, so module fixtures compile
# once), then the `serial` tests (MPI jobs, edge servers, multi-process runs: their timeouts
# assume the machine is not also running another worker) alone. Arguments go to one plain
# pytest run. Tests marked `slow` (a few end-to-end runs of a minute or more) are left out:
# `make test-slow` runs them. The slowest tests of each run are listed (--durations) to keep
# `make test` within its 25-minute budget. pytest exits 5 when it collects no test: that is a
# broken suite, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."

run() {
  .venv/bin/python -m pytest "$@"
  local code=$?
  if [ "$code" -eq 5 ]; then
    echo "error: pytest collected no tests ($*)" >&2
  fi
  return "$code"
}

if [ "$#" -gt 0 ]; then
  run "$@"
  exit $?
fi
run -n "${TEST_WORKERS:-2}" --dist loadfile --durations=30 -m "not serial and not slow"
parallel=$?
run --durations=15 -m "serial and not slow"
serial=$?
if [ "$parallel" -ne 0 ]; then
  exit "$parallel"
fi
exit "$serial"

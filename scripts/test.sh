#!/usr/bin/env bash
# Set up with the test extras, then run the default test suite (slow tests and benchmarks excluded).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test || exit 1
.venv/bin/python -m pytest -q "$@"
rc=$?
# pytest exits 5 when nothing was collected; that is a failure for us, not a pass
[ $rc -eq 5 ] && echo "no tests collected" >&2
exit $rc

#!/usr/bin/env bash
# The test command (README, .ci/run). pytest's exit code 5 ("no tests collected") is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
status=$?
if [[ $status -eq 5 ]]; then
  echo "test: pytest collected no tests" >&2
  exit 1
fi
exit $status

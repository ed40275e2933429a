#!/usr/bin/env bash
# The project's test command: set up (or refresh) the venv, then run the whole suite.
# Extra arguments go to pytest (e.g. tools/run_tests.sh -k parser -x).
# pytest exits non-zero when it collects no test, so a run that tests nothing fails.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/tools/setup_env.sh"
cd "$repo"
exec "${QVP_VENV:-$repo/.venv}/bin/python" -m pytest "$@"

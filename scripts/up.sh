#!/usr/bin/env bash
# Start a whole local Cohort cluster on the embedded defaults (coordinator, 3 servers, director).
# Extra arguments go to `cohort up`, e.g. --data-dir ./cohort-data --port 9000
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/cohort up "$@"

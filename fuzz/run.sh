#!/usr/bin/env bash
# Run every fuzz target for a bounded time: fuzz/run.sh [SECONDS_PER_TARGET] [--targets codec,session,policy]
# Uses $VENV/bin/python when VENV is set, else $PYTHON, else python3. Exit status non-zero on any crash.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VENV:-}" ]; then PY="$VENV/bin/python"; else PY="${PYTHON:-python3}"; fi
exec "$PY" -m fuzz "$@"

# Shared by scripts/demo and scripts/test: a project virtualenv with everything installed.
# Sourced, not executed. Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MTLS_GUARD_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "mtls-guard needs Python >= 3.11 (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)-${1:-runtime}"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade "pip>=25.1"
  if [ "${1:-runtime}" = dev ]; then
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT" --group "$ROOT/pyproject.toml:dev"
  else
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT"
  fi
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

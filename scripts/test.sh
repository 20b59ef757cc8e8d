#!/usr/bin/env bash
# The whole test suite on the real ComfyUI runtime: provisions (idempotent), then runs pytest.
# Arguments go to pytest, e.g. `bash scripts/test.sh tests/core -x`; without paths it runs tests/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/provision.sh"
cd "$ROOT"
paths=()
for arg in "$@"; do [ -e "${arg%%::*}" ] && paths+=("$arg"); done
[ ${#paths[@]} -gt 0 ] || set -- "$@" tests
exec "${DOPSD_VENV:-$ROOT/.venv}/bin/python" -m pytest -c tests/pytest.ini --rootdir tests "$@"

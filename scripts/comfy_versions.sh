# Sourced by scripts/provision.sh, scripts/test.sh and scripts/update_pins_comfy033.sh (expects ROOT to be set):
# the two ComfyUI releases the suite runs against, where each one's environment lives, and how ComfyUI 0.33 is
# obtained and verified.
#
#   version  ComfyUI folder                   venv             pins
#   0.3.75   .comfyui/ComfyUI-0.3.75          .venv            requirements-dev.txt (today's pins)
#   0.33     .comfyui/ComfyUI-0.33.0          .venv-comfy033   requirements-dev-comfy033.txt (+ -nodeps.txt), the
#                                                              newest of everything (scripts/update_pins_comfy033.sh)

COMFY_VERSIONS_ALL="0.3.75 0.33"
COMFY033_VERSION="0.33.0"
COMFY033_COMMIT="783545f689a0af730065994b46b382ae24844c99"
# sha256 of the source archive kept beside checkouts on machines without GitHub (../shared/runtime/).
COMFY033_SHA256="dcb034a58656b8ef9038da10eeb2fb0cd1760c27185a58004e9c9a2264b560e5"

# The local archive: $DOPSD_COMFY033_ARCHIVE, else ../shared/runtime/ beside this checkout, else beside the checkout
# this one was cloned from (a clean clone made elsewhere, as CI makes, still finds the machine's archive).
comfy033_archive() {
    local name="shared/runtime/ComfyUI-$COMFY033_VERSION.tar.gz" origin
    [ -n "${DOPSD_COMFY033_ARCHIVE:-}" ] && { echo "$DOPSD_COMFY033_ARCHIVE"; return; }
    origin="$(git -C "$ROOT" remote get-url origin 2>/dev/null || true)"
    if [ ! -f "$ROOT/../$name" ] && [ -d "$origin" ] && [ -f "$origin/../$name" ]; then
        echo "$(cd "$origin/.." && pwd)/$name"
    else
        echo "$ROOT/../$name"
    fi
}
COMFY033_ARCHIVE="$(comfy033_archive)"
COMFY033_URL="https://codeload.github.com/comfyanonymous/ComfyUI/tar.gz/$COMFY033_COMMIT"

# "0.33" / "0.33.0" -> 0.33, "0.3.75" -> 0.3.75; anything else is an error.
comfy_version_key() {
    case "$1" in
        0.3.75) echo 0.3.75 ;;
        0.33|0.33.0) echo 0.33 ;;
        *) echo "unknown ComfyUI version '$1' (tested: $COMFY_VERSIONS_ALL)" >&2; return 1 ;;
    esac
}
comfy_venv() { case "$1" in 0.3.75) echo "${DOPSD_VENV:-$ROOT/.venv}" ;; 0.33) echo "${DOPSD_VENV_COMFY033:-$ROOT/.venv-comfy033}" ;; esac; }
comfy_dir() { case "$1" in 0.3.75) echo "$ROOT/.comfyui/ComfyUI-0.3.75" ;; 0.33) echo "$ROOT/.comfyui/ComfyUI-$COMFY033_VERSION" ;; esac; }

# Unpacks ComfyUI 0.33.0 into $1 (which must not exist yet): from the local archive when present (sha256 checked),
# else from GitHub (the archive's embedded commit id checked). Prints nothing on success; exits non-zero with a
# one-line reason otherwise.
comfy033_unpack() {
    local dest="$1" python="${2:-python3}" tmp archive
    tmp="$(mktemp -d)"
    if [ -f "$COMFY033_ARCHIVE" ]; then
        archive="$COMFY033_ARCHIVE"
        local sum
        sum="$(sha256sum "$archive" | cut -d' ' -f1)"
        [ "$sum" = "$COMFY033_SHA256" ] || { rm -rf "$tmp"; echo "$archive has sha256 $sum, expected $COMFY033_SHA256" >&2; return 1; }
    else
        archive="$tmp/comfyui.tar.gz"
        command -v curl >/dev/null || { rm -rf "$tmp"; echo "no $COMFY033_ARCHIVE and no curl to fetch $COMFY033_URL" >&2; return 1; }
        curl -fsSL --retry 2 -o "$archive" "$COMFY033_URL" \
            || { rm -rf "$tmp"; echo "could not download ComfyUI $COMFY033_VERSION from $COMFY033_URL (and no local $COMFY033_ARCHIVE)" >&2; return 1; }
    fi
    "$python" - "$archive" "$dest" "$COMFY033_VERSION" "$COMFY033_COMMIT" "$COMFY033_SHA256" <<'PY' || { rm -rf "$tmp"; return 1; }
import hashlib, pathlib, shutil, sys, tarfile

archive, dest, version, commit, sha = sys.argv[1:]
dest = pathlib.Path(dest)
staging = dest.with_name(dest.name + ".partial")
shutil.rmtree(staging, ignore_errors=True)
with tarfile.open(archive) as tf:
    # `git archive` (GitHub's tarballs) records the commit in the pax global header; the local archive is checked
    # by its sha256 above instead (it was packed from that commit, see its README).
    embedded = tf.pax_headers.get("comment")
    local = hashlib.sha256(open(archive, "rb").read()).hexdigest() == sha
    if not local and embedded != commit:
        sys.exit(f"{archive} is not ComfyUI commit {commit} (embedded commit: {embedded})")
    members = tf.getmembers()
    top = {m.name.split("/", 1)[0] for m in members}
    if len(top) != 1:
        sys.exit(f"{archive}: expected one top-level folder, found {sorted(top)[:5]}")
    tf.extractall(staging, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(staging)
inner = staging / top.pop()
found = (inner / "comfyui_version.py").read_text()
if f'"{version}"' not in found:
    sys.exit(f"expected ComfyUI {version} in {archive}, found: {found.strip()}")
inner.rename(dest)
shutil.rmtree(staging)
PY
    rm -rf "$tmp"
}

# The suite's version key for a ComfyUI checkout: 0.3.75 for that release, 0.33 (the newest pins) for any other.
comfy_version_of_dir() {
    local file="$1/comfyui_version.py"
    [ -f "$file" ] || return 1
    if grep -q '"0.3.75"' "$file"; then echo 0.3.75; else echo 0.33; fi
}

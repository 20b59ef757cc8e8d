#!/usr/bin/env bash
# The main job: provisions (idempotent), then runs the example fine-tune-then-generate workflow headless on the
# small built-in world (world/weights): D-OPSD and SFT LoRAs, their table and image grid, in an output folder it prints.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/provision.sh"
exec "${DOPSD_VENV:-$ROOT/.venv}/bin/python" "$ROOT/scripts/run_example.py"

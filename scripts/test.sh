#!/usr/bin/env bash
# Set up .venv and run the whole test suite on the built-in tiny models (CPU, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A private model cache per run: tests never read tiny models built by another version of the code.
export SDXL_PERSONALIZE_CACHE="${SDXL_PERSONALIZE_CACHE:-$(mktemp -d)}"
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"

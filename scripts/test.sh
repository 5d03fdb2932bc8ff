#!/usr/bin/env bash
# Set up .venv and run the default test suite on the built-in tiny models (CPU, offline); arguments go to pytest. The full-size
# tier (marker `slow`) has its own command: bash scripts/test_full_size.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A private model cache per run: tests never read built-in models built by another version of the code.
if [ -z "${SDXL_PERSONALIZE_CACHE:-}" ]; then
    SDXL_PERSONALIZE_CACHE=$(mktemp -d)
    trap 'rm -rf "$SDXL_PERSONALIZE_CACHE"' EXIT
fi
export SDXL_PERSONALIZE_CACHE HF_HUB_OFFLINE=1
.venv/bin/python -m pytest -q "$@"

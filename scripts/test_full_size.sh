#!/usr/bin/env bash
# Set up .venv and run the full-size tier: every script on SDXL base 1.0's and Playground v2.5's real
# architectures (random weights built into the test run's private cache, 6.5 GB, removed afterwards), bf16
# on the CPU. Arguments go to pytest (e.g. -k "architectures or plain_training", the core CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
cache_parent="${SDXL_PERSONALIZE_CACHE:-${TMPDIR:-/tmp}}"
mkdir -p "$cache_parent"
free_gib=$(( $(df -Pk "$cache_parent" | awk 'NR == 2 {print $4}') / 1048576 ))
if [ "$free_gib" -lt 10 ]; then
    echo "error: the full-size tier needs about 10 GB free under $cache_parent (set SDXL_PERSONALIZE_CACHE or TMPDIR elsewhere); $free_gib GB are" >&2
    exit 2
fi
exec bash scripts/test.sh -m slow "$@"

#!/usr/bin/env bash
# Every GPU figure in one run (bench/gpu.py): bash bench/gpu.sh [--dry-run] [--out table.md]
# On a lent GPU it builds the full-size model on the device's own disk (no download) and prints the Markdown table for
# bench/RESULTS.md in under 8 minutes on an H100-class card; --dry-run does the same on the tiny model, anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
exec "$python" bench/gpu.py "$@"

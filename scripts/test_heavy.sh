#!/usr/bin/env bash
# Set up .venv and run the heavy tier on the built-in tiny models: training-quality, multi-process, kill -9 and
# Ctrl-C tests and the longest end-to-end runs, a few seconds or more each (about 8 min on 2 CPU cores). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/test.sh -m heavy "$@"

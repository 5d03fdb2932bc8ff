#!/usr/bin/env bash
# Set up .venv and run the heavy tier on the built-in tiny models: training-quality, multi-process, kill -9 and
# Ctrl-C tests, a quarter minute or more each (about 13 min on 2 CPU cores). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/test.sh -m heavy "$@"

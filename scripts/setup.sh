#!/usr/bin/env bash
# Make .venv in the repository root and install requirements.txt into it; a no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.requirements.sha256
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    .venv/bin/python -m pip install --quiet --progress-bar off -r requirements.txt
    echo "$wanted" > "$stamp"
fi

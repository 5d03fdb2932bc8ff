#!/usr/bin/env bash
# Make .venv in the repository root and install requirements.txt into it (a no-op when already done), then check
# that it holds the torch/torchvision pair requirements.txt pins and that its packages agree (pip check).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.requirements.sha256
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    .venv/bin/python -m pip install --quiet --progress-bar off -r requirements.txt
    .venv/bin/python -m pip check > /dev/null || { .venv/bin/python -m pip check >&2; exit 2; }
    echo "$wanted" > "$stamp"
fi
pinned() { sed -n "s/^$1==\([^ ;#]*\).*/\1/p" requirements.txt; }
installed=$(.venv/bin/python -c 'from importlib.metadata import version
print(*(version(name).split("+")[0] for name in ("torch", "torchvision")))')
if [ "$installed" != "$(pinned torch) $(pinned torchvision)" ]; then
    echo "error: .venv has torch and torchvision $installed, but this toolkit is tested with $(pinned torch) and $(pinned torchvision) (requirements.txt); remove .venv and run this again" >&2
    exit 2
fi

#!/usr/bin/env bash
# Run kohya sd-scripts' own code beside ours (its dataset config reader and counts, its bucket manager): the tests
# marked kohya_source. kohya's scripts are no package, so give a checkout of them (at the commit the references
# name, 48d368fa, e.g. `git clone https://github.com/kohya-ss/sd-scripts && git -C sd-scripts checkout 48d368fa`).
# Their few extra dependencies are installed into a temporary folder, not into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ ! -f "$1/library/config_util.py" ]; then
    echo "usage: bash scripts/test_against_kohya.sh SD_SCRIPTS_CHECKOUT [pytest args]" >&2
    exit 2
fi
source_dir=$(cd "$1" && pwd)
shift
bash scripts/setup.sh
deps=$(mktemp -d)
trap 'rm -rf "$deps"' EXIT
.venv/bin/python -m pip install --quiet --target "$deps" voluptuous imagesize opencv-python-headless
rm -rf "$deps"/numpy "$deps"/numpy-* "$deps"/numpy.libs  # the venv's own numpy stays the one imported
KOHYA_SD_SCRIPTS="$source_dir" PYTHONPATH="$deps" HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m kohya_source "$@"

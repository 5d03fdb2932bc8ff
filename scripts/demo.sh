#!/usr/bin/env bash
# Set up .venv, then run the toolkit end to end on the built-in tiny models (CPU, offline, about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
python=.venv/bin/python
out=demo
rm -rf "$out"

echo "== infer: tiny-sdxl (discrete/epsilon, like SDXL base), 4 images, two schedulers"
$python infer.py --model tiny-sdxl --prompt "a photo of an astronaut riding a horse" \
    --num_images 2 --seed 1 --num_inference_steps 20 --output_dir "$out/tiny-sdxl"
$python infer.py --model tiny-sdxl --prompt "a painting of a red house" --negative_prompt "blurry" \
    --scheduler dpmpp-2m-karras --num_images 2 --batch_size 2 --seed 7 --output_dir "$out/tiny-sdxl"

echo "== infer: tiny-edm (EDM, like Playground v2.5) with its own EDM DPM++ 2M sampler"
$python infer.py --model tiny-edm --prompt "a photo of a cat" --num_images 2 --seed 3 \
    --num_inference_steps 20 --guidance_scale 3 --output_dir "$out/tiny-edm"

echo "== every image carries its parameters (as WebUI's PNG Info shows them):"
$python - "$out" <<'PY'
import sys
from pathlib import Path
from PIL import Image
for png in sorted(Path(sys.argv[1]).rglob("*.png")):
    print(f"{png}:\n  " + Image.open(png).text["parameters"].replace("\n", "\n  "))
PY

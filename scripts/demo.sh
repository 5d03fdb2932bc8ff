#!/usr/bin/env bash
# Set up .venv, then run the toolkit end to end on the built-in tiny models (CPU, offline, a minute or two).
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

echo "== train: a DreamBooth LoRA on 4 synthetic images, on each flavour (EDM is switched on for tiny-edm)"
$python - "$out/instance" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
for k, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]):
    pixels = np.full((64, 64, 3), colour, np.uint8); pixels[8 + 6 * k : 30 + 6 * k, 16:40] = 255
    Image.fromarray(pixels).save(folder / f"dog_{k}.png")
PY
for model in tiny-sdxl tiny-edm; do
    $python train_lora.py --pretrained_model_name_or_path $model --instance_data_dir "$out/instance" \
        --instance_prompt "a photo of sks dog" --resolution 64 --train_batch_size 2 --rank 8 --learning_rate 5e-3 \
        --max_train_steps 60 --checkpointing_steps 30 --cache_latents --random_flip --seed 0 \
        --output_dir "$out/lora-$model"
    echo "== infer with the trained LoRA, diffusers file and its WebUI/kohya copy"
    $python infer.py --model $model --lora "$out/lora-$model" --prompt "a photo of sks dog" --seed 5 \
        --num_inference_steps 20 --output_dir "$out/with-lora-$model"
    $python infer.py --model $model --lora "$out/lora-$model/lora-$model.safetensors:0.8" --prompt "a photo of sks dog" \
        --seed 5 --num_inference_steps 20 --output_dir "$out/with-lora-$model"
done

echo "== a LoKr on the attention projections and the ResNet convolutions (LyCORIS's file, which WebUI and ComfyUI read)"
$python train_lora.py --pretrained_model_name_or_path tiny-sdxl --instance_data_dir "$out/instance" \
    --instance_prompt "a photo of sks dog" --adapter lokr --conv_rank 4 --lokr_factor 4 --resolution 64 --train_batch_size 2 \
    --rank 8 --learning_rate 5e-3 --max_train_steps 30 --checkpointing_steps 30 --cache_latents --seed 0 --output_dir "$out/lokr_dog"
$python infer.py --model tiny-sdxl --lora "$out/lokr_dog" --prompt "a photo of sks dog" --seed 5 --num_inference_steps 20 \
    --output_dir "$out/with-lokr"
$python convert_for_webui.py "$out/lokr_dog/lokr_dog.safetensors" --check

echo "== the advanced recipe: pivotal tuning (TOK -> <s0><s1>) with Prodigy and prior preservation"
$python train_lora.py --pretrained_model_name_or_path tiny-sdxl --instance_data_dir "$out/instance" \
    --instance_prompt "3d icon in the style of TOK" --train_text_encoder_ti --train_text_encoder_ti_frac 0.5 \
    --token_abstraction TOK --optimizer prodigy --learning_rate 1.0 --text_encoder_lr 1.0 --snr_gamma 5 --rank 8 \
    --with_prior_preservation --class_data_dir "$out/class" --class_prompt "3d icon" --num_class_images 4 \
    --resolution 64 --train_batch_size 2 --max_train_steps 20 --checkpointing_steps 10 --seed 0 --output_dir "$out/icons"
echo "== infer with the LoRA and its embedding"
$python infer.py --model tiny-sdxl --lora "$out/icons" --embedding "$out/icons/icons_emb.safetensors" \
    --prompt "a <s0><s1> icon of an astronaut riding a horse" --seed 9 --num_inference_steps 20 --output_dir "$out/icons-images"

echo "== merge: the dog LoRA and the icon LoRA by TIES on their delta weights (the icon embedding comes along)"
$python merge_lora.py --model tiny-sdxl --lora "$out/lora-tiny-sdxl:1.0" --lora "$out/icons:0.8" --method ties \
    --density 0.5 --kohya --out "$out/merged"
$python infer.py --model tiny-sdxl --lora "$out/merged" --embedding "$out/merged/merged_emb.safetensors" \
    --prompt "a photo of sks dog, <s0><s1> icon" --seed 9 --num_inference_steps 20 --output_dir "$out/merged-images"

echo "== MJHQ-30K-style evaluation on a 12-prompt stand-in: generate (resumable), score, report"
echo "   (offline there is no Inception file, so a random-weight Inception-v3 stands in: the numbers mean nothing, the path is the real one)"
$python - "$out/mjhq" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
import torch
from PIL import Image
sys.path.insert(0, "bench")
from fid_throughput import RandomInception
root = Path(sys.argv[1]); rng = np.random.default_rng(0); meta = {}
for c, category in enumerate(["animals", "food", "people"]):
    for k in range(4):
        image_id = f"{category}{k}"
        meta[image_id] = {"category": category, "prompt": f"a photo of {category}, number {k}"}
        path = root / "mjhq30k_imgs" / category / f"{image_id}.jpg"; path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 64)).save(path)
(root / "meta_data.json").write_text(json.dumps(meta))
with torch.no_grad():
    torch.jit.trace(RandomInception().eval(), torch.rand(1, 3, 299, 299) * 255).save(str(root / "stand-in-inception.pt"))
PY
mjhq_options=(--meta_data "$out/mjhq/meta_data.json" --gen_dir "$out/mjhq/gen" --model tiny-sdxl --num_inference_steps 10)
$python mjhq_fid.py generate "${mjhq_options[@]}" --per_category 2 --batch_size 2
$python mjhq_fid.py all "${mjhq_options[@]}" --ref "$out/mjhq/mjhq30k_imgs" --inception_weights "$out/mjhq/stand-in-inception.pt" \
    --kid --report_dir "$out/mjhq/report" --cache_dir "$out/mjhq/cache" --batch_size 2
cat "$out/mjhq/report/fid_report.md"

echo "== every image carries its parameters (as WebUI's PNG Info shows them):"
$python - "$out" <<'PY'
import sys
from pathlib import Path
from PIL import Image
for png in sorted(Path(sys.argv[1]).rglob("*.png")):
    parameters = Image.open(png).text.get("parameters")
    if parameters:  # generated images; the training images have none
        print(f"{png}:\n  " + parameters.replace("\n", "\n  "))
PY

echo "== export for WebUI and ComfyUI (kohya LoRA + embedding), with the prompts to use"
$python convert_for_webui.py "$out/icons" --name my_icons --out "$out/webui-export" --force
$python convert_for_webui.py "$out/webui-export/my_icons.safetensors" --check

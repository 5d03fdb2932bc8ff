"""What the last alpha-bar of a zero-terminal-SNR schedule does to an image: diffusers' samplers put 2^-24 there
(sigma_max 4096), WebUI and ComfyUI 4.8973451890853435e-08 (sigma_max 4518.8). Both sample the same model with the
same seed and trailing timesteps; only that one number differs.

    python bench/ztsnr_terminal_alpha.py [--model tiny-sdxl] [--size 64] [--seeds 8]

The model is read as v-prediction with zero-terminal SNR whatever it says (the built-in models are random weights:
the difference measures the sampler's arithmetic, not picture quality). Prints, per sampler and step count, the
largest and mean difference of the 8-bit images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.models import FlavourOptions, load_sdxl_pipeline  # noqa: E402
from common.schedulers import make_scheduler  # noqa: E402

UI_LAST_ALPHA_BAR = 4.8973451890853435e-08  # comfy/model_sampling.py rescale_zero_terminal_snr_sigmas; WebUI's the same


def images(pipe, sampler: str, steps: int, seeds: list[int], size: int, last_alpha_bar: float | None) -> np.ndarray:
    pipe.scheduler = make_scheduler(sampler, pipe.scheduler)
    if last_alpha_bar is not None:
        pipe.scheduler.alphas_cumprod[-1] = last_alpha_bar  # read again by set_timesteps when the sigmas are made
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    with torch.inference_mode():
        out = pipe(["a photo of a dog"] * len(seeds), num_inference_steps=steps, guidance_scale=5.0, guidance_rescale=0.7,
                   width=size, height=size, generator=generators, output_type="np").images
    return np.round(out * 255).astype(int)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    pipe = load_sdxl_pipeline(args.model, torch.float32, flavour=FlavourOptions("v_prediction", True))
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(args.seeds))
    print(f"{args.model} at {args.size}x{args.size}, {len(seeds)} seeds, CFG 5, guidance rescale 0.7")
    print("| sampler | steps | max difference (/255) | mean difference (/255) | pixels that differ |")
    print("| --- | --- | --- | --- | --- |")
    for sampler in ("euler", "dpmpp-2m", "euler-a"):
        for steps in (10, 30):
            diffusers = images(pipe, sampler, steps, seeds, args.size, None)
            ui = images(pipe, sampler, steps, seeds, args.size, UI_LAST_ALPHA_BAR)
            difference = np.abs(diffusers - ui)
            print(f"| {sampler} | {steps} | {difference.max()} | {difference.mean():.3f} | {(difference > 0).mean():.1%} |")


if __name__ == "__main__":
    main()

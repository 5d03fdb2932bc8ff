"""Helpers for training tests: synthetic image sets, in-process runs, and fixed-noise denoising losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from helpers import load_pipe, run_cli

PROMPT = "a photo of sks dog"


def write_images(folder: Path, count: int = 4, size: tuple[int, int] = (64, 64)) -> Path:
    """Distinguishable images: image k has a solid colour k and a bright square at a k-dependent place."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    height, width = size
    for k in range(count):
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[:] = colours[k % len(colours)]
        top, left = (k * 7) % (height // 2), (k * 11) % (width // 2)
        pixels[top : top + height // 3, left : left + width // 3] = 255
        Image.fromarray(pixels).save(folder / f"image_{k}.png")
    return folder


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; each in-process run starts from a clean slate as a new process would."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def train_cli(capsys, *argv) -> tuple[int, str, str]:
    import train_lora

    reset_accelerate()
    return run_cli(train_lora.app, [str(a) for a in argv], capsys)


def image_batch(folder: Path) -> torch.Tensor:
    files = sorted(folder.glob("*.png"))
    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1 for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def denoising_losses(model_path: str, folder: Path, lora: Path | None, noise_levels: list[float], edm: bool) -> list[float]:
    """Mean denoising error of the folder's images at fixed noise levels and fixed noise.

    Discrete models: the MSE of the network's own target (epsilon, or v for a v-prediction model) at timesteps
    `noise_levels`. EDM models: x0 MSE of D(x; sigma) at sigmas.
    """
    from common.lora_formats import LoraSpec, load_loras
    from common.losses import EDMFormulation
    from common.models import normalise_latents

    pipe = load_pipe(model_path)
    if lora is not None:
        load_loras(pipe, [LoraSpec(lora)])
    with torch.no_grad():
        x0 = normalise_latents(pipe.vae.encode(image_batch(folder)).latent_dist.mean, pipe.vae.config)
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
        count = x0.shape[0]
        embeds, pooled = embeds.expand(count, -1, -1), pooled.expand(count, -1)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).expand(count, -1)

        def network(model_input, timestep):
            timestep = timestep if timestep.ndim else timestep.expand(count)
            return pipe.unet(model_input, timestep, encoder_hidden_states=embeds,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

        losses = []
        for level in noise_levels:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1234))
            if edm:
                sigma = torch.full((count,), level)
                denoised = EDMFormulation(sigma_data=float(pipe.scheduler.config.sigma_data)).denoise(network, x0 + level * noise, sigma)
                losses.append(float(((denoised - x0) ** 2).mean()))
            else:
                abar = pipe.scheduler.alphas_cumprod[int(level)]
                noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
                target = noise if pipe.scheduler.config.prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
                losses.append(float(((network(noisy, torch.full((count,), int(level))) - target) ** 2).mean()))
        return losses

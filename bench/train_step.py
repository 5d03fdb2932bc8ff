#!/usr/bin/env python
"""Training-step benchmark: seconds per step, images/s, peak memory and (GPU) model FLOP utilisation.

    python bench/train_step.py pipeline --model tiny-sdxl --resolution 64 --batch_sizes 1,4
    python bench/train_step.py sdxl-unet --resolution 1024 --batch_sizes 1,4 --rank 32 --gradient_checkpointing

`pipeline` runs train_lora.py's own step (data, VAE or cached latents, LoRA UNet, loss, AdamW) on any
model, for each combination of --cache_latents and --gradient_checkpointing. `sdxl-unet` trains a
rank-R LoRA on an SDXL-shaped UNet with random weights from cached latents and text embeddings (what
the trainer does with --cache_latents and frozen text encoders); its model FLOPs per step (forward
and backward, without checkpointing's recomputation) are counted by torch's FlopCounterMode on the
meta device.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_lora  # noqa: E402
from common.cli import flags, run_app  # noqa: E402
from common.models import peak_memory_gib, quiet_libraries  # noqa: E402
from gpu import fresh_accelerator, train_row  # noqa: E402
from gpu import write_images as write_synthetic_images  # noqa: E402
from measure import device_label, peak_tflops, report, reset_peak_memory, synchronize  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def timed_steps(step, device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


@app.command()
def pipeline(
    model: Annotated[str, typer.Option(*flags("model", "-m"))] = "tiny-sdxl",
    resolution: Annotated[int, typer.Option(*flags("resolution"))] = 64,
    batch_sizes: Annotated[str, typer.Option(*flags("batch_sizes"))] = "1,4",
    rank: Annotated[int, typer.Option(*flags("rank"))] = 4,
    mixed_precision: Annotated[str, typer.Option(*flags("mixed_precision"))] = "no",
    steps: Annotated[int, typer.Option(*flags("steps"))] = 10,
    out: Annotated[Path | None, typer.Option(*flags("out"))] = None,
) -> None:
    """train_lora.py's step, with and without cached latents and gradient checkpointing."""
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        images = Path(scratch) / "images"
        images.mkdir()
        write_synthetic_images(images, resolution, 8)
        for batch, cache, checkpointing in itertools.product([int(b) for b in batch_sizes.split(",")], (False, True), (False, True)):
            row = train_row(model, images, Path(scratch), resolution, batch, checkpointing, steps, rank=rank, cache_latents=cache,
                            mixed_precision=mixed_precision)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            rows.append({"mode": "pipeline", "model": model, "device": device_label(device), "precision": mixed_precision,
                         "resolution": resolution, "batch": batch, "rank": rank, "cache_latents": cache,
                         "grad_checkpointing": checkpointing, "s_per_step": row["s"], "images_per_s": batch / row["s"],
                         "peak_mem_gib": peak_memory_gib(device)})
    report(rows, out)


def sdxl_training_setup(device, dtype, rank: int, checkpointing: bool):
    """LoRA UNet (frozen base in `dtype`, LoRA in fp32) and the DDPM epsilon formulation of SDXL."""
    from diffusers import DDPMScheduler

    from common.losses import DiscreteFormulation
    from sdxl_unet import sdxl_unet

    unet = sdxl_unet(device, dtype)
    unet.requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    config = train_lora.TrainConfig(pretrained_model_name_or_path="sdxl-shaped", output_dir="-", rank=rank)
    with quiet_libraries():
        unet = train_lora.add_lora(unet, config)
    schedule = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return unet, DiscreteFormulation(schedule.alphas_cumprod.to(device))


def sdxl_network(unet, batch: int, device, dtype):
    from sdxl_unet import unet_inputs

    conditioning = unet_inputs(batch, 8, 8, device, dtype)  # text embeddings and time ids; latents come separately

    def network(model_input, timestep):
        return unet(model_input.to(dtype), timestep, encoder_hidden_states=conditioning["encoder_hidden_states"],
                    added_cond_kwargs=conditioning["added_cond_kwargs"]).sample

    return network


def training_flops(batch: int, resolution: int, rank: int) -> int:
    """Forward + backward FLOPs of one LoRA training step, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, formulation = sdxl_training_setup("meta", torch.bfloat16, rank, checkpointing=False)
    latents = torch.empty(batch, 4, resolution // 8, resolution // 8, device="meta")
    network = sdxl_network(unet, batch, "meta", torch.bfloat16)
    with FlopCounterMode(display=False) as counter:
        formulation.loss(network, latents).mean().backward()
    return counter.get_total_flops()


@app.command("sdxl-unet")
def sdxl_unet_steps(
    resolution: Annotated[int, typer.Option(*flags("resolution"))] = 1024,
    batch_sizes: Annotated[str, typer.Option(*flags("batch_sizes"))] = "1,4",
    rank: Annotated[int, typer.Option(*flags("rank"))] = 32,
    gradient_checkpointing: Annotated[bool, typer.Option(*flags("gradient_checkpointing"))] = False,
    mixed_precision: Annotated[str, typer.Option(*flags("mixed_precision"))] = "bf16",
    steps: Annotated[int, typer.Option(*flags("steps"))] = 10,
    warmup: Annotated[int, typer.Option(*flags("warmup"))] = 3,
    out: Annotated[Path | None, typer.Option(*flags("out"))] = None,
) -> None:
    """LoRA training steps on an SDXL-shaped UNet from cached latents and embeddings."""
    rows = []
    for batch in [int(b) for b in batch_sizes.split(",")]:
        accelerator = fresh_accelerator(mixed_precision)
        device, dtype = accelerator.device, train_lora.weight_dtype(accelerator)
        unet, formulation = sdxl_training_setup(device, dtype, rank, gradient_checkpointing)
        optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        latents = torch.randn(batch, 4, resolution // 8, resolution // 8, device=device)
        network = sdxl_network(unet, batch, device, dtype)
        seconds = timed_steps(
            lambda: train_lora.training_step(lambda: formulation.loss(network, latents).mean(), models=[unet], accelerator=accelerator,
                                             optimizer=optimizer, lr_scheduler=lr_scheduler, max_grad_norm=1.0),
            device, warmup, steps,
        )
        flops = training_flops(batch, resolution, rank)
        peak = peak_tflops(device)
        achieved = flops / seconds / 1e12
        rows.append({"mode": "sdxl-unet", "device": device_label(device), "precision": mixed_precision, "resolution": resolution,
                     "batch": batch, "rank": rank, "grad_checkpointing": gradient_checkpointing, "s_per_step": seconds,
                     "images_per_s": batch / seconds, "tflop_per_step": flops / 1e12, "achieved_tflops": achieved,
                     "mfu": achieved / peak if peak else float("nan"), "peak_mem_gib": peak_memory_gib(device)})
    report(rows, out)


if __name__ == "__main__":
    run_app(app)

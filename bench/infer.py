#!/usr/bin/env python
"""Inference benchmark: seconds per image, peak memory and (on a GPU) the UNet's FLOP utilisation.

    python bench/infer.py pipeline --model tiny-sdxl --size 64 --steps 20 --batch_sizes 1,4
    python bench/infer.py sdxl-unet --size 1024 --steps 25 --batch_sizes 1,4 --compile

`pipeline` times infer.py's own generation path (text encoders, UNet loop, VAE decode) on any model.
`sdxl-unet` times the denoising loop of an SDXL-shaped UNet with random weights, with CFG (two UNet
rows per image), and reports achieved TFLOP/s against the GPU's dense bf16 peak; FLOPs per forward
come from torch's FlopCounterMode (about 6.8 TFLOP at 1024x1024 per image row).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.cli import flags, parse_dtype, run_app  # noqa: E402
from common.models import peak_memory_gib, pick_device, speed_up_unet  # noqa: E402
from measure import device_label, peak_tflops, report, reset_peak_memory, synchronize  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

@app.command()
def pipeline(
    model: Annotated[str, typer.Option(*flags("model", "-m"))] = "tiny-sdxl",
    size: Annotated[int, typer.Option(*flags("size"))] = 64,
    steps: Annotated[int, typer.Option(*flags("steps"))] = 20,
    batch_sizes: Annotated[str, typer.Option(*flags("batch_sizes"))] = "1,4",
    guidance_scale: Annotated[float, typer.Option(*flags("guidance_scale"))] = 5.0,
    device_name: Annotated[str, typer.Option(*flags("device"))] = "auto",
    dtype_name: Annotated[str, typer.Option(*flags("dtype"))] = "auto",
    compile_unet: Annotated[bool, typer.Option(*flags("compile"))] = False,
    repeats: Annotated[int, typer.Option(*flags("repeats"))] = 3,
    out: Annotated[Path | None, typer.Option(*flags("out"))] = None,
) -> None:
    """Seconds per image through infer.py's generation path (common.generation.run_batch)."""
    from common.generation import ImageJob, SamplingSettings, run_batch
    from common.models import load_sdxl_pipeline

    device = pick_device(device_name)
    dtype = parse_dtype(dtype_name) if dtype_name != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe = load_sdxl_pipeline(model, dtype).to(device)
    pipe.unet = speed_up_unet(pipe.unet, device, compile_unet)
    pipe.set_progress_bar_config(disable=True)
    settings = SamplingSettings(width=size, height=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                                scheduler_name="default", webui_sampler="default")
    rows = []
    for batch in [int(b) for b in batch_sizes.split(",")]:
        jobs = [ImageJob(i, "a photo of an astronaut riding a horse", None, i) for i in range(batch)]
        run_batch(pipe, jobs, settings)  # warm-up: allocator, kernels, compilation
        reset_peak_memory(device)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            run_batch(pipe, jobs, settings)
        synchronize(device)
        seconds = (time.perf_counter() - start) / (repeats * batch)
        rows.append({"mode": "pipeline", "model": model, "device": device_label(device), "dtype": str(dtype).split(".")[-1],
                     "size": size, "steps": steps, "batch": batch, "s_per_image": seconds,
                     "peak_mem_gib": peak_memory_gib(device)})
    report(rows, out)


@app.command("sdxl-unet")
def sdxl_unet_loop(
    size: Annotated[int, typer.Option(*flags("size"))] = 1024,
    steps: Annotated[int, typer.Option(*flags("steps"))] = 25,
    batch_sizes: Annotated[str, typer.Option(*flags("batch_sizes"))] = "1,4",
    device_name: Annotated[str, typer.Option(*flags("device"))] = "auto",
    dtype_name: Annotated[str, typer.Option(*flags("dtype"))] = "bf16",
    compile_unet: Annotated[bool, typer.Option(*flags("compile"))] = False,
    out: Annotated[Path | None, typer.Option(*flags("out"))] = None,
) -> None:
    """The CFG denoising loop of an SDXL-shaped UNet: seconds per image and FLOP utilisation."""
    from sdxl_unet import sdxl_unet, unet_forward_flops, unet_inputs

    device, dtype = pick_device(device_name), parse_dtype(dtype_name)
    unet = sdxl_unet(device, dtype).eval()
    unet.requires_grad_(False)
    model = speed_up_unet(unet, device, compile_unet)
    peak = peak_tflops(device)
    rows = []
    for batch in [int(b) for b in batch_sizes.split(",")]:
        rows_per_call = 2 * batch  # classifier-free guidance: conditional and unconditional rows
        flops_per_call = unet_forward_flops(sdxl_unet("meta", dtype), rows_per_call, size, size)
        inputs = unet_inputs(rows_per_call, size, size, device, dtype)
        if device.type == "cuda":
            inputs["sample"] = inputs["sample"].contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(3):  # warm-up and compilation
                model(**inputs)
            reset_peak_memory(device)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                model(**inputs)
            synchronize(device)
        elapsed = time.perf_counter() - start
        achieved = flops_per_call * steps / elapsed / 1e12
        rows.append({"mode": "sdxl-unet", "device": device_label(device), "dtype": dtype_name, "compile": compile_unet,
                     "size": size, "steps": steps, "batch": batch, "s_per_image": elapsed / batch,
                     "tflop_per_forward_row": flops_per_call / rows_per_call / 1e12, "achieved_tflops": achieved,
                     "flop_utilisation": achieved / peak if peak else float("nan"), "peak_mem_gib": peak_memory_gib(device)})
    report(rows, out)


if __name__ == "__main__":
    run_app(app)

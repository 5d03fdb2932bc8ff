#!/usr/bin/env python
"""Every GPU figure from one short run: training and sampling speed, peak memory and model FLOP utilisation.

    bash bench/gpu.sh              # on a lent GPU: builds full-sdxl on the device's own disk, no download
    bash bench/gpu.sh --dry-run    # anywhere: the built-in tiny model, 2 steps, the same code path and table

Training is train_lora.py's own step (its functions: load_models, build_data with --cache_latents (common/training_data.py),
add_lora, make_optimizer, BatchLoss, training_step) at 1024², bf16, LoRA rank 16, batch 1 and 4, with and without gradient
checkpointing; sampling is infer.py's own path (common.generation.run_batch) at 1024², 30 steps, batch 1 and 4,
with and without --compile's recipe. Each row gives seconds per step or image, torch's max_memory_allocated (the
configuration's whole run: its start, latent caching included, and its steps), the README's estimate for the same
configuration beside it, and the model FLOP utilisation: FLOPs counted by torch's FlopCounterMode on one extra
step of the same configuration, over the time of a timed step, against the card's dense bf16 peak (bench/measure.py).
The table is Markdown, for bench/RESULTS.md; its first lines name the card and the torch and CUDA versions.
"""

from __future__ import annotations

import itertools
import re
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Annotated

import torch
import typer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_lora  # noqa: E402
from common.cli import flags, run_app  # noqa: E402
from common.models import quiet_libraries, speed_up_unet  # noqa: E402
from common.training_data import build_data, make_loader  # noqa: E402
from measure import device_label, peak_tflops, reset_peak_memory, synchronize  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
GIB = 2**30


def readme_estimates(readme: Path = REPO / "README.md") -> dict:
    """The README's estimated peaks (GiB) at 1024², bf16, rank 16: ("train", batch, checkpointing) with --cache_latents,
    and ("infer", batch), read from its "GPU memory at 1024×1024" tables, so the bench and the README cannot drift."""
    text = readme.read_text(encoding="utf-8")
    estimates = {}
    for batch, cells in re.findall(r"^\| batch (\d), rank 16 \| (.+) \|$", text, re.MULTILINE):
        both, _, cached_only, _ = (float(re.sub(r"[^\d.]", "", cell)) for cell in cells.split("|"))
        estimates[("train", int(batch), True)], estimates[("train", int(batch), False)] = both, cached_only
    for batch, cell in re.findall(r"^\| batch (\d)(?: \(.*?\))? \| \**([\d.]+) GiB\** \|$", text, re.MULTILINE):
        estimates[("infer", int(batch))] = float(cell)
    return estimates


def fresh_accelerator(mixed_precision: str = "bf16"):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision)


def write_images(folder: Path, resolution: int, count: int) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for k in range(count):
        pixels = (torch.rand(resolution, resolution, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{k}.png")


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def train_row(model: str, images: Path, scratch: Path, resolution: int, batch: int, checkpointing: bool, steps: int, *,
              rank: int = 16, cache_latents: bool = True, mixed_precision: str = "bf16") -> dict:
    """One training configuration through train_lora.py's functions: s/step, peak memory, FLOPs per step."""
    from torch.utils.flop_counter import FlopCounterMode

    config = train_lora.TrainConfig(
        pretrained_model_name_or_path=model, output_dir=str(scratch / "out"), instance_data_dir=str(images),
        instance_prompt="a photo of sks dog", resolution=resolution, train_batch_size=batch, rank=rank, cache_latents=cache_latents,
        gradient_checkpointing=checkpointing, mixed_precision=mixed_precision, seed=0,
    )
    accelerator = fresh_accelerator(mixed_precision)
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    with quiet_libraries():
        checked = train_lora.preflight(config)
        pipe = train_lora.load_models(config, accelerator, checked.base)
        formulation = train_lora.choose_formulation(config, pipe, accelerator, checked.base, checked.formulation)
        data = build_data(config, checked, pipe, accelerator)
        unet = train_lora.add_lora(pipe.unet, config)
    loader, batch_order = make_loader(config, data.instances, data.plans[0].batch_size, pin_memory=device.type == "cuda")
    optimizer, lr_scheduler, total = train_lora.make_optimizer(config, unet, pipe, accelerator, len(batch_order),
                                                               data.plans[0].batch_size)
    captions = train_lora.CaptionEncoder(pipe, config, total, data.all_captions(), accelerator)
    unet = speed_up_unet(unet, device, allow_tf32=False)  # channels-last on a GPU, as train_lora.py does
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    batches = itertools.cycle(list(loader))
    batch_loss = train_lora.BatchLoss(pipe=pipe, unet=unet, caption_encoder=captions, formulation=formulation,
                                      accelerator=accelerator, prior_loss_weight=1.0)

    def step():
        return train_lora.training_step(partial(batch_loss, next(batches), None, 0), models=[unet], accelerator=accelerator,
                                        optimizer=optimizer, lr_scheduler=lr_scheduler, max_grad_norm=1.0)

    for _ in range(2):  # warm-up: allocator, kernels, AdamW's state, the caption cache
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = peak_gib(device)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    del pipe, unet, optimizer, batch_loss, captions
    return {"s": seconds, "peak": peak, "flops": flops}


def infer_row(pipe, device, resolution: int, batch: int, steps: int) -> dict:
    """One sampling configuration through infer.py's run_batch: s/image, peak memory, FLOPs of the UNet calls."""
    from torch.utils.flop_counter import FlopCounterMode

    from common.generation import ImageJob, SamplingSettings, run_batch

    settings = SamplingSettings(width=resolution, height=resolution, num_inference_steps=steps, guidance_scale=5.0,
                                scheduler_name="default", webui_sampler="default")
    jobs = [ImageJob(i, "a photo of an astronaut riding a horse", None, i) for i in range(batch)]
    run_batch(pipe, jobs, settings)  # warm-up (and compilation)
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    run_batch(pipe, jobs, settings)
    synchronize(device)
    seconds = (time.perf_counter() - start) / batch
    peak = peak_gib(device)
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)  # count the module's FLOPs, not the compiled wrapper's
    latents = torch.zeros(2 * batch, unet.config.in_channels, resolution // 8, resolution // 8, device=device, dtype=unet.dtype)
    pooled_width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(latents, torch.ones(2 * batch, device=device),
             encoder_hidden_states=torch.zeros(2 * batch, 77, unet.config.cross_attention_dim, device=device, dtype=unet.dtype),
             added_cond_kwargs={"text_embeds": torch.zeros(2 * batch, pooled_width, device=device, dtype=unet.dtype),
                                "time_ids": torch.zeros(2 * batch, 6, device=device, dtype=unet.dtype)})
    return {"s": seconds, "peak": peak, "flops": counter.get_total_flops() * steps / batch}  # per image: CFG's two rows


def cell(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def utilisation(flops: float, seconds: float, device) -> str:
    peak = peak_tflops(device)
    return "n/a (CPU)" if peak is None else f"{flops / seconds / 1e12 / peak:.0%}"


@app.command()
def main(
    dry_run: Annotated[bool, typer.Option(*flags("dry_run"), help="tiny model, 64², 2 steps: the same path and table anywhere")] = False,
    out: Annotated[Path | None, typer.Option(*flags("out"), help="also write the table here")] = None,
) -> None:
    """Measure training and sampling on this machine's GPU and print the table for bench/RESULTS.md."""
    from common.builtin_models import builtin_model_path
    from common.models import load_sdxl_pipeline, pick_device

    model, resolution, train_steps, sample_steps = ("tiny-sdxl", 64, 2, 2) if dry_run else ("full-sdxl", 1024, 5, 30)
    started = time.perf_counter()
    device = pick_device("auto")
    model_path = str(builtin_model_path(model))  # built from its config on this machine's disk, no download
    estimates = readme_estimates()
    cuda = torch.version.cuda or "none"
    lines = [f"Card: {device_label(device)}; torch {torch.__version__}, CUDA {cuda}; model {model} at {resolution}², bf16"
             + (" (--dry-run: not a measurement)" if dry_run else ""), "",
             "| job | batch | option | s / step or image | peak allocated, GiB | README estimate, GiB | model FLOP utilisation |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as scratch:
        images = Path(scratch) / "images"
        images.mkdir()
        write_images(images, resolution, 8)
        for batch, checkpointing in itertools.product((1, 4), (False, True)):
            row = train_row(model_path, images, Path(scratch), resolution, batch, checkpointing, train_steps)
            option = "checkpointing, cached latents" if checkpointing else "cached latents"
            lines.append(f"| train_lora.py rank 16 | {batch} | {option} | {row['s']:.3f} | {cell(row['peak'], '.2f')} | "
                         f"{cell(estimates.get(('train', batch, checkpointing)), '.1f')} | {utilisation(row['flops'], row['s'], device)} |")
    pipe = load_sdxl_pipeline(model_path, torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    eager = pipe.unet
    for compiled, batch in itertools.product((False, True), (1, 4)):
        option = f"{sample_steps} steps" + (", --compile" if compiled else "")
        if compiled and device.type != "cuda":
            lines.append(f"| infer.py | {batch} | {option} | skipped on a CPU (inductor takes minutes there) | | | |")
            continue
        pipe.unet = speed_up_unet(eager, device, compile_unet=compiled)
        row = infer_row(pipe, device, resolution, batch, sample_steps)
        lines.append(f"| infer.py | {batch} | {option} | {row['s']:.3f} | {cell(row['peak'], '.2f')} | "
                     f"{cell(estimates.get(('infer', batch)), '.1f')} | {utilisation(row['flops'], row['s'], device)} |")
    lines += ["", f"Whole run: {time.perf_counter() - started:.0f} s."]
    table = "\n".join(lines)
    typer.echo(table)
    if out:
        out.write_text(table + "\n")


if __name__ == "__main__":
    run_app(app)

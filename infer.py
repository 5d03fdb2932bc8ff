#!/usr/bin/env python
"""Text-to-image with an SDXL-family model (SDXL, Playground v2.5, their fine-tunes), LoRAs and embeddings.

    python infer.py --model tiny-sdxl --prompt "a photo of a dog" --num_images 4 --seed 1
    python infer.py --model stabilityai/stable-diffusion-xl-base-1.0 --lora out/my_lora:0.9 \\
        --embedding out/my_lora/my_lora_emb.safetensors --prompt "a photo of <s0><s1> dog"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from common.cli import UserError, flags, run_app
from common.lora_formats import BLORA_CONTENT_BLOCK, BLORA_STYLE_BLOCK, LoraSpec, parse_weighted_path
from common.models import parse_dtype
from common.schedulers import SCHEDULER_NAMES, check_scheduler_name
from common.tokens import EmbeddingSpec, parse_embedding_spec

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")

MODEL, PROMPT, SAMPLING, ADAPTERS, MEMORY, OUTPUT = "Model", "Prompt", "Sampling", "LoRA and embeddings", "Memory", "Output"


@dataclass(frozen=True)
class InferConfig:
    model: str
    prompts: list[str]
    negative_prompt: str | None
    num_images: int
    seeds: list[int]
    num_inference_steps: int
    guidance_scale: float
    width: int | None
    height: int | None
    scheduler: str
    eta: float | None
    loras: list[LoraSpec]
    embeddings: list[EmbeddingSpec]
    dtype: str
    device: str
    batch_size: int
    cpu_offload: bool
    vae_tiling: bool
    vae_slicing: bool
    compile_unet: bool
    output_dir: Path


@app.command()
def main(
    model: Annotated[str, typer.Option(*flags("pretrained_model_name_or_path", "--model", "-m"), help="tiny-sdxl, tiny-edm, a diffusers pipeline folder, or a hub id", rich_help_panel=MODEL)],
    dtype: Annotated[str, typer.Option(*flags("dtype"), help="auto (bf16 on a GPU, fp32 on the CPU), fp32, fp16 or bf16", rich_help_panel=MODEL)] = "auto",
    device: Annotated[str, typer.Option(*flags("device"), help="auto (cuda if present, else cpu), cpu, cuda, cuda:N", rich_help_panel=MODEL)] = "auto",
    prompt: Annotated[Optional[str], typer.Option(*flags("prompt", "-p"), help="the prompt", rich_help_panel=PROMPT)] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(*flags("prompt_file"), help="a text file of prompts, one per line", rich_help_panel=PROMPT)] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(*flags("negative_prompt"), help="what to steer away from", rich_help_panel=PROMPT)] = None,
    num_images: Annotated[int, typer.Option(*flags("num_images", "-n"), help="images per prompt", rich_help_panel=PROMPT)] = 1,
    seed: Annotated[Optional[list[int]], typer.Option(*flags("seed", "-s"), help="one seed (image k gets seed+k) or one per image; random if omitted", rich_help_panel=PROMPT)] = None,
    num_inference_steps: Annotated[int, typer.Option(*flags("num_inference_steps"), help="sampling steps", rich_help_panel=SAMPLING)] = 30,
    guidance_scale: Annotated[float, typer.Option(*flags("guidance_scale"), help="classifier-free guidance scale (1 disables it)", rich_help_panel=SAMPLING)] = 5.0,
    width: Annotated[Optional[int], typer.Option(*flags("width"), help="image width, a multiple of 8 (default: the model's, 1024 for SDXL)", rich_help_panel=SAMPLING)] = None,
    height: Annotated[Optional[int], typer.Option(*flags("height"), help="image height, a multiple of 8 (default: the model's)", rich_help_panel=SAMPLING)] = None,
    scheduler: Annotated[str, typer.Option(*flags("scheduler"), help=f"{', '.join(SCHEDULER_NAMES)}", rich_help_panel=SAMPLING)] = "default",
    eta: Annotated[Optional[float], typer.Option(*flags("eta"), help="stochasticity of DDIM-like steps; TCD's gamma (default 0.3 for tcd, else 0)", rich_help_panel=SAMPLING)] = None,
    lora: Annotated[Optional[list[str]], typer.Option(*flags("lora"), help="PATH[:WEIGHT], diffusers or kohya format; repeat to combine", rich_help_panel=ADAPTERS)] = None,
    lora_scale: Annotated[float, typer.Option(*flags("lora_scale"), help="multiplies every LoRA's weight", rich_help_panel=ADAPTERS)] = 1.0,
    lora_blocks: Annotated[Optional[str], typer.Option(*flags("lora_blocks"), help="load only these blocks of each --lora, comma-separated (e.g. up_blocks.0.attentions.1)", rich_help_panel=ADAPTERS)] = None,
    content_lora: Annotated[Optional[str], typer.Option(*flags("content_lora"), help=f"B-LoRA: PATH[:ALPHA], only its content block {BLORA_CONTENT_BLOCK}", rich_help_panel=ADAPTERS)] = None,
    style_lora: Annotated[Optional[str], typer.Option(*flags("style_lora"), help=f"B-LoRA: PATH[:ALPHA], only its style block {BLORA_STYLE_BLOCK}", rich_help_panel=ADAPTERS)] = None,
    embedding: Annotated[Optional[list[str]], typer.Option(*flags("embedding"), help="PATH[:TOKENS] with clip_l/clip_g rows; tokens default to <s0>,<s1>,...", rich_help_panel=ADAPTERS)] = None,
    batch_size: Annotated[int, typer.Option(*flags("batch_size", "-b"), help="images per forward pass", rich_help_panel=MEMORY)] = 1,
    cpu_offload: Annotated[bool, typer.Option(*flags("cpu_offload"), help="keep idle components in CPU memory (GPU only)", rich_help_panel=MEMORY)] = False,
    vae_tiling: Annotated[bool, typer.Option(*flags("vae_tiling"), help="decode the VAE in tiles (large images)", rich_help_panel=MEMORY)] = False,
    vae_slicing: Annotated[bool, typer.Option(*flags("vae_slicing"), help="decode the VAE one image at a time", rich_help_panel=MEMORY)] = False,
    compile_unet: Annotated[bool, typer.Option(*flags("compile", "--compile_unet"), help="torch.compile the UNet (slow first batch, faster after)", rich_help_panel=MEMORY)] = False,
    output_dir: Annotated[Path, typer.Option(*flags("output_dir", "-o"), help="where the PNGs go", rich_help_panel=OUTPUT)] = Path("outputs"),
) -> None:
    """Generate images with an SDXL-family model; each PNG carries its parameters (WebUI 'PNG Info')."""
    config = InferConfig(
        model=model,
        prompts=read_prompts(prompt, prompt_file),
        negative_prompt=negative_prompt,
        num_images=num_images,
        seeds=list(seed or []),
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        width=width,
        height=height,
        scheduler=check_scheduler_name(scheduler),
        eta=eta,
        loras=lora_specs(lora or [], lora_scale, lora_blocks, content_lora, style_lora),
        embeddings=[parse_embedding_spec(spec) for spec in embedding or []],
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        cpu_offload=cpu_offload,
        vae_tiling=vae_tiling,
        vae_slicing=vae_slicing,
        compile_unet=compile_unet,
        output_dir=output_dir,
    )
    validate(config)
    saved = run(config)
    typer.echo(f"saved {len(saved)} image(s) to {config.output_dir}/")


def run(config: InferConfig) -> list[Path]:
    """Load the model and adapters, then generate and save every image."""
    from common.generation import generate_images, next_free_index, plan_jobs, sampling_settings
    from common.models import load_sdxl_pipeline
    from common.schedulers import make_scheduler

    device, dtype = resolve_device_and_dtype(config)
    pipe = load_sdxl_pipeline(config.model, dtype)
    pipe.scheduler = make_scheduler(config.scheduler, pipe.scheduler)
    load_adapters(pipe, config)
    place(pipe, device, config)

    settings = sampling_settings(
        pipe, config.width, config.height, config.num_inference_steps, config.guidance_scale, config.eta, config.model,
        adapter_description(config),
    )
    config.output_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(
        config.prompts, config.negative_prompt, config.num_images, config.seeds, next_free_index(config.output_dir)
    )
    return generate_images(pipe, jobs, settings, config.output_dir, config.batch_size)


def read_prompts(prompt: str | None, prompt_file: Path | None) -> list[str]:
    if (prompt is None) == (prompt_file is None):
        raise UserError("give exactly one of --prompt TEXT or --prompt_file FILE")
    if prompt is not None:
        return [prompt]
    if not prompt_file.is_file():
        raise UserError(f"prompt file {str(prompt_file)!r} not found")
    prompts = [line.strip() for line in prompt_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {str(prompt_file)!r} has no prompts (expected one per line)")
    return prompts


def lora_specs(
    loras: list[str], lora_scale: float, lora_blocks: str | None, content_lora: str | None, style_lora: str | None
) -> list[LoraSpec]:
    """Every adapter to load, with its weight times --lora_scale and the blocks it may touch."""
    blocks = tuple(b for b in (lora_blocks or "").split(",") if b.strip()) or None
    specs = []
    for spec in loras:
        path, weight = parse_weighted_path(spec)
        specs.append(LoraSpec(path, weight * lora_scale, blocks))
    for spec, block, what in ((content_lora, BLORA_CONTENT_BLOCK, "content LoRA"), (style_lora, BLORA_STYLE_BLOCK, "style LoRA")):
        if spec:
            path, alpha = parse_weighted_path(spec, what)
            specs.append(LoraSpec(path, alpha * lora_scale, (block,)))
    return specs


def validate(config: InferConfig) -> None:
    """Every check on the options, before any model is loaded."""
    from common.generation import check_image_size

    check_image_size("width", config.width)
    check_image_size("height", config.height)
    for name, value in (("num_images", config.num_images), ("batch_size", config.batch_size), ("num_inference_steps", config.num_inference_steps)):
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if config.guidance_scale < 0:
        raise UserError(f"--guidance_scale must be >= 0, got {config.guidance_scale}")
    if config.dtype != "auto":
        parse_dtype(config.dtype)
    if any(not 0 <= s < 2**64 for s in config.seeds):
        raise UserError(f"seeds must be in [0, 2^64), got {config.seeds}")


def resolve_device_and_dtype(config: InferConfig):
    from common.models import device_and_dtype

    device, dtype = device_and_dtype(config.device, config.dtype)
    if config.cpu_offload and device.type != "cuda":
        raise UserError("--cpu_offload moves components between CPU and GPU memory and needs a CUDA GPU; drop it on the CPU")
    return device, dtype


def load_adapters(pipe, config: InferConfig) -> None:
    from common.lora_formats import load_loras
    from common.tokens import load_embedding

    for spec in config.embeddings:
        tokens = load_embedding(pipe, spec)
        typer.echo(f"embedding {spec.path.name}: write {''.join(tokens)} in the prompt")
    load_loras(pipe, config.loras)


def place(pipe, device, config: InferConfig) -> None:
    from common.models import speed_up_unet

    if config.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.unet = speed_up_unet(pipe.unet, device, config.compile_unet)
    if config.vae_tiling:
        pipe.vae.enable_tiling()
    if config.vae_slicing:
        pipe.vae.enable_slicing()


def adapter_description(config: InferConfig) -> dict[str, str]:
    described = {}
    if config.loras:
        described["Lora"] = ", ".join(
            f"{spec.path.name}:{spec.weight:g}" + (f" [{'+'.join(spec.blocks)}]" if spec.blocks else "") for spec in config.loras
        )
    if config.embeddings:
        described["Embeddings"] = ", ".join(spec.path.name for spec in config.embeddings)
    return described


if __name__ == "__main__":
    run_app(app)

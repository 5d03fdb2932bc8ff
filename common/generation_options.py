"""The generation options infer.py and mjhq_fid.py share, and loading a pipeline ready to sample with them.

The Typer option types below are used in both scripts' signatures, so a flag is spelled, documented
and validated once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from common.cli import UserError, flags
from common.lora_formats import BLORA_CONTENT_BLOCK, BLORA_STYLE_BLOCK, LoraSpec, parse_weighted_path
from common.models import parse_dtype
from common.schedulers import SCHEDULER_NAMES, check_scheduler_name
from common.tokens import EmbeddingSpec, parse_embedding_spec

MODEL, SAMPLING, ADAPTERS, MEMORY = "Model", "Sampling", "LoRA and embeddings", "Memory"

ModelOption = Annotated[str, typer.Option(*flags("pretrained_model_name_or_path", "--model", "-m"), help="tiny-sdxl, tiny-edm, a diffusers pipeline folder, or a hub id", rich_help_panel=MODEL)]
DtypeOption = Annotated[str, typer.Option(*flags("dtype"), help="auto (bf16 on a GPU, fp32 on the CPU), fp32, fp16 or bf16", rich_help_panel=MODEL)]
DeviceOption = Annotated[str, typer.Option(*flags("device"), help="auto (cuda if present, else cpu), cpu, cuda, cuda:N", rich_help_panel=MODEL)]
NegativePromptOption = Annotated[Optional[str], typer.Option(*flags("negative_prompt"), help="what to steer away from", rich_help_panel=SAMPLING)]
StepsOption = Annotated[int, typer.Option(*flags("num_inference_steps"), help="sampling steps", rich_help_panel=SAMPLING)]
GuidanceOption = Annotated[float, typer.Option(*flags("guidance_scale"), help="classifier-free guidance scale (1 disables it)", rich_help_panel=SAMPLING)]
WidthOption = Annotated[Optional[int], typer.Option(*flags("width"), help="image width, a multiple of 8 (default: the model's, 1024 for SDXL)", rich_help_panel=SAMPLING)]
HeightOption = Annotated[Optional[int], typer.Option(*flags("height"), help="image height, a multiple of 8 (default: the model's)", rich_help_panel=SAMPLING)]
SchedulerOption = Annotated[str, typer.Option(*flags("scheduler"), help=f"{', '.join(SCHEDULER_NAMES)}", rich_help_panel=SAMPLING)]
EtaOption = Annotated[Optional[float], typer.Option(*flags("eta"), help="stochasticity of DDIM-like steps; TCD's gamma (default 0.3 for tcd, else 0)", rich_help_panel=SAMPLING)]
LoraOption = Annotated[Optional[list[str]], typer.Option(*flags("lora"), help="PATH[:WEIGHT], diffusers or kohya format; repeat to combine", rich_help_panel=ADAPTERS)]
LoraScaleOption = Annotated[float, typer.Option(*flags("lora_scale"), help="multiplies every LoRA's weight", rich_help_panel=ADAPTERS)]
LoraBlocksOption = Annotated[Optional[str], typer.Option(*flags("lora_blocks"), help="load only these blocks of each --lora, comma-separated (e.g. up_blocks.0.attentions.1)", rich_help_panel=ADAPTERS)]
ContentLoraOption = Annotated[Optional[str], typer.Option(*flags("content_lora"), help=f"B-LoRA: PATH[:ALPHA], only its content block {BLORA_CONTENT_BLOCK}", rich_help_panel=ADAPTERS)]
StyleLoraOption = Annotated[Optional[str], typer.Option(*flags("style_lora"), help=f"B-LoRA: PATH[:ALPHA], only its style block {BLORA_STYLE_BLOCK}", rich_help_panel=ADAPTERS)]
EmbeddingOption = Annotated[Optional[list[str]], typer.Option(*flags("embedding"), help="PATH[:TOKENS] with clip_l/clip_g rows; tokens default to <s0>,<s1>,...", rich_help_panel=ADAPTERS)]
BatchSizeOption = Annotated[int, typer.Option(*flags("batch_size", "-b"), help="images per forward pass", rich_help_panel=MEMORY)]
CpuOffloadOption = Annotated[bool, typer.Option(*flags("cpu_offload"), help="keep idle components in CPU memory (GPU only)", rich_help_panel=MEMORY)]
VaeTilingOption = Annotated[bool, typer.Option(*flags("vae_tiling"), help="decode the VAE in tiles (large images)", rich_help_panel=MEMORY)]
VaeSlicingOption = Annotated[bool, typer.Option(*flags("vae_slicing"), help="decode the VAE one image at a time", rich_help_panel=MEMORY)]
CompileOption = Annotated[bool, typer.Option(*flags("compile", "--compile_unet"), help="torch.compile the UNet (slow first batch, faster after)", rich_help_panel=MEMORY)]


@dataclass(frozen=True)
class PipelineConfig:
    """How to build and run the pipeline: the model, its adapters, the sampler and the memory options."""

    model: str
    negative_prompt: str | None
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


def pipeline_config(
    model: str, negative_prompt: str | None, num_inference_steps: int, guidance_scale: float, width: int | None,
    height: int | None, scheduler: str, eta: float | None, lora: list[str] | None, lora_scale: float,
    lora_blocks: str | None, content_lora: str | None, style_lora: str | None, embedding: list[str] | None,
    dtype: str, device: str, batch_size: int, cpu_offload: bool, vae_tiling: bool, vae_slicing: bool, compile_unet: bool,
) -> PipelineConfig:
    """The parsed and checked options, before any model is loaded."""
    from common.generation import check_image_size

    check_image_size("width", width)
    check_image_size("height", height)
    for name, value in (("batch_size", batch_size), ("num_inference_steps", num_inference_steps)):
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if guidance_scale < 0:
        raise UserError(f"--guidance_scale must be >= 0, got {guidance_scale}")
    if dtype != "auto":
        parse_dtype(dtype)
    return PipelineConfig(
        model=model,
        negative_prompt=negative_prompt,
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
    )


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


def prepare_pipeline(config: PipelineConfig, device_name: str | None = None):
    """Load the model with its scheduler and adapters on its device; (pipeline, sampling settings).
    `device_name` overrides config.device (a distributed launch gives each process its own)."""
    from common.generation import sampling_settings
    from common.models import load_sdxl_pipeline
    from common.schedulers import make_scheduler

    device, dtype = resolve_device_and_dtype(config, device_name)
    pipe = load_sdxl_pipeline(config.model, dtype)
    pipe.scheduler = make_scheduler(config.scheduler, pipe.scheduler)
    load_adapters(pipe, config)
    place(pipe, device, config)
    settings = sampling_settings(
        pipe, config.width, config.height, config.num_inference_steps, config.guidance_scale, config.eta, config.model,
        adapter_description(config),
    )
    return pipe, settings


def resolve_device_and_dtype(config: PipelineConfig, device_name: str | None = None):
    from common.models import device_and_dtype

    device, dtype = device_and_dtype(device_name or config.device, config.dtype)
    if config.cpu_offload and device.type != "cuda":
        raise UserError("--cpu_offload moves components between CPU and GPU memory and needs a CUDA GPU; drop it on the CPU")
    return device, dtype


def load_adapters(pipe, config: PipelineConfig) -> None:
    from common.lora_formats import load_loras
    from common.tokens import load_embedding

    for spec in config.embeddings:
        tokens = load_embedding(pipe, spec)
        typer.echo(f"embedding {spec.path.name}: write {''.join(tokens)} in the prompt")
    load_loras(pipe, config.loras)


def place(pipe, device, config: PipelineConfig) -> None:
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


def adapter_description(config: PipelineConfig) -> dict[str, str]:
    """The adapters as WebUI's PNG Info shows them (`Lora: name:weight, ...`)."""
    described = {}
    if config.loras:
        described["Lora"] = ", ".join(
            f"{spec.path.name}:{spec.weight:g}" + (f" [{'+'.join(spec.blocks)}]" if spec.blocks else "") for spec in config.loras
        )
    if config.embeddings:
        described["Embeddings"] = ", ".join(spec.path.name for spec in config.embeddings)
    return described


def describe_model(config: PipelineConfig) -> str:
    """A short label for reports: the model's name and its adapters."""
    adapters = adapter_description(config)
    parts = [Path(config.model).name or config.model] + [f"{key}: {value}" for key, value in adapters.items()]
    return " + ".join(parts)

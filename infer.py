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
from common.generation_options import (
    BatchSizeOption, CompileOption, ContentLoraOption, CpuOffloadOption, DeviceOption, DtypeOption, EmbeddingOption,
    EtaOption, GuidanceOption, HeightOption, LoraBlocksOption, LoraOption, LoraScaleOption, ModelOption,
    NegativePromptOption, PipelineConfig, SchedulerOption, StepsOption, StyleLoraOption, VaeSlicingOption,
    VaeTilingOption, WidthOption, pipeline_config,
)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")

PROMPT, OUTPUT = "Prompt", "Output"


@dataclass(frozen=True)
class InferConfig:
    pipeline: PipelineConfig
    prompts: list[str]
    num_images: int
    seeds: list[int]
    output_dir: Path


@app.command()
def main(
    model: ModelOption,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    prompt: Annotated[Optional[str], typer.Option(*flags("prompt", "-p"), help="the prompt", rich_help_panel=PROMPT)] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(*flags("prompt_file"), help="a text file of prompts, one per line", rich_help_panel=PROMPT)] = None,
    negative_prompt: NegativePromptOption = None,
    num_images: Annotated[int, typer.Option(*flags("num_images", "-n"), help="images per prompt", rich_help_panel=PROMPT)] = 1,
    seed: Annotated[Optional[list[int]], typer.Option(*flags("seed", "-s"), help="one seed (image k gets seed+k) or one per image; random if omitted", rich_help_panel=PROMPT)] = None,
    num_inference_steps: StepsOption = 30,
    guidance_scale: GuidanceOption = 5.0,
    width: WidthOption = None,
    height: HeightOption = None,
    scheduler: SchedulerOption = "default",
    eta: EtaOption = None,
    lora: LoraOption = None,
    lora_scale: LoraScaleOption = 1.0,
    lora_blocks: LoraBlocksOption = None,
    content_lora: ContentLoraOption = None,
    style_lora: StyleLoraOption = None,
    embedding: EmbeddingOption = None,
    batch_size: BatchSizeOption = 1,
    cpu_offload: CpuOffloadOption = False,
    vae_tiling: VaeTilingOption = False,
    vae_slicing: VaeSlicingOption = False,
    compile_unet: CompileOption = False,
    output_dir: Annotated[Path, typer.Option(*flags("output_dir", "-o"), help="where the PNGs go", rich_help_panel=OUTPUT)] = Path("outputs"),
) -> None:
    """Generate images with an SDXL-family model; each PNG carries its parameters (WebUI 'PNG Info')."""
    config = InferConfig(
        pipeline=pipeline_config(
            model, negative_prompt, num_inference_steps, guidance_scale, width, height, scheduler, eta, lora, lora_scale,
            lora_blocks, content_lora, style_lora, embedding, dtype, device, batch_size, cpu_offload, vae_tiling,
            vae_slicing, compile_unet,
        ),
        prompts=read_prompts(prompt, prompt_file),
        num_images=num_images,
        seeds=list(seed or []),
        output_dir=output_dir,
    )
    validate(config)
    saved = run(config)
    typer.echo(f"saved {len(saved)} image(s) to {config.output_dir}/")


def run(config: InferConfig) -> list[Path]:
    """Load the model and adapters, then generate and save every image."""
    from common.generation import generate_images, next_free_index, plan_jobs
    from common.generation_options import prepare_pipeline

    pipe, settings = prepare_pipeline(config.pipeline)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(
        config.prompts, config.pipeline.negative_prompt, config.num_images, config.seeds, next_free_index(config.output_dir)
    )
    return generate_images(pipe, jobs, settings, config.output_dir, config.pipeline.batch_size)


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


def validate(config: InferConfig) -> None:
    """The checks on infer.py's own options (the pipeline's are made by pipeline_config)."""
    if config.num_images < 1:
        raise UserError(f"--num_images must be at least 1, got {config.num_images}")
    if any(not 0 <= s < 2**64 for s in config.seeds):
        raise UserError(f"seeds must be in [0, 2^64), got {config.seeds}")


if __name__ == "__main__":
    run_app(app)

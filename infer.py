#!/usr/bin/env python
"""Text-to-image with an SDXL-family model (SDXL, Playground v2.5, their fine-tunes), LoRAs and embeddings.

    python infer.py --model tiny-sdxl --prompt "a photo of a dog" --num_images 4 --seed 1
    python infer.py --model stabilityai/stable-diffusion-xl-base-1.0 --lora out/my_lora:0.9 \\
        --embedding out/my_lora/my_lora_emb.safetensors --prompt "a photo of <s0><s1> dog"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from common.cli import UserError, config_from_options, option, options_command, run_app
from common.files import writable_folder
from common.generation_options import GenerationOptions, check_generation_prompts, read_generation_model

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")

PROMPT, OUTPUT = "Prompt", "Output"


@dataclass(frozen=True)
class InferOptions:
    """infer.py's own options, beside the generation options it shares."""

    prompt: Optional[str] = option(None, "-p", panel=PROMPT, help="the prompt")
    prompt_file: Optional[Path] = option(None, panel=PROMPT, help="a text file of prompts, one per line, or the parameters of "
                                         "an image (WebUI's PNG Info text, ours): its prompt, negative prompt, prompt syntax, "
                                         "emphasis and clip skip where the command line does not give them")
    num_images: int = option(1, "-n", panel=PROMPT, help="images per prompt")
    seed: Optional[list[int]] = option(None, "-s", panel=PROMPT,
                                       help="one seed (image k gets seed+k) or one per image; random if omitted")
    output_dir: Path = option(Path("outputs"), "-o", panel=OUTPUT, help="where the PNGs go")


@dataclass(frozen=True)
class InferConfig:
    generation: GenerationOptions
    prompts: list[str]
    num_images: int
    seeds: list[int]
    output_dir: Path


@options_command(app, GenerationOptions, InferOptions)
def main(**options) -> None:
    """Generate images with an SDXL-family model; each PNG carries its parameters (WebUI 'PNG Info')."""
    own = config_from_options(InferOptions, options)
    prompts, generation = read_prompts(own.prompt, own.prompt_file, config_from_options(GenerationOptions, options))
    config = InferConfig(
        generation=generation,
        prompts=prompts,
        num_images=own.num_images,
        seeds=list(own.seed or []),
        output_dir=own.output_dir,
    )
    validate(config)
    reading = read_generation_model(config.generation)
    writable_folder(config.output_dir, "--output_dir")
    saved = run(config, reading)
    typer.echo(f"saved {len(saved)} image(s) to {config.output_dir}/")


def run(config: InferConfig, reading=None) -> list[Path]:
    """Load the model and adapters, then generate and save every image."""
    from common.generation import generate_images, next_free_index, plan_jobs
    from common.generation_options import prepare_pipeline

    pipe, settings = prepare_pipeline(config.generation, None, reading)
    jobs = plan_jobs(config.prompts, negative_prompt=config.generation.negative_prompt, num_images=config.num_images,
                     seeds=config.seeds, first_index=next_free_index(config.output_dir))
    return generate_images(pipe, jobs, settings, output_dir=config.output_dir, batch_size=config.generation.batch_size)


def read_prompts(prompt: str | None, prompt_file: Path | None, generation: GenerationOptions) -> tuple[list[str], GenerationOptions]:
    """The prompts: --prompt, or --prompt_file's lines, or, for a file holding an image's WebUI parameters, its prompt
    with its negative prompt and the options that say how it was read (Prompt syntax, Emphasis, Clip skip: WebUI's
    numbering), each where the command line gives none."""
    import dataclasses

    from common.files import read_text_file
    from common.generation import read_parameters

    if (prompt is None) == (prompt_file is None):
        raise UserError("give exactly one of --prompt TEXT or --prompt_file FILE")
    if prompt is not None:
        return [prompt], generation
    if not prompt_file.is_file():
        raise UserError(f"prompt file {str(prompt_file)!r} not found")
    text = read_text_file(prompt_file, "--prompt_file")
    parameters = read_parameters(text)
    if parameters is not None:
        prompt, negative, fields = parameters
        syntax, emphasis, clip_skip = read_parameter_options(fields, prompt_file)
        return [prompt], dataclasses.replace(
            generation,
            negative_prompt=generation.negative_prompt if generation.negative_prompt is not None else negative,
            prompt_syntax=generation.prompt_syntax or syntax,
            emphasis=generation.emphasis or (emphasis if (generation.prompt_syntax or syntax) == "webui" else None),
            clip_skip=generation.clip_skip if generation.clip_skip is not None else clip_skip,
        )
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {str(prompt_file)!r} has no prompts (expected one per line)")
    return prompts, generation


def read_parameter_options(fields: dict[str, str], prompt_file: Path) -> tuple[str | None, str | None, int | None]:
    """--prompt_syntax, --emphasis and --clip_skip (diffusers' numbering) from an image's WebUI parameters, each None
    where the file says nothing; a value this toolkit cannot reproduce is refused naming the file and the field."""
    from common.generation import EMPHASIS_NAMES
    from common.prompt_syntax import SYNTAXES

    def refuse(field: str, accepted: str):
        raise UserError(f"prompt file {str(prompt_file)!r}: '{field}: {fields[field]}' cannot be reproduced here; accepted: {accepted}")

    syntax = fields.get("Prompt syntax")
    if syntax is not None and syntax not in SYNTAXES:
        refuse("Prompt syntax", ", ".join(SYNTAXES))
    emphasis = fields.get("Emphasis")
    if emphasis is not None and emphasis not in EMPHASIS_NAMES:
        refuse("Emphasis", " or ".join(EMPHASIS_NAMES) + " (WebUI's None and Ignore modes are not reproduced)")
    clip_skip = fields.get("Clip skip")
    if clip_skip is not None and not (clip_skip.isdigit() and int(clip_skip) >= 1):
        refuse("Clip skip", "a whole number from 1 (WebUI's numbering: 1 and 2 are the penultimate layer on SDXL)")
    return (syntax, EMPHASIS_NAMES.get(emphasis), int(clip_skip) - 2 if clip_skip and int(clip_skip) > 2 else None)


def validate(config: InferConfig) -> None:
    """The checks on infer.py's own options (the generation options check themselves)."""
    if config.num_images < 1:
        raise UserError(f"--num_images must be at least 1, got {config.num_images}")
    if any(not 0 <= s < 2**64 for s in config.seeds):
        raise UserError(f"seeds must be in [0, 2^64), got {config.seeds}")
    check_generation_prompts(config.generation, config.prompts)


if __name__ == "__main__":
    run_app(app)

"""Batched text-to-image generation with one seed per image, saved as PNGs with WebUI-style parameters."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.cli import UserError
from common.files import atomic_path


@dataclass(frozen=True)
class ImageJob:
    """One image to make: everything that varies per image, so it can be reproduced alone."""

    index: int
    prompt: str
    negative_prompt: str | None
    seed: int


@dataclass(frozen=True)
class SamplingSettings:
    """What every image of a run shares; written into each PNG beside the image's own job."""

    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler_name: str
    webui_sampler: str
    webui_schedule: str = ""
    eta: float = 0.0
    model: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # LoRAs, embeddings: shown as given


def plan_jobs(
    prompts: list[str], negative_prompt: str | None, num_images: int, seeds: list[int], first_index: int = 0
) -> list[ImageJob]:
    """`num_images` images per prompt; image k of the run gets seeds[k], or seeds[0] + k for one seed.

    With no seed a random one is drawn (and written into each PNG), as WebUI does.
    """
    total = len(prompts) * num_images
    if not seeds:
        seeds = [random.randrange(2**32)]
    if len(seeds) == 1:
        per_image = [(seeds[0] + k) % 2**64 for k in range(total)]
    elif len(seeds) == total:
        per_image = list(seeds)
    else:
        raise UserError(f"got {len(seeds)} seeds for {total} images; give one seed (then +1 per image) or exactly {total}")
    prompt_per_image = [prompt for prompt in prompts for _ in range(num_images)]
    return [
        ImageJob(first_index + k, prompt, negative_prompt, seed)
        for k, (prompt, seed) in enumerate(zip(prompt_per_image, per_image))
    ]


def webui_parameters(job: ImageJob, settings: SamplingSettings) -> str:
    """The PNG `parameters` text in Stable Diffusion WebUI's layout, which WebUI's 'PNG Info' reads back."""
    fields = {
        "Steps": settings.num_inference_steps,
        "Sampler": settings.webui_sampler,
        "Schedule type": settings.webui_schedule,
        "CFG scale": settings.guidance_scale,
        "Seed": job.seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model": settings.model,
        "Scheduler": settings.scheduler_name,
        "Eta": settings.eta if settings.eta else "",
        **settings.extra,
    }
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value != "")
    negative = f"\nNegative prompt: {job.negative_prompt}" if job.negative_prompt else ""
    return f"{job.prompt}{negative}\n{line}"


def _quote(value) -> str:
    """WebUI quotes a value that contains its separators, in JSON string syntax."""
    text = str(value)
    return json.dumps(text) if re.search(r'[,:"]', text) else text


def next_free_index(output_dir: Path) -> int:
    """The index after the highest `NNNNN-SEED.png` already in the folder, so runs never overwrite."""
    indices = [int(m.group(1)) for p in output_dir.glob("*.png") if (m := re.match(r"(\d+)-", p.name))]
    return max(indices, default=-1) + 1


def image_path(output_dir: Path, job: ImageJob) -> Path:
    return output_dir / f"{job.index:05d}-{job.seed}.png"


def save_png(image, path: Path, parameters: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(path) as partial:
        image.save(partial, format="PNG", pnginfo=info)


def generate_images(pipe, jobs: list[ImageJob], settings: SamplingSettings, output_dir: Path, batch_size: int) -> list[Path]:
    """Run the pipeline over `jobs` in batches and save each image as soon as its batch is done."""
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    saved = []
    with tqdm(total=len(jobs), unit="img", desc="generating") as progress:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            images = run_batch(pipe, batch, settings)
            for job, image in zip(batch, images):
                path = image_path(output_dir, job)
                save_png(image, path, webui_parameters(job, settings))
                saved.append(path)
            progress.update(len(batch))
    return saved


def run_batch(pipe, batch: list[ImageJob], settings: SamplingSettings):
    """Images for one batch; each image's noise comes from its own CPU generator seeded with its seed,
    so an image does not depend on its batch, its position or the device."""
    negative = [job.negative_prompt or "" for job in batch] if any(job.negative_prompt for job in batch) else None
    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in batch]
    with torch.inference_mode():
        return pipe(
            prompt=[job.prompt for job in batch],
            negative_prompt=negative,
            width=settings.width,
            height=settings.height,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            eta=settings.eta,
            generator=generators,
        ).images

"""Batched text-to-image generation with one seed per image, saved as PNGs with WebUI-style parameters."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from common.cli import UserError
from common.files import IMAGE_SUFFIXES, PARTIAL_SUFFIX, atomic_path
from common.long_prompts import CLIP_WINDOW


# The smallest image side the scripts sample or train at: 2x2 latents. At 1x1 a group norm of the UNet or VAE can see one
# value per group (the tiny models' do) and fails; SDXL's own smallest sensible size is far larger.
MIN_IMAGE_SIDE = 16


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
    guidance_rescale: float = 0.0  # Lin et al. 2024, Sec. 3.4
    model: str = ""
    max_token_length: int = CLIP_WINDOW  # longer prompts cut there; a multiple of it: encoded in chunks
    adapters: dict[str, str] = field(default_factory=dict)  # LoRAs, embeddings: shown as given
    prompt_syntax: str = "plain"  # common.prompt_syntax: plain, webui, comfyui
    emphasis: str = "original"  # WebUI's emphasis mode, with prompt_syntax webui
    clip_skip: int | None = None  # diffusers' numbering
    embedding_names: dict[str, str] = field(default_factory=dict)  # each name of a loaded embedding -> its tokens


def plan_jobs(
    prompts: list[str], *, negative_prompt: str | None, num_images: int, seeds: list[int], first_index: int = 0
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


# WebUI's infotext names of our --emphasis values, and back
EMPHASIS_NAMES = {"Original": "original", "No norm": "no_norm"}
EMPHASIS_LABELS = {value: name for name, value in EMPHASIS_NAMES.items()}


def webui_parameters(job: ImageJob, settings: SamplingSettings) -> str:
    """The PNG `parameters` text in Stable Diffusion WebUI's layout, which WebUI's 'PNG Info' reads back."""
    fields = {
        "Steps": settings.num_inference_steps,
        "Sampler": settings.webui_sampler,
        "Schedule type": settings.webui_schedule,
        "CFG scale": settings.guidance_scale,
        # the "CFG Rescale" extension's field (Seshelle/CFG_Rescale_webui scripts/CFGRescale.py; A1111 has none of its
        # own), written as that extension writes it: only when above 0
        "CFG Rescale": settings.guidance_rescale if settings.guidance_rescale else "",
        "Seed": job.seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model": settings.model,
        "Scheduler": settings.scheduler_name,
        "Eta": settings.eta if settings.eta else "",
        # beside WebUI's other text-encoding fields (Clip skip, Emphasis, Pad conds), and only where it departs from
        # the default, so that a resumed run can tell images encoded otherwise
        "Max token length": settings.max_token_length if settings.max_token_length != CLIP_WINDOW else "",
        # WebUI's numbering (its SDXL default 2 is diffusers' None), written, as WebUI writes it, only when set
        "Clip skip": settings.clip_skip + 2 if settings.clip_skip is not None else "",
        "Prompt syntax": settings.prompt_syntax if settings.prompt_syntax != "plain" else "",
        # WebUI writes its emphasis mode where it is not the default
        "Emphasis": EMPHASIS_LABELS[settings.emphasis] if settings.prompt_syntax == "webui" and settings.emphasis != "original" else "",
        **settings.adapters,
    }
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value != "")
    negative = f"\nNegative prompt: {job.negative_prompt}" if job.negative_prompt else ""
    return f"{job.prompt}{negative}\n{line}"


# a `Key: value` field of WebUI's parameters line, the value plain or a JSON string (WebUI's own pattern's shape)
_PARAMETER_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def read_parameters(text: str) -> tuple[str, str | None, dict[str, str]] | None:
    """(prompt, negative prompt, fields) of a WebUI `parameters` text (what `webui_parameters` writes and WebUI's PNG
    Info shows: the prompt, an optional "Negative prompt:" part, and a last line of `Key: value` fields holding
    "Steps"); None for text that is not one."""
    lines = text.strip().splitlines()
    if len(lines) < 2 or not lines[-1].lstrip().startswith("Steps: "):
        return None
    fields = {key.strip(): json.loads(value) if value.startswith('"') else value.strip()
              for key, value in _PARAMETER_FIELD.findall(lines[-1])}
    body = lines[:-1]
    negative_at = next((i for i, line in enumerate(body) if line.startswith("Negative prompt: ")), None)
    if negative_at is None:
        return "\n".join(body), None, fields
    negative = "\n".join(body[negative_at:]).removeprefix("Negative prompt: ")
    return "\n".join(body[:negative_at]), negative, fields


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
    with atomic_path(path) as partial:
        _write_png(image, partial, parameters)


def _write_png(image, path: Path, parameters: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, format="PNG", pnginfo=info)


def save_numbered_png(image, output_dir: Path, job: ImageJob, parameters: str) -> Path:
    """Save as `NNNNN-SEED.png` under the first number from the job's on that is free when the image is done
    (the folder is read again for each image), claimed atomically: runs saving into one folder at once
    keep all their images."""
    import dataclasses
    import os

    from common.files import claim_free_name, make_readable

    output_dir.mkdir(parents=True, exist_ok=True)
    finished = output_dir / f".{job.index:05d}-{job.seed}.{os.getpid()}{PARTIAL_SUFFIX}"
    try:
        _write_png(image, finished, parameters)
        make_readable(finished)
        return claim_free_name(finished, lambda number: image_path(output_dir, dataclasses.replace(job, index=number)),
                               max(job.index, next_free_index(output_dir)))
    finally:
        finished.unlink(missing_ok=True)


def generate_images(
    pipe, jobs: list[ImageJob], settings: SamplingSettings, *, output_dir: Path, batch_size: int, path_for=None,
    batches: list[list[ImageJob]] | None = None, show_progress: bool = True,
) -> list[Path]:
    """Run the pipeline over `jobs` in batches (or the given `batches`) and save each image as soon as
    its batch is done, at `path_for(output_dir, job)`, or numbered after the images already there."""
    from tqdm.auto import tqdm

    from common.tokens import warn_about_long_prompts

    pipe.set_progress_bar_config(disable=True)
    if batches is None:
        batches = [jobs[start : start + batch_size] for start in range(0, len(jobs), batch_size)]
    texts = [text for batch in batches for job in batch for text in (job.prompt, job.negative_prompt) if text]
    warn_about_long_prompts(pipe.tokenizer, texts, max_tokens=settings.max_token_length)
    saved = []
    with tqdm(total=sum(map(len, batches)), unit="img", desc="generating", disable=not show_progress) as progress:
        for batch in batches:
            images = run_batch(pipe, batch, settings)
            for job, image in zip(batch, images):
                if path_for is None:
                    saved.append(save_numbered_png(image, output_dir, job, webui_parameters(job, settings)))
                else:
                    saved.append(path_for(output_dir, job))
                    save_png(image, saved[-1], webui_parameters(job, settings))
            progress.update(len(batch))
    return saved


def run_batch(pipe, batch: list[ImageJob], settings: SamplingSettings):
    """Images for one batch; each image's noise comes from its own CPU generator seeded with its seed,
    so an image does not depend on its batch, its position or the device. Prompts are cut at CLIP's 75
    tokens by the pipeline itself, or encoded here in chunks up to settings.max_token_length. An image that decodes
    to non-finite values (a diverged LoRA, an overflowing weight) stops the run naming its prompt and seed: saved, it
    would be a black PNG."""
    import numpy as np
    import torch

    from common.long_prompts import pipeline_prompt_embeds
    from common.models import quiet_libraries

    prompts = [job.prompt for job in batch]
    negative = [job.negative_prompt or "" for job in batch] if any(job.negative_prompt for job in batch) else None
    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in batch]
    with torch.inference_mode(), quiet_libraries():  # diffusers' own truncation note would repeat ours every batch
        if settings.max_token_length == CLIP_WINDOW and settings.prompt_syntax == "plain":
            text = {"prompt": prompts, "negative_prompt": negative, "clip_skip": settings.clip_skip}
        else:
            text = pipeline_prompt_embeds(pipe, prompts, negative, max_token_length=settings.max_token_length,
                                          syntax=settings.prompt_syntax, emphasis=settings.emphasis,
                                          clip_skip=settings.clip_skip, embeddings=settings.embedding_names)
        arrays = pipe(
            **text,
            width=settings.width,
            height=settings.height,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            guidance_rescale=settings.guidance_rescale,
            eta=settings.eta,
            generator=generators,
            output_type="np",  # the same 8-bit images as "pil" (numpy_to_pil below), after the check
        ).images
    for job, array in zip(batch, arrays):
        if not np.isfinite(array).all():
            adapters = f" (with {settings.adapters['Lora']})" if settings.adapters.get("Lora") else ""
            raise UserError(f"the image of prompt {job.prompt[:80]!r}, seed {job.seed}, came out non-finite (NaN or inf): the "
                            f"model{adapters} overflowed; a LoRA weight too large, a LoRA holding non-finite values or an fp16 "
                            "overflow (try --dtype bf16 or fp32) are the usual causes; nothing was saved for it")
    return pipe.image_processor.numpy_to_pil(arrays)


# ---------------------------------------------------------------- class images for prior preservation

CLASS_IMAGE = re.compile(r"^class_(\d{6})\.png$")


def class_image_path(folder: Path, job: ImageJob) -> Path:
    return folder / f"class_{job.index:06d}.png"


def is_readable_image(path: Path) -> bool:
    """The whole file decodes (a PNG cut short by an interrupted run does not)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return False


def missing_class_indices(folder: Path, wanted: int) -> list[int]:
    """Indices of the class images still to make so that `folder` holds `wanted` readable images.

    Photos of the user's own count; our `class_NNNNNN.png` files are numbered, so a re-run with a
    larger count adds new numbers and a broken file of ours is made again under its own number.
    """
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES] if folder.is_dir() else []
    ours = {int(m.group(1)): p for p in files if (m := CLASS_IMAGE.match(p.name))}
    readable_ours = {i for i, p in ours.items() if is_readable_image(p)}
    readable_others = sum(1 for p in files if not CLASS_IMAGE.match(p.name) and is_readable_image(p))
    needed = wanted - readable_others - len(readable_ours)
    missing, index = [], 0
    while len(missing) < needed:
        if index not in readable_ours:
            missing.append(index)
        index += 1
    return missing


def class_image_batches(folder: Path, *, wanted: int, prompt: str, negative_prompt: str | None, seed: int, batch_size: int,
                        process_index: int = 0, num_processes: int = 1) -> list[list[ImageJob]]:
    """This process's share of the class images still missing. Image i always gets seed + i, and
    batches are dealt out whole, so every image is made once and identically whatever the number
    of processes. Every process must list the folder before any of them writes to it."""
    jobs = [ImageJob(i, prompt, negative_prompt, seed + i) for i in missing_class_indices(folder, wanted)]
    return deal_batches(jobs, batch_size, process_index, num_processes)


def deal_batches(jobs: list[ImageJob], batch_size: int, process_index: int = 0, num_processes: int = 1) -> list[list[ImageJob]]:
    """This process's share of `jobs`: batches are cut from the one list every process holds and dealt
    out whole, so each image is made once, in the same batch, whatever the number of processes (a
    batch's numerics can depend on its size, so splitting a batch could change the pixels)."""
    batches = [jobs[start : start + batch_size] for start in range(0, len(jobs), batch_size)]
    return batches[process_index::num_processes]


def make_class_images(pipe, batches: list[list[ImageJob]], settings: SamplingSettings, folder: Path, show_progress: bool = True) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return len(generate_images(pipe, [], settings, output_dir=folder, batch_size=1, path_for=class_image_path, batches=batches, show_progress=show_progress))


def fill_class_folder(state, folder: Path, *, wanted: int, prompt: str, negative_prompt: str | None, seed: int, batch_size: int,
                      make: Callable[[list[list[ImageJob]]], int]) -> int:
    """Fill `folder` up to `wanted` class images in every process of a run (`state`: accelerate's PartialState or
    Accelerator): the main process removes what killed runs left half-written, every process lists what is
    missing before any of them writes, then `make(batches)` makes this process's share (loading a model only
    where there is something to make) and all wait for the last. Returns how many this process made."""
    from common.files import remove_leftover_partials

    if state.is_main_process:
        remove_leftover_partials(folder)  # of a killed run; their images are made again
    state.wait_for_everyone()
    batches = class_image_batches(folder, wanted=wanted, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                                  batch_size=batch_size, process_index=state.process_index, num_processes=state.num_processes)
    state.wait_for_everyone()  # nobody writes before everybody has listed the folder
    made = make(batches) if batches else 0
    state.wait_for_everyone()
    return made

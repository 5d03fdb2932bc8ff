"""Sample galleries during training: prompts with their own settings (kohya's --sample_prompts lines), checked before
anything loads, sampled when due (`Sampling`, with the EMA weights under --use_ema), and one grid image per sampling
step, rows the prompts and columns their seeds.

`config` is train_lora.py's TrainConfig (common/ never imports a script).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from common.cli import UserError
from common.generation import MIN_IMAGE_SIDE
from common.lora_outputs import ema_weights

logger = logging.getLogger(__name__)

# kohya's prompt-line options (sd-scripts library/train_util.py `line_to_prompt_dict`) that mean the same here:
# letter -> (SamplePrompt field, type, what it is)
PROMPT_LINE_OPTIONS = {"n": ("negative_prompt", str, "negative prompt"), "w": ("width", int, "width"),
                       "h": ("height", int, "height"), "d": ("seed", int, "seed"), "l": ("guidance_scale", float, "CFG scale"),
                       "s": ("steps", int, "steps")}


@dataclass(frozen=True)
class SamplePrompt:
    """A sample prompt and what it overrides of the run's sampling settings (None: the run's)."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    steps: int | None = None


def parse_prompt_line(line: str, where: str) -> SamplePrompt:
    """A kohya sample-prompt line: the prompt, then options ` --n NEGATIVE`, `--w`, `--h`, `--d SEED`, `--l CFG`,
    `--s STEPS` (kohya's `line_to_prompt_dict`: the text is split at " --", each part's first letter(s) name it).
    Another option is refused in one line naming it and the accepted ones."""
    prompt, *parts = line.split(" --")
    values: dict = {"prompt": prompt.strip()}
    for part in parts:
        name, _, value = part.strip().partition(" ")
        if name not in PROMPT_LINE_OPTIONS:
            accepted = ", ".join(f"--{k} ({meaning})" for k, (_, _, meaning) in PROMPT_LINE_OPTIONS.items())
            raise UserError(f"{where}: option --{name} is not one of {accepted}")
        field, kind, _ = PROMPT_LINE_OPTIONS[name]
        try:
            values[field] = kind(value.strip())
        except ValueError:
            raise UserError(f"{where}: --{name} {value.strip()!r} is not a {kind.__name__}") from None
    if not values["prompt"]:
        raise UserError(f"{where}: no prompt before the options")
    for side in ("width", "height"):
        if values.get(side) is not None and (values[side] < MIN_IMAGE_SIDE or values[side] % 8):
            raise UserError(f"{where}: --{side[0]} {values[side]} must be a multiple of 8 of at least {MIN_IMAGE_SIDE} (the UNet's "
                            "smallest latent is 2x2)")
    if values.get("steps") is not None and values["steps"] < 1:
        raise UserError(f"{where}: --s {values['steps']} must be at least 1 (the sampling steps; leave --s out for 25)")
    if values.get("guidance_scale") is not None and values["guidance_scale"] < 0:
        raise UserError(f"{where}: --l {values['guidance_scale']:g} must be >= 0 (the CFG scale)")
    return SamplePrompt(**values)


def read_prompt_file(path: Path) -> list[SamplePrompt]:
    """kohya's --sample_prompts text file: one prompt line per line; blank lines and lines starting with # are skipped."""
    from common.files import read_text_file

    if not path.is_file():
        raise UserError(f"--sample_prompts {str(path)!r} is not a file")
    prompts = [parse_prompt_line(line, f"{path.name} line {number}")
               for number, line in enumerate(read_text_file(path, "--sample_prompts").splitlines(), start=1)
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"--sample_prompts {str(path)!r} holds no prompt")
    return prompts


def image_grid(rows: list[list], background=(255, 255, 255)):
    """One image of rows of PIL images (each row a prompt's images), each cell as large as the largest image, images
    at their cells' top left."""
    from PIL import Image

    cell_w = max(image.width for row in rows for image in row)
    cell_h = max(image.height for row in rows for image in row)
    grid = Image.new("RGB", (cell_w * max(len(row) for row in rows), cell_h * len(rows)), background)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), (c * cell_w, r * cell_h))
    return grid


def check_sample_prompts(config) -> None:
    """The sample prompts read as the gallery will read them (--prompt_syntax), before anything loads."""
    from common.prompt_syntax import check_prompt_syntax, check_prompts

    check_prompt_syntax(config.prompt_syntax, config.emphasis)
    prompts = sample_prompts(config)
    texts = [text for sample in prompts for text in (sample.prompt, sample.negative_prompt) if text]
    weighted = check_prompts(texts, config.prompt_syntax)
    if weighted:
        logger.warning(weighted)


def sample_prompts(config) -> list:
    """The prompts sampled during training: each --validation_prompt, then the lines of --sample_prompts."""
    prompts = [SamplePrompt(prompt) for prompt in config.validation_prompt or []]
    if config.sample_prompts:
        prompts += read_prompt_file(Path(config.sample_prompts))
    return prompts


class Sampling:
    """Sample images during training, every --validation_steps steps and/or every --validation_epochs epochs (50
    when neither is given, the reference script's default), at most once per step; with the EMA weights under
    --use_ema."""

    def __init__(self, pipe, unet, config, accelerator, ema):
        self.pipe, self.unet, self.config, self.accelerator, self.ema = pipe, unet, config, accelerator, ema
        self.prompts = sample_prompts(config)
        self.every_epochs = config.validation_epochs or (None if config.validation_steps else 50)
        self.last_step = None

    def due_at_step(self, step: int) -> bool:
        return bool(self.prompts and self.config.validation_steps and step % self.config.validation_steps == 0)

    def due_after_epoch(self, epoch: int, step: int) -> bool:
        return bool(self.prompts and self.every_epochs and (epoch + 1) % self.every_epochs == 0 and step != self.last_step)

    def __call__(self, step: int) -> None:
        self.last_step = step
        with ema_weights(self.ema, self.unet) if self.ema is not None else contextlib.nullcontext():
            validate_images(self.pipe, self.unet, self.config, self.accelerator, step, self.prompts)


def validate_images(pipe, unet, config, accelerator, step: int, prompts: list) -> None:
    """Sample images with the adapter as trained so far: each prompt's --num_validation_images images (prompt i's
    seeds start at its --d or --seed + i, the same at every step, so galleries compare) under
    OUTPUT/validation/step-N/, their grid (a row per prompt) as OUTPUT/samples/step-N.png carrying the first image's
    WebUI parameters, and the grid in every tracker that takes images (TensorBoard, wandb)."""
    import numpy as np
    import torch
    from PIL import Image

    from common.generation import SamplingSettings, generate_images, plan_jobs, save_png, webui_parameters
    from common.generation_options import default_guidance_rescale
    from common.tokens import expand_abstractions

    if not accelerator.is_main_process:
        return
    pipe.unet = accelerator.unwrap_model(unet)
    parked = [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae) if m.device != accelerator.device]
    for module in parked:
        module.to(accelerator.device)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rows, first = [], None
    for index, sample in enumerate(prompts):
        settings = SamplingSettings(
            width=sample.width or native,
            height=sample.height or native,
            num_inference_steps=25 if sample.steps is None else sample.steps,
            guidance_scale=5.0 if sample.guidance_scale is None else sample.guidance_scale,
            guidance_rescale=default_guidance_rescale(pipe.scheduler.config) if config.guidance_rescale is None else config.guidance_rescale,
            scheduler_name="default",
            webui_sampler="default",
            model=config.pretrained_model_name_or_path,
            max_token_length=config.max_token_length,
            prompt_syntax=config.prompt_syntax,
            emphasis=config.emphasis,
            clip_skip=config.clip_skip,
        )
        negative = expand_abstractions(sample.negative_prompt, config.token_map) if sample.negative_prompt else None
        jobs = plan_jobs([expand_abstractions(sample.prompt, config.token_map)], negative_prompt=negative,
                         num_images=config.num_validation_images, seeds=[config.seed + index if sample.seed is None else sample.seed])
        with torch.no_grad(), accelerator.autocast():
            paths = generate_images(pipe, jobs, settings, output_dir=Path(config.output_dir) / "validation" / f"step-{step}",
                                    batch_size=1, show_progress=False)
        rows.append([Image.open(path).convert("RGB") for path in paths])  # read now: the files stay closed
        first = first or webui_parameters(jobs[0], settings)
    for module in parked:
        module.to("cpu")
    grid = image_grid(rows)
    (Path(config.output_dir) / "samples").mkdir(exist_ok=True)
    save_png(grid, Path(config.output_dir) / "samples" / f"step-{step}.png", first)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": np.asarray(grid)}, step=step, dataformats="HWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({"samples": np.asarray(grid)}, step=step)

"""Sample galleries during training: prompts with their own settings (kohya's --sample_prompts lines), and one grid
image per sampling step, rows the prompts and columns their seeds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.cli import UserError
from common.generation import MIN_IMAGE_SIDE

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


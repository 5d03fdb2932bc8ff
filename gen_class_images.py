#!/usr/bin/env python
"""Class images for DreamBooth prior preservation: make only the ones missing from the folder.

    python gen_class_images.py --model stabilityai/stable-diffusion-xl-base-1.0 \\
        --class_prompt "a photo of a dog" --class_data_dir class_dog/ --num_class_images 200
    accelerate launch gen_class_images.py ...   # the same images, shared out over every GPU

Image i is `class_NNNNNN.png` made with seed + i, so a run gives the same files whatever the number
of processes, a later run with a larger count only adds images, and a file cut short by an
interrupted run is made again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from common.cli import REQUIRED, UserError, config_from_options, option, options_command, run_app
from common.generation_options import GenerationOptions, check_generation_prompts

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")
CLASS = "Class images"


@dataclass(frozen=True)
class ClassImages:
    """Which images the folder should hold."""

    class_prompt: str = option(REQUIRED, panel=CLASS, help="e.g. 'a photo of a dog'")
    class_data_dir: Path = option(REQUIRED, panel=CLASS, help="folder to fill (photos already there count)")
    num_class_images: int = option(100, panel=CLASS, help="how many images the folder should hold")
    seed: int = option(0, panel=CLASS, help="image i gets seed + i")

    def __post_init__(self):
        if self.num_class_images < 1:
            raise UserError(f"--num_class_images must be at least 1, got {self.num_class_images}")


@options_command(app, ClassImages, GenerationOptions, defaults={"batch_size": 4},
                 more_names={"batch_size": ["--sample_batch_size"], "dtype": ["--prior_generation_precision"]})
def main(**options) -> None:
    """Fill --class_data_dir up to --num_class_images images of --class_prompt."""
    wanted = config_from_options(ClassImages, options)
    generation = config_from_options(GenerationOptions, options)
    check_generation_prompts(generation, [wanted.class_prompt])
    made = make_missing_images(wanted, generation)
    typer.echo(f"{wanted.class_data_dir}/: made {made} image(s) in this process")


def make_missing_images(wanted: ClassImages, generation: GenerationOptions) -> int:
    """Every process lists what is missing (the same list), then makes its share of it."""
    from accelerate import PartialState

    from common.files import writable_folder
    from common.generation import fill_class_folder, make_class_images
    from common.generation_options import prepare_pipeline, read_generation_model
    from common.models import cpu_processes_requested, warn_about_lost_processes

    reading = read_generation_model(generation)
    state = PartialState(cpu=cpu_processes_requested())
    if state.is_main_process:
        warn_about_lost_processes(state.num_processes)
    writable_folder(wanted.class_data_dir, "--class_data_dir")

    def make(batches) -> int:
        pipe, settings = prepare_pipeline(generation, str(state.device) if state.num_processes > 1 else None, reading)
        return make_class_images(pipe, batches, settings, wanted.class_data_dir, show_progress=state.is_local_main_process)

    return fill_class_folder(state, wanted.class_data_dir, wanted=wanted.num_class_images, prompt=wanted.class_prompt,
                             negative_prompt=generation.negative_prompt, seed=wanted.seed, batch_size=generation.batch_size,
                             make=make)


if __name__ == "__main__":
    run_app(app)

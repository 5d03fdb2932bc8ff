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

from pathlib import Path
from typing import Annotated, Optional

import typer

from common.cli import UserError, flags, run_app
from common.schedulers import SCHEDULER_NAMES, check_scheduler_name

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")


@app.command()
def main(
    model: Annotated[str, typer.Option(*flags("pretrained_model_name_or_path", "--model", "-m"), help="tiny-sdxl, tiny-edm, a diffusers folder or a hub id")],
    class_prompt: Annotated[str, typer.Option(*flags("class_prompt"), help="e.g. 'a photo of a dog'")],
    class_data_dir: Annotated[Path, typer.Option(*flags("class_data_dir"), help="folder to fill (photos already there count)")],
    num_class_images: Annotated[int, typer.Option(*flags("num_class_images"), help="how many images the folder should hold")] = 100,
    negative_prompt: Annotated[Optional[str], typer.Option(*flags("negative_prompt"))] = None,
    sample_batch_size: Annotated[int, typer.Option(*flags("sample_batch_size", "--batch_size"), help="images per forward pass")] = 4,
    num_inference_steps: Annotated[int, typer.Option(*flags("num_inference_steps"))] = 30,
    guidance_scale: Annotated[float, typer.Option(*flags("guidance_scale"))] = 5.0,
    scheduler: Annotated[str, typer.Option(*flags("scheduler"), help=", ".join(SCHEDULER_NAMES))] = "default",
    width: Annotated[Optional[int], typer.Option(*flags("width"), help="default: the model's native size")] = None,
    height: Annotated[Optional[int], typer.Option(*flags("height"))] = None,
    seed: Annotated[int, typer.Option(*flags("seed"), help="image i gets seed + i")] = 0,
    dtype: Annotated[str, typer.Option(*flags("dtype", "--prior_generation_precision"), help="auto, fp32, fp16, bf16")] = "auto",
) -> None:
    """Fill --class_data_dir up to --num_class_images images of --class_prompt."""
    from common.generation import check_image_size

    check_scheduler_name(scheduler)
    check_image_size("width", width)
    check_image_size("height", height)
    if num_class_images < 1 or sample_batch_size < 1 or num_inference_steps < 1:
        raise UserError("--num_class_images, --sample_batch_size and --num_inference_steps must be at least 1")
    made = fill_class_folder(
        model, class_prompt, class_data_dir, num_class_images, negative_prompt, sample_batch_size,
        num_inference_steps, guidance_scale, scheduler, width, height, seed, dtype,
    )
    typer.echo(f"{class_data_dir}/: made {made} image(s) in this process")


def fill_class_folder(model, class_prompt, class_data_dir: Path, num_class_images: int, negative_prompt, batch_size: int,
                      steps: int, guidance_scale: float, scheduler: str, width, height, seed: int, dtype_name: str) -> int:
    """List what is missing (every process the same list), then make this process's share of it."""
    from accelerate import PartialState

    from common.generation import class_image_batches, make_class_images, sampling_settings
    from common.models import cpu_processes_requested, device_and_dtype, load_sdxl_pipeline
    from common.schedulers import make_scheduler

    state = PartialState(cpu=cpu_processes_requested())
    batches = class_image_batches(class_data_dir, num_class_images, class_prompt, negative_prompt, seed, batch_size,
                                  state.process_index, state.num_processes)
    state.wait_for_everyone()  # nobody writes before everybody has listed the folder
    made = 0
    if batches:
        device, dtype = device_and_dtype(str(state.device), dtype_name)
        pipe = load_sdxl_pipeline(model, dtype).to(device)
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler)
        settings = sampling_settings(pipe, width, height, steps, guidance_scale, None, model)
        made = make_class_images(pipe, batches, settings, class_data_dir, show_progress=state.is_local_main_process)
    state.wait_for_everyone()
    return made


if __name__ == "__main__":
    run_app(app)

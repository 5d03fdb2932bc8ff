"""Sample galleries during training: several prompts (and kohya's prompt files), every N steps, a grid PNG with WebUI
parameters, and TensorBoard event files holding the losses and the grids, read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from common.cli import UserError
from common.gallery import SamplePrompt, image_grid, parse_prompt_line, read_prompt_file
from helpers import parse_webui_parameters
from training_helpers import train_cli, write_images


def test_kohya_prompt_lines_are_read_with_their_options():
    line = "a photo of sks dog, on a beach --n blurry, low quality --w 64 --h 48 --d 7 --l 3.5 --s 4"
    assert parse_prompt_line(line, "x") == SamplePrompt("a photo of sks dog, on a beach", "blurry, low quality", 7, 64, 48, 3.5, 4)
    assert parse_prompt_line("just a prompt", "x") == SamplePrompt("just a prompt")


@pytest.mark.parametrize("line, message", [
    ("a dog --ss euler_a", r"prompts.txt line 1: option --ss is not one of --n \(negative prompt\), --w \(width\)"),
    ("a dog --d seven", r"prompts.txt line 1: --d 'seven' is not a int"),
    ("a dog --w 60", r"prompts.txt line 1: --w 60 must be a multiple of 8 of at least 16"),
    ("a dog --w 8 --h 8", r"prompts.txt line 1: --w 8 must be a multiple of 8 of at least 16 \(the UNet.s smallest latent is 2x2\)"),
    ("a dog --s 0", r"prompts.txt line 1: --s 0 must be at least 1"),
    (" --n only a negative", r"prompts.txt line 1: no prompt before the options"),
])
def test_a_bad_prompt_line_is_refused_in_one_line_naming_it(tmp_path, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=message):
        read_prompt_file(path)


def test_prompt_files_skip_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# kohya's comment\n\na dog\n  # another\na cat --d 3\n")
    assert read_prompt_file(path) == [SamplePrompt("a dog"), SamplePrompt("a cat", seed=3)]
    path.write_text("# nothing\n")
    with pytest.raises(UserError, match="holds no prompt"):
        read_prompt_file(path)


def test_the_grid_puts_each_prompts_images_in_a_row():
    red, blue, green = (Image.new("RGB", (8, 6), colour) for colour in ("red", "blue", "green"))
    grid = image_grid([[red, blue], [green]])
    assert grid.size == (16, 12)
    assert grid.getpixel((1, 1)) == (255, 0, 0) and grid.getpixel((9, 1)) == (0, 0, 255)
    assert grid.getpixel((1, 7)) == (0, 128, 0) and grid.getpixel((9, 7)) == (255, 255, 255)


@pytest.mark.heavy
def test_training_samples_several_prompts_every_n_steps_into_a_gallery_and_tensorboard(tiny_sdxl_path, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sks dog in the snow --n blurry --d 11 --w 32 --h 32 --s 2\n")
    out = tmp_path / "out"
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", write_images(tmp_path / "img", 2),
                             "--instance_prompt", "a sks dog", "--resolution", 64, "--train_batch_size", 2,
                             "--max_train_steps", 4, "--validation_prompt", "a sks dog", "--validation_prompt", "a sks cat",
                             "--sample_prompts", prompts, "--sample_every_n_steps", 2, "--num_validation_images", 2,
                             "--report_to", "tensorboard", "--logging_steps", 2, "--output_dir", out)
    assert code == 0, err
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-2.png", "step-4.png"]
    with Image.open(out / "samples" / "step-4.png") as grid:
        assert grid.size == (2 * 64, 3 * 64)  # two seeds per prompt; three prompts; cells of the largest image
        parameters = parse_webui_parameters(grid.info["parameters"])
    assert parameters["prompt"] == "a sks dog" and parameters["Seed"] == "0"
    # fixed seeds per prompt, the same at every sampling step: prompt i from --seed + i, a file line from its --d
    for step in (2, 4):
        names = sorted(p.name.split("-", 1)[1] for p in (out / "validation" / f"step-{step}").glob("*.png"))
        assert names == sorted(["0.png", "1.png", "1.png", "2.png", "11.png", "12.png"]), names
    small = [p for p in (out / "validation" / "step-2").glob("*-11.png")]
    with Image.open(small[0]) as image:
        assert image.size == (32, 32) and "Negative prompt: blurry" in image.info["parameters"]
        assert "Steps: 2," in image.info["parameters"]

    events = [p for p in (out / "logs").rglob("events.out.tfevents.*")]
    accumulators = [EventAccumulator(str(p), size_guidance={"images": 0, "scalars": 0}) for p in events]
    for accumulator in accumulators:
        accumulator.Reload()
    scalars = {tag: [e.step for e in a.Scalars(tag)] for a in accumulators for tag in a.Tags()["scalars"]}
    images = {tag: [(e.step, e.width, e.height) for e in a.Images(tag)] for a in accumulators for tag in a.Tags()["images"]}
    assert scalars["loss"] == [2, 4] and scalars["lr"] == [2, 4]  # the mean loss, read every --logging_steps
    assert images == {"samples": [(2, 128, 192), (4, 128, 192)]}

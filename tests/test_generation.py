"""Seeds per image, WebUI parameters text, file naming and atomic saving."""

from __future__ import annotations

import pytest
from PIL import Image

from common.cli import UserError
from common.generation import ImageJob, SamplingSettings, image_path, next_free_index, plan_jobs, save_png, webui_parameters
from helpers import parse_webui_parameters

SETTINGS = SamplingSettings(
    width=640, height=512, num_inference_steps=25, guidance_scale=6.5, scheduler_name="dpmpp-2m-karras",
    webui_sampler="DPM++ 2M", webui_schedule="Karras", model="sd_xl_base_1.0",
    adapters={"Lora": "a.safetensors:0.8, b.safetensors:1"},
)


def test_one_seed_gives_consecutive_seeds_across_prompts_and_images():
    jobs = plan_jobs(["cat", "dog"], negative_prompt=None, num_images=3, seeds=[100], first_index=7)
    assert [job.seed for job in jobs] == [100, 101, 102, 103, 104, 105]
    assert [job.prompt for job in jobs] == ["cat"] * 3 + ["dog"] * 3
    assert [job.index for job in jobs] == list(range(7, 13))


def test_one_seed_per_image_is_used_as_given():
    jobs = plan_jobs(["cat"], negative_prompt="blurry", num_images=3, seeds=[5, 1, 9])
    assert [job.seed for job in jobs] == [5, 1, 9]
    assert all(job.negative_prompt == "blurry" for job in jobs)


def test_wrong_number_of_seeds_is_refused_with_the_counts():
    with pytest.raises(UserError, match="got 2 seeds for 3 images"):
        plan_jobs(["cat"], negative_prompt=None, num_images=3, seeds=[1, 2])


def test_without_a_seed_a_random_one_is_drawn_and_then_incremented():
    first, second = plan_jobs(["cat"], negative_prompt=None, num_images=2, seeds=[])
    assert second.seed == first.seed + 1


def test_webui_parameters_round_trip_with_quoted_values():
    job = ImageJob(index=0, prompt="a photo of a dog, studio light", negative_prompt="blurry, lowres", seed=42)
    text = webui_parameters(job, SETTINGS)
    parsed = parse_webui_parameters(text)
    assert parsed["prompt"] == job.prompt
    assert parsed["negative_prompt"] == "blurry, lowres"
    assert parsed["Steps"] == "25" and parsed["CFG scale"] == "6.5" and parsed["Seed"] == "42"
    assert parsed["Size"] == "640x512" and parsed["Sampler"] == "DPM++ 2M" and parsed["Schedule type"] == "Karras"
    assert parsed["Lora"] == "a.safetensors:0.8, b.safetensors:1"
    assert text.splitlines()[2].startswith("Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 42")


def test_next_free_index_continues_after_existing_images(tmp_path):
    assert next_free_index(tmp_path) == 0
    (tmp_path / "00000-5.png").touch()
    (tmp_path / "00012-9.png").touch()
    (tmp_path / "notes.png").touch()
    assert next_free_index(tmp_path) == 13
    assert image_path(tmp_path, ImageJob(13, "x", None, 77)).name == "00013-77.png"


def test_save_png_writes_parameters_and_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    target = tmp_path / "00000-1.png"
    save_png(image, target, "a cat\nSteps: 1")
    assert Image.open(target).text["parameters"] == "a cat\nSteps: 1"

    def fail_midway(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        save_png(image, tmp_path / "00001-2.png", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-1.png"]

"""--masked_loss: masks from alpha channels or --mask_dir, kept paired with their images through crops, flips,
buckets and cached latents, and weighting the loss as kohya's apply_masked_loss does (tests/test_loss_variants.py
holds the loss arithmetic against kohya's)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from common.cli import UserError
from common.data import ALPHA, Augment, CachedLatents, Example, TrainingImages, open_mask, place_image_and_mask, with_masks
from common.losses import latent_grid_mask
from training_helpers import train_cli, write_images


def cut_out_image(path: Path, size=(48, 80), seed=0) -> Path:
    """An RGBA image whose opaque part (a random rectangle) is pure red and whose transparent rest, shown over white,
    is white: wherever the placed mask is 1 the placed pixels are red, wherever it is 0 they are white."""
    rng = np.random.default_rng(seed)
    height, width = size
    pixels = np.zeros((height, width, 4), np.uint8)
    pixels[..., :3] = rng.integers(0, 255, (height, width, 3))  # colours under transparency are not shown
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    pixels[top : top + height // 2, left : left + width // 2] = (255, 0, 0, 255)
    Image.fromarray(pixels, "RGBA").save(path)
    return path


@pytest.mark.parametrize("buckets", [False, True])
def test_the_mask_gets_its_images_resize_crop_and_flip(tmp_path, buckets):
    from common.data import open_rgb, sdxl_buckets

    for seed in range(6):
        example = Example(cut_out_image(tmp_path / f"cut_{seed}.png", seed=seed), "x", f"cut_{seed}.png", mask=ALPHA)
        image = open_rgb(example)
        augment = Augment(resolution=32, random_flip=True, buckets=tuple(sdxl_buckets(32)) if buckets else (), masked=True)
        pixels, placement, mask = place_image_and_mask(image, open_mask(example, (image.height, image.width)), augment, random.Random(seed))
        assert mask.shape == pixels.shape[1:]
        red = (pixels[1] < -0.5)  # green low: red pixels; white has green 1
        sure = (mask > 0.99) | (mask < 0.01)  # off the resampled edges
        assert torch.equal(red[sure], (mask > 0.5)[sure]), f"seed {seed}: mask and image placed differently"
        assert 0 < float(mask.mean()) < 1


def test_cached_latents_keep_each_mask_on_the_latent_grid_with_its_flip(tmp_path):
    examples = with_masks([Example(cut_out_image(tmp_path / f"c{k}.png", seed=k), "x", f"c{k}.png") for k in range(3)], None)
    augment = Augment(resolution=32, center_crop=True, random_flip=True, masked=True)
    images = TrainingImages(examples, augment, repeats=2, seed=5)
    cached = CachedLatents(images, lambda pixels: (torch.zeros(len(pixels), 4, 4, 4), torch.ones(len(pixels), 4, 4, 4)))
    for epoch in range(3):
        images.epoch = epoch
        for position in range(len(images)):
            expected = latent_grid_mask(images[position]["mask"][None], (4, 4))[0, 0]
            assert torch.equal(cached[position]["mask"], expected), (epoch, position)


def test_mask_files_are_found_by_stem_and_a_missing_or_misshapen_one_is_refused(tmp_path):
    images = write_images(tmp_path / "img", count=2, size=(64, 64))
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (32, 32), 255).save(masks / "image_0.jpg")  # same aspect ratio, half the size: scaled
    examples = [Example(p, "x", p.name) for p in sorted(images.glob("*.png"))]
    with pytest.raises(UserError, match=r"has no mask for 1 image\(s\), e.g. image_1.png \(a mask has the image's file stem: image_1.png\)"):
        with_masks(examples, masks)
    Image.new("RGB", (64, 32), (0, 0, 0)).save(masks / "image_1.png")
    found = with_masks(examples, masks)
    assert [m.mask.name for m in found] == ["image_0.jpg", "image_1.png"]
    assert np.asarray(open_mask(found[0], (64, 64))).min() == 255
    with pytest.raises(UserError, match=r"mask .*image_1.png' is 64x32, its image image_1.png 64x64"):
        open_mask(found[1], (64, 64))


def lora_up_weights(out: Path) -> list[torch.Tensor]:
    state = load_file(out / f"{out.name}.safetensors")
    return [t for k, t in state.items() if k.endswith("lora_up.weight")]


@pytest.mark.parametrize("source", ["alpha", "mask_dir with cached latents"])
def test_all_black_masks_are_refused_before_anything_is_made_and_one_black_mask_is_named(tiny_sdxl_path, tmp_path, capsys, caplog,
                                                                                        source):
    """A black mask excludes its image from the loss: masks that are all black would leave the LoRA's up weights, which
    start at zero, exactly zero, so the run is refused before any model loads; one black mask among others is named
    in a warning, and the others train."""
    folder = write_images(tmp_path / "img", count=2, size=(64, 64))
    masks = tmp_path / "masks"
    masks.mkdir()

    def mask(path: Path, value: int) -> None:
        if source == "alpha":
            rgba = Image.open(path).convert("RGBA")
            rgba.putalpha(value)
            rgba.save(path)
        else:
            Image.new("L", (64, 64), value).save(masks / path.name)

    paths = sorted(folder.glob("*.png"))
    for path in paths:
        mask(path, 0)
    extra = [] if source == "alpha" else ["--mask_dir", masks, "--cache_latents"]
    common = ["-m", tiny_sdxl_path, "--train_data_dir", folder, "--instance_prompt", "a photo of sks dog", "--resolution", 64,
              "--max_train_steps", 2, "--unet_lr", 1e-2, "--seed", 0, "--masked_loss", *extra]
    code, _, err = train_cli(capsys, *common, "--output_dir", tmp_path / "masked")
    kind = "alpha channel" if source == "alpha" else "mask"
    assert code == 2 and f"every image's {kind} is all black (2 of 2)" in err and err.count("\n") == 1, err
    assert not (tmp_path / "masked").exists()
    mask(paths[1], 255)
    code, out, err = train_cli(capsys, *common, "--output_dir", tmp_path / "half")
    assert code == 0, err
    assert "1 of 2 masks are all black: those images train nothing" in caplog.text
    assert any(float(t.abs().max()) > 0 for t in lora_up_weights(tmp_path / "half"))


def test_a_fully_black_mask_gives_exactly_zero_loss():
    from common.losses import DiscreteFormulation, formulation_for_scheduler
    from common.architectures import SDXL_SCHEDULER_CONFIG

    formulation, _ = formulation_for_scheduler(SDXL_SCHEDULER_CONFIG)
    assert isinstance(formulation, DiscreteFormulation)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    network = lambda model_input, time: model_input * 0.5  # noqa: E731
    losses = formulation.loss(network, x0, torch.Generator().manual_seed(1), mask=torch.zeros(2, 64, 64))
    assert torch.equal(losses, torch.zeros(2))
    assert float(formulation.loss(network, x0, torch.Generator().manual_seed(1), mask=torch.ones(2, 64, 64)).min()) > 0


def test_mask_dir_without_masked_loss_is_refused_in_one_line(tiny_sdxl_path, tmp_path, capsys):
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", write_images(tmp_path / "img", 1),
                             "--instance_prompt", "x", "--mask_dir", tmp_path, "--output_dir", tmp_path / "out")
    assert code != 0 and "--mask_dir gives --masked_loss its masks; add --masked_loss" in err and err.count("\n") == 1, err

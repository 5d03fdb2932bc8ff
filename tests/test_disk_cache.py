"""Disk caches of latents and caption embeddings: content-keyed, reused by later runs and resumes, never stale."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from common.disk_cache import TensorFiles, content_key, module_digest
from training_helpers import train_cli, write_images


def lora(out) -> dict:
    return load_file(out / f"{out.name}.safetensors")


def test_module_digest_sees_one_changed_weight_and_content_keys_every_part():
    module = torch.nn.Linear(3, 2)
    before = module_digest(module)
    assert module_digest(module) == before
    with torch.no_grad():
        module.weight[0, 0] += 1e-7
    assert module_digest(module) != before
    assert module_digest(module.half()) != module_digest(module.float())
    assert content_key(a=1, b="x") == content_key(b="x", a=1) != content_key(a=1, b="y")


@pytest.mark.heavy
def test_a_second_run_reads_every_latent_back_a_changed_image_is_encoded_again(tiny_sdxl_path, tmp_path, capsys):
    images = write_images(tmp_path / "img", 3)
    cache = tmp_path / "cache"
    common = ["-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", "a sks dog", "--resolution", 64,
              "--max_train_steps", 2, "--random_flip", "--cache_latents_to_disk", "--disk_cache_dir", cache, "--seed", 1]
    code, out, err = train_cli(capsys, *common, "--output_dir", tmp_path / "first")
    assert code == 0, err
    assert f"latents: 6 encoded, 0 read from the disk cache {cache / 'latents'}" in out, out  # 3 images x 2 flips
    assert len(list((cache / "latents").rglob("*.safetensors"))) == 6
    code, out, err = train_cli(capsys, *common, "--output_dir", tmp_path / "second")
    assert code == 0, err
    assert "latents: 0 encoded, 6 read from the disk cache" in out, out
    first, second = lora(tmp_path / "first"), lora(tmp_path / "second")
    assert all(torch.equal(first[k], second[k]) for k in first)  # what was read is what was encoded, bit for bit
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", "a sks dog",
                             "--resolution", 64, "--max_train_steps", 2, "--random_flip", "--cache_latents", "--seed", 1,
                             "--output_dir", tmp_path / "in_memory")
    assert code == 0, err
    assert all(torch.equal(first[k], t) for k, t in lora(tmp_path / "in_memory").items())

    edited = Image.open(images / "image_1.png").convert("RGB")
    edited.putpixel((0, 0), (1, 2, 3))
    edited.save(images / "image_1.png")
    code, out, err = train_cli(capsys, *common, "--output_dir", tmp_path / "third")
    assert code == 0, err
    assert "latents: 2 encoded, 4 read from the disk cache" in out, out


def test_caption_embeddings_are_cached_on_disk_and_reused(tiny_sdxl_path, tmp_path, capsys):
    images = write_images(tmp_path / "img", 2)
    (images / "image_0.txt").write_text("a sks dog on grass")
    cache = tmp_path / "cache"
    common = ["-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", "a sks dog", "--resolution", 64,
              "--max_train_steps", 2, "--cache_text_encoder_outputs_to_disk", "--disk_cache_dir", cache,
              "--caption_dropout_rate", 0.5, "--seed", 2]
    code, _, err = train_cli(capsys, *common, "--output_dir", tmp_path / "first")
    assert code == 0, err
    entries = sorted((cache / "text").rglob("*.safetensors"))
    assert len(entries) == 3  # two captions and the dropped (empty) one
    written = {p: p.stat().st_mtime_ns for p in entries}
    code, _, err = train_cli(capsys, *common, "--output_dir", tmp_path / "second")
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in sorted((cache / "text").rglob("*.safetensors"))} == written
    first, second = lora(tmp_path / "first"), lora(tmp_path / "second")
    assert all(torch.equal(first[k], second[k]) for k in first)
    code, _, err = train_cli(capsys, *common, "--shuffle_caption", "--output_dir", tmp_path / "bad")
    assert code != 0 and "--cache_text_encoder_outputs_to_disk keeps fixed captions" in err and err.count("\n") == 1, err


@pytest.mark.heavy
def test_resume_is_bit_exact_with_shuffle_dropout_ema_and_disk_caches(tiny_sdxl_path, tmp_path, capsys):
    images = write_images(tmp_path / "img", 3)
    for k in range(3):
        (images / f"image_{k}.txt").write_text(f"sks dog, photo {k}, outdoors, sunny")
    common = ["-m", tiny_sdxl_path, "--instance_data_dir", images, "--resolution", 64, "--train_batch_size", 2,
              "--shuffle_caption", "--keep_tokens", 1, "--caption_dropout_rate", 0.3, "--caption_tag_dropout_rate", 0.2,
              "--use_ema", "--cache_latents_to_disk", "--disk_cache_dir", tmp_path / "cache", "--random_flip",
              "--checkpointing_steps", 2, "--seed", 4]
    code, _, err = train_cli(capsys, *common, "--max_train_steps", 4, "--output_dir", tmp_path / "straight")
    assert code == 0, err
    code, _, err = train_cli(capsys, *common, "--max_train_steps", 2, "--output_dir", tmp_path / "resumed")
    assert code == 0, err
    code, out, err = train_cli(capsys, *common, "--max_train_steps", 4, "--resume_from_checkpoint", "latest",
                               "--output_dir", tmp_path / "resumed")
    assert code == 0, err
    assert "latents: 0 encoded, 6 read from the disk cache" in out, out
    for name in ("straight.safetensors", "straight_ema.safetensors"):
        expected = load_file(tmp_path / "straight" / name)
        got = load_file(tmp_path / "resumed" / name.replace("straight", "resumed"))
        assert all(torch.equal(expected[k], got[k]) for k in expected), name


def test_an_unusable_cache_or_mask_folder_is_refused_in_one_line_before_any_model_loads(tiny_sdxl_path, tmp_path, capsys):
    images = write_images(tmp_path / "img", 1)
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", "x",
                             "--cache_latents_to_disk", "--disk_cache_dir", images / "image_0.png", "--output_dir", tmp_path / "a")
    assert code != 0 and "--disk_cache_dir" in err and "is a file; give a folder" in err and err.count("\n") == 1, err
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", "x",
                             "--masked_loss", "--mask_dir", tmp_path / "none", "--output_dir", tmp_path / "b")
    assert code != 0 and "is not a folder" in err and "--mask_dir" in err and err.count("\n") == 1, err

"""A kohya sd-scripts user's command line, as they would write it for an SDXL LoRA, runs here unchanged where each flag
means exactly one of ours; flags that mean something else are refused in one line naming ours; flags that change
nothing here are accepted with a warning."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from training_helpers import train_cli, write_images


def kohya_dataset(root):
    """img/ with caption files, a `2_sks dog` repeats folder, and one image whose alpha channel masks its left half."""
    folder = write_images(root / "img", count=2)
    (folder / "image_0.txt").write_text("sks dog, on grass, sunny")
    (folder / "image_1.txt").write_text("sks dog, indoors")
    write_images(folder / "2_sks dog", count=1)
    rgba = Image.open(folder / "image_0.png").convert("RGBA")
    alpha = Image.new("L", rgba.size, 0)
    alpha.paste(255, (0, 0, rgba.width // 2, rgba.height))
    rgba.putalpha(alpha)
    rgba.save(folder / "image_0.png")
    return folder


def test_a_kohya_users_sdxl_lora_command_runs_unchanged(tiny_sdxl_path, tmp_path, capsys, caplog):
    folder = kohya_dataset(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks dog, on a beach --n blurry --d 5 --s 2\n")
    out = tmp_path / "out"
    command = [
        "--pretrained_model_name_or_path", tiny_sdxl_path, "--train_data_dir", folder, "--output_dir", out,
        "--resolution", "64,64", "--enable_bucket", "--flip_aug", "--network_dim", 4, "--network_alpha", 2,
        "--unet_lr", 1e-3, "--text_encoder_lr", 1e-5, "--max_train_epochs", 1, "--train_batch_size", 1,
        "--mixed_precision", "no", "--save_model_as", "safetensors", "--save_every_n_steps", 100,
        "--max_data_loader_n_workers", 0, "--caption_extension", ".txt", "--shuffle_caption", "--keep_tokens", 1,
        "--xformers", "--cache_latents", "--cache_latents_to_disk", "--alpha_mask", "--loss_type", "huber",
        "--huber_schedule", "snr", "--huber_c", 0.1, "--min_snr_gamma", 5, "--noise_offset", 0.05,
        "--multires_noise_iterations", 6, "--multires_noise_discount", 0.3, "--ip_noise_gamma", 0.05,
        "--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", 2, "--lr_warmup_steps", 0,
        "--sample_every_n_steps", 2, "--sample_prompts", prompts, "--num_validation_images", 1, "--max_token_length", 150,
        "--seed", 1, "--log_with", "tensorboard", "--network_train_unet_only"]
    code, _, err = train_cli(capsys, *command, "--optimizer_type", "Lion")
    assert code != 0 and "--optimizer_type 'Lion' is not available here; accepted: AdamW, AdamW8bit, Prodigy, Adafactor" in err, err
    code, stdout, err = train_cli(capsys, *command, "--optimizer_type", "AdamW")
    assert code == 0, err
    assert "--xformers has no effect" in caplog.text and "--network_train_unet_only has no effect" in caplog.text
    assert "repeats 2 x1, 1 x2: 4 examples an epoch" in stdout and "masked loss: 1 of 3 images masked" in stdout, stdout
    args = json.loads((out / "training_args.json").read_text())
    expected = {"resolution": 64, "aspect_buckets": True, "random_flip": True, "rank": 4, "lora_alpha": 2, "learning_rate": 1e-3,
                "num_train_epochs": 1, "save_every_n_steps": 100, "lr_num_cycles": 2, "masked_loss": True, "snr_gamma": 5,
                "loss_type": "huber", "cache_latents_to_disk": True, "validation_steps": 2, "report_to": "tensorboard",
                "max_token_length": 150}
    assert {k: args[k] for k in expected} == expected
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-2.png", "step-4.png"]
    assert (out / "out.safetensors").is_file()


REFUSED = {
    "--save_precision fp8": (["--save_precision", "fp8"], "--save_precision 'fp8': choose float, fp16, bf16"),
    "--save_model_as ckpt": (["--save_model_as", "ckpt"], "every file is written as safetensors"),
    "--reg_data_dir missing": (["--reg_data_dir", "nowhere"], "--reg_data_dir 'nowhere' is not a folder"),
    "--dataset_config with folders": (["--dataset_config", "x.toml"], "--dataset_config holds the folders (image_dir, is_reg, "
                                      "conditioning_data_dir per subset); --instance_data_dir cannot go with it"),
    "--save_last_n_epochs alone": (["--save_last_n_epochs", "2"], "add --save_every_n_epochs N or leave it out"),
    "--optimizer_args alone": (["--optimizer_args", "weight_decay=0.1"], "--optimizer_args needs kohya's --optimizer_type"),
    "--network_args alone": (["--network_args", "loraplus_lr_ratio=16"], "--network_args needs kohya's --network_module"),
    "--network_args unknown": (["--network_module", "networks.lora", "--network_args", "train_norm=True"],
                               "--network_args train_norm=True is not read here; accepted: algo, preset, conv_dim"),
    "--optimizer_args unknown": (["--optimizer_type", "AdamW", "--optimizer_args", "foreach=False"],
                                 "--optimizer_args foreach=False is not read for AdamW here; accepted: weight_decay, eps, betas"),
    "--resolution 512,abc": (["--resolution", "512,abc"], "--resolution '512,abc' is not a number of pixels, e.g. 1024 or 1024,768"),
    "--resolution 500,768": (["--resolution", "500,768"], "--resolution 500,768: both sides must be multiples of 8"),
    "--bucket_reso_steps 48": (["--enable_bucket", "--bucket_reso_steps", "48"], "--bucket_reso_steps 48 must be a multiple of 32"),
    "--full_bf16": (["--full_bf16"], "the adapter trains in float32 under --mixed_precision bf16 autocast"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_kohya_flags_that_differ_are_refused_in_one_line_naming_ours(case, tiny_sdxl_path, tmp_path, capsys):
    extra, message = REFUSED[case]
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", write_images(tmp_path / "img", 1),
                             "--instance_prompt", "x", "--output_dir", tmp_path / "out", *extra)
    assert code != 0 and message in err and err.count("\n") == 1, err

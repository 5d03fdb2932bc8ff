"""train_lora.py on the tiny models: it learns, keeps cached data paired, writes loadable files (resuming: test_resume.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import free_port, generate_array, load_pipe
from training_helpers import PROMPT, denoising_losses, train_cli, write_images

REPO = Path(__file__).resolve().parents[1]


def base_args(model: str, images: Path, out: Path, steps: int, *extra) -> list:
    return ["-m", model, "--instance_data_dir", images, "--instance_prompt", PROMPT, "--resolution", 64,
            "--output_dir", out, "--max_train_steps", steps, "--seed", 0, *extra]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("instance"))


@pytest.mark.heavy
def test_lora_lowers_the_denoising_loss_of_its_images_on_tiny_sdxl(tiny_sdxl_path, images, tmp_path, capsys):
    code, _, err = train_cli(capsys, *base_args(tiny_sdxl_path, images, tmp_path, 200, "--train_batch_size", 4,
                                                "--rank", 8, "--learning_rate", 5e-3, "--checkpointing_steps", 1000))
    assert code == 0, err
    timesteps = [50, 200, 500, 800]
    before = denoising_losses(tiny_sdxl_path, images, None, timesteps, edm=False)
    after = denoising_losses(tiny_sdxl_path, images, tmp_path / "pytorch_lora_weights.safetensors", timesteps, edm=False)
    ratios = [a / b for a, b in zip(after, before)]
    assert max(ratios) < 0.95, f"epsilon MSE at t={timesteps}: base {before}, LoRA {after}"


@pytest.mark.heavy
def test_edm_lora_lowers_the_loss_on_tiny_edm_at_low_sigmas_too(tiny_edm_path, images, tmp_path, capsys):
    code, out, err = train_cli(capsys, *base_args(tiny_edm_path, images, tmp_path, 200, "--train_batch_size", 4,
                                                  "--rank", 8, "--learning_rate", 5e-3, "--checkpointing_steps", 1000))
    assert code == 0, err
    assert "EDM base detected from its scheduler config" in out
    sigmas = [0.05, 0.2, 0.5, 1.0, 3.0]
    before = denoising_losses(tiny_edm_path, images, None, sigmas, edm=True)
    after = denoising_losses(tiny_edm_path, images, tmp_path / "pytorch_lora_weights.safetensors", sigmas, edm=True)
    ratios = [a / b for a, b in zip(after, before)]
    message = f"x0 MSE at sigma={sigmas}: base {before}, LoRA {after}"
    assert all(r < 0.99 for r in ratios[:2]), message
    assert sum(ratios) / len(ratios) < 0.9, message


@pytest.mark.heavy
def test_outputs_load_through_diffusers_and_kohya_alike(tiny_sdxl_path, images, tmp_path, capsys):
    out = tmp_path / "my_dog"
    code, _, err = train_cli(capsys, *base_args(tiny_sdxl_path, images, out, 30, "--rank", 4, "--lora_alpha", 8,
                                                "--learning_rate", 1e-2, "--checkpointing_steps", 100))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "README.md", "buckets.json", "config.toml", "my_dog.safetensors", "pytorch_lora_weights.safetensors", "training_args.json"]
    args = json.loads((out / "training_args.json").read_text())
    assert args["rank"] == 4 and args["lora_alpha"] == 8
    assert "<lora:my_dog:1>" in (out / "README.md").read_text()
    kohya = load_file(out / "my_dog.safetensors")
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    arrays = []
    for file in (out / "pytorch_lora_weights.safetensors", out / "my_dog.safetensors"):
        pipe = load_pipe(tiny_sdxl_path)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        arrays.append(generate_array(pipe, PROMPT))
    plain = generate_array(load_pipe(tiny_sdxl_path), PROMPT)
    assert np.abs(arrays[0] - plain).max() > 1e-3, "the trained LoRA must change the image"
    assert np.abs(arrays[0] - arrays[1]).max() <= 1e-5


def test_cached_latents_stay_paired_with_their_captions_and_sizes(tmp_path):
    from common.data import Augment, BucketBatches, CachedLatents, Example, TrainingImages, collate, sdxl_buckets

    examples = []
    for k, size in enumerate([(64, 64), (48, 96), (96, 48), (64, 64), (40, 88), (80, 64)]):
        value = 20 + 35 * k
        Image.new("RGB", (size[1], size[0]), (value, value, value)).save(tmp_path / f"{k}.png")
        examples.append(Example(tmp_path / f"{k}.png", f"caption {k}", f"{k}.png"))
    augment = Augment(64, center_crop=True, random_flip=True, buckets=tuple(sdxl_buckets(64)))
    images = TrainingImages(examples, augment, repeats=3, seed=7)

    def fake_encode(pixels):  # a "latent" that records the image's grey level
        grey = pixels.mean(dim=(1, 2, 3), keepdim=True)
        return grey.expand(-1, 4, 2, 2).clone(), torch.zeros(pixels.shape[0], 4, 2, 2)

    cached = CachedLatents(images, fake_encode)
    order = BucketBatches(cached, batch_size=2, seed=7)
    loader = torch.utils.data.DataLoader(cached, batch_sampler=order, collate_fn=collate)
    seen = 0
    for epoch in range(3):
        order.start_epoch(epoch)
        for batch in loader:
            for index, latent, time_ids in zip(batch["index"].tolist(), batch["latent_mean"], batch["time_ids"]):
                expected_grey = (20 + 35 * index) / 127.5 - 1
                assert latent.mean().item() == pytest.approx(expected_grey, abs=1e-5), f"latent of example {index}"
                assert tuple(time_ids[:2].int().tolist()) == images.sizes[index], f"original size of example {index}"
                assert examples[index].caption == f"caption {index}"
                seen += 1
    assert seen == 3 * len(images)


def test_aspect_buckets_include_sdxls_training_shapes_and_train_non_square_images(tiny_sdxl_path, tmp_path, capsys, monkeypatch):
    import train_lora
    from common.data import nearest_bucket, sdxl_buckets

    buckets = set(sdxl_buckets(1024))
    assert {(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (768, 1344), (640, 1536)} <= buckets
    assert all(h * w <= 1024 * 1024 and h % 64 == 0 and w % 64 == 0 for h, w in buckets)
    trained_shapes = []
    original_latents = train_lora.batch_latents
    monkeypatch.setattr(train_lora, "batch_latents", lambda *a: trained_shapes.append(tuple((x := original_latents(*a)).shape)) or x)
    wide = write_images(tmp_path / "wide", count=2, size=(48, 112))  # (height, width)
    code, out, err = train_cli(capsys, *base_args(tiny_sdxl_path, wide, tmp_path / "out", 2, "--aspect_buckets", "--train_batch_size", 2))
    assert code == 0, err
    height, width = nearest_bucket(48, 112, sdxl_buckets(64))
    assert width > height, (height, width)
    assert trained_shapes == [(2, 4, height // 8, width // 8)] * 2, f"every step trains the {height}x{width} bucket: {trained_shapes}"


def test_lora_targets_follow_blocks_blora_and_dora(tiny_sdxl_path):
    import train_lora

    pipe = load_pipe(tiny_sdxl_path)
    config = train_lora.TrainConfig(pretrained_model_name_or_path="x", output_dir="y", use_blora=True)
    targets = train_lora.lora_target_modules(pipe.unet, config)
    assert targets and all(t.startswith(("up_blocks.0.attentions.0.", "up_blocks.0.attentions.1.")) for t in targets)
    assert any(t.startswith("up_blocks.0.attentions.1.") for t in targets)
    config = train_lora.TrainConfig(pretrained_model_name_or_path="x", output_dir="y", lora_unet_blocks="unet.mid_block", use_dora=True, rank=2)
    unet = train_lora.add_lora(pipe.unet, config)
    adapted = [n for n, m in unet.named_modules() if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector]
    assert adapted and all(n.startswith("mid_block.") for n in adapted)
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)


def test_prodigy_with_reference_style_boolean_values(tiny_sdxl_path, images, tmp_path, capsys, caplog):
    code, _, err = train_cli(capsys, *base_args(tiny_sdxl_path, images, tmp_path, 3, "--optimizer", "prodigy", "--learning_rate", 1.0,
                                                "--prodigy_safeguard_warmup=False", "--prodigy_use_bias_correction=True",
                                                "--prodigy_decouple", "false", "--hub_token", "hf_NotARealToken123",
                                                "--enable_xformers_memory_efficient_attention"))
    assert code == 0, err
    args = json.loads((tmp_path / "training_args.json").read_text())
    assert (args["optimizer"], args["prodigy_safeguard_warmup"], args["prodigy_use_bias_correction"], args["prodigy_decouple"]) == (
        "prodigy", False, True, False)
    assert "d*lr=" in err
    assert "--hub_token has no effect" in caplog.text and "--enable_xformers_memory_efficient_attention has no effect" in caplog.text
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not [p.name for p in written if b"hf_NotARealToken123" in p.read_bytes()], "a token reached the disk"


def unreadable(folder: Path) -> Path:
    write_images(folder, count=2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


BAD_TRAINING_INPUTS = {
    "empty data folder": (lambda tmp: ["--instance_data_dir", (tmp / "empty").mkdir() or tmp / "empty"], "has no images"),
    "unreadable image": (lambda tmp: ["--instance_data_dir", unreadable(tmp / "broken")], "cannot read image broken.png"),
    "missing caption column": (
        lambda tmp: ["--dataset_name", write_images(tmp / "dataset", 2), "--caption_column", "text"],
        "--caption_column 'text' is not in dataset"),
    "rank zero": (lambda tmp: ["--rank", "0"], "--rank must be a positive integer, got 0"),
    "non-positive snr gamma": (lambda tmp: ["--snr_gamma", "0"], "--snr_gamma must be > 0"),
    "missing checkpoint": (lambda tmp: ["--resume_from_checkpoint", str(tmp / "checkpoint-7")], "is not a checkpoint folder"),
    "no checkpoint to resume": (lambda tmp: ["--resume_from_checkpoint", "latest"], "no checkpoint-N folder in"),
    "boolean that is not one": (lambda tmp: ["--prodigy_decouple", "maybe"], "--prodigy_decouple 'maybe' is not a boolean"),
    "prior preservation without a class prompt": (
        lambda tmp: ["--with_prior_preservation", "--class_data_dir", str(tmp / "class")], "--with_prior_preservation needs"),
    "text fraction out of range": (lambda tmp: ["--train_text_encoder_ti_frac", "1.5"], "--train_text_encoder_ti_frac must be in (0, 1]"),
    "unknown base formulation": (lambda tmp: ["--base_formulation", "edm"], "--base_formulation 'edm'; choose one of auto, edm-native, discrete"),
    "edm-native without an EDM scheduler": (
        lambda tmp: ["--base_formulation", "edm-native"], "--base_formulation edm-native needs an EDM scheduler config"),
    "two EDM weights": (lambda tmp: ["--edm", "--edm_weighting", "unit-output", "--snr_gamma", "5"],
                        "--edm_weighting unit-output and --snr_gamma both set the EDM loss weight; keep one"),
    "dataset configuration of an image folder": (
        lambda tmp: ["--dataset_name", write_images(tmp / "dataset", 2), "--dataset_config_name", "large"],
        "--dataset_config_name 'large': "),
}


@pytest.mark.parametrize("case", BAD_TRAINING_INPUTS)
def test_bad_training_input_gives_one_clear_line(case, tiny_sdxl_path, images, tmp_path, capsys):
    make_extra, message = BAD_TRAINING_INPUTS[case]
    argv = base_args(tiny_sdxl_path, images, tmp_path / "out", 2)
    extra = make_extra(tmp_path)
    if extra[0] in ("--instance_data_dir", "--dataset_name"):
        argv = argv[:2] + argv[4:]  # replace the good data folder
    code, _, err = train_cli(capsys, *argv, *extra)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], err
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.heavy
def test_torchrun_with_two_processes_shards_the_data_and_saves_once(tiny_sdxl_path, images, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "train_lora.py",
               *map(str, base_args(tiny_sdxl_path, images, tmp_path / "ddp", 4, "--train_batch_size", 1, "--checkpointing_steps", 2))]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es), 2 batches each per epoch, 4 steps" in result.stdout, result.stdout
    assert result.stdout.count("done: 4 steps") == 1
    assert (tmp_path / "ddp" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "ddp").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


REFERENCE_FLAGS = """pretrained_model_name_or_path pretrained_vae_model_name_or_path revision variant dataset_name
dataset_config_name instance_data_dir cache_dir image_column caption_column repeats class_data_dir instance_prompt
token_abstraction num_new_tokens_per_abstraction class_prompt validation_prompt num_validation_images validation_epochs
do_edm_style_training with_prior_preservation prior_loss_weight num_class_images output_dir seed resolution center_crop
random_flip train_text_encoder train_batch_size sample_batch_size num_train_epochs max_train_steps checkpointing_steps
checkpoints_total_limit resume_from_checkpoint gradient_accumulation_steps gradient_checkpointing learning_rate clip_skip
text_encoder_lr scale_lr lr_scheduler snr_gamma lr_warmup_steps lr_num_cycles lr_power dataloader_num_workers
train_text_encoder_ti train_text_encoder_ti_frac train_text_encoder_frac optimizer use_8bit_adam adam_beta1 adam_beta2
prodigy_beta3 prodigy_decouple adam_weight_decay adam_weight_decay_text_encoder adam_epsilon prodigy_use_bias_correction
prodigy_safeguard_warmup max_grad_norm push_to_hub hub_token hub_model_id logging_dir allow_tf32 report_to
mixed_precision prior_generation_precision local_rank enable_xformers_memory_efficient_attention noise_offset rank
use_dora lora_unet_blocks use_blora cache_latents""".split()


def test_every_flag_of_the_reference_script_is_accepted_under_its_own_spelling():
    import typer.main

    import train_lora

    command = typer.main.get_command(train_lora.app)
    accepted = {option for parameter in command.params for option in parameter.opts}
    assert len(REFERENCE_FLAGS) == 79
    missing = [flag for flag in REFERENCE_FLAGS if f"--{flag}" not in accepted]
    assert not missing, f"not accepted: {missing}"


def test_each_option_is_declared_once_as_a_config_field():
    import dataclasses

    import typer.main

    import train_lora

    command = typer.main.get_command(train_lora.app)
    declared = [f.name for cls in (train_lora.TrainConfig, train_lora.IgnoredOptions, train_lora.ConfigFiles)
                for f in dataclasses.fields(cls) if "option" in f.metadata]
    assert sorted(p.name for p in command.params) == sorted(declared)
    recorded = {f.name for f in dataclasses.fields(train_lora.TrainConfig)}
    assert recorded.isdisjoint(f.name for f in dataclasses.fields(train_lora.IgnoredOptions)), "hub_token and co. are never recorded"


def test_dataset_captions_are_used_per_image_and_bad_images_can_be_skipped(tiny_sdxl_path, tmp_path, capsys, caplog):
    dataset = write_images(tmp_path / "dataset", count=4)
    rows = [{"file_name": f"image_{k}.png", "text": f"a photo of sks {'dog' if k % 2 else 'cat'}"} for k in range(4)]
    (dataset / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    argv = ["-m", tiny_sdxl_path, "--dataset_name", dataset, "--caption_column", "text", "--resolution", 64,
            "--output_dir", tmp_path / "out", "--max_train_steps", 1]
    code, out, err = train_cli(capsys, *argv)
    assert code == 0, err
    assert "4 images, captions 4 from the dataset (2 distinct); repeats 4 x1: 4 examples an epoch" in out
    broken = unreadable(tmp_path / "broken")
    code, out, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", broken, "--instance_prompt", PROMPT,
                               "--resolution", 64, "--output_dir", tmp_path / "out2", "--max_train_steps", 1, "--skip_bad_images")
    assert code == 0, err
    assert "skipping unreadable image broken.png" in caplog.text and "2 images, captions 2 from --instance_prompt" in out


@pytest.mark.heavy
def test_formulation_is_chosen_from_the_scheduler_config(tiny_sdxl_path, tiny_edm_path, tmp_path, capsys):
    import math

    import train_lora
    from common.cli import UserError
    from common.losses import DiscreteFormulation, EDMFormulation
    from training_helpers import reset_accelerate

    reset_accelerate()
    from accelerate import Accelerator

    accelerator = Accelerator()

    def chosen(model, pipe=None, **options):
        config = train_lora.TrainConfig(pretrained_model_name_or_path=model, output_dir="x", **options)
        formulation = train_lora.choose_formulation(config, pipe or load_pipe(model), accelerator)
        assert getattr(formulation, "p_mean", None) == config.edm_p_mean, "training_args.json records the P_mean used"
        return formulation

    discrete = chosen(tiny_sdxl_path, snr_gamma=5.0)
    assert isinstance(discrete, DiscreteFormulation) and discrete.prediction_type == "epsilon" and discrete.snr_gamma == 5.0
    assert chosen(tiny_sdxl_path, prediction_type="v_prediction").prediction_type == "v_prediction"
    edm_on_discrete = chosen(tiny_sdxl_path, edm=True, snr_gamma=5.0, snr_weighting="soft")
    assert isinstance(edm_on_discrete, EDMFormulation) and edm_on_discrete.schedule_sigmas is not None
    assert (edm_on_discrete.sigma_data, edm_on_discrete.soft_min_snr) == (1.0, True)
    assert (edm_on_discrete.p_mean, edm_on_discrete.p_std) == (-1.2 + math.log(2), 1.2), "the paper's P_mean in sigma_data units"
    assert chosen(tiny_sdxl_path, edm=True, edm_weighting="unit-output").weighting == "unit-output"
    native = chosen(tiny_edm_path)
    assert isinstance(native, EDMFormulation) and native.schedule_sigmas is None and native.sigma_data == 0.5
    assert (native.p_mean, native.p_std, native.prediction_type) == (-1.2, 1.2, "epsilon")
    with pytest.raises(UserError, match="--prediction_type v_prediction contradicts this EDM base's scheduler"):
        chosen(tiny_edm_path, prediction_type="v_prediction")
    with pytest.raises(UserError, match="--base_formulation discrete needs the base's beta schedule"):
        chosen(tiny_edm_path, base_formulation="discrete")

    # an EDM sampler saved with SDXL's betas: trained as discrete, sampled (validation images) the same way
    from diffusers import DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler

    pipe = load_pipe(tiny_sdxl_path)
    pipe.scheduler = EDMDPMSolverMultistepScheduler.from_config({k: v for k, v in pipe.scheduler.config.items() if v is not None})
    capsys.readouterr()
    assert isinstance(chosen(tiny_sdxl_path, pipe), DiscreteFormulation)
    assert "treating the base as a discrete DDPM model" in capsys.readouterr().out
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and pipe.scheduler.config.use_karras_sigmas
    pipe.scheduler = EDMDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    stated = chosen(tiny_sdxl_path, pipe, base_formulation="edm-native")
    assert isinstance(stated, EDMFormulation) and stated.schedule_sigmas is None
    assert isinstance(pipe.scheduler, EDMDPMSolverMultistepScheduler)


@pytest.mark.parametrize("fixture", ["tiny_sdxl_path", "tiny_edm_path"])
def test_normalised_latents_are_what_the_pipeline_decodes(fixture, request):
    from common.models import normalise_latents

    pipe = load_pipe(request.getfixturevalue(fixture))
    raw = torch.randn(2, 4, 8, 8)
    normalised = normalise_latents(raw, pipe.vae.config)
    config = pipe.vae.config
    # StableDiffusionXLPipeline.__call__, before vae.decode:
    if config.get("latents_mean") is not None:
        mean, std = torch.tensor(config.latents_mean).view(1, 4, 1, 1), torch.tensor(config.latents_std).view(1, 4, 1, 1)
        decoded_input = normalised * std / config.scaling_factor + mean
    else:
        decoded_input = normalised / config.scaling_factor
    torch.testing.assert_close(decoded_input, raw, rtol=1e-5, atol=1e-5)


def test_validation_images_and_checkpoint_limit(tiny_sdxl_path, images, tmp_path, capsys):
    code, _, err = train_cli(capsys, *base_args(tiny_sdxl_path, images, tmp_path, 3, "--train_batch_size", 4,
                                                "--checkpointing_steps", 1, "--checkpoints_total_limit", 2,
                                                "--validation_prompt", PROMPT, "--validation_epochs", 2,
                                                "--num_validation_images", 2))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in (tmp_path / "validation").iterdir()) == ["step-2"]
    assert len(list((tmp_path / "validation" / "step-2").glob("*.png"))) == 2


def test_torch_compile_wraps_the_lora_unet(tiny_sdxl_path, images, tmp_path, capsys, monkeypatch):
    compiled = []

    def record(module, *args, **kwargs):  # inductor takes minutes on a CPU; the wiring is what is checked here
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", record)
    code, _, err = train_cli(capsys, *base_args(tiny_sdxl_path, images, tmp_path, 1, "--torch_compile"))
    assert code == 0, err
    assert len(compiled) == 1 and hasattr(compiled[0], "peft_config")


@pytest.mark.heavy
def test_init_lora_continues_from_a_diffusers_or_kohya_lora(tiny_sdxl_path, images, tmp_path, capsys):
    code, _, err = train_cli(capsys, *base_args(tiny_sdxl_path, images, tmp_path / "first", 5, "--rank", 4,
                                                "--lora_alpha", 8, "--learning_rate", 1e-2))
    assert code == 0, err
    first = load_file(tmp_path / "first" / "pytorch_lora_weights.safetensors")
    for start in (tmp_path / "first" / "pytorch_lora_weights.safetensors", tmp_path / "first" / "first.safetensors"):
        out = tmp_path / f"again-{start.stem}"
        code, _, err = train_cli(capsys, *base_args(tiny_sdxl_path, images, out, 1, "--rank", 4, "--lora_alpha", 8,
                                                    "--learning_rate", 1e-12, "--init_lora", start))
        assert code == 0, err
        again = load_file(out / "pytorch_lora_weights.safetensors")
        assert again.keys() == first.keys()
        worst = max(float((again[k] - first[k]).abs().max()) for k in first)
        assert worst < 1e-8, f"{start.name}: continued weights moved by {worst} after one step at lr 1e-12"
    code, _, err = train_cli(capsys, *base_args(tiny_sdxl_path, images, tmp_path / "wrong", 1, "--rank", 2,
                                                "--init_lora", tmp_path / "first"))
    assert code == 2 and "--init_lora has rank [4] but --rank is 2; pass --rank 4" in err

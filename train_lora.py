#!/usr/bin/env python
"""DreamBooth LoRA/DoRA training for SDXL-family models, with EDM training done as the paper says.

    accelerate launch train_lora.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --instance_data_dir dog/ --instance_prompt "a photo of TOK dog" --output_dir out/dog \\
        --rank 16 --learning_rate 1e-4 --max_train_steps 500 --mixed_precision bf16 --cache_latents

Accepts the flags of diffusers' train_dreambooth_lora_sdxl_advanced.py under their own spelling.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import typer
from tqdm.auto import tqdm

from common.cli import (
    MANY_VALUED, Interrupted, UserError, config_from_options, option, options_command, parse_bool, run_app,
)
from common.files import atomic_folder, atomic_path
from common.lora_layers import LORA_LAYERS_HELP

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")
logger = logging.getLogger("train_lora")

# help panels
MODEL, DATA, LORA, OPTIM, LOSS, OUTPUT = "Model", "Data", "LoRA", "Optimizer", "Loss", "Output"
MEMORY, TEXT = "Memory and speed", "Pivotal tuning, text encoders, prior preservation"
OPTIMIZERS = ("adamw", "prodigy", "adafactor")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class TrainConfig:
    """Every option of the command, declared once (default, help, panel); validated by make_config and saved
    as training_args.json."""

    pretrained_model_name_or_path: Optional[str] = option(
        None, "--model", "-m", help="tiny-sdxl, tiny-edm, a diffusers folder, a single-file checkpoint (.safetensors, as "
        "WebUI and ComfyUI keep them; its flavour is read from its keys) or a hub id", panel=MODEL
    )
    pretrained_vae_model_name_or_path: Optional[str] = option(
        None, "--vae", help="an fp16-safe VAE (a folder, hub id or single file); the model's VAE otherwise runs in fp32",
        panel=MODEL,
    )
    revision: Optional[str] = option(None, help="hub revision (network)", panel=MODEL)
    variant: Optional[str] = option(None, help="weight variant, e.g. fp16", panel=MODEL)
    cache_dir: Optional[str] = option(None, help="hub download cache", panel=MODEL)
    instance_data_dir: Optional[str] = option(
        None, "--train_data_dir", help="folder of training images: caption files beside them, kohya's N_prompt subfolders "
        "(N repeats), or a metadata.jsonl imagefolder", panel=DATA,
    )
    instance_prompt: Optional[str] = option(
        None, help="the caption of images without a caption file (or, with --prefix_instance_prompt, put before theirs)",
        panel=DATA,
    )
    caption_extension: str = option(".txt", help="the caption file beside each image (0001.txt for 0001.png)", panel=DATA)
    shuffle_caption: bool = option(False, help="shuffle each caption's comma-separated tags every time it is shown", panel=DATA)
    keep_tokens: int = option(0, help="with --shuffle_caption and tag dropout: the first N tags stay in place", panel=DATA)
    caption_dropout_rate: float = option(0.0, help="train this share of examples unconditioned (an empty caption)", panel=DATA)
    caption_tag_dropout_rate: float = option(0.0, help="drop each tag after --keep_tokens with this probability", panel=DATA)
    caption_dropout_every_n_epochs: int = option(0, help="kohya's: every Nth epoch trains every caption empty", panel=DATA)
    caption_prefix: Optional[str] = option(None, help="kohya's: text put before every caption (before shuffling)", panel=DATA)
    caption_suffix: Optional[str] = option(None, help="kohya's: text put after every caption", panel=DATA)
    caption_separator: str = option(",", help="kohya's: what separates a caption's tags", panel=DATA)
    keep_tokens_separator: Optional[str] = option(
        None, help="kohya's: the tags before it (and after a second one) stay in place, instead of --keep_tokens", panel=DATA)
    secondary_separator: Optional[str] = option(
        None, help="kohya's: joins parts into one tag for shuffling and dropout; written as --caption_separator", panel=DATA)
    enable_wildcard: bool = option(False, help="kohya's: a caption file's lines are alternatives (one drawn each time) and "
                                   "{a|b} picks one", panel=DATA)
    prefix_instance_prompt: bool = option(False, help="put --instance_prompt before each caption file's caption", panel=DATA)
    masked_loss: bool = option(
        False, "--alpha_mask", help="weight the loss by a mask: the image's alpha channel, or its file in --mask_dir", panel=DATA
    )
    mask_dir: Optional[str] = option(
        None, "--conditioning_data_dir", help="with --masked_loss: a mask per image, same file stem (white trains, black not)",
        panel=DATA,
    )
    dataset_name: Optional[str] = option(None, help="a local ImageFolder/dataset (or hub id, network)", panel=DATA)
    dataset_config_name: Optional[str] = option(None, help="the configuration of a hub --dataset_name", panel=DATA)
    image_column: str = option("image", panel=DATA)
    caption_column: Optional[str] = option(None, help="per-image captions", panel=DATA)
    repeats: int = option(1, help="how often an epoch shows each image (times an N_prompt folder's N)", panel=DATA)
    resolution: int = option(
        1024, help="side of the square (or the bucket area's side); kohya's W,H trains W x H images (buckets at that area)",
        panel=DATA, cli_type=str, parse=lambda name, value: area_side(parse_resolution(value)),
    )
    center_crop: bool = option(False, panel=DATA)
    random_flip: bool = option(False, "--flip_aug", panel=DATA)
    image_interpolation_mode: str = option(
        "lanczos", help="lanczos, bicubic, bilinear, nearest, box, hamming", panel=DATA
    )
    aspect_buckets: bool = option(False, "--enable_bucket", help="train each image at the bucket of its aspect ratio: SDXL's "
                                  "published ones, or kohya's with any of the bucket options below", panel=DATA)
    min_bucket_reso: Optional[int] = option(None, help="kohya's buckets: the smallest side (default 256)", panel=DATA)
    max_bucket_reso: Optional[int] = option(None, help="kohya's buckets: the largest side (default 1024)", panel=DATA)
    bucket_reso_steps: Optional[int] = option(None, help="kohya's buckets: sides are multiples of this (default 64)", panel=DATA)
    bucket_no_upscale: bool = option(False, help="kohya's buckets: a small image gets a smaller bucket instead of being "
                                     "enlarged", panel=DATA)
    dataset_config: Optional[str] = option(
        None, help="kohya's dataset TOML (or JSON): [general], [[datasets]] with their own resolution and batch size, "
        "[[datasets.subsets]] each with its folder, repeats, caption options and is_reg", panel=DATA)
    reg_data_dir: Optional[str] = option(
        None, help="kohya's regularisation folder of N_class folders: trained in the instance batches at --prior_loss_weight, "
        "repeated or trimmed to the instance images as kohya does", panel=DATA)
    validation_split: float = option(0.0, help="hold this share of each dataset's images out of training for the validation "
                                     "loss (kohya's)", panel=DATA)
    validation_seed: Optional[int] = option(None, help="the seed of which images are held out (default --seed)", panel=DATA)
    validate_every_n_steps: Optional[int] = option(None, help="the validation loss every N steps (default: after every "
                                                   "epoch, with --validation_split)", panel=DATA)
    validate_every_n_epochs: Optional[int] = option(None, help="the validation loss after every N epochs", panel=DATA)
    skip_bad_images: bool = option(False, help="skip unreadable images with a warning", panel=DATA)
    train_batch_size: int = option(4, panel=DATA)
    num_train_epochs: int = option(1, "--max_train_epochs", panel=DATA)
    max_train_steps: Optional[int] = option(None, help="optimizer steps (overrides epochs)", panel=DATA)
    gradient_accumulation_steps: int = option(1, panel=DATA)
    dataloader_num_workers: int = option(0, "--max_data_loader_n_workers", panel=DATA)
    adapter: str = option(
        "lora", help="lora (LoCon with --conv_rank), loha or lokr: trained by peft, written as LyCORIS writes them",
        panel=LORA,
    )
    rank: int = option(4, "--network_dim", help="LoRA rank r", panel=LORA)
    lora_alpha: Optional[float] = option(None, "--network_alpha", help="LoRA alpha (default: the rank, scale 1)", panel=LORA)
    conv_rank: Optional[int] = option(
        None, "--conv_dim", help="also adapt the UNet's ResNet convolutions (conv1, conv2, conv_shortcut) and its down- "
        "and upsamplers at this rank (LoCon, as kohya's --conv_dim)", panel=LORA,
    )
    conv_alpha: Optional[float] = option(None, help="alpha of the convolutions (default: --conv_rank)", panel=LORA)
    lora_dropout: float = option(0.0, panel=LORA)
    rank_dropout: float = option(0.0, help="LoHa, LoKr: drop rows of a layer's ΔW with this probability", panel=LORA)
    module_dropout: float = option(0.0, help="LoHa, LoKr: leave a layer's adapter out of a step with this probability", panel=LORA)
    use_tucker: bool = option(False, help="LoKr: 3x3 convolutions in the effective-conv (Tucker) form", panel=LORA)
    lokr_factor: int = option(-1, help="LoKr: the Kronecker factor (-1: as square a split as each layer allows)", panel=LORA)
    decompose_both: bool = option(False, help="LoKr: factor the smaller Kronecker factor at --rank too", panel=LORA)
    use_dora: bool = option(False, panel=LORA)
    lora_unet_blocks: Optional[str] = option(
        None, help="comma-separated blocks, e.g. unet.up_blocks.0.attentions.0", panel=LORA
    )
    use_blora: bool = option(False, help="B-LoRA: only the content and style blocks", panel=LORA)
    lora_layers: Optional[str] = option(None, help=LORA_LAYERS_HELP + " (default attn; kohya's attn-mlp with kohya's "
                                        "--network_module or --network_dim)", panel=LORA)
    init_lora: Optional[str] = option(
        None, "--network_weights", help="start the UNet LoRA from this one (diffusers or kohya file or folder)", panel=LORA
    )
    optimizer: str = option(
        "adamw", help="adamw, prodigy or adafactor (any case; Adafactor at --learning_rate, no relative step)", panel=OPTIM
    )
    learning_rate: float = option(1e-4, "--unet_lr", panel=OPTIM)
    loraplus_lr_ratio: Optional[float] = option(
        None, help="LoRA+ (Hayou et al. 2024): B matrices learn at this multiple of the rate (16 is usual)", panel=OPTIM
    )
    down_lr_weight: Optional[str] = option(
        None, help="9 comma-separated weights of SDXL's input blocks' learning rates, or a preset (cosine, sine, linear, "
        "reverse_linear, zeros, NAME+BASE), as kohya's; a block of weight 0 is not trained", panel=OPTIM,
    )
    mid_lr_weight: Optional[str] = option(None, help="3 weights of the middle block's parts", panel=OPTIM)
    up_lr_weight: Optional[str] = option(None, help="9 weights of the output blocks, or a preset", panel=OPTIM)
    block_lr_zero_threshold: float = option(0.0, help="block weights at or below this are 0 (not trained)", panel=OPTIM)
    use_ema: bool = option(
        False, help="keep an EMA of the UNet adapter's weights: saved beside the raw ones (NAME_ema) and used for samples",
        panel=OPTIM,
    )
    ema_decay: float = option(0.999, help="EMA decay, reached after a warm-up of min(decay, (1 + t) / (10 + t))", panel=OPTIM)
    scale_lr: bool = option(False, panel=OPTIM)
    use_8bit_adam: bool = option(False, help="bitsandbytes AdamW8bit (CUDA)", panel=OPTIM)
    adam_beta1: float = option(0.9, panel=OPTIM)
    adam_beta2: float = option(0.999, panel=OPTIM)
    adam_weight_decay: float = option(1e-4, panel=OPTIM)
    adam_epsilon: float = option(1e-8, panel=OPTIM)
    prodigy_beta3: Optional[float] = option(None, panel=OPTIM)
    prodigy_decouple: bool = option(True, help="True/False", panel=OPTIM, cli_type=str, parse=parse_bool)
    prodigy_use_bias_correction: bool = option(True, help="True/False", panel=OPTIM, cli_type=str, parse=parse_bool)
    prodigy_safeguard_warmup: bool = option(True, help="True/False", panel=OPTIM, cli_type=str, parse=parse_bool)
    prodigy_d_coef: float = option(1.0, help="Prodigy's multiplier of its estimated step size (kohya users' d_coef)", panel=OPTIM)
    max_grad_norm: float = option(1.0, panel=OPTIM)
    lr_scheduler: str = option("constant", help=", ".join(LR_SCHEDULERS), panel=OPTIM)
    lr_warmup_steps: int = option(500, panel=OPTIM)
    lr_num_cycles: int = option(1, "--lr_scheduler_num_cycles", panel=OPTIM)
    lr_power: float = option(1.0, "--lr_scheduler_power", panel=OPTIM)
    edm: bool = option(
        False,
        "--do_edm_style_training",
        "--do-edm-style-training",
        help="EDM training (automatic on EDM bases)",
        panel=LOSS,
    )
    edm_p_mean: Optional[float] = option(
        None, help="mean of ln(sigma) (default: -1.2 + ln(sigma_data / 0.5): -1.2 on Playground v2.5, -0.51 on SDXL)",
        panel=LOSS,
    )
    edm_p_std: float = option(1.2, help="std of ln(sigma)", panel=LOSS)
    edm_weighting: str = option(
        "table1", help="table1 (EDM's lambda(sigma)) or unit-output (1/c_out^2: the epsilon MSE on an epsilon base)",
        panel=LOSS,
    )
    base_formulation: str = option(
        "auto", help="auto (read from the scheduler config), edm-native or discrete: how the base was trained",
        panel=MODEL,
    )
    snr_gamma: Optional[float] = option(None, "--min_snr_gamma", help="Min-SNR-gamma (5 is usual)", panel=LOSS)
    snr_weighting: str = option("hard", help="hard (min) or soft (smooth min) with --snr_gamma under EDM", panel=LOSS)
    prediction_type: Optional[str] = option(
        None, help="epsilon or v_prediction: what the model predicts (default: read from it); v_prediction on an epsilon base "
        "is a conversion run", panel=LOSS,
    )
    v_parameterization: bool = option(False, help="kohya's spelling of --prediction_type v_prediction", panel=LOSS)
    zero_terminal_snr: bool = option(
        False, "--rescale_betas_zero_snr", help="rescale the base's schedule to zero terminal SNR (Lin et al. 2024, Algorithm "
        "1; needs v-prediction); models that say so (a ztsnr key, rescale_betas_zero_snr) are read so without it", panel=LOSS,
    )
    noise_offset: float = option(0.0, help="offset noise strength (0.05-0.1 is usual)", panel=LOSS)
    noise_offset_random_strength: bool = option(False, help="draw each batch's offset strength in [0, --noise_offset)", panel=LOSS)
    multires_noise_iterations: int = option(0, help="multi-resolution (pyramid) noise levels, kohya's (6-10 is usual)", panel=LOSS)
    multires_noise_discount: float = option(0.3, help="weight ratio between multi-resolution noise levels", panel=LOSS)
    ip_noise_gamma: float = option(0.0, help="input perturbation gamma (Ning et al. 2023; 0.1 is usual)", panel=LOSS)
    ip_noise_gamma_random_strength: bool = option(False, help="draw each batch's gamma in [0, --ip_noise_gamma)", panel=LOSS)
    min_timestep: Optional[int] = option(None, help="lowest timestep drawn (discrete training; default 0)", panel=LOSS)
    max_timestep: Optional[int] = option(None, help="timesteps drawn are below this (default: the schedule's 1000)", panel=LOSS)
    min_sigma: Optional[float] = option(None, help="EDM: the log-normal sigmas conditioned on sigma >= this", panel=LOSS)
    max_sigma: Optional[float] = option(None, help="EDM: the log-normal sigmas conditioned on sigma <= this", panel=LOSS)
    loss_type: str = option("l2", help="l2, l1, huber or smooth_l1 (scheduled pseudo-Huber, Khrapov et al. 2024)", panel=LOSS)
    huber_c: float = option(0.1, help="pseudo-Huber threshold c in (0, 1]", panel=LOSS)
    huber_schedule: str = option("snr", help="constant, exponential or snr: how c changes with the noise level", panel=LOSS)
    huber_scale: float = option(1.0, help="multiplies c under the constant and exponential schedules (kohya's)", panel=LOSS)
    debiased_estimation_loss: bool = option(False, help="weight by 1/sqrt(SNR) (Yu et al. 2024); discrete training", panel=LOSS)
    cache_latents: bool = option(False, help="encode every image once", panel=MEMORY)
    cache_latents_to_disk: bool = option(
        False, help="keep the encoded images on disk, named by content: reused by later runs and resumes, memory flat in "
        "the dataset's size (implies --cache_latents)", panel=MEMORY,
    )
    cache_text_encoder_outputs_to_disk: bool = option(
        False, help="keep the captions' text-encoder outputs on disk the same way once the text encoders are frozen",
        panel=MEMORY,
    )
    disk_cache_dir: Optional[str] = option(
        None, help="where the disk caches live (default: $SDXL_PERSONALIZE_CACHE/train_cache, else ~/.cache/sdxl_personalize/"
        "train_cache)", panel=MEMORY,
    )
    gradient_checkpointing: bool = option(False, panel=MEMORY)
    mixed_precision: Optional[str] = option(None, help="no, fp16, bf16", panel=MEMORY)
    allow_tf32: bool = option(False, panel=MEMORY)
    torch_compile: bool = option(False, panel=MEMORY)
    output_dir: str = option("lora-dreambooth-model", "-o", panel=OUTPUT)
    checkpointing_steps: int = option(500, help="save the whole training state (for --resume_from_checkpoint) every N steps",
                                      panel=OUTPUT)
    output_name: Optional[str] = option(None, help="the adapter files' name (default: --output_dir's own folder name)",
                                        panel=OUTPUT)
    save_every_n_epochs: Optional[int] = option(
        None, help="also write the adapter as NAME-000004.safetensors after every N epochs (kohya's; not after the last: "
        "that is NAME.safetensors)", panel=OUTPUT)
    save_every_n_steps: Optional[int] = option(
        None, help="also write the adapter as NAME-step00000100.safetensors every N steps (kohya's)", panel=OUTPUT)
    save_last_n_epochs: Optional[int] = option(
        None, help="keep only the last N epoch files (kohya's: a count of files)", panel=OUTPUT)
    save_last_n_steps: Optional[int] = option(
        None, help="keep only the step files of the last N steps (kohya's: a span of steps, not a count)", panel=OUTPUT)
    save_precision: Optional[str] = option(
        None, help="float, fp16 or bf16: the precision of every adapter file written (default: float32)", panel=OUTPUT)
    no_metadata: bool = option(False, help="write only the minimum of kohya's metadata into the adapter files (no dataset, "
                               "tags, buckets or times)", panel=OUTPUT)
    checkpoints_total_limit: Optional[int] = option(None, panel=OUTPUT)
    resume_from_checkpoint: Optional[str] = option(None, "--resume", help="latest or a checkpoint folder", panel=OUTPUT)
    force: bool = option(
        False, help="start over in an --output_dir that holds another run (its checkpoints are removed)", panel=OUTPUT
    )
    validation_prompt: Optional[list[str]] = option(
        None, help="a prompt to sample during training; repeat the option for several", panel=OUTPUT
    )
    sample_prompts: Optional[str] = option(
        None, help="a file of sample prompts, one per line, with kohya's --n, --w, --h, --d, --l and --s options", panel=OUTPUT
    )
    num_validation_images: int = option(4, help="images per sample prompt (seeds fixed per prompt)", panel=OUTPUT)
    guidance_rescale: Optional[float] = option(
        None, help="the samples' guidance rescale (Lin et al. 2024, Sec. 3.4; default 0.7 on zero-terminal-SNR models, else 0)",
        panel=OUTPUT,
    )
    prompt_syntax: str = option(
        "plain", help="how the sample prompts are read: plain, webui or comfyui, as infer.py reads them (captions are always "
        "plain text)", panel=OUTPUT,
    )
    emphasis: str = option("original", help="with --prompt_syntax webui: original or no_norm, WebUI's emphasis", panel=OUTPUT)
    validation_steps: Optional[int] = option(None, "--sample_every_n_steps", help="sample every N steps", panel=OUTPUT)
    validation_epochs: Optional[int] = option(
        None, "--sample_every_n_epochs", help="sample every N epochs (default: 50 without --validation_steps)", panel=OUTPUT
    )
    seed: int = option(
        0, help="seeds the LoRA's initialisation, the noise, the data order and augmentation", panel=OUTPUT
    )
    report_to: str = option("none", "--log_with", help="none, tensorboard, wandb, ... (must be installed)", panel=OUTPUT)
    logging_steps: int = option(
        10, help="show and log the mean loss every N steps: reading it waits for the GPU, so the steps between run ahead",
        panel=OUTPUT,
    )
    logging_dir: str = option("logs", panel=OUTPUT)
    train_text_encoder_ti: bool = option(False, panel=TEXT)
    train_text_encoder_ti_frac: float = option(0.5, panel=TEXT)
    token_abstraction: str = option("TOK", panel=TEXT)
    num_new_tokens_per_abstraction: int = option(2, panel=TEXT)
    initializer_token: Optional[str] = option(
        None, help="start the new rows from this word's embedding (default: random with the table's std)", panel=TEXT
    )
    train_text_encoder: bool = option(False, panel=TEXT)
    train_text_encoder_frac: float = option(1.0, panel=TEXT)
    text_encoder_lr: float = option(5e-6, panel=TEXT)
    adam_weight_decay_text_encoder: Optional[float] = option(None, panel=TEXT)
    clip_skip: Optional[int] = option(
        None, help="text-encoder layers skipped before the penultimate, for captions and samples (diffusers' numbering; "
        "WebUI's 'Clip skip' is this plus 2, ComfyUI's CLIPSetLastLayer -(this + 2))", panel=TEXT,
    )
    max_token_length: int = option(
        75, help="75 (captions cut at CLIP's window), 150 or 225: longer captions in 75-token chunks, as ComfyUI "
        "encodes prompts (sample with infer.py --max_token_length)", panel=TEXT,
    )
    with_prior_preservation: bool = option(False, panel=TEXT)
    class_data_dir: Optional[str] = option(None, panel=TEXT)
    class_prompt: Optional[str] = option(None, panel=TEXT)
    num_class_images: int = option(100, panel=TEXT)
    prior_loss_weight: float = option(1.0, panel=TEXT)
    sample_batch_size: int = option(4, panel=TEXT)
    prior_generation_precision: Optional[str] = option(None, panel=TEXT)
    # abstraction -> its new tokens; filled in by pivotal tuning, recorded in training_args.json
    token_map: dict = field(default_factory=dict)
    # (width, height) of --resolution W,H where it is no square; None: resolution x resolution
    training_size: Optional[tuple] = None
    # the run's options as config.toml holds them (common.config_file); written beside the LoRA, not into training_args.json
    configuration: str = field(default="", repr=False, metadata={"recorded": False})


def recorded(config: TrainConfig) -> dict:
    """The config as training_args.json and the trackers record it."""
    fields = {f.name for f in dataclasses.fields(config) if f.metadata.get("recorded", True)}
    return {k: v for k, v in asdict(config).items() if k in fields}


@dataclass
class ConfigFiles:
    """kohya's --config_file and --output_config (common.config_file)."""

    config_file: Optional[str] = option(
        None, help="a TOML file of options beneath the command line (kohya's: sections flattened, its option names read "
        "as ours; a run's own config.toml re-runs it)", panel=OUTPUT,
    )
    output_config: bool = option(False, help="write the options that differ from their defaults to --config_file and stop",
                                 panel=OUTPUT)


def parse_resolution(value) -> tuple[int, int]:
    """--resolution N, or kohya's "W,H": (width, height) in pixels."""
    parts = [p.strip() for p in str(value).split(",")]
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--resolution {value!r} is not a number of pixels, e.g. 1024 or 1024,768") from None
    if len(sides) > 2:
        raise UserError(f"--resolution {value!r}: one side (1024) or width,height (1024,768)")
    return (sides[0], sides[-1])


def area_side(size: tuple[int, int]) -> int:
    """The side of the square of a (width, height)'s area: what buckets and samples are sized by."""
    return size[0] if size[0] == size[1] else round(math.sqrt(size[0] * size[1]) / 8) * 8


@dataclass
class IgnoredOptions:
    """Flags of diffusers' script accepted so that its command lines run unchanged; never recorded (a token is
    a secret)."""

    enable_xformers_memory_efficient_attention: bool = option(
        False, panel=MEMORY, no_effect="PyTorch's scaled-dot-product attention is always used"
    )
    push_to_hub: bool = option(
        False, panel=OUTPUT, help="refused: it needs network access; upload --output_dir yourself"
    )
    hub_token: Optional[str] = option(None, panel=OUTPUT, no_effect="only --push_to_hub would use it")
    hub_model_id: Optional[str] = option(None, panel=OUTPUT, no_effect="only --push_to_hub would use it")
    local_rank: int = option(
        -1, panel=OUTPUT, help="set by launchers; accelerate reads the process's rank from the environment"
    )
    # kohya's sd-scripts flags whose meaning differs here: refused with the option that does it
    # kohya's network and optimizer options, read into ours (common.kohya_options)
    network_module: Optional[str] = option(
        None, panel=LORA, help="kohya's: networks.lora (LoRA, LoCon with conv_dim) or lycoris.kohya (with algo=locon|loha|lokr)"
    )
    network_args: Optional[list[str]] = option(
        None, panel=LORA, help="kohya's key=value settings of --network_module: algo, preset, conv_dim, conv_alpha, dropout, "
        "rank_dropout, module_dropout, use_tucker, factor, decompose_both, loraplus_lr_ratio, down/mid/up_lr_weight",
    )
    network_dropout: Optional[float] = option(
        None, panel=LORA, refused="kohya drops a LoRA's hidden units, peft its inputs: --lora_dropout is the nearest"
    )
    optimizer_type: Optional[str] = option(None, panel=OPTIM, help="kohya's: AdamW, AdamW8bit, Prodigy or Adafactor")
    optimizer_args: Optional[list[str]] = option(
        None, panel=OPTIM, help="kohya's key=value settings of --optimizer_type: weight_decay, eps, betas, and Prodigy's "
        "decouple, use_bias_correction, safeguard_warmup"
    )
    save_model_as: str = option("safetensors", panel=OUTPUT, refused="every file is written as safetensors")
    in_json: Optional[str] = option(None, panel=DATA, refused="captions come from caption files or a metadata.jsonl imagefolder")
    weighted_captions: bool = option(False, panel=DATA, refused="captions are plain text here; weighting syntax in a caption "
                                     "would be trained as text (the sample prompts take --prompt_syntax)")
    full_bf16: bool = option(False, panel=MEMORY, refused="the adapter trains in float32 under --mixed_precision bf16 autocast")
    full_fp16: bool = option(False, panel=MEMORY, refused="the adapter trains in float32 under --mixed_precision fp16 autocast")
    color_aug: bool = option(False, panel=DATA, refused="no colour augmentation here")
    network_train_text_encoder_only: bool = option(False, panel=LORA, refused="the UNet adapter always trains")
    # kohya's flags that change nothing here: accepted with a warning
    xformers: bool = option(False, panel=MEMORY, no_effect="PyTorch's scaled-dot-product attention is always used")
    sdpa: bool = option(False, panel=MEMORY, no_effect="PyTorch's scaled-dot-product attention is always used")
    no_half_vae: bool = option(False, panel=MEMORY, no_effect="the VAE runs in float32 unless an fp16-safe one is given")
    cache_text_encoder_outputs: bool = option(
        False, panel=MEMORY, no_effect="caption embeddings are cached in memory whenever the text encoders are frozen"
    )
    network_train_unet_only: bool = option(
        False, panel=LORA, no_effect="only the UNet trains unless --train_text_encoder"
    )
    random_crop: bool = option(False, panel=DATA, no_effect="crops are random unless --center_crop (kohya's default is centred)")
    persistent_data_loader_workers: bool = option(False, panel=DATA, no_effect="workers are started per epoch")
    save_state: bool = option(False, panel=OUTPUT, no_effect="every checkpoint holds the whole training state")
    highvram: bool = option(False, panel=MEMORY, no_effect="memory is managed the same way on every device")
    lowram: bool = option(False, panel=MEMORY, no_effect="memory is managed the same way on every device")


# kohya's flags that take several values after one flag
setattr(app, MANY_VALUED, ("--network_args", "--optimizer_args"))


@options_command(app, TrainConfig, IgnoredOptions, ConfigFiles)
def main(**options) -> None:
    """Train a DreamBooth LoRA (or DoRA) on an SDXL-family model; EDM bases train with EDM automatically."""
    options = with_config_file(options)
    config = make_config(options)
    config.configuration = configuration_text(options)
    if options["output_config"]:
        write_output_config(options["config_file"], config.configuration)
        return
    train(config)


def check_data_sources(config: TrainConfig) -> None:
    """The data options that exclude each other, and kohya's bucket options checked (common.buckets)."""
    if config.dataset_config:
        others = [f"--{name}" for name in ("instance_data_dir", "dataset_name", "reg_data_dir", "mask_dir") if getattr(config, name)]
        if others:
            raise UserError(f"--dataset_config holds the folders (image_dir, is_reg, conditioning_data_dir per subset); "
                            f"{', '.join(others)} cannot go with it")
    if config.reg_data_dir and config.dataset_name:
        raise UserError("--reg_data_dir goes with --instance_data_dir (kohya's --train_data_dir), not --dataset_name")
    if not 0 <= config.validation_split < 1 or math.isnan(config.validation_split):
        raise UserError(f"--validation_split must be in [0, 1), got {config.validation_split}")
    for name in ("validate_every_n_steps", "validate_every_n_epochs"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UserError(f"--{name} must be a whole number >= 1, got {getattr(config, name)}")
        if getattr(config, name) is not None and not config.validation_split and not config.dataset_config:
            raise UserError(f"--{name} computes the loss of held-out images: give --validation_split too (e.g. 0.1)")
    if not config.aspect_buckets and (config.bucket_no_upscale or any(
            v is not None for v in (config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps))):
        logger.warning("the bucket options apply with --aspect_buckets (kohya's --enable_bucket), which is not given: ignored, "
                       "as kohya ignores them")
    rule = kohya_bucket_options(config)
    if rule is not None:
        rule.check()


def kohya_bucket_options(config: TrainConfig):
    """kohya's bucket rule where --aspect_buckets comes with any of kohya's bucket options (common.buckets); None
    for SDXL's published buckets or none."""
    from common.buckets import BucketOptions

    given = {"min_reso": config.min_bucket_reso, "max_reso": config.max_bucket_reso, "steps": config.bucket_reso_steps}
    if not config.aspect_buckets or (all(v is None for v in given.values()) and not config.bucket_no_upscale):
        return None
    size = config.training_size or (config.resolution, config.resolution)
    return BucketOptions(resolution_wh=size, no_upscale=config.bucket_no_upscale, **{k: v for k, v in given.items() if v is not None})


def choose_lora_layers(config: TrainConfig, options: dict) -> None:
    """--lora_layers, or the default of the flags used: kohya's network module or --network_dim train kohya's layer
    set (common.lora_layers), said in one line; the diffusers flags the attention projections."""
    import sys

    from common.lora_layers import choose_layer_set

    kohya_flags = options.get("network_module") is not None or any(a.split("=")[0] == "--network_dim" for a in sys.argv[1:])
    config.lora_layers, message = choose_layer_set(config.lora_layers, kohya_flags=kohya_flags)
    if message:
        logger.warning(message)


def with_kohya_options(options: dict) -> dict:
    """kohya's --network_module/--network_args and --optimizer_type/--optimizer_args read into the options they mean
    here (common.kohya_options); one of those options also given otherwise, with another value, is refused."""
    from common.kohya_options import kohya_network, kohya_optimizer

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    read = kohya_optimizer(options["optimizer_type"], options["optimizer_args"], options["optimizer"])
    read |= kohya_network(options["network_module"], options["network_args"])
    for name, value in read.items():
        if name not in defaults:
            raise UserError(f"kohya's setting for --{name} ({value}) has no option here")
        given = options.get(name, defaults.get(name))
        if given != defaults.get(name) and str(given).lower() != str(value).lower():
            raise UserError(f"--{name} {given} and kohya's --network_args/--optimizer_args/--optimizer_type ({value}) disagree; "
                            "give it once")
    return options | read


def with_config_file(options: dict) -> dict:
    """--config_file's values beneath the command line (common.config_file). kohya's clip_skip, which kohya ignores
    on SDXL (its text encoders' penultimate layer is always read), is ignored with a warning: ours skips layers
    beyond that one."""
    from typer.main import get_current_context  # typer's own click

    from common.config_file import config_path, layer_config_file

    if not options["config_file"] or options["output_config"]:
        return options
    layered, own = layer_config_file(options, config_path(options["config_file"]), get_current_context(),
                                     winning_aliases=frozenset({"unet_lr"}))
    if layered["clip_skip"] != options["clip_skip"] and "clip_skip" not in own:
        logger.warning(f"--config_file: clip_skip = {layered['clip_skip']} is kohya's, which kohya ignores on SDXL (the penultimate "
                       "layer is always read, as here); ignored. --clip_skip N skips N layers beyond that one")
        layered["clip_skip"] = options["clip_skip"]
    return layered


def configuration_text(options: dict) -> str:
    """The run's options that differ from their defaults as a TOML table that --config_file reads back."""
    from typer.main import get_current_context

    from common.config_file import non_default_options, toml_text

    values = non_default_options(options, get_current_context())
    return toml_text(values, header="train_lora.py's options for this run: re-run it with\n"
                                    "  python train_lora.py --config_file config.toml --output_dir ANOTHER_FOLDER")


def write_output_config(config_file: str | None, text: str) -> None:
    """kohya's --output_config: the configuration written to --config_file's path, never over an existing file."""
    from common.config_file import config_path

    if not config_file:
        raise UserError("--output_config writes the options to --config_file FILE.toml; give that too")
    path = config_path(config_file)
    if path.exists():
        raise UserError(f"--output_config: {str(path)!r} exists; it is never replaced, give another --config_file")
    with atomic_path(path) as partial:
        partial.write_text(text)
    typer.echo(f"wrote the options to {path}")


def make_config(options: dict) -> TrainConfig:
    """Validate every option once, at the top, with messages for people; return the typed config."""
    from common.data import INTERPOLATIONS
    from common.generation import MIN_IMAGE_SIDE
    from common.losses import EDM_WEIGHTINGS, HUBER_SCHEDULES, LOSS_TYPES
    from common.models import BASE_FORMULATIONS

    if options["push_to_hub"]:
        raise UserError(
            "--push_to_hub needs network access to the Hugging Face Hub; upload --output_dir yourself afterwards"
        )
    config_from_options(IgnoredOptions, options, warn=logger.warning)
    options = with_kohya_options(options)
    config = config_from_options(TrainConfig, options)
    if not config.pretrained_model_name_or_path:
        raise UserError("give the base model: --model (kohya's --pretrained_model_name_or_path) on the command line or in "
                        "--config_file")
    if config.v_parameterization:
        if config.prediction_type not in (None, "v_prediction"):
            raise UserError(f"--v_parameterization means --prediction_type v_prediction; it contradicts --prediction_type {config.prediction_type}")
        config.prediction_type = "v_prediction"
    config.optimizer = config.optimizer.lower()
    width, height = parse_resolution(options["resolution"])
    if width != height:
        if min(width, height) < MIN_IMAGE_SIDE or width % 8 or height % 8:
            raise UserError(f"--resolution {width},{height}: both sides must be multiples of 8 and at least {MIN_IMAGE_SIDE}")
        config.training_size = (width, height)
    check_adapter_options(config)
    save_schedule(config)
    check_data_sources(config)
    choose_lora_layers(config, options)
    check_trackers(config.report_to)
    checks = [
        (config.rank >= 1, f"--rank must be a positive integer, got {config.rank}"),
        (config.lora_alpha is None or config.lora_alpha > 0, f"--lora_alpha must be > 0, got {config.lora_alpha}"),
        (0 <= config.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {config.lora_dropout}"),
        (
            config.snr_gamma is None or config.snr_gamma > 0,
            f"--snr_gamma must be > 0 (5 is usual), got {config.snr_gamma}",
        ),
        (
            config.snr_weighting in ("hard", "soft"),
            f"--snr_weighting must be hard or soft, got {config.snr_weighting!r}",
        ),
        (config.optimizer in OPTIMIZERS, f"--optimizer {config.optimizer!r} is not supported; use AdamW, Prodigy or Adafactor"),
        (0 < config.prodigy_d_coef < MAX_LEARNING_RATE, f"--prodigy_d_coef must be a finite number > 0, got {config.prodigy_d_coef}"),
        (
            config.loraplus_lr_ratio is None or config.loraplus_lr_ratio > 0,
            f"--loraplus_lr_ratio must be > 0 (16 is usual), got {config.loraplus_lr_ratio}",
        ),
        (
            config.loraplus_lr_ratio is None or config.adapter == "lora",
            f"--loraplus_lr_ratio scales a LoRA's B matrix; --adapter {config.adapter} has none (use --adapter lora)",
        ),
        (0 < config.ema_decay < 1, f"--ema_decay must be in (0, 1) (0.999 is usual), got {config.ema_decay}"),
        (
            config.guidance_rescale is None or 0 <= config.guidance_rescale <= 1,
            f"--guidance_rescale must be in [0, 1] (0.7 is the paper's), got {config.guidance_rescale}",
        ),
        (
            config.lr_scheduler in LR_SCHEDULERS,
            f"--lr_scheduler {config.lr_scheduler!r}; choose one of {', '.join(LR_SCHEDULERS)}",
        ),
        (
            config.mixed_precision in (None, "no", "fp16", "bf16"),
            f"--mixed_precision {config.mixed_precision!r}; use no, fp16 or bf16",
        ),
        (
            config.prediction_type in (None, "epsilon", "v_prediction"),
            f"--prediction_type {config.prediction_type!r}; use epsilon or v_prediction",
        ),
        (
            config.resolution % 8 == 0 and config.resolution > 0,
            f"--resolution {config.resolution} must be a positive multiple of 8",
        ),
        (config.train_batch_size >= 1, f"--train_batch_size must be >= 1, got {config.train_batch_size}"),
        (config.repeats >= 1, f"--repeats must be >= 1, got {config.repeats}"),
        (config.keep_tokens >= 0, f"--keep_tokens must be >= 0, got {config.keep_tokens}"),
        (config.max_token_length in (75, 150, 225), f"--max_token_length must be 75, 150 or 225, got {config.max_token_length}"),
        (config.logging_steps >= 1, f"--logging_steps must be >= 1, got {config.logging_steps}"),
        (config.num_validation_images >= 1, f"--num_validation_images must be >= 1, got {config.num_validation_images}"),
        (
            config.validation_steps is None or config.validation_steps >= 1,
            f"--validation_steps must be >= 1, got {config.validation_steps}",
        ),
        (
            config.validation_epochs is None or config.validation_epochs >= 1,
            f"--validation_epochs must be >= 1, got {config.validation_epochs}",
        ),
        (
            not config.cache_text_encoder_outputs_to_disk or not (config.shuffle_caption or config.caption_tag_dropout_rate),
            "--cache_text_encoder_outputs_to_disk keeps fixed captions; --shuffle_caption and --caption_tag_dropout_rate "
            "make new ones every step (drop one or the other)",
        ),
        (config.mask_dir is None or config.masked_loss, "--mask_dir gives --masked_loss its masks; add --masked_loss"),
        (
            0 <= config.caption_dropout_rate < 1 and 0 <= config.caption_tag_dropout_rate < 1,
            "--caption_dropout_rate and --caption_tag_dropout_rate must be in [0, 1), got "
            f"{config.caption_dropout_rate} and {config.caption_tag_dropout_rate}",
        ),
        (
            config.gradient_accumulation_steps >= 1,
            f"--gradient_accumulation_steps must be >= 1, got {config.gradient_accumulation_steps}",
        ),
        (
            config.max_train_steps is None or config.max_train_steps >= 1,
            f"--max_train_steps must be >= 1, got {config.max_train_steps}",
        ),
        (config.checkpointing_steps >= 1, f"--checkpointing_steps must be >= 1, got {config.checkpointing_steps}"),
        (0 < config.learning_rate < MAX_LEARNING_RATE, f"--learning_rate must be a finite number in (0, {MAX_LEARNING_RATE:g}) "
         f"(1e-4 is usual for AdamW, 1.0 for Prodigy), got {config.learning_rate}"),
        (0 < config.text_encoder_lr < MAX_LEARNING_RATE, f"--text_encoder_lr must be a finite number in (0, {MAX_LEARNING_RATE:g}), "
         f"got {config.text_encoder_lr}"),
        (config.caption_extension.startswith(".") and len(config.caption_extension) > 1,
         f"--caption_extension {config.caption_extension!r} needs its dot: .{config.caption_extension.lstrip('.') or 'txt'}"),
        (config.resolution >= MIN_IMAGE_SIDE, f"--resolution must be at least {MIN_IMAGE_SIDE} (the UNet's smallest latent is 2x2), "
         f"got {config.resolution}"),
        (not (config.cache_text_encoder_outputs_to_disk and config.train_text_encoder),
         "--cache_text_encoder_outputs_to_disk keeps the outputs of frozen text encoders; --train_text_encoder trains them, so "
         "nothing would be cached: drop one"),
        (None in (config.min_timestep, config.max_timestep) or config.min_timestep < config.max_timestep,
         f"--min_timestep {config.min_timestep} and --max_timestep {config.max_timestep}: need min < max (max is exclusive)"),
        (None in (config.min_sigma, config.max_sigma) or config.min_sigma < config.max_sigma,
         f"--min_sigma {config.min_sigma} and --max_sigma {config.max_sigma}: need min < max"),
        (config.edm_p_std > 0, f"--edm_p_std must be > 0, got {config.edm_p_std}"),
        (config.loss_type in LOSS_TYPES, f"--loss_type {config.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}"),
        (
            config.huber_schedule in HUBER_SCHEDULES,
            f"--huber_schedule {config.huber_schedule!r}; choose one of {', '.join(HUBER_SCHEDULES)}",
        ),
        (0 < config.huber_c <= 1, f"--huber_c must be in (0, 1] (0.1 is usual), got {config.huber_c}"),
        (config.huber_scale > 0, f"--huber_scale must be > 0, got {config.huber_scale}"),
        (config.noise_offset >= 0, f"--noise_offset must be >= 0, got {config.noise_offset}"),
        (config.ip_noise_gamma >= 0, f"--ip_noise_gamma must be >= 0 (0.1 is usual), got {config.ip_noise_gamma}"),
        (
            config.multires_noise_iterations >= 0,
            f"--multires_noise_iterations must be >= 0, got {config.multires_noise_iterations}",
        ),
        (
            0 < config.multires_noise_discount <= 1,
            f"--multires_noise_discount must be in (0, 1], got {config.multires_noise_discount}",
        ),
        (
            config.edm_weighting in EDM_WEIGHTINGS,
            f"--edm_weighting {config.edm_weighting!r}; choose one of {', '.join(EDM_WEIGHTINGS)}",
        ),
        (
            config.base_formulation in BASE_FORMULATIONS,
            f"--base_formulation {config.base_formulation!r}; choose one of {', '.join(BASE_FORMULATIONS)}",
        ),
        (
            config.snr_gamma is None or config.edm_weighting == "table1",
            f"--edm_weighting {config.edm_weighting} and --snr_gamma both set the EDM loss weight; keep one",
        ),
        (
            0 < config.train_text_encoder_ti_frac <= 1,
            f"--train_text_encoder_ti_frac must be in (0, 1], got {config.train_text_encoder_ti_frac}",
        ),
        (
            0 < config.train_text_encoder_frac <= 1,
            f"--train_text_encoder_frac must be in (0, 1], got {config.train_text_encoder_frac}",
        ),
        (
            config.num_new_tokens_per_abstraction >= 1,
            f"--num_new_tokens_per_abstraction must be >= 1, got {config.num_new_tokens_per_abstraction}",
        ),
        (config.clip_skip is None or config.clip_skip >= 0, f"--clip_skip must be >= 0, got {config.clip_skip}"),
        (config.text_encoder_lr > 0, f"--text_encoder_lr must be > 0, got {config.text_encoder_lr}"),
        (
            not config.with_prior_preservation or (config.class_data_dir and config.class_prompt),
            "--with_prior_preservation needs --class_data_dir FOLDER and --class_prompt TEXT (e.g. 'a photo of a dog')",
        ),
        (
            config.num_class_images >= 1 and config.sample_batch_size >= 1,
            "--num_class_images and --sample_batch_size must be >= 1",
        ),
        (
            config.prior_generation_precision in (None, "no", "fp32", "fp16", "bf16"),
            f"--prior_generation_precision {config.prior_generation_precision!r}; use fp32, fp16 or bf16",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if config.image_interpolation_mode not in INTERPOLATIONS:
        raise UserError(
            f"--image_interpolation_mode {config.image_interpolation_mode!r}; choose one of {', '.join(INTERPOLATIONS)}"
        )
    block_weights(config)  # refuses malformed --down_lr_weight, --mid_lr_weight, --up_lr_weight here
    check_sample_prompts(config)  # and a malformed --sample_prompts file, or prompts its syntax cannot read
    if config.mask_dir and not Path(config.mask_dir).is_dir():
        raise UserError(f"--mask_dir {config.mask_dir!r} is not a folder")
    if config.resume_from_checkpoint and config.resume_from_checkpoint != "latest":
        if not (Path(config.resume_from_checkpoint) / "lora.safetensors").is_file():
            raise UserError(
                f"--resume_from_checkpoint {config.resume_from_checkpoint!r} is not a checkpoint folder; use latest or a checkpoint-N folder"
            )
    return config


# A rate above this overflows float32 in the optimizers' updates (AdamW's lr / bias correction) before training starts.
MAX_LEARNING_RATE = 1e20


# accelerate's trackers by --report_to name, with the packages that provide them
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",),
                    "mlflow": ("mlflow",), "clearml": ("clearml",), "aim": ("aim",), "dvclive": ("dvclive",)}


def check_trackers(report_to: str) -> None:
    """Every --report_to tracker named is one accelerate knows and installed: accelerate drops one that is not
    installed without a word, and the run would track nothing."""
    import importlib.util

    for tracker in (name.strip() for name in report_to.split(",") if name.strip() not in ("", "none", "all")):
        if tracker not in TRACKER_PACKAGES:
            raise UserError(f"--report_to {tracker!r}; choose none, all or any of {', '.join(TRACKER_PACKAGES)} (comma-separated)")
        if not any(importlib.util.find_spec(package) for package in TRACKER_PACKAGES[tracker]):
            raise UserError(f"--report_to {tracker}: the {TRACKER_PACKAGES[tracker][0]} package is not installed "
                            f"(pip install {TRACKER_PACKAGES[tracker][0]}); without it accelerate would track nothing")


def check_adapter_options(config: TrainConfig) -> None:
    """The adapter options, each refused in one line where --adapter does not have it (or peft cannot train it)."""
    from common.adapters import ADAPTERS

    if config.adapter not in ADAPTERS:
        raise UserError(f"--adapter {config.adapter!r}; choose one of {', '.join(ADAPTERS)} (LoCon is --adapter lora with --conv_rank)")
    adapter = ADAPTERS[config.adapter]
    lycoris = config.adapter != "lora"
    only_for = [
        (config.use_dora and not adapter.trains_dora, "--use_dora", "lora (peft trains DoRA for LoRA only)"),
        (config.lora_dropout > 0 and lycoris, "--lora_dropout", "lora; LoHa and LoKr have --rank_dropout and --module_dropout"),
        ((config.rank_dropout > 0 or config.module_dropout > 0) and not lycoris, "--rank_dropout and --module_dropout",
         "loha and lokr (peft's LoRA has --lora_dropout only)"),
        (config.lokr_factor != -1 and config.adapter != "lokr", "--lokr_factor", "lokr"),
        (config.decompose_both and config.adapter != "lokr", "--decompose_both", "lokr"),
        (config.use_tucker and not adapter.trains_tucker, "--use_tucker",
         "lokr (peft has no Tucker LoRA, and peft 0.21's LoHa Tucker backward computes wrong gradients)"),
    ]
    for wrong, flag, accepted in only_for:
        if wrong:
            raise UserError(f"{flag} does not apply to --adapter {config.adapter}; it is for {accepted}")
    checks = [
        (config.conv_rank is None or config.conv_rank >= 1, f"--conv_rank must be a positive integer, got {config.conv_rank}"),
        (config.conv_alpha is None or config.conv_rank is not None, "--conv_alpha needs --conv_rank (the convolutions' rank)"),
        (config.conv_alpha is None or config.conv_alpha > 0, f"--conv_alpha must be > 0, got {config.conv_alpha}"),
        (not config.use_tucker or config.conv_rank is not None, "--use_tucker shapes 3x3 convolutions, which --conv_rank adds"),
        (0 <= config.rank_dropout < 1 and 0 <= config.module_dropout < 1,
         f"--rank_dropout and --module_dropout must be in [0, 1), got {config.rank_dropout} and {config.module_dropout}"),
        (config.lokr_factor == -1 or config.lokr_factor >= 2, f"--lokr_factor must be -1 or at least 2, got {config.lokr_factor}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


@dataclass
class Preflight:
    """What was checked before any model loaded or anything was written: the base as read (None for a hub id), the
    training examples and their images' (height, width), the formulation where the base's configs could be read (else
    chosen once it loads), and the lines to show once the run starts."""

    base: object
    datasets: list  # common.data_plan.DatasetPlan, one per dataset
    formulation: tuple | None
    notes: list


def preflight(config: TrainConfig) -> Preflight:
    """Every check that needs no model, in one pass before anything loads, is made or is removed: the data first
    (images, captions, masks, kohya folders; no model file is opened while they are read), then the base as read (a
    single file's keys, a folder's configs) with the refusals of its flavour and of the loss options on it, the output
    folder, caches and logs (checked, not made), and the checkpoint a resume would continue."""
    datasets, notes = plan_data(config)
    base = read_base_model(config)
    formulation = make_formulation(config, base.scheduler_config) if base is not None else None
    check_output_places(config)
    check_resume(config)
    return Preflight(base, datasets, formulation, notes)


def plan_data(config: TrainConfig) -> tuple[list, list[str]]:
    """The first half of the data path (`build_data` is the second, once the models are loaded), in one pass
    (common.data_plan): the datasets (kohya's --dataset_config, or the command line's folders), their subsets'
    examples found and captioned, every image and mask read, validation images held out and regularisation images
    counted to the instance images; (datasets, lines saying what was left out or trains nothing)."""
    from common.data_plan import plan_dataset

    run = run_data(config)
    if config.dataset_config:
        from common.dataset_config import read_dataset_config

        plans = [plan_dataset(spec, run) for spec in read_dataset_config(config.dataset_config, given_data_options(config))]
        return plans, [note for plan in plans for note in plan.notes]
    examples, notes = command_line_examples(config)
    plan = plan_dataset(command_line_dataset(config), run, first_examples=examples, first_subset=command_line_subset(config))
    return [plan], notes + plan.notes


def run_data(config: TrainConfig):
    from common.data_plan import RunData

    return RunData(seed=config.seed, masked_loss=config.masked_loss, skip_bad_images=config.skip_bad_images,
                   prior_loss_weight=config.prior_loss_weight, interpolation=config.image_interpolation_mode)


def given_data_options(config: TrainConfig) -> dict:
    """The data options given on the command line (or in --config_file) by name, for --dataset_config's levels to
    stand on (common.dataset_config): an option left at its default gives way to kohya's default."""
    names = ("train_batch_size", "repeats", "caption_extension", "shuffle_caption", "keep_tokens", "caption_dropout_rate",
             "caption_tag_dropout_rate", "caption_dropout_every_n_epochs", "caption_prefix", "caption_suffix", "caption_separator",
             "keep_tokens_separator", "secondary_separator", "enable_wildcard", "random_flip", "aspect_buckets", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
             "bucket_no_upscale", "masked_loss", "validation_split", "validation_seed")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    given = {name: getattr(config, name) for name in names if getattr(config, name) != defaults[name]}
    if config.resolution != defaults["resolution"] or config.training_size:
        given["resolution"] = config.training_size or (config.resolution, config.resolution)
    return given


def command_line_examples(config: TrainConfig) -> tuple[list, list[str]]:
    """The instance images of --instance_data_dir (kohya's --train_data_dir, with its N_prompt folders) or
    --dataset_name, captioned by the one caption rule of every layout, each with its repeats (N x --repeats), and the
    lines on folders left out."""
    from common.data import find_examples, skipped_folders, with_masks

    folder = Path(config.instance_data_dir) if config.instance_data_dir else None
    examples = find_examples(
        instance_data_dir=folder,
        instance_prompt=config.instance_prompt,
        dataset_name=config.dataset_name,
        dataset_config_name=config.dataset_config_name,
        image_column=config.image_column,
        caption_column=config.caption_column,
        caption_extension=config.caption_extension,
        prompt_as_prefix=config.prefix_instance_prompt,
        enable_wildcard=config.enable_wildcard,
    )
    examples = [dataclasses.replace(e, repeats=e.repeats * config.repeats) for e in examples]
    if config.masked_loss:
        examples = with_masks(examples, Path(config.mask_dir) if config.mask_dir else None)
    return examples, skipped_folders(folder) if folder is not None and not config.dataset_name else []


def command_line_subset(config: TrainConfig):
    """How the command line's instance images train (common.data_plan.SubsetPlan)."""
    from common.data import Augment, sdxl_buckets
    from common.data_plan import SubsetPlan

    size = config.training_size
    augment = Augment(
        resolution=config.resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        interpolation=config.image_interpolation_mode,
        buckets=tuple(sdxl_buckets(config.resolution)) if config.aspect_buckets else (),
        masked=config.masked_loss,
        size=(size[1], size[0]) if size else None,
        bucket_rule=kohya_bucket_options(config),
    )
    name = Path(config.instance_data_dir).name if config.instance_data_dir else str(config.dataset_name)
    return SubsetPlan(name=name, is_reg=False, augment=augment, captions=caption_transform(config))


def command_line_dataset(config: TrainConfig):
    """The command line's dataset (common.dataset_config.DatasetSpec) beside its instance subset: --reg_data_dir's
    N_class folders as kohya's regularisation subsets (images directly in it captioned by --class_prompt)."""
    from common.data import repeat_folders
    from common.dataset_config import DatasetSpec, SubsetSpec

    width, height = config.training_size or (config.resolution, config.resolution)
    subsets = []
    if config.reg_data_dir:
        folder = Path(config.reg_data_dir)
        if not folder.is_dir():
            raise UserError(f"--reg_data_dir {str(folder)!r} is not a folder")
        from common.files import IMAGE_SUFFIXES

        direct = [(folder, 1, config.class_prompt)] if any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()) else []
        for sub, count, name in direct + repeat_folders(folder):
            subsets.append(SubsetSpec(image_dir=sub, num_repeats=count * config.repeats, class_tokens=name or None, is_reg=True,
                                      caption_extension=config.caption_extension, shuffle_caption=config.shuffle_caption,
                                      keep_tokens=config.keep_tokens, caption_dropout_rate=config.caption_dropout_rate,
                                      caption_tag_dropout_rate=config.caption_tag_dropout_rate,
                                      caption_dropout_every_n_epochs=config.caption_dropout_every_n_epochs,
                                      caption_prefix=config.caption_prefix, caption_suffix=config.caption_suffix,
                                      caption_separator=config.caption_separator,
                                      keep_tokens_separator=config.keep_tokens_separator or "",
                                      secondary_separator=config.secondary_separator, enable_wildcard=config.enable_wildcard,
                                      flip_aug=config.random_flip,
                                      random_crop=not config.center_crop, alpha_mask=config.masked_loss and not config.mask_dir))
        if not subsets:
            raise UserError(f"--reg_data_dir {str(folder)!r} has no images, in itself or in N_class folders (e.g. 1_dog)")
    return DatasetSpec(resolution=(width, height), subsets=tuple(subsets), batch_size=config.train_batch_size,
                       enable_bucket=False, validation_split=config.validation_split, validation_seed=config.validation_seed)


def check_output_places(config: TrainConfig) -> None:
    """The folders the run will write checked without being made: --output_dir (and no earlier run in it unless this
    one continues it or starts over), the TensorBoard --logging_dir, the disk caches with the subfolders already in
    them, and the prior-preservation class folder."""
    from common.files import check_writable_folder

    check_writable_folder(config.output_dir, "--output_dir")
    if Path(config.output_dir).is_dir():
        refuse_earlier_run(config)
    if config.report_to != "none":
        check_writable_folder(Path(config.output_dir) / config.logging_dir, "--logging_dir")
    if config.cache_latents_to_disk or config.cache_text_encoder_outputs_to_disk:
        root = disk_cache_folder(config)
        check_writable_folder(root, "--disk_cache_dir")
        for kind in ("latents", "text"):  # an entry goes into <kind>/<first two hex digits>/
            if (root / kind).exists():
                for folder in [root / kind, *sorted(p for p in (root / kind).glob("*") if p.is_dir())]:
                    check_writable_folder(folder, "--disk_cache_dir's folder")
    if config.with_prior_preservation:
        check_writable_folder(config.class_data_dir, "--class_data_dir")


def train(config: TrainConfig) -> None:
    """Check everything that needs no model -> claim the output folder -> train."""
    checked = preflight(config)  # everything that needs no model: a refusal here leaves the disk as it was
    accelerator = make_accelerator(config)
    with claimed_output_dir(config, accelerator):  # locked until the run ends; removed if this run made it and failed empty
        run_training(config, checked, accelerator)


def run_training(config: TrainConfig, checked: Preflight, accelerator) -> None:
    """Load models -> (class images) -> (pivotal tokens, text LoRA) -> data -> UNet LoRA -> optimizer -> loop -> save."""
    from common.models import graph_break_summary, peak_memory_gib, speed_up_unet

    start_trackers(accelerator, config)
    for note in checked.notes:
        logger.warning(note)
    base = checked.base
    pipe = load_models(config, accelerator, base)
    formulation = choose_formulation(config, pipe, accelerator, base, checked.formulation)
    if config.with_prior_preservation:
        make_missing_class_images(config, pipe, accelerator, base)
    config.token_map = add_pivotal_tokens(pipe, config)
    if config.train_text_encoder:
        add_text_encoder_lora(pipe, config)
    data = build_data(config, checked, pipe, accelerator)
    unet = add_lora(pipe.unet, config)
    if config.init_lora:
        start_from_lora(unet, config)
    optimizer, lr_scheduler, total_steps = make_optimizer(config, unet, pipe, accelerator, data.instances, data.plans[0].batch_size)
    caption_encoder = CaptionEncoder(pipe, config, total_steps, data.all_captions(), accelerator, data.captions_vary)
    # infer.py --compile's recipe: channels-last on a GPU (TF32 only with --allow_tf32), compiled with --torch_compile
    unet = speed_up_unet(unet, accelerator.device, compile_unet=config.torch_compile, allow_tf32=config.allow_tf32)
    loader, batch_order = make_loader(config, data.instances, data.plans[0].batch_size, pin_memory=accelerator.device.type == "cuda")
    unet, *encoders, optimizer, lr_scheduler = accelerator.prepare(
        unet, *caption_encoder.trainable_encoders(), optimizer, lr_scheduler
    )
    caption_encoder.use_prepared(encoders)
    models = [unet, *encoders]
    loader = accelerator.prepare_data_loader(loader, device_placement=False)
    class_batches = ClassBatches(data, config, accelerator) if data.classes is not None else None
    register_checkpoint_hooks(accelerator, config, caption_encoder)
    ema = make_ema(config, unet, accelerator)
    step = resume(config, accelerator, total_steps, optimizer, lr_scheduler)
    caption_encoder.update_phase(step)
    accelerator.print(
        f"{accelerator.num_processes} process(es), {len(loader)} batches each per epoch, {total_steps} steps"
    )

    batch_loss = BatchLoss(
        pipe=pipe,
        unet=unet,
        caption_encoder=caption_encoder,
        formulation=formulation,
        accelerator=accelerator,
        prior_loss_weight=config.prior_loss_weight,
    )
    progress = Progress(total_steps, step, accelerator, config.logging_steps, diverged=partial(divergence_error, config))
    sampling = Sampling(pipe, unet, config, accelerator, ema)
    steps_per_epoch = max(1, math.ceil(len(loader) / config.gradient_accumulation_steps))
    schedule = save_schedule(config)
    started, first_step, saved_step = time.time(), step, step
    describe = partial(lora_facts, config, data, formulation, started)  # (step, epoch) -> the adapter files' metadata facts
    validate = HeldOut(data, batch_loss, models, config, progress)
    with CtrlC(accelerator, config.logging_steps) as ctrl_c:
        while step < total_steps:
            epoch = step // steps_per_epoch
            batch_order.start_epoch(epoch)
            skip = (step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            for micro_step, batch in enumerate(batches, start=step * config.gradient_accumulation_steps):
                class_batch = class_batches.batch(micro_step) if class_batches else None
                loss = training_step(
                    partial(batch_loss, batch, class_batch, step),
                    models=models,
                    accelerator=accelerator,
                    optimizer=optimizer,
                    lr_scheduler=lr_scheduler,
                    max_grad_norm=config.max_grad_norm,
                )
                if not accelerator.sync_gradients:
                    continue
                step += 1
                if config.torch_compile and step == first_step + 1:
                    accelerator.print(graph_break_summary())
                if ema is not None:
                    ema.step([p for p in unet.parameters() if p.requires_grad])
                caption_encoder.update_phase(step)
                checkpoint_due = step % config.checkpointing_steps == 0 or step == total_steps
                snapshot = schedule.file_after_step(step)
                # before a checkpoint or an adapter file the loss and the weights are checked finite: never a file of a
                # diverged run
                progress.update(loss, optimizer, lr_scheduler, models if checkpoint_due or snapshot else None)
                if checkpoint_due:
                    save_checkpoint(accelerator, config, step, total_steps)
                    saved_step = step
                if snapshot and accelerator.is_main_process:
                    save_snapshot(accelerator.unwrap_model(unet), pipe, config, schedule, snapshot,
                                  describe(step, step // steps_per_epoch))
                if validate.due_at_step(step):
                    validate(step)
                if sampling.due_at_step(step):
                    sampling(step)
                if ctrl_c.pressed(step):  # here, between steps, the state is whole: safe to save and stop
                    if saved_step != step:
                        progress.check_finite(models, step)
                        save_checkpoint(accelerator, config, step, total_steps)
                    progress.close()  # the error gets a line of its own
                    raise Interrupted(f"interrupted at step {step}; resume with --resume_from_checkpoint latest")
                if step >= total_steps:
                    break
            snapshot = schedule.file_after_epoch(step // steps_per_epoch, math.ceil(total_steps / steps_per_epoch))
            if snapshot and step % steps_per_epoch == 0:  # the epoch ran to its end
                progress.check_finite(models, step)
                if accelerator.is_main_process:
                    save_snapshot(accelerator.unwrap_model(unet), pipe, config, schedule, snapshot,
                                  describe(step, step // steps_per_epoch))
            if step % steps_per_epoch == 0 and validate.due_after_epoch(step // steps_per_epoch):
                validate(step)
            if sampling.due_after_epoch(epoch, step):
                sampling(step)
    progress.close()
    progress.check_finite(models, step)  # no adapter file of diverged weights

    accelerator.wait_for_everyone()
    caption_encoder.check_original_rows()
    if accelerator.is_main_process:
        save_outputs(accelerator.unwrap_model(unet), pipe, caption_encoder, config, describe(step, math.ceil(step / steps_per_epoch)), ema)
    seconds = time.time() - started
    steps_done = max(1, step - first_step)
    accelerator.print(
        f"done: {step} steps in {seconds:.1f} s ({seconds / steps_done:.3f} s/step), peak memory {peak_memory_gib(accelerator.device):.2f} GiB, "
        f"LoRA in {config.output_dir}/"
    )
    accelerator.end_training()


@dataclass(kw_only=True)
class BatchLoss:
    """A batch's loss; with prior preservation, instance loss + prior_loss_weight x class loss, in one
    forward pass when instance and class images share a shape."""

    pipe: object
    unet: object
    caption_encoder: CaptionEncoder
    formulation: object
    accelerator: object
    prior_loss_weight: float

    def __call__(self, batch: dict, class_batch: dict | None, step: int):
        import torch

        from common.losses import prior_preservation_loss

        parts = [batch] + ([class_batch] if class_batch is not None else [])
        latents = [batch_latents(b, self.pipe, self.accelerator) for b in parts]
        captions = [b["captions"] for b in parts]  # each example's caption as its dataset drew it
        time_ids = [b["time_ids"] for b in parts]
        masks = [b["mask"].to(self.accelerator.device, non_blocking=True) if "mask" in b else None for b in parts]  # --masked_loss
        if len(parts) == 2 and latents[0].shape[1:] == latents[1].shape[1:]:
            joint_mask = torch.cat(masks) if masks[0] is not None else None
            joint = self.formulation.loss(
                self.network(captions[0] + captions[1], torch.cat(time_ids), step), torch.cat(latents), mask=joint_mask
            )
            losses = [joint[: len(captions[0])], joint[len(captions[0]) :]]
        else:
            losses = [
                self.formulation.loss(self.network(c, t, step), x, mask=m)
                for x, c, t, m in zip(latents, captions, time_ids, masks)
            ]
        if "loss_weight" in batch:  # kohya's regularisation images in the batch: each one's loss times --prior_loss_weight
            losses[0] = losses[0] * batch["loss_weight"].to(losses[0].device, losses[0].dtype)
        if len(losses) == 1:
            return losses[0].mean()
        return prior_preservation_loss(losses[0], losses[1], self.prior_loss_weight)

    def network(self, captions: list[str], time_ids, step: int):
        return conditioned_unet(self.unet, self.caption_encoder.embed(captions, step), time_ids, self.accelerator)


@dataclass
class HeldOut:
    """The validation loss of the held-out images (common.validation), when it is due; nothing without them."""

    data: TrainingData
    batch_loss: BatchLoss
    models: list
    config: TrainConfig
    progress: Progress

    def __post_init__(self):
        from common.validation import ValidationSchedule

        self.schedule = ValidationSchedule(self.config.validate_every_n_steps, self.config.validate_every_n_epochs)

    def due_at_step(self, step: int) -> bool:
        return bool(self.data.held_out) and self.schedule.due_at_step(step)

    def due_after_epoch(self, epoch: int) -> bool:
        return bool(self.data.held_out) and self.schedule.due_after_epoch(epoch)

    def __call__(self, step: int) -> float | None:
        from common.data import collate
        from common.validation import validation_loss

        if not self.data.held_out:
            return None
        loss = validation_loss(lambda batch: self.batch_loss(batch, None, step), self.data.held_out, collate,
                               self.config.seed, self.models)
        self.progress.validation(loss)
        return loss


def training_step(compute_loss, *, models: list, accelerator, optimizer, lr_scheduler, max_grad_norm: float):
    """One micro-batch: loss, backward, and (when gradients are due) clip and step."""
    with accelerator.accumulate(*models):
        with accelerator.autocast():
            loss = compute_loss()
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            parameters = [p for model in models for p in model.parameters() if p.requires_grad]
            accelerator.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


@contextlib.contextmanager
def claimed_output_dir(config: TrainConfig, accelerator):
    """--output_dir claimed for the run (`claim_output_dir`) and its lock held; a folder this run made is removed again
    if the run is refused while it is still empty, so that a refusal leaves no trace."""
    made = not Path(config.output_dir).exists()
    lock = claim_output_dir(config, accelerator)
    try:
        yield lock
    except BaseException:
        if made and accelerator.is_main_process and not any(Path(config.output_dir).iterdir()):
            Path(config.output_dir).rmdir()
        raise
    finally:
        if lock is not None:
            lock.close()


def earlier_run(config: TrainConfig) -> list[Path]:
    """What an earlier run left in --output_dir: its LoRA file and its checkpoints."""
    from common.lora_formats import DIFFUSERS_LORA_FILE

    folder = Path(config.output_dir)
    return [p for p in (folder / DIFFUSERS_LORA_FILE, *checkpoints(config.output_dir)) if p.exists()]


def refuse_earlier_run(config: TrainConfig) -> None:
    """--output_dir may hold an earlier run only when this one continues it (--resume_from_checkpoint) or starts over
    (--force)."""
    earlier = earlier_run(config)
    if earlier and not config.resume_from_checkpoint and not config.force:
        raise UserError(
            f"--output_dir {config.output_dir!r} already holds a run ({earlier[0].name}); continue it with "
            "--resume_from_checkpoint latest, start over with --force, or choose another folder"
        )


def claim_output_dir(config: TrainConfig, accelerator):
    """--output_dir made and locked (the main process holds its lock; None elsewhere), holding no earlier run unless
    this one continues it or starts over (--force, which removes the old checkpoints so that `latest` cannot pick one
    up). Called once the preflight has passed: nothing is made or removed for a run that is refused."""
    from common.files import lock_folder, writable_folder

    folder = writable_folder(config.output_dir, "--output_dir")
    lock = lock_folder(folder, "--output_dir") if accelerator.is_main_process else None
    refuse_earlier_run(config)
    if earlier_run(config) and not config.resume_from_checkpoint:
        accelerator.wait_for_everyone()  # every process has looked before the old checkpoints go
        if accelerator.is_main_process:
            for old in checkpoints(config.output_dir):
                shutil.rmtree(old)
            accelerator.print(f"--force: starting over in {config.output_dir}/ (its earlier checkpoints removed)")
    accelerator.wait_for_everyone()
    return lock


def make_accelerator(config: TrainConfig):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from common.models import cpu_processes_requested, warn_about_lost_processes

    project = ProjectConfiguration(
        project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / config.logging_dir)
    )
    try:
        accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=None if config.report_to == "none" else config.report_to,
            project_config=project,
            rng_types=[],  # our data order is seeded by (seed, epoch) and identical in every process
            cpu=cpu_processes_requested(),
        )
    except (ValueError, ImportError) as error:
        raise UserError(
            f"could not set up accelerate (--report_to {config.report_to!r}, --mixed_precision {config.mixed_precision!r}): {error}"
        ) from None
    logging.basicConfig(format="%(message)s", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    set_seed(config.seed)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if accelerator.is_main_process:
        warn_about_lost_processes(accelerator.num_processes)
    return accelerator


def start_trackers(accelerator, config: TrainConfig) -> None:
    """--report_to's trackers, which write into --output_dir's --logging_dir: started once the folder is claimed, so that
    a refused run writes no event file into an earlier run's folder."""
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers(
            "train_lora", config={k: v for k, v in recorded(config).items() if isinstance(v, (int, float, str, bool))}
        )


def weight_dtype(accelerator):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def flavour_options(config: TrainConfig):
    from common.models import FlavourOptions

    return FlavourOptions(config.prediction_type, True if config.zero_terminal_snr else None, config.base_formulation)


def read_base_model(config: TrainConfig):
    """The base as read before its weights load (`common.models.read_model`): a single file refused here when it is not
    an SDXL base, the flavour options and --clip_skip checked against it; None for a hub id."""
    from common.models import check_clip_skip, read_model

    base = read_model(config.pretrained_model_name_or_path, flavour_options(config))
    check_clip_skip(config.clip_skip, base and base.text_encoder_layers, config.pretrained_model_name_or_path)
    return base


def load_models(config: TrainConfig, accelerator, base=None):
    """The pipeline's frozen parts, in the compute dtype; the VAE in fp32 unless a fp16-safe one is named."""
    import torch

    from common.models import check_clip_skip, load_sdxl_pipeline, load_vae, quiet_libraries

    hub_options = {"revision": config.revision, "variant": config.variant, "cache_dir": config.cache_dir}
    hub_options = {k: v for k, v in hub_options.items() if v is not None}
    dtype = weight_dtype(accelerator)
    # read straight into the compute dtype: SDXL read in fp32 and then cast would need 14 GB of memory on the way
    pipe = load_sdxl_pipeline(
        config.pretrained_model_name_or_path, {"default": dtype, "vae": torch.float32}, flavour=base or flavour_options(config),
        say=accelerator.print, **hub_options
    )
    if config.pretrained_vae_model_name_or_path:
        pipe.vae = load_vae(config.pretrained_vae_model_name_or_path, base, torch.float32)
    check_clip_skip(config.clip_skip, (pipe.text_encoder.config.num_hidden_layers, pipe.text_encoder_2.config.num_hidden_layers),
                    config.pretrained_model_name_or_path)  # a hub model's depths are known only now
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    with quiet_libraries():
        # The UNet waits in CPU memory: accelerator.prepare() puts it on the device once the latents are
        # cached, so the VAE's encoding never shares the device with it (bench/gpu_memory.py).
        pipe.unet.to(dtype=dtype)
        pipe.vae.to(accelerator.device, dtype=dtype if config.pretrained_vae_model_name_or_path else torch.float32)
        pipe.text_encoder.to(accelerator.device, dtype=dtype)
        pipe.text_encoder_2.to(accelerator.device, dtype=dtype)
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_formulation(config: TrainConfig, scheduler_config) -> tuple:
    """(formulation, note): the noise formulation of this run on a base of `scheduler_config` (`formulation_for_scheduler`),
    refusing the loss options that base has no meaning for. Needs no model: made in the preflight from the base's
    configs as read."""
    from common.losses import LossRecipe, NoiseRecipe, formulation_for_scheduler

    return formulation_for_scheduler(
        scheduler_config,
        edm=config.edm,
        prediction_type=config.prediction_type,
        p_mean=config.edm_p_mean,
        p_std=config.edm_p_std,
        snr_gamma=config.snr_gamma,
        soft_min_snr=config.snr_weighting == "soft",
        noise=NoiseRecipe(offset=config.noise_offset, offset_random_strength=config.noise_offset_random_strength,
                          multires_iterations=config.multires_noise_iterations, multires_discount=config.multires_noise_discount,
                          input_perturbation=config.ip_noise_gamma, perturbation_random_strength=config.ip_noise_gamma_random_strength),
        objective=LossRecipe(loss_type=config.loss_type, huber_c=config.huber_c, huber_schedule=config.huber_schedule,
                             huber_scale=config.huber_scale, debiased=config.debiased_estimation_loss),
        timestep_range=(config.min_timestep, config.max_timestep),
        sigma_range=(config.min_sigma, config.max_sigma),
        base_formulation=config.base_formulation,
        weighting=config.edm_weighting,
    )


def choose_formulation(config: TrainConfig, pipe, accelerator, base=None, made: tuple | None = None):
    """The noise formulation, chosen once: EDM (native base, or --edm on a discrete one) or DDPM, on the base's flavour
    as read (and overridden) at its load (`made` in the preflight, or now from the loaded pipeline's scheduler). The
    pipeline's sampler (validation images) is made to agree with the base's reading, and EDM defaults taken from the
    base are written into the config, so training_args.json records what ran."""
    from common.losses import EDMFormulation
    from common.schedulers import make_scheduler

    formulation, note = made or make_formulation(config, pipe.scheduler.config)
    if note:
        accelerator.print(note)
    if base is not None and base.flavour != base.base.flavour:
        flags = f"--prediction_type {base.flavour.prediction_type}" + (" --zero_terminal_snr" if base.flavour.zero_terminal_snr else "")
        accelerator.print(
            f"conversion run: the base is {base.base.flavour.name}, and this LoRA is trained to make it {base.flavour.name}; the "
            f"samples are drawn so, and infer.py must draw so too ({flags}), as must the UIs (v_pred/ztsnr keys in a checkpoint "
            "baked with merge_lora.py --into_checkpoint, or their sampling settings)"
        )
    formulation = formulation.to(accelerator.device)
    edm_native = formulation.base_is_edm
    pipe.scheduler = make_scheduler("default", pipe.scheduler, model_is_edm=edm_native)
    if isinstance(formulation, EDMFormulation):
        config.edm_p_mean = formulation.p_mean
        if edm_native and not config.edm:
            accelerator.print("EDM base detected from its scheduler config: training with the EDM formulation")
        weighting = f"Min-SNR-{config.snr_gamma:g} ({config.snr_weighting})" if config.snr_gamma else config.edm_weighting
        accelerator.print(
            f"EDM training: ln(sigma) ~ N({formulation.p_mean:.3g}, {formulation.p_std:.3g}^2), sigma_data "
            f"{formulation.sigma_data:g}, {formulation.prediction_type} network, weighting {weighting}"
        )
    elif config.edm_p_mean is not None or config.edm_p_std != 1.2 or config.edm_weighting != "table1":
        logging.warning("--edm_p_mean, --edm_p_std and --edm_weighting have no effect on a discrete base without --edm")
    return formulation


@dataclass
class TrainingData:
    """Instance images (one dataset, or a DatasetGroup of several) and class images for prior preservation, with
    each example's caption."""

    instances: object
    captions: list  # every dataset's examples' captions, abstractions already expanded
    classes: object = None
    class_captions: list = field(default_factory=list)
    plans: list = field(default_factory=list)  # common.data_plan.DatasetPlan of each dataset
    captions_vary: bool = False  # a subset's options draw captions no list can hold ahead (shuffles, wildcards, ...)
    held_out: list = field(default_factory=list)  # one dataset item per held-out image, the same at every evaluation

    def all_captions(self) -> list[str]:
        return sorted(set(self.captions) | set(self.class_captions))


def shown_captions(examples: list, options: list) -> tuple[list[str], bool]:
    """(the captions training can show, whether they vary beyond that list): each example's caption under its
    subset's kohya options (prefix, suffix, separators: the same every time), and the empty one where captions are
    dropped; or, where tags are shuffled or dropped, wildcards drawn or whole epochs dropped, the written captions and
    True (they are then encoded as they come)."""
    import random

    from common.captions import processed_caption

    def varies(o) -> bool:
        return o.shuffle or o.tag_dropout > 0 or o.enable_wildcard or o.dropout_every_n_epochs > 0

    if any(varies(options[e.subset]) for e in examples):
        return [e.caption for e in examples], True
    fixed = [processed_caption(e.caption, dataclasses.replace(options[e.subset], dropout=0.0), random.Random(0), 1) for e in examples]
    return fixed + ([""] if any(options[e.subset].dropout > 0 for e in examples) else []), False


def build_data(config: TrainConfig, checked: Preflight, pipe, accelerator) -> TrainingData:
    """The second half of the data path (`plan_data` is the first): each dataset's checked examples, their captions'
    token abstractions expanded, as a dataset of its subsets' own options (optionally as cached latents), several
    datasets as one group, with the class images; buckets.json written."""
    import torch

    from common.data import CAPTIONS_AS_WRITTEN, CachedLatents, DatasetGroup, TrainingImages, check_images, find_examples
    from common.tokens import expand_abstractions, warn_about_long_prompts

    parts, captions, vary = [], [], False
    for plan in checked.datasets:
        examples = [dataclasses.replace(e, caption=expand_abstractions(e.caption, config.token_map)) for e in plan.examples]
        shown, varies = shown_captions(examples, [s.captions for s in plan.subsets])
        captions, vary = captions + shown, vary or varies
        parts.append(TrainingImages(examples, [s.augment for s in plan.subsets], 1, config.seed,
                                    captions=[s.captions for s in plan.subsets], sizes=plan.sizes,
                                    loss_weights=[s.loss_weight for s in plan.subsets]))
    data = TrainingData(parts[0], captions, plans=checked.datasets, captions_vary=vary)
    # the held-out images centred, unflipped and captioned as written: the same item at every evaluation
    held_out = [TrainingImages([dataclasses.replace(e, caption=expand_abstractions(e.caption, config.token_map)) for e in plan.held_out],
                               [dataclasses.replace(s.augment, center_crop=True, random_flip=False) for s in plan.subsets],
                               1, config.seed, captions=[CAPTIONS_AS_WRITTEN] * len(plan.subsets), sizes=plan.held_out_sizes)
                for plan in checked.datasets if plan.held_out]
    data.captions += [e.caption for part in held_out for e in part.examples]  # encoded like the others
    if config.with_prior_preservation:
        class_examples = find_examples(
            instance_data_dir=Path(config.class_data_dir), instance_prompt=config.class_prompt
        )
        class_examples, class_sizes = check_images(class_examples, config.skip_bad_images)
        count = config.num_class_images
        augment = dataclasses.replace(checked.datasets[0].subsets[0].augment, masked=config.masked_loss)
        data.classes = TrainingImages(class_examples[:count], augment, 1, config.seed + 1, sizes=class_sizes[:count])
        class_examples = class_examples[:count]
        data.class_captions = [e.caption for e in class_examples]
    if config.cache_latents or config.cache_latents_to_disk:
        encode = lambda pixels: vae_posterior(pipe.vae, pixels, accelerator.device)  # noqa: E731
        files, vae_key = None, ""
        if config.cache_latents_to_disk:
            from common.disk_cache import TensorFiles, module_digest

            files, vae_key = TensorFiles(disk_cache_folder(config) / "latents"), module_digest(pipe.vae)
        with torch.no_grad():
            parts = [CachedLatents(part, encode, files=files, model_key=vae_key) for part in parts]
            held_out = [CachedLatents(part, encode, files=files, model_key=vae_key) for part in held_out]
            if data.classes is not None:
                data.classes = CachedLatents(data.classes, encode, files=files, model_key=vae_key)
        if files is not None and accelerator.is_main_process:
            cached = parts + ([data.classes] if data.classes is not None else [])
            healed = sum(d.healed for d in cached)
            accelerator.print(f"latents: {sum(d.encoded for d in cached)} encoded, {sum(d.found for d in cached)} read from the "
                              f"disk cache {files.folder}" + (f"; {healed} of the encoded replaced broken entries (cut short, "
                                                              "incomplete or not finite)" if healed else ""))
        pipe.vae.to("cpu")  # the loop needs it no more: about 0.3 GiB of GPU memory for SDXL
    data.instances = parts[0] if len(parts) == 1 else DatasetGroup(parts, [plan.batch_size for plan in checked.datasets])
    data.held_out = [part[position] for part in held_out for position in range(len(part))]
    if accelerator.is_main_process:
        warn_about_long_prompts(pipe.tokenizer, data.all_captions(), "caption", logger.warning, max_tokens=config.max_token_length)
        accelerator.print(data_summary(data, config))
        write_bucket_record(data, config)
    return data


def disk_cache_folder(config: TrainConfig) -> Path:
    from common.disk_cache import default_cache_folder

    return Path(config.disk_cache_dir) if config.disk_cache_dir else default_cache_folder()


def caption_transform(config: TrainConfig):
    """kohya's caption options of the command line (common.captions), checked."""
    from common.captions import CaptionOptions

    return CaptionOptions(shuffle=config.shuffle_caption, keep_tokens=config.keep_tokens, keep_tokens_separator=config.keep_tokens_separator,
                          caption_separator=config.caption_separator, secondary_separator=config.secondary_separator,
                          caption_prefix=config.caption_prefix, caption_suffix=config.caption_suffix, dropout=config.caption_dropout_rate,
                          dropout_every_n_epochs=config.caption_dropout_every_n_epochs, tag_dropout=config.caption_tag_dropout_rate,
                          enable_wildcard=config.enable_wildcard).check()


def data_summary(data: TrainingData, config: TrainConfig) -> str:
    """One line on what the run trains on: images, where their captions came from, repeats, buckets; with several
    datasets or regularisation images, kohya's counts of each."""
    from collections import Counter

    from common.data import open_mask

    examples = [e for plan in data.plans for e in plan.examples]
    sources = Counter(e.caption_from for e in examples)
    named = {"file": "from caption files", "metadata": "from metadata.jsonl", "folder": "from folder names",
             "prompt": "from --instance_prompt", "dataset": "from the dataset"}
    captions = ", ".join(f"{count} {named[source]}" for source, count in sources.items())
    repeats = Counter(e.repeats for e in examples)
    buckets = Counter(data.instances.bucket(position) for position in range(len(data.instances)))
    classes = f"; {len(data.class_captions)} class images" if data.classes is not None else ""
    masked_runs = [plan for plan in data.plans if any(s.augment.masked for s in plan.subsets)]
    if masked_runs:
        masked = sum(open_mask(e, size) is not None for plan in masked_runs for e, size in zip(plan.examples, plan.sizes))
        source = f"from {config.mask_dir}" if config.mask_dir else "from alpha channels"
        classes += f"; masked loss: {masked} of {len(examples)} images masked ({source}; the others train everywhere)"
    line = (f"{len(examples)} images, captions {captions} ({len({e.caption for e in examples})} distinct); "
            f"repeats {', '.join(f'{n} x{r}' for r, n in sorted(repeats.items()))}: {len(data.instances)} examples an epoch; "
            f"{len(buckets)} bucket(s): {', '.join(f'{h}x{w} ({n})' for (h, w), n in sorted(buckets.items()))}{classes}")
    held_out = sum(len(plan.held_out) for plan in data.plans)
    if held_out:
        line += f"; {held_out} images held out for the validation loss"
    reg = sum(plan.reg_images for plan in data.plans)
    if len(data.plans) > 1 or reg:
        line += "\n" + kohya_counts_line(data)
    return line


def kohya_counts_line(data: TrainingData) -> str:
    """kohya's numbers of an epoch, per dataset: train and regularisation images with repeats, what became of the
    regularisation images (repeated or trimmed to the train images), batches."""
    parts = []
    for k, plan in enumerate(data.plans):
        train = sum(e.repeats for e in plan.examples if not plan.subsets[e.subset].is_reg)
        reg = sum(e.repeats for e in plan.examples if plan.subsets[e.subset].is_reg)
        width, height = plan.resolution
        text = f"dataset {k} ({width}x{height}, batch {plan.batch_size}): {train} train images with repeats"
        if reg:
            weight = next(s.loss_weight for s in plan.subsets if s.is_reg)
            text += f", {reg} regularisation images with repeats, repeated or trimmed to match them as kohya does (loss x{weight:g})"
        parts.append(text)
    return "; ".join(parts)


def write_bucket_record(data: TrainingData, config: TrainConfig) -> None:
    """buckets.json in the output folder: each image's bucket and the size it was resized to, and each bucket's count."""
    from common.data import fitted_size

    images = []
    for k, plan in enumerate(data.plans):
        for example, size in zip(plan.examples, plan.sizes):
            (height, width), (resized_h, resized_w) = fitted_size(size, plan.subsets[example.subset].augment)
            images.append({"dataset": k, "image": example.name, "size": [size[1], size[0]], "bucket": [width, height],
                           "resized": [resized_w, resized_h], "repeats": example.repeats})
    counts: dict = {}
    for item in images:
        key = f"{item['dataset']}: {item['bucket'][0]}x{item['bucket'][1]}"
        counts[key] = counts.get(key, 0) + item["repeats"]
    with atomic_path(Path(config.output_dir) / "buckets.json") as partial:
        partial.write_text(json.dumps({"buckets (dataset: width x height): images with repeats": counts, "images": images}, indent=1))


def make_missing_class_images(config: TrainConfig, pipe, accelerator, base) -> None:
    """Fill --class_data_dir up to --num_class_images with the base model, as gen_class_images.py does."""
    from common.generation import fill_class_folder, make_class_images
    from common.cli import parse_dtype
    from common.generation_options import GenerationOptions, sampling_settings
    from common.models import load_sdxl_pipeline

    folder = Path(config.class_data_dir)

    def make(batches) -> int:
        if config.prior_generation_precision not in (None, "no"):
            dtype = parse_dtype(config.prior_generation_precision)
            generator_pipe = load_sdxl_pipeline(config.pretrained_model_name_or_path, dtype,
                                                flavour=base or flavour_options(config)).to(accelerator.device)
            generator_pipe.scheduler = pipe.scheduler  # the sampler that agrees with the base's formulation
        else:
            generator_pipe = pipe.to(accelerator.device)
        options = GenerationOptions(
            model=config.pretrained_model_name_or_path,
            width=config.resolution,
            height=config.resolution,
            num_inference_steps=25,
            guidance_scale=5.0,
        )
        with accelerator.autocast():  # a bf16/fp16 UNet beside the fp32 VAE
            made = make_class_images(generator_pipe, batches, sampling_settings(generator_pipe, options), folder,
                                     show_progress=accelerator.is_local_main_process)
        accelerator.print(f"made {made} class image(s) in {folder}/")
        return made

    fill_class_folder(accelerator, folder, wanted=config.num_class_images, prompt=config.class_prompt, negative_prompt=None,
                      seed=config.seed, batch_size=config.sample_batch_size, make=make)


def add_pivotal_tokens(pipe, config: TrainConfig) -> dict:
    """New tokens for each abstraction in both tokenizers, with trainable rows beside frozen tables."""
    import torch

    from common.tokens import NewTokenRows, abstraction_tokens

    if not config.train_text_encoder_ti:
        return {}
    abstractions = [a.strip() for a in config.token_abstraction.split(",") if a.strip()]
    if not abstractions:
        raise UserError(f"--token_abstraction {config.token_abstraction!r} names no abstraction; e.g. TOK or TOK,TOK2")
    mapping = abstraction_tokens(abstractions, config.num_new_tokens_per_abstraction)
    tokens = [t for group in mapping.values() for t in group]
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        table = encoder.get_input_embeddings()
        if any(t in tokenizer.get_vocab() for t in tokens):
            raise UserError(
                f"the tokenizer already has one of {', '.join(tokens)}; this model was pivotal-tuned before"
            )
        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if ids != list(range(table.num_embeddings, table.num_embeddings + len(tokens))):
            raise UserError(
                f"the tokenizer ({len(tokenizer)} tokens) and its embedding table ({table.num_embeddings} rows) disagree"
            )
        if config.initializer_token:
            start = tokenizer(config.initializer_token, add_special_tokens=False).input_ids
            if len(start) != 1:
                pieces = " + ".join(tokenizer.convert_ids_to_tokens(start)) or "nothing"
                raise UserError(
                    f"--initializer_token {config.initializer_token!r} is {len(start)} CLIP tokens ({pieces}); "
                    "give a word that is one token, e.g. dog, person, style"
                )
            rows = table.weight[start[0]].detach().float().expand(len(tokens), -1)
        else:
            rows = torch.randn(len(tokens), table.embedding_dim) * table.weight.detach().float().std()
        encoder.set_input_embeddings(NewTokenRows(table, rows.to(table.weight.device)))
    return mapping


def add_text_encoder_lora(pipe, config: TrainConfig) -> None:
    """The adapter (--adapter, --rank, --lora_alpha) on both text encoders' attention projections (trained in fp32)."""
    from diffusers.training_utils import cast_training_params

    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.add_adapter(adapter_config(config, list(TEXT_LORA_TARGETS)))
        cast_training_params(encoder)


def encode_captions(tokenizers, encoders, captions: list[str], clip_skip: int | None, device, max_token_length: int = 75):
    """SDXL's prompt encoding through the (possibly wrapped, possibly training) encoders: the penultimate
    (or clip_skip-th from last) hidden state of both encoders side by side, and the second one's pooled
    projection, as diffusers' StableDiffusionXLPipeline.encode_prompt computes them for 75 tokens; longer captions
    (--max_token_length 150 or 225) in 75-token chunks as ComfyUI encodes them when sampling
    (common/long_prompts.py), so the LoRA meets at use the encoding it was trained with."""
    from common.long_prompts import encode_long_prompts

    return encode_long_prompts(tokenizers, encoders, captions, max_token_length=max_token_length, clip_skip=clip_skip, device=device)


class CaptionEncoder:
    """Caption embeddings. Through the trainable text parts (pivotal rows, text-encoder LoRA) while they
    train; once the last of them stops (its fraction of the steps), every caption is embedded once,
    cached, and the encoders leave the GPU."""

    def __init__(self, pipe, config: TrainConfig, total_steps: int, captions: list[str], accelerator, varying: bool = False):
        self.pipe, self.config, self.captions, self.accelerator = pipe, config, captions, accelerator
        self.encoders = [pipe.text_encoder, pipe.text_encoder_2]
        self.rows = [e.get_input_embeddings() for e in self.encoders] if config.train_text_encoder_ti else []
        self.rows_stop = int(config.train_text_encoder_ti_frac * total_steps) if self.rows else 0
        self.lora_stop = int(config.train_text_encoder_frac * total_steps) if config.train_text_encoder else 0
        # shuffled or dropped tags, wildcards, epochs without captions make captions no list can hold ahead: encoded as
        # they come, the encoders stay; a dropped caption is the empty one, which `captions` holds (TrainingData)
        self.varying = varying
        self.files = None
        self.zeros_for_empty = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
        self.cache = None
        self.original_digests = [self._digest(r.table.weight) for r in self.rows]

    @staticmethod
    def _digest(tensor) -> str:
        return hashlib.sha256(tensor.detach().float().cpu().numpy().tobytes()).hexdigest()

    def trainable_encoders(self) -> list:
        return list(self.encoders) if self.rows or self.config.train_text_encoder else []

    def use_prepared(self, encoders: list) -> None:
        if encoders:
            self.encoders = encoders

    def update_phase(self, step: int) -> None:
        """Freeze the pivotal rows after their fraction of the steps, the text LoRA after its own."""
        from common.adapters import TRAINED_PARAMETER_MARKERS

        for rows in self.rows:
            rows.new_rows.requires_grad_(step < self.rows_stop)
        if self.config.train_text_encoder:
            for encoder in (self.pipe.text_encoder, self.pipe.text_encoder_2):
                for name, parameter in encoder.named_parameters():
                    if any(marker in name for marker in TRAINED_PARAMETER_MARKERS):
                        parameter.requires_grad_(step < self.lora_stop)

    def embed(self, captions: list[str], step: int):
        """(prompt embeddings, pooled embeddings) for a batch of captions, in the compute dtype."""
        import torch

        from common.long_prompts import repeat_to_common_length

        device, dtype = self.accelerator.device, weight_dtype(self.accelerator)
        tokenizers = [self.pipe.tokenizer, self.pipe.tokenizer_2]
        if step < max(self.rows_stop, self.lora_stop) or self.varying:
            with torch.no_grad() if step >= max(self.rows_stop, self.lora_stop) else contextlib.nullcontext():
                embeds, pooled = encode_captions(tokenizers, self.encoders, captions, self.config.clip_skip, device,
                                                 self.config.max_token_length)
            return self.unconditional_where_empty(captions, embeds.to(dtype), pooled.to(dtype))
        if self.cache is None:
            with torch.no_grad():
                self.cache = self.encode_once(tokenizers, device)
            for encoder in (self.pipe.text_encoder, self.pipe.text_encoder_2):
                encoder.to("cpu")  # frozen from here on: about 1.6 GiB of GPU memory for SDXL in bf16
        # each cached tensor copied as it is (pinned on a GPU: without waiting for it), then batched there
        cached = [tuple(t.to(device, non_blocking=True) for t in self.cached(c)) for c in captions]
        # captions of different chunk counts batch as the samplers batch them (exact for cross-attention)
        embeds = torch.cat(repeat_to_common_length([e for e, _ in cached])).to(dtype)
        pooled = torch.cat([p for _, p in cached]).to(dtype)
        return self.unconditional_where_empty(captions, embeds, pooled)

    def encode_once(self, tokenizers, device) -> dict:
        """Every caption encoded by the frozen encoders: caption -> (embeddings, pooled) in memory, or with
        --cache_text_encoder_outputs_to_disk caption -> the name of its entry on disk, named by the caption and the
        encoders' exact weights (pivotal rows and text LoRA included) and encoding options, read where it exists."""
        from common.disk_cache import TensorFiles, content_key, module_digest

        def encode(caption):
            encoded = encode_captions(tokenizers, self.encoders, [caption], self.config.clip_skip, device, self.config.max_token_length)
            return tuple(t[:1].cpu() for t in encoded)

        def pinned(tensors):  # page-locked host memory: copies to the GPU need not wait for it
            return tuple(t.pin_memory() for t in tensors) if device.type == "cuda" else tensors

        if not self.config.cache_text_encoder_outputs_to_disk:
            return {c: pinned(encode(c)) for c in self.captions}
        self.files = TensorFiles(disk_cache_folder(self.config) / "text")
        encoders = module_digest(self.pipe.text_encoder, self.pipe.text_encoder_2)
        vocabulary = [len(self.pipe.tokenizer), len(self.pipe.tokenizer_2)]
        names, healed = {}, 0
        for caption in self.captions:
            names[caption] = content_key(caption=caption, encoders=encoders, vocabulary=vocabulary, clip_skip=self.config.clip_skip,
                                         max_token_length=self.config.max_token_length)
            if not self.files.whole(names[caption], {"embeds", "pooled"}):
                healed += names[caption] in self.files
                embeds, pooled = encode(caption)
                self.files.put(names[caption], {"embeds": embeds, "pooled": pooled})
        if healed:
            self.accelerator.print(f"caption embeddings: {healed} broken entries of the disk cache (cut short, incomplete or not "
                                   "finite) encoded again")
        return names

    def cached(self, caption: str):
        entry = self.cache[caption]
        if not isinstance(entry, str):
            return entry
        tensors = self.files.get(entry)
        if tensors is None:
            raise UserError(f"cached text embedding {self.files.path(entry)} could not be read; delete it and run again")
        return tensors["embeds"], tensors["pooled"]

    def unconditional_where_empty(self, captions: list[str], embeds, pooled):
        """An empty caption (--caption_dropout_rate) as the unconditional case SDXL samples with: zero embeddings, where
        the pipeline's config says so (force_zeros_for_empty_prompt: SDXL base was trained so; diffusers' sampling
        uses zeros for an empty negative prompt), else the encoded empty text."""
        import torch

        if not self.zeros_for_empty or "" not in captions:
            return embeds, pooled
        empty = torch.tensor([caption == "" for caption in captions], device=embeds.device)
        return embeds.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)

    def check_original_rows(self) -> None:
        """Pivotal tuning must leave every original vocabulary row bit-identical."""
        for rows, digest in zip(self.rows, self.original_digests):
            if self._digest(rows.table.weight) != digest:
                raise RuntimeError("an original token-embedding row changed during pivotal tuning")


class ClassBatches:
    """Class-image batches for prior preservation, one per micro-step, in a seeded order that is the
    same after a resume; process p takes batch (micro_step * processes + p), so processes differ."""

    def __init__(self, data: TrainingData, config: TrainConfig, accelerator):
        from common.data import BucketBatches

        self.dataset = data.classes
        self.order = BucketBatches(data.classes, config.train_batch_size, config.seed + 1)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes

    def batch(self, micro_step: int) -> dict:
        from common.data import collate

        global_index = micro_step * self.world + self.rank  # over all processes' class batches so far
        per_epoch = len(self.order)
        self.order.start_epoch(global_index // per_epoch)
        positions = self.order.batches()[global_index % per_epoch]
        return collate([self.dataset[p] for p in positions])


def vae_posterior(vae, pixels, device):
    """(mean, std) of the VAE's latent distribution, still unnormalised."""
    distribution = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    # the mean is a view of the VAE's output, whose other half (the log-variance) a cached view would keep alive
    return distribution.mean.float().cpu().clone(), distribution.std.float().cpu()


def batch_latents(batch, pipe, accelerator):
    """Normalised latents of a batch: sampled from the cached posterior, or encoded now."""
    import torch

    from common.models import normalise_latents

    if "latent_mean" in batch:
        mean = batch["latent_mean"].to(accelerator.device, non_blocking=True)  # pinned batches: no wait on a GPU
        std = batch["latent_std"].to(accelerator.device, non_blocking=True)
        raw = mean + std * torch.randn_like(mean)
    else:
        with torch.no_grad():
            pixels = batch["pixels"].to(accelerator.device, non_blocking=True).to(pipe.vae.dtype)
            raw = pipe.vae.encode(pixels).latent_dist.sample().float()
    return normalise_latents(raw, pipe.vae.config)


def conditioned_unet(unet, text_embeddings, time_ids, accelerator):
    """network(model_input, timestep) for a batch's caption embeddings and SDXL micro-conditioning."""
    embeds, pooled = text_embeddings
    dtype = weight_dtype(accelerator)
    time_ids = time_ids.to(accelerator.device, non_blocking=True).to(dtype)

    def network(model_input, timestep):
        return unet(
            model_input.to(dtype),
            timestep.to(accelerator.device),
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample

    return network


def lora_target_modules(unet, config: TrainConfig) -> list[str]:
    """The UNet layers the adapter trains: --lora_layers' Linear layers (common.lora_layers), and with --conv_rank the
    ResNet convolutions and samplers, in the chosen blocks (B-LoRA: content and style)."""
    from common.lora_formats import BLORA_BLOCKS, parse_blocks

    blocks = BLORA_BLOCKS if config.use_blora else parse_blocks(config.lora_unet_blocks)
    prefixes = tuple(b.removeprefix("unet.") + "." for b in blocks)
    from common.lora_layers import DEFAULT_LAYER_SET, lora_layer_names

    names = lora_layer_names(unet, config.lora_layers or DEFAULT_LAYER_SET, convolutions=bool(config.conv_rank))
    if prefixes:
        chosen = [n for n in names if n.startswith(prefixes)]
        for prefix in prefixes:
            if not any(n.startswith(prefix) for n in chosen):
                kinds = f"--lora_layers {config.lora_layers}" + (" or convolution" if config.conv_rank else "")
                raise UserError(
                    f"--lora_unet_blocks: no {kinds} layers under 'unet.{prefix[:-1]}'; e.g. unet.up_blocks.0.attentions.0"
                )
        names = chosen
    weight_of = unet_lr_weight(config, unet.config.layers_per_block)
    if weight_of is not None:  # kohya creates no LoRA in a block of weight 0
        names = [n for n in names if weight_of(n) > 0]
        if not names:
            raise UserError("--down_lr_weight, --mid_lr_weight and --up_lr_weight leave no adapted layer a weight above 0")
    return names


def block_weights(config: TrainConfig):
    """(down, mid, up) learning-rate weights of SDXL's blocks (kohya's), or None when none is given."""
    from common.optim import SDXL_DOWN_BLOCKS, SDXL_MID_BLOCKS, SDXL_UP_BLOCKS, parse_block_weights

    if config.down_lr_weight is None and config.mid_lr_weight is None and config.up_lr_weight is None:
        return None
    return (parse_block_weights(config.down_lr_weight, SDXL_DOWN_BLOCKS, "--down_lr_weight"),
            parse_block_weights(config.mid_lr_weight, SDXL_MID_BLOCKS, "--mid_lr_weight", presets=False),
            parse_block_weights(config.up_lr_weight, SDXL_UP_BLOCKS, "--up_lr_weight"))


def unet_lr_weight(config: TrainConfig, layers_per_block: int = 2):
    """name -> the learning-rate weight of the UNet block a module or parameter is in, or None without block weights."""
    from common.checkpoints import unet_module_to_sgm
    from common.optim import block_lr_weight

    weights = block_weights(config)
    if weights is None:
        return None
    return lambda name: block_lr_weight(unet_module_to_sgm(name, layers_per_block), *weights, config.block_lr_zero_threshold)


def adapter_config(config: TrainConfig, target_modules: list[str]):
    """The peft config of --adapter on these layers: --rank and --lora_alpha, and --conv_rank and --conv_alpha on
    the convolutions among them."""
    from common.adapters import ADAPTERS, peft_config

    from common.lora_layers import is_conv_layer

    convolutions = [name for name in target_modules if is_conv_layer(name)]
    conv_rank = config.conv_rank or config.rank
    return peft_config(
        ADAPTERS[config.adapter],
        rank=config.rank,
        alpha=config.lora_alpha or config.rank,
        target_modules=target_modules,
        rank_pattern={name: conv_rank for name in convolutions},
        alpha_pattern={name: config.conv_alpha or conv_rank for name in convolutions},
        dropout=config.lora_dropout,
        rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout,
        use_dora=config.use_dora,
        use_tucker=config.use_tucker,
        decompose_both=config.decompose_both,
        factor=config.lokr_factor,
    )


def add_lora(unet, config: TrainConfig):
    """peft LoRA (or DoRA, LoHa, LoKr) on the chosen layers; adapter weights train in fp32."""
    from diffusers.training_utils import cast_training_params

    unet.add_adapter(adapter_config(config, lora_target_modules(unet, config)))
    cast_training_params(unet)
    return unet


def start_from_lora(unet, config: TrainConfig) -> None:
    """Copy an existing adapter's UNet layers into the run's (continuing a community or earlier LoRA, LoCon, LoHa or
    LoKr): its type, and each layer's rank and alpha, must be the run's, or the continued adapter would not mean what
    it meant. A kohya/LyCORIS file is read layer by layer (`copy_file_layers`); a diffusers/peft LoRA or DoRA, or a
    kohya DoRA, through peft's state dict."""
    from peft.utils import set_peft_model_state_dict

    from types import SimpleNamespace

    from common.lora_formats import adapter_layers, base_weight_reader, is_kohya_format, lora_file, read_peft_lora, safetensors_keys

    path = Path(config.init_lora)
    if not path.exists():
        raise UserError(f"--init_lora {config.init_lora!r} not found")
    file = lora_file(path)
    keys = safetensors_keys(file, "--init_lora")
    if is_kohya_format(keys) and not any(key.endswith(".dora_scale") for key in keys):
        copy_file_layers(unet, file, config)
        return
    if config.adapter != "lora":
        raise UserError(f"--init_lora {config.init_lora!r} is a LoRA; this run trains --adapter {config.adapter}")
    states, alphas = read_peft_lora(file, base_weight=base_weight_reader(SimpleNamespace(unet=unet)))
    state, module_alphas = states.get("unet"), alphas.get("unet", {})
    if not state:
        raise UserError(f"--init_lora {config.init_lora!r} has no UNet layers")
    trained = adapter_layers(unet, "default")
    ranks = {module: state[f"{module}.lora_A.weight"].shape[0] for module in module_alphas}
    wrong_rank = sorted(m for m in ranks if m in trained and ranks[m] != trained[m].r["default"])
    if wrong_rank:
        found, wanted = sorted(set(ranks.values())), trained[wrong_rank[0]].r["default"]
        raise UserError(f"--init_lora has rank {found} but --rank is {wanted}; pass --rank {max(found)}")
    wrong_alpha = sorted(m for m in module_alphas if m in trained and module_alphas[m] != trained[m].lora_alpha["default"])
    if wrong_alpha:
        found, wanted = sorted(set(module_alphas.values())), trained[wrong_alpha[0]].lora_alpha["default"]
        raise UserError(f"--init_lora has alpha {found} but this run uses {wanted}; pass --lora_alpha")
    parameters = {name.replace(".default.", "."): p for name, p in unet.named_parameters() if "lora_" in name}
    for key, value in state.items():
        own = parameters.get(key)
        if own is not None and own.shape != value.shape:
            raise UserError(
                f"--init_lora's {key} is {tuple(value.shape)} but this model's is {tuple(own.shape)}; "
                "was it trained on another base model?"
            )
    result = set_peft_model_state_dict(unet, state)
    if result.unexpected_keys:
        raise UserError(
            f"--init_lora has layers this run does not train, e.g. {result.unexpected_keys[0]}; check --lora_unet_blocks"
        )


def copy_file_layers(unet, file: Path, config: TrainConfig) -> None:
    """A kohya/LyCORIS file's UNet layers as the run's adapter parameters (`peft_parameters`: the same ΔW), each
    checked to be of the run's type, form, rank and alpha."""
    import torch

    from types import SimpleNamespace

    from common.adapters import ADAPTERS, adapter_of_layer, file_layers, peft_parameters
    from common.lora_formats import adapter_layers, file_layer_names, read_finite_safetensors

    targets = file_layer_names(SimpleNamespace(unet=unet))
    found = file_layers(read_finite_safetensors(file, "--init_lora"))
    strangers = [name for name in found if name.startswith(("lora_unet_", "lycoris_")) and name not in targets]
    if strangers:
        raise UserError(f"--init_lora's layer {strangers[0]!r} names no layer of this model; was it trained on another base model?")
    layers = {targets[name][1]: tensors for name, tensors in found.items() if name in targets}
    if not layers:
        raise UserError(f"--init_lora {config.init_lora!r} has no UNet layers")
    trained = adapter_layers(unet, "default")
    untrained = sorted(set(layers) - set(trained))
    if untrained:
        raise UserError(f"--init_lora has layers this run does not train, e.g. {untrained[0]}; check --lora_unet_blocks and --conv_rank")
    adapter = ADAPTERS[config.adapter]
    with torch.no_grad():
        for module, tensors in layers.items():
            kind = adapter_of_layer(tensors, f"--init_lora's {module}")
            if kind is not adapter:
                raise UserError(f"--init_lora is a {kind.title}; this run trains a {adapter.title} (pass --adapter {kind.name})")
            layer = trained[module]
            rank, alpha = layer.r["default"], (layer.lora_alpha if adapter.name == "lora" else layer.alpha)["default"]
            own = {name.replace(".default", ""): p for name, p in layer.named_parameters() if ".default" in name}
            parameters = peft_parameters(adapter, tensors, rank=rank, alpha=alpha)
            shapes = {name: tuple(value.shape) for name, value in parameters.items()}
            if shapes != {name: tuple(p.shape) for name, p in own.items()}:
                raise UserError(f"--init_lora's {module} holds {shapes}, this run's layer {({n: tuple(p.shape) for n, p in own.items()})}: "
                                "train with the file's --rank, --conv_rank, --decompose_both and --lokr_factor")
            full_lokr = adapter.name == "lokr" and "lokr_w1" in tensors and "lokr_w2" in tensors  # scale 1, whatever its alpha
            if "alpha" in tensors and not full_lokr and float(tensors["alpha"]) != alpha:
                raise UserError(f"--init_lora's {module} has alpha {float(tensors['alpha']):g} but this run uses {alpha:g}; "
                                "pass --lora_alpha (--conv_alpha for convolutions)")
            for name, value in parameters.items():
                own[name].copy_(value.to(own[name].dtype))


def make_optimizer(config: TrainConfig, unet, pipe, accelerator, dataset, batch_size: int):
    """Optimizer over the trained parameters (UNet LoRA; text LoRA and pivotal rows at --text_encoder_lr),
    its learning-rate schedule, and the number of optimizer steps."""
    import torch
    from diffusers.optimization import get_scheduler

    from common.optim import parameter_groups

    text_decay = (
        config.adam_weight_decay
        if config.adam_weight_decay_text_encoder is None
        else config.adam_weight_decay_text_encoder
    )
    text_parameters = [(n, p) for e in (pipe.text_encoder, pipe.text_encoder_2) for n, p in e.named_parameters() if p.requires_grad]
    from common.data import DatasetGroup

    parts = dataset.parts() if isinstance(dataset, DatasetGroup) else [(0, len(dataset), batch_size)]
    batches_per_epoch = math.ceil(sum(length / size for _, length, size in parts) / accelerator.num_processes)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / config.gradient_accumulation_steps))
    total_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.gradient_accumulation_steps * batch_size * accelerator.num_processes
    # one group per learning rate: the UNet's by block weight and LoRA+, the text encoders' at --text_encoder_lr
    parameters = parameter_groups([(n, p) for n, p in unet.named_parameters() if p.requires_grad], lr=learning_rate,
                                  weight_decay=config.adam_weight_decay, loraplus_ratio=config.loraplus_lr_ratio,
                                  lr_weight_of=unet_lr_weight(config, unet.config.layers_per_block))
    parameters += parameter_groups(text_parameters, lr=config.text_encoder_lr, weight_decay=text_decay,
                                   loraplus_ratio=config.loraplus_lr_ratio)
    if config.optimizer == "prodigy":
        import prodigyopt

        if learning_rate != 1.0 or (text_parameters and config.text_encoder_lr != 1.0):
            logger.warning(
                "Prodigy adapts the step size itself: set --learning_rate 1.0 (and --text_encoder_lr 1.0), got %s and %s",
                learning_rate,
                config.text_encoder_lr,
            )
        optimizer = prodigyopt.Prodigy(
            parameters,
            lr=learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            beta3=config.prodigy_beta3,
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
            decouple=config.prodigy_decouple,
            use_bias_correction=config.prodigy_use_bias_correction,
            safeguard_warmup=config.prodigy_safeguard_warmup,
            d_coef=config.prodigy_d_coef,
        )
    elif config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # at a given rate, as LoRA recipes run it (kohya's docs: relative_step, scale_parameter and warmup_init off), so
        # that --lr_scheduler, LoRA+ and block weights apply to it as to AdamW
        optimizer = Adafactor(parameters, lr=learning_rate, relative_step=False, scale_parameter=False, warmup_init=False,
                              weight_decay=config.adam_weight_decay)
    else:
        optimizer_class = torch.optim.AdamW
        if config.use_8bit_adam:
            if not torch.cuda.is_available():
                raise UserError("--use_8bit_adam needs bitsandbytes on a CUDA GPU; drop it on the CPU")
            try:
                import bitsandbytes
            except ImportError:
                raise UserError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
            optimizer_class = bitsandbytes.optim.AdamW8bit
        # one fused kernel for every parameter on a GPU, instead of a few per parameter (the CPU keeps its default)
        fused = {"fused": True} if accelerator.device.type == "cuda" and not config.use_8bit_adam else {}
        optimizer = optimizer_class(
            parameters,
            lr=learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
            **fused,
        )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )
    return optimizer, lr_scheduler, total_steps


def make_loader(config: TrainConfig, dataset, batch_size: int, pin_memory: bool = False):
    """The instance batches in BucketBatches' order; on a GPU in pinned memory, so that their copies to it need not wait
    for the device (batch_latents copies them with non_blocking)."""
    import torch

    from common.data import BucketBatches, collate

    batch_order = BucketBatches(dataset, batch_size, config.seed)  # a DatasetGroup batches each dataset at its own size
    # A loader without a generator of its own draws its workers' base seed from the global generator each time
    # an iterator is made (each epoch, and mid-epoch after a resume), shifting the noise of every later step.
    # accelerate's prepare_data_loader and skip_first_batches pass this generator on to the loaders they make.
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_order,
        collate_fn=collate,
        num_workers=config.dataloader_num_workers,
        generator=torch.Generator().manual_seed(config.seed),
        pin_memory=pin_memory,
    )
    return loader, batch_order


CHECKPOINT_FILES = ("lora.safetensors", "text_encoder.safetensors", "text_encoder_2.safetensors")


def trained_state(model) -> dict:
    """The parameters a run trains in `model`: the adapter's (LoRA/DoRA, LoHa, LoKr) and pivotal-tuning rows."""
    from common.adapters import TRAINED_PARAMETER_MARKERS

    return {
        n: p.detach().float().cpu().contiguous()
        for n, p in model.named_parameters()
        if any(marker in n for marker in (*TRAINED_PARAMETER_MARKERS, "new_rows"))
    }


def register_checkpoint_hooks(accelerator, config: TrainConfig, caption_encoder) -> None:
    """Checkpoints hold only what is trained (not 2.6 B frozen UNet parameters), plus optimizer and RNG
    state, and with pivotal tuning the embedding file as it is at that step. A checkpoint is restored only
    into a run that trains the same weights with the same shapes."""
    from safetensors.torch import save_file

    from common.lora_formats import read_safetensors
    from common.tokens import save_embedding

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model, name in zip(models, CHECKPOINT_FILES):
                save_file(trained_state(accelerator.unwrap_model(model)), os.path.join(output_dir, name))
            if caption_encoder.rows:
                save_embedding(
                    Path(output_dir) / f"{output_name(config)}_emb.safetensors",
                    *[r.new_rows for r in caption_encoder.rows],
                    [t for group in config.token_map.values() for t in group],
                )
        weights.clear()

    def load_hook(models, input_dir):
        def does_not_fit(what: str) -> UserError:
            return UserError(
                f"checkpoint {input_dir} does not fit this run: {what}; resume with the options it was trained with "
                "(--rank, --use_dora, --lora_unet_blocks, the text-encoder options)"
            )

        for model, name in zip(list(models), CHECKPOINT_FILES):
            file = Path(input_dir) / name
            if not file.is_file():  # a checkpoint of a run that left the text encoders alone
                raise does_not_fit(f"it has no {name}")
            state = read_safetensors(file, "checkpoint file", hint="; resume from another checkpoint-N")
            trained = trained_state(accelerator.unwrap_model(model))
            mismatch = weights_mismatch(
                {n: tuple(t.shape) for n, t in state.items()}, {n: tuple(t.shape) for n, t in trained.items()}
            )
            if mismatch:
                raise does_not_fit(f"{name} {mismatch}")
            accelerator.unwrap_model(model).load_state_dict(state, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def output_name(config: TrainConfig) -> str:
    """The run's name: --output_name, or the output folder's own name (also for a nested path)."""
    return config.output_name or Path(config.output_dir).resolve().name


def save_schedule(config: TrainConfig):
    """kohya's saving options as one checked schedule (common.save_schedule)."""
    from common.save_schedule import SaveSchedule

    return SaveSchedule(name=output_name(config), every_n_epochs=config.save_every_n_epochs, every_n_steps=config.save_every_n_steps,
                        last_n_epochs=config.save_last_n_epochs, last_n_steps=config.save_last_n_steps,
                        precision=config.save_precision).check()


def checkpoints(output_dir: str) -> list[Path]:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


CHECKPOINT_RECORD = "training_state.json"  # the step, the run's length, its process count and shape options, for resume's checks
# The options a checkpoint's state depends on: a resume with another value cannot restore it (refused before any model
# loads), and the learning rates, which a resume may change (a diverged run continues at a lower one)
RESUME_SHAPE_OPTIONS = ("adapter", "use_ema", "use_dora", "rank", "conv_rank", "train_text_encoder", "train_text_encoder_ti")
RESUME_RATE_OPTIONS = ("learning_rate", "text_encoder_lr")


def save_checkpoint(accelerator, config: TrainConfig, step: int, total_steps: int) -> None:
    """accelerate state in checkpoint-STEP, written beside and renamed, so a crash never leaves half of one."""
    with atomic_folder(
        Path(config.output_dir) / f"checkpoint-{step}", is_main_process=accelerator.is_main_process
    ) as staging:
        accelerator.wait_for_everyone()  # the main process has made the staging folder
        accelerator.save_state(str(staging))
        if accelerator.is_main_process:
            record = {"step": step, "total_steps": total_steps, "processes": accelerator.num_processes,
                      **{name: getattr(config, name) for name in RESUME_SHAPE_OPTIONS + RESUME_RATE_OPTIONS}}
            (staging / CHECKPOINT_RECORD).write_text(json.dumps(record))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process and config.checkpoints_total_limit:
        for old in checkpoints(config.output_dir)[: -config.checkpoints_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resume_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint --resume_from_checkpoint names (latest: the newest in --output_dir), or None without it."""
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        found = checkpoints(config.output_dir)
        if not found:
            raise UserError(f"--resume_from_checkpoint latest: no checkpoint-N folder in {config.output_dir!r}")
        return found[-1]
    return Path(config.resume_from_checkpoint)


def check_resume(config: TrainConfig) -> None:
    """Before any model loads: the checkpoint to resume is readable and was written by a run this one can continue,
    each difference named by its option (accelerate's own refusal, after the load, names neither). A checkpoint
    written before its record held these options is judged by its files: an EMA leaves accelerate's
    custom_checkpoint_0.pkl."""
    path = resume_checkpoint(config)
    if path is None:
        return
    record = read_checkpoint_record(path)
    if "use_ema" not in record:
        record["use_ema"] = (path / "custom_checkpoint_0.pkl").is_file()
    for name in RESUME_SHAPE_OPTIONS:
        if name in record and record[name] != getattr(config, name):
            def flag(value):
                return f"--{name} {value}" if not isinstance(value, bool) else (f"--{name}" if value else f"no --{name}")

            raise UserError(f"{path} was written by a run with {flag(record[name])}, this one has {flag(getattr(config, name))}: a "
                            f"resume continues the same adapter; resume with {flag(record[name])}, or start over with --force")


def resume(config: TrainConfig, accelerator, total_steps: int, optimizer=None, lr_scheduler=None) -> int:
    """The step to continue from: 0, or the step of the checkpoint whose state was just restored.

    A checkpoint past this run's last step is refused (an old run's, left in the folder); one at the last
    step restores the finished state, so the outputs are written from it. One written by a run of another
    length or process count is restored with a warning for each setting that makes the result differ from
    one uninterrupted run."""
    path = resume_checkpoint(config)
    if path is None:
        return 0
    record = read_checkpoint_record(path)
    step = record["step"]
    if step > total_steps:
        length = f"--max_train_steps {total_steps}" if config.max_train_steps else f"{total_steps} steps"
        raise UserError(
            f"{path} is at step {step}, past the end of this run ({length}); continue it with a larger "
            "--max_train_steps, or train into another --output_dir"
        )
    if accelerator.is_main_process:
        for warning in resume_differences(config, record, step, total_steps, accelerator.num_processes):
            logger.warning(f"{path.name}: {warning}; the result will differ from one uninterrupted run")
    rates = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups] if optimizer is not None else []
    restore_checkpoint(accelerator, path)
    if any(name in record and record[name] != getattr(config, name) for name in RESUME_RATE_OPTIONS):
        continue_at_rates(optimizer, lr_scheduler, rates)
    finished = ": the run is finished, its outputs are written again" if step == total_steps else ""
    accelerator.print(f"resumed from {path} at step {step}{finished}")
    return step


def continue_at_rates(optimizer, lr_scheduler, rates: list[float]) -> None:
    """After a checkpoint's optimizer and schedule were restored (with the rates of the run that wrote it), this run's
    rates (each parameter group's `rates`) as the schedule's base, at the restored step of the schedule."""
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper holds torch's scheduler
    schedule.base_lrs = list(rates)
    for group, rate in zip(optimizer.param_groups, rates):
        group["initial_lr"] = rate
    # diffusers' schedules are LambdaLR: the rate at a step is the base rate times the schedule's factor there
    schedule._last_lr = [factor(schedule.last_epoch) * rate for factor, rate in zip(schedule.lr_lambdas, rates)]
    for group, rate in zip(optimizer.param_groups, schedule._last_lr):
        group["lr"] = rate


def read_checkpoint_record(path: Path) -> dict:
    """The checkpoint's training_state.json; a checkpoint written before there was one gives its step by its
    name alone."""
    file = path / CHECKPOINT_RECORD
    if file.is_file():
        try:
            return json.loads(file.read_text())
        except (ValueError, OSError) as error:
            raise UserError(f"could not read {str(file)!r}: {error}; resume from another checkpoint-N") from None
    digits = path.name.rpartition("-")[2]
    if not digits.isdigit():
        raise UserError(f"--resume_from_checkpoint {str(path)!r}: a checkpoint folder is named checkpoint-STEP")
    return {"step": int(digits)}


def resume_differences(config: TrainConfig, record: dict, step: int, total_steps: int, processes: int) -> list[str]:
    """Why continuing from a checkpoint with this config cannot equal an uninterrupted run of it: the
    settings that follow the run's length, when the checkpoint's run had another, and another process
    count (another sharding of the data, and processes without a saved random state)."""
    differences = []
    written_total = record.get("total_steps", total_steps)
    if written_total != total_steps and step < total_steps:
        changed = []
        if config.lr_scheduler not in ("constant", "constant_with_warmup"):
            changed.append(f"--lr_scheduler {config.lr_scheduler} runs over all the steps")
        for on, name, fraction in (
            (config.train_text_encoder_ti, "train_text_encoder_ti_frac", config.train_text_encoder_ti_frac),
            (config.train_text_encoder, "train_text_encoder_frac", config.train_text_encoder_frac),
        ):
            # the steps before the checkpoint trained this part up to the old run's end of it, not the new one's
            if on and min(int(fraction * written_total), step) != min(int(fraction * total_steps), step):
                changed.append(f"--{name} {fraction} ends at another step")
        if changed:
            length = f"written by a run of {written_total} steps, this one has {total_steps}"
            differences.append(f"{length}: {'; '.join(changed)}")
    written_processes = record.get("processes", processes)
    if written_processes != processes:
        differences.append(f"written by {written_processes} process(es), this run has {processes}")
    for name in RESUME_RATE_OPTIONS:
        if name in record and record[name] != getattr(config, name):
            differences.append(f"written at --{name} {record[name]:g}, continued at {getattr(config, name):g}")
    return differences


def restore_checkpoint(accelerator, path: Path) -> None:
    """accelerate's load_state, with any file it cannot read refused in one line. It passes over a random
    state it cannot read without a word, which would quietly end the bit-identical continuation, so that
    file is read here first."""
    import pickle

    import torch

    unreadable = (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError)
    random_state = path / f"random_states_{accelerator.process_index}.pkl"
    try:
        if random_state.is_file():
            torch.load(random_state, weights_only=False)  # as accelerate does next
    except unreadable as error:
        raise UserError(
            f"could not read checkpoint file {str(random_state)!r}: {str(error) or type(error).__name__}; "
            "resume from another checkpoint-N"
        ) from None
    try:
        accelerator.load_state(str(path))
    except unreadable as error:
        raise UserError(
            f"could not restore checkpoint {str(path)!r}: {str(error) or type(error).__name__}; "
            "resume from another checkpoint-N"
        ) from None


def weights_mismatch(found: dict, expected: dict) -> str | None:
    """How a checkpoint's weights (name -> shape) differ from those a run trains; None when they match."""
    unknown = sorted(set(found) - set(expected))
    if unknown:
        return f"has {len(unknown)} weights this run does not train, e.g. {unknown[0]}"
    missing = sorted(set(expected) - set(found))
    if missing:
        return f"lacks {len(missing)} weights this run trains, e.g. {missing[0]}"
    for name in sorted(found):
        if found[name] != expected[name]:
            return f"has {name} of shape {list(found[name])}, this run's is {list(expected[name])}"
    return None


class CtrlC:
    """Ctrl-C (SIGINT) during the loop asks for a stop at the next step boundary, where the state is whole
    and can be saved: stopping mid-step would save half a step's random state under the last step's name.
    The handler that was there before comes back with the first Ctrl-C, so a second one stops at once.
    In a run of several processes, a request in any of them stops all at the same step: the processes share
    their requests every `every` steps (--logging_steps), not with a collective, and its wait, every step."""

    def __init__(self, accelerator, every: int = 1):
        self.accelerator, self.every, self.requested, self.previous = accelerator, every, False, None

    def __enter__(self) -> CtrlC:
        current = signal.getsignal(signal.SIGINT)
        # handlers can be set from the main thread only; an ignored SIGINT (a background job's) stays ignored
        if threading.current_thread() is threading.main_thread() and current not in (None, signal.SIG_IGN):
            self.previous = current
            signal.signal(signal.SIGINT, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True
        self._restore()

    def _restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def __exit__(self, *exc) -> None:
        self._restore()

    def pressed(self, step: int) -> bool:
        if self.accelerator.num_processes == 1:
            return self.requested
        if step % self.every:
            return False
        import torch

        flag = torch.tensor([float(self.requested)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="max").item())


class Progress:
    """A progress bar with loss, learning rate and, for Prodigy, the adapted step size d*lr.

    The loss stays on the device, summed, and is read once every `every` steps (--logging_steps) and at the end:
    reading it waits for the device to finish, so the steps in between queue their work without waiting. The mean
    over those steps is shown and logged at the step it was read."""

    def __init__(self, total: int, start: int, accelerator, every: int = 1, diverged=None):
        self.bar = tqdm(
            total=total, initial=start, desc="training", unit="step", disable=not accelerator.is_local_main_process
        )
        self.accelerator, self.every = accelerator, every
        self.loss_sum, self.summed, self.schedule = None, 0, None
        self.shown: dict = {}  # values kept on the bar between reads (the validation loss)
        self.last_values: dict = {}
        # diverged(step, mean loss or None, (step, mean loss) last finite or None) -> the error that stops the run
        self.diverged, self.last_finite = diverged, None

    def update(self, loss, optimizer, lr_scheduler, check_models: list | None = None) -> None:
        """Add a step's loss; read the mean every `every` steps, and with `check_models` (a checkpoint follows) read it
        now and check those models' trained weights finite too."""
        loss = loss.detach()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.summed += 1
        self.schedule = (optimizer, lr_scheduler)
        self.bar.update(1)
        if self.bar.n % self.every == 0 or self.bar.n == self.bar.total or check_models is not None:
            self.flush()
        if check_models is not None:
            self.check_finite(check_models, self.bar.n)

    def flush(self) -> None:
        """Read, show and log the mean loss of the steps since the last read (the one host synchronisation)."""
        if not self.summed:
            return
        optimizer, lr_scheduler = self.schedule
        group = optimizer.param_groups[0]
        values = {"loss": float(self.loss_sum) / self.summed, "lr": lr_scheduler.get_last_lr()[0]}
        if not math.isfinite(values["loss"]):  # read here anyway: the check costs no wait of its own
            self.loss_sum, self.summed = None, 0
            self.stop(values["loss"])
        self.last_finite = (self.bar.n, values["loss"])
        if "d" in group:
            values["d*lr"] = group["d"] * group["lr"]
        self.last_values = values
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in (values | self.shown).items()})
        self.accelerator.log(values, step=self.bar.n)
        self.loss_sum, self.summed = None, 0

    def validation(self, loss: float) -> None:
        """Show the held-out loss on the bar from now on, and log it as loss/validation (kohya's name)."""
        self.shown["val_loss"] = loss
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in (self.last_values | self.shown).items()})
        self.accelerator.log({"loss/validation": loss}, step=self.bar.n)

    def close(self) -> None:
        self.flush()
        self.bar.close()

    def check_finite(self, models: list, step: int) -> None:
        """Every trained weight is finite: one reduction on the device, read where the run waits anyway (before a
        checkpoint and the final save), so that neither ever holds a diverged adapter."""
        import torch

        parameters = [p for model in models for p in model.parameters() if p.requires_grad]
        if parameters and not bool(torch.stack([torch.isfinite(p).all() for p in parameters]).all()):
            self.stop(None, step)

    def stop(self, loss: float | None, step: int | None = None) -> None:
        self.bar.close()
        if self.diverged is None:
            raise UserError(f"training diverged at step {step or self.bar.n}")
        raise self.diverged(step or self.bar.n, loss, self.last_finite)


def divergence_error(config: TrainConfig, step: int, loss: float | None, last_finite: tuple | None) -> UserError:
    """The one line a diverged run stops with: where, the last finite loss, the likely cause, and the last good
    checkpoint to resume at a lower rate (every checkpoint was checked finite before it was written)."""
    what = f"the mean loss up to step {step} is {loss}" if loss is not None else f"the trained weights are not finite at step {step}"
    last = f" (the last finite mean loss: {last_finite[1]:.4g} at step {last_finite[0]})" if last_finite else ""
    usual = {"adamw": 1e-4, "adafactor": 1e-4, "prodigy": 1.0}[config.optimizer]
    causes = [f"--{name} {rate:g} ({usual:g} is usual for {config.optimizer})"
              for name, rate in (("learning_rate", config.learning_rate), ("text_encoder_lr", config.text_encoder_lr))
              if rate > 100 * usual and (name == "learning_rate" or config.train_text_encoder or config.train_text_encoder_ti)]
    if config.mixed_precision == "fp16":
        causes.append("fp16 overflow (--mixed_precision bf16 has float32's range)")
    cause = " or ".join(causes) or "the learning rate, or an image with extreme values"
    kept = checkpoints(config.output_dir)
    resume = (f"{kept[-1].name} holds the last finite state: resume it at a lower rate with --resume_from_checkpoint latest"
              if kept else f"no checkpoint was written before it (every {config.checkpointing_steps} steps): start over at a lower rate")
    return UserError(f"training diverged: {what}{last}; likely cause: {cause}; {resume}; no LoRA file was written")


def check_sample_prompts(config: TrainConfig) -> None:
    """The sample prompts read as the gallery will read them (--prompt_syntax), before anything loads."""
    from common.prompt_syntax import check_prompt_syntax, check_prompts

    check_prompt_syntax(config.prompt_syntax, config.emphasis)
    prompts = sample_prompts(config)
    texts = [text for sample in prompts for text in (sample.prompt, sample.negative_prompt) if text]
    weighted = check_prompts(texts, config.prompt_syntax)
    if weighted:
        logger.warning(weighted)


def sample_prompts(config: TrainConfig) -> list:
    """The prompts sampled during training: each --validation_prompt, then the lines of --sample_prompts."""
    from common.gallery import SamplePrompt, read_prompt_file

    prompts = [SamplePrompt(prompt) for prompt in config.validation_prompt or []]
    if config.sample_prompts:
        prompts += read_prompt_file(Path(config.sample_prompts))
    return prompts


class Sampling:
    """Sample images during training, every --validation_steps steps and/or every --validation_epochs epochs (50
    when neither is given, the reference script's default), at most once per step; with the EMA weights under
    --use_ema."""

    def __init__(self, pipe, unet, config: TrainConfig, accelerator, ema):
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


def validate_images(pipe, unet, config: TrainConfig, accelerator, step: int, prompts: list) -> None:
    """Sample images with the adapter as trained so far: each prompt's --num_validation_images images (prompt i's
    seeds start at its --d or --seed + i, the same at every step, so galleries compare) under
    OUTPUT/validation/step-N/, their grid (a row per prompt) as OUTPUT/samples/step-N.png carrying the first image's
    WebUI parameters, and the grid in every tracker that takes images (TensorBoard, wandb)."""
    import numpy as np
    import torch
    from PIL import Image

    from common.gallery import image_grid
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


def save_outputs(unet, pipe, caption_encoder, config: TrainConfig, facts, ema=None) -> None:
    """The diffusers LoRA file (LoRA and LoCon: what diffusers loads), the kohya/LyCORIS file WebUI and ComfyUI
    read (every type but DoRA), the same two for the EMA weights (`NAME_ema.safetensors`, `ema/`) with --use_ema,
    pivotal-tuning embeddings, training_args.json and a model card, each written atomically."""
    from common.tokens import save_embedding

    output, name = Path(config.output_dir), output_name(config)
    models = {"unet": unet}
    if config.train_text_encoder:
        models |= {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    save_adapter_files(models, output, name, config, pipe.unet.config.layers_per_block, facts=facts)
    if ema is not None:
        with ema_weights(ema, unet):
            save_adapter_files(models, output / "ema", f"{name}_ema", config, pipe.unet.config.layers_per_block,
                               facts=dataclasses.replace(facts, output_name=f"{name}_ema"))
        (output / "ema" / f"{name}_ema.safetensors").replace(output / f"{name}_ema.safetensors")  # beside the raw one
        if not any((output / "ema").iterdir()):  # LoHa and LoKr have no diffusers file
            (output / "ema").rmdir()

    if caption_encoder.rows:
        save_embedding(
            output / f"{name}_emb.safetensors",
            *[r.new_rows for r in caption_encoder.rows],
            [t for group in config.token_map.values() for t in group],
        )
    with atomic_path(output / "training_args.json") as partial:
        partial.write_text(json.dumps(recorded(config), indent=2, default=str))
    if config.configuration:
        with atomic_path(output / "config.toml") as partial:
            partial.write_text(config.configuration)
    with atomic_path(output / "README.md") as partial:
        partial.write_text(model_card(config, name))


def save_adapter_files(models: dict, output: Path, name: str, config: TrainConfig, layers_per_block: int,
                       snapshot: bool = False, facts=None) -> None:
    """The adapter of `models` in --save_precision: the diffusers file (LoRA and LoCon) in `output` and the
    kohya/LyCORIS file NAME.safetensors, each with kohya's metadata of `facts` (common.lora_metadata; the minimum
    with --no_metadata) and its hashes. A `snapshot` (a --save_every_n_* file) is only the file the UIs read, under
    `name`: the kohya/LyCORIS file, or for DoRA, which has none, the diffusers one."""
    from peft.utils import get_peft_model_state_dict

    from common.lora_formats import save_diffusers_lora, trained_adapter_file
    from common.lora_metadata import add_file_metadata, lora_metadata, save_lora_file
    from common.save_schedule import cast_for_saving

    output.mkdir(parents=True, exist_ok=True)
    if config.adapter == "lora" and (config.use_dora or not snapshot):
        states = {
            component: cast_for_saving({k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()},
                                       config.save_precision)
            for component, model in models.items()
        }
        written = save_diffusers_lora(output, states, {c: model.peft_config["default"].to_dict() for c, model in models.items()},
                                      file_name=f"{name}.safetensors" if snapshot else None)
        add_file_metadata(written, lora_metadata(facts, minimal=config.no_metadata))
    if config.use_dora:
        if not snapshot:
            logger.warning("DoRA: no kohya copy written (WebUI and ComfyUI read DoRA differently); use the diffusers file")
        return
    state = cast_for_saving(trained_adapter_file(models, layers_per_block=layers_per_block), config.save_precision)
    save_lora_file(output / f"{name}.safetensors", state, lora_metadata(facts, minimal=config.no_metadata))


def lora_facts(config: TrainConfig, data: TrainingData, formulation, started_at: float, step: int, epoch: int):
    """What an adapter file's metadata records of this run (common.lora_metadata): the network, the dataset's
    folders with their tags, repeats and image counts, the buckets, the training size, the rates and times."""
    from collections import Counter, defaultdict

    from common.adapters import ADAPTERS
    from common.lora_metadata import LoraFacts, dataset_folder
    from common.tokens import expand_abstractions

    groups: dict = defaultdict(list)
    for plan in data.plans:
        for example in plan.examples:
            subset = plan.subsets[example.subset]
            folder = example.name.split("/")[0] if "/" in example.name else subset.name
            groups[(folder, subset.is_reg)].append((example, subset))
    folders = [dataset_folder(folder, [e.caption for e, _ in members],
                              members[0][1].num_repeats if is_reg else members[0][0].repeats, is_reg=is_reg)
               for (folder, is_reg), members in groups.items()]
    if data.classes is not None:
        folders.append(dataset_folder(Path(config.class_data_dir).name, data.class_captions, 1, is_reg=True))
    buckets = Counter(data.instances.bucket(position) for position in range(len(data.instances)))
    width, height = config.training_size or (config.resolution, config.resolution)
    network_args = {"algo": "locon" if config.adapter == "lora" and config.conv_rank else config.adapter,
                    "lora_layers": config.lora_layers}
    if config.conv_rank:
        network_args |= {"conv_dim": config.conv_rank, "conv_alpha": config.conv_alpha or config.conv_rank}
    prediction = getattr(formulation, "prediction_type", None)
    return LoraFacts(
        network_module=ADAPTERS[config.adapter].network_module, dim=config.rank, alpha=config.lora_alpha or config.rank,
        output_name=output_name(config), network_args=network_args, base_model=config.pretrained_model_name_or_path,
        folders=tuple(folders), buckets={(w, h): n for (h, w), n in buckets.items()}, resolution=(width, height),
        clip_skip=config.clip_skip, started_at=started_at, finished_at=time.time(), steps=step, epoch=epoch, seed=config.seed,
        learning_rate=config.learning_rate, unet_lr=config.learning_rate,
        text_encoder_lr=config.text_encoder_lr if config.train_text_encoder or config.token_map else None,
        prediction_type=prediction if prediction in ("epsilon", "v_prediction") else None,
        trigger_phrase=expand_abstractions(config.instance_prompt, config.token_map) if config.instance_prompt else None,
    )


def save_snapshot(unet, pipe, config: TrainConfig, schedule, file_name: str, facts) -> None:
    """A --save_every_n_epochs/--save_every_n_steps file of the adapter as it is now, then the file kohya's
    --save_last_n_* retire (common.save_schedule); the main process's work."""
    models = {"unet": unet}
    if config.train_text_encoder:
        models |= {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    output = Path(config.output_dir)
    save_adapter_files(models, output, file_name.removesuffix(".safetensors"), config, pipe.unet.config.layers_per_block,
                       snapshot=True, facts=dataclasses.replace(facts, output_name=output_name(config)))
    for removed in schedule.remove_expired(output, file_name):
        logger.info(f"removed {removed.name} (--save_last_n_*)")


def make_ema(config: TrainConfig, unet, accelerator):
    """diffusers' EMAModel of the UNet adapter's trained weights (--use_ema), on the device and in every checkpoint;
    its decay warms up as min(--ema_decay, (1 + t) / (10 + t)) (EMAModel.get_decay without use_ema_warmup)."""
    from diffusers.training_utils import EMAModel

    if not config.use_ema:
        return None
    ema = EMAModel([p for p in unet.parameters() if p.requires_grad], decay=config.ema_decay)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    return ema


@contextlib.contextmanager
def ema_weights(ema, unet):
    """The UNet adapter with its EMA weights inside the block, its raw weights after it."""
    trained = [p for p in unet.parameters() if p.requires_grad]
    ema.store(trained)
    ema.copy_to(trained)
    try:
        yield
    finally:
        ema.restore(trained)


def model_card(config: TrainConfig, name: str) -> str:
    """How to use the result: trigger prompt, tokens, diffusers and infer.py code, WebUI and ComfyUI."""
    from common.tokens import expand_abstractions

    model = config.pretrained_model_name_or_path
    prompt = expand_abstractions(config.instance_prompt or "(your caption)", config.token_map)
    tokens = [t for group in config.token_map.values() for t in group]
    embedding_code = embedding_cli = embedding_ui = tokens_line = ""
    if tokens:
        tokens_line = "Tokens: " + ", ".join(f"`{a}` -> `{''.join(t)}`" for a, t in config.token_map.items()) + "\n"
        embedding_code = f"""from safetensors.torch import load_file
pipe.text_encoder_2.text_model.eos_token_id = 49407  # pool at the end of text, as in training (SDXL's config says 2)
state = load_file("{config.output_dir}/{name}_emb.safetensors")
pipe.load_textual_inversion(state["clip_l"], token={tokens!r}, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
pipe.load_textual_inversion(state["clip_g"], token={tokens!r}, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
"""
        embedding_cli = f" --embedding {config.output_dir}/{name}_emb.safetensors"
        ui_prompt = expand_abstractions(config.instance_prompt or "", {a: [name] for a in config.token_map})
        embedding_ui = f"""
Embedding: copy `{name}_emb.safetensors` as `{name}.safetensors` into WebUI's `embeddings/` or ComfyUI's
`models/embeddings/` and write its name where the tokens were: WebUI `{ui_prompt} <lora:{name}:1>`,
ComfyUI `{expand_abstractions(config.instance_prompt or "", {a: [f"embedding:{name}"] for a in config.token_map})}`.
"""
    kind = {"lora": "LoCon" if config.conv_rank else "LoRA", "loha": "LoHa", "lokr": "LoKr"}[config.adapter]
    convolutions = f", convolutions at rank {config.conv_rank}" if config.conv_rank else ""
    load = "from_single_file" if Path(model).is_file() else "from_pretrained"  # a single file needs its configs: see the README
    if config.adapter == "lora":
        diffusers = f"""```python
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.{load}("{model}")
pipe.load_lora_weights("{config.output_dir}")
{embedding_code}image = pipe("{prompt}").images[0]
```

or: """
    else:  # diffusers' SDXL loader reads no hada_/lokr_ tensors
        diffusers = f"diffusers' SDXL LoRA loader cannot read a {kind}; use "
    return f"""# {name}

{kind} (rank {config.rank}{convolutions}{", DoRA" if config.use_dora else ""}{", with text-encoder adapters" if config.train_text_encoder else ""}) for `{model}`,
trained with train_lora.py{" (EDM formulation)" if config.edm else ""}{", pivotal tuning" if tokens else ""}.

Trigger prompt: `{prompt}`
{tokens_line}
## diffusers

{diffusers}`python infer.py --model {model} --lora {config.output_dir}{embedding_cli} --prompt "{prompt}"`

## WebUI / ComfyUI

Copy `{name}.safetensors` into `models/Lora` (WebUI: prompt `<lora:{name}:1>`) or `models/loras` (ComfyUI: LoraLoader).
{embedding_ui}"""


if __name__ == "__main__":
    run_app(app)

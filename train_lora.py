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
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import typer

from common.checkpointing import check_resume, checkpoints, register_checkpoint_hooks, resume, save_checkpoint
from common.cli import (
    MANY_VALUED, Interrupted, UserError, config_from_options, option, options_command, parse_bool, run_app,
)
from common.config_file import configuration_text, with_config_file, write_output_config
from common.gallery import Sampling, check_sample_prompts
from common.kohya_options import choose_lora_layers, with_kohya_options
from common.lora_layers import LORA_LAYERS_HELP
from common.lora_outputs import facts_at, lora_facts, make_ema, recorded, save_outputs, save_schedule, save_snapshot
from common.progress import CtrlC, Progress, divergence_error
from common.training_data import ClassBatches, build_data, check_data_sources, disk_cache_folder, make_loader, plan_data

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
    options = with_kohya_options(options, TrainConfig)
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
        (not config.use_8bit_adam or config.optimizer == "adamw",
         f"--use_8bit_adam is bitsandbytes' AdamW8bit; it does not apply to --optimizer {config.optimizer}"),
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
    check_eight_bit_adam(config)
    return config


def check_eight_bit_adam(config: TrainConfig) -> None:
    """--use_8bit_adam runs bitsandbytes' AdamW8bit: it needs a CUDA GPU that this run uses (not several CPU
    processes) and the package, checked here rather than when the optimizer is made, after the models load."""
    import importlib.util

    import torch

    from common.models import cpu_processes_requested

    if not config.use_8bit_adam:
        return
    if not torch.cuda.is_available() or cpu_processes_requested():
        missing = "no CUDA GPU"
    elif importlib.util.find_spec("bitsandbytes") is None:
        missing = "no bitsandbytes (pip install bitsandbytes)"
    else:
        return
    raise UserError(f"--use_8bit_adam (kohya's --optimizer_type AdamW8bit) needs bitsandbytes on a CUDA GPU; this run has "
                    f"{missing}: leave it out to train with AdamW")


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
    from common.validation import HeldOut

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
    loader, batch_order = make_loader(config, data.instances, data.plans[0].batch_size, pin_memory=accelerator.device.type == "cuda")
    optimizer, lr_scheduler, total_steps = make_optimizer(config, unet, pipe, accelerator, len(batch_order), data.plans[0].batch_size)
    caption_encoder = CaptionEncoder(pipe, config, total_steps, data.all_captions(), accelerator, data.captions_vary)
    # infer.py --compile's recipe: channels-last on a GPU (TF32 only with --allow_tf32), compiled with --torch_compile
    unet = speed_up_unet(unet, accelerator.device, compile_unet=config.torch_compile, allow_tf32=config.allow_tf32)
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
    describe = partial(facts_at, lora_facts(config, data, formulation, started))  # (step, epoch) -> an adapter file's facts
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

    return FlavourOptions.of_flags(config.prediction_type, config.zero_terminal_snr, config.base_formulation)


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

    from common.models import check_clip_skip, load_sdxl_pipeline, load_vae, quiet_libraries, text_encoder_layers

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
    check_clip_skip(config.clip_skip, text_encoder_layers(pipe), config.pretrained_model_name_or_path)  # a hub model's, known now
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


def make_optimizer(config: TrainConfig, unet, pipe, accelerator, batches_per_epoch: int, batch_size: int):
    """Optimizer over the trained parameters (UNet LoRA; text LoRA and pivotal rows at --text_encoder_lr),
    its learning-rate schedule, and the number of optimizer steps. `batches_per_epoch`: the batch order's count over
    all processes (each bucket's last batch may be short, so it is not the examples over the batch size)."""
    import torch
    from diffusers.optimization import get_scheduler

    from common.optim import parameter_groups

    text_decay = (
        config.adam_weight_decay
        if config.adam_weight_decay_text_encoder is None
        else config.adam_weight_decay_text_encoder
    )
    text_parameters = [(n, p) for e in (pipe.text_encoder, pipe.text_encoder_2) for n, p in e.named_parameters() if p.requires_grad]
    batches_per_process = math.ceil(batches_per_epoch / accelerator.num_processes)  # as accelerate shards the batches
    steps_per_epoch = max(1, math.ceil(batches_per_process / config.gradient_accumulation_steps))
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
        if config.use_8bit_adam:  # make_config has checked that it runs here
            import bitsandbytes

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


if __name__ == "__main__":
    run_app(app)

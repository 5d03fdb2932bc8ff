"""Built-in SDXL-family models, made offline from configs with deterministic random weights.

Four names, two sizes, two flavours:
- `tiny-sdxl`, `tiny-edm`: SDXL's structure scaled down (a few MB) for the tests and the demo;
- `full-sdxl`, `full-edm`: the exact architectures of SDXL base 1.0 and Playground v2.5 (a 2,567,463,684-
  parameter UNet, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders, the 83.7 M-parameter VAE), random
  weights stored in bf16: every shape, key name and byte count a user's real model has, without a download.
`*-sdxl` is DDPM/epsilon with SDXL's Euler scheduler; `*-edm` has Playground v2.5's EDM scheduler and VAE
latent statistics. Every size uses OpenAI CLIP's real 49,408-token BPE vocabulary, built from the merges
file vendored in `common/clip_vocab/` (MIT licence, OpenAI; the same file open-clip-torch ships).

Building never touches torch's global RNG: a model built on first use cannot change what a seeded run
does next.

    python -m common.builtin_models full-edm DIR   # writes an ordinary diffusers pipeline folder
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the scripts parse options and answer --help without torch
    import torch

TINY_MODELS = ("tiny-sdxl", "tiny-edm")
FULL_MODELS = ("full-sdxl", "full-edm")
BUILTIN_MODELS = TINY_MODELS + FULL_MODELS
# Bump when a config or the weights below change, so that cached folders of an older layout are rebuilt.
LAYOUT_VERSION = {"tiny": 2, "full": 1}

CLIP_BPE_FILE = Path(__file__).parent / "clip_vocab" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408  # 256 bytes, 256 bytes ending a word, 48,894 merges, <|startoftext|>, <|endoftext|>
CLIP_MAX_TOKENS = 77

# SDXL base 1.0's published unet/config.json (the shape Playground v2.5 and SDXL fine-tunes share)
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
# Its text_encoder/ and text_encoder_2/ config.json: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14. The token ids
# are the published ones; eos_token_id 2 (not 49407) makes transformers pool at the highest token id.
_SDXL_TEXT_COMMON = {
    "vocab_size": CLIP_VOCAB_SIZE, "max_position_embeddings": CLIP_MAX_TOKENS, "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
SDXL_TEXT_ENCODER_CONFIGS = (
    {**_SDXL_TEXT_COMMON, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
     "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768},
    {**_SDXL_TEXT_COMMON, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
     "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280},
)
SDXL_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
PLAYGROUND_V25_LATENTS_MEAN = [-1.6574, 1.886, -1.383, 2.5155]
PLAYGROUND_V25_LATENTS_STD = [8.4927, 5.9022, 6.5498, 5.2299]
PLAYGROUND_V25_VAE_CHANGES = {
    "scaling_factor": 0.5, "latents_mean": PLAYGROUND_V25_LATENTS_MEAN, "latents_std": PLAYGROUND_V25_LATENTS_STD,
    "force_upcast": False,
}

# The tiny models: the same layouts with small widths (two text encoders of different widths catch
# clip_l/clip_g mix-ups; up_blocks.0 keeps attentions.0 and .1, B-LoRA's content and style blocks).
_TINY_TEXT_WIDTHS = (32, 64)
_TINY_TIME_EMBED_DIM = 8
TINY_UNET_CONFIG = {
    **SDXL_UNET_CONFIG,
    "sample_size": 8,
    "block_out_channels": [32, 64, 64],
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": sum(_TINY_TEXT_WIDTHS),
    "addition_time_embed_dim": _TINY_TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": _TINY_TEXT_WIDTHS[1] + 6 * _TINY_TIME_EMBED_DIM,
}
TINY_TEXT_ENCODER_CONFIGS = tuple(
    {**full, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 3,  # SDXL reads the penultimate layer
     "num_attention_heads": 4, "projection_dim": width}
    for full, width in zip(SDXL_TEXT_ENCODER_CONFIGS, _TINY_TEXT_WIDTHS)
)
TINY_VAE_CONFIG = {**SDXL_VAE_CONFIG, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "sample_size": 64}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (GPT-2 byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, characters)}


def clip_merges() -> list[str]:
    """The 48,894 BPE merges of OpenAI's CLIP tokenizer, in rank order (the file's first line is a header;
    CLIP uses only as many merges as fill its 49,408-token vocabulary)."""
    lines = gzip.decompress(CLIP_BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    return lines[1 : 1 + CLIP_VOCAB_SIZE - 2 * 256 - 2]


def clip_vocabulary(merges: list[str]) -> dict[str, int]:
    """CLIP's token ids: the 256 byte symbols, the same at a word's end (`</w>`), one token per merge, then
    <|startoftext|> (49406) and <|endoftext|> (49407)."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def write_clip_tokenizer(folder: Path, pad_token: str) -> None:
    """CLIPTokenizer files as openai/clip-vit-large-patch14 has them; SDXL's second tokenizer pads with "!"."""
    merges = clip_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocabulary(merges), ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_MAX_TOKENS, "pad_token": pad_token,
              "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": pad_token}, indent=2))


def _scheduler(edm: bool):
    from diffusers import EDMDPMSolverMultistepScheduler, EulerDiscreteScheduler

    if edm:  # Playground v2.5's scheduler_config.json
        return EDMDPMSolverMultistepScheduler(
            sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, prediction_type="epsilon", num_train_timesteps=1000,
            solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", final_sigmas_type="zero",
        )
    # SDXL base 1.0's scheduler_config.json
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, prediction_type="epsilon",
        steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
    )


def fill_deterministically(module: torch.nn.Module, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    """Give every parameter of a module built on the meta device real values of `dtype`, cheaply and
    identically on every machine, without the global RNG: weights are windows of one fixed pool of normal
    numbers, at an offset from a CRC of the parameter's name, scaled to std 1/sqrt(fan_in) (PyTorch's default
    init has the same fan-in scaling); norm scales are 1 and every other vector (biases) 0. A copy per
    parameter instead of a random draw per element: SDXL's 3.5 G values take seconds, not minutes."""
    import torch

    pool = torch.randn(2**24 + 43, generator=torch.Generator().manual_seed(seed))  # a prime length
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    for module_name, child in module.named_modules():
        for name, parameter in list(child.named_parameters(recurse=False)):
            values = torch.empty(parameter.shape, dtype=dtype)
            if parameter.ndim >= 2:
                _copy_from_pool(values.view(-1), pool, zlib.crc32(f"{module_name}.{name}".encode()))
                values.mul_(parameter[0].numel() ** -0.5)
            else:
                values.fill_(1.0 if isinstance(child, norms) and name == "weight" else 0.0)
            child._parameters[name] = torch.nn.Parameter(values, requires_grad=parameter.requires_grad)
    return module


def _copy_from_pool(flat: torch.Tensor, pool: torch.Tensor, offset: int) -> None:
    position, start = 0, offset % len(pool)
    while position < len(flat):
        count = min(len(flat) - position, len(pool) - start)
        flat[position : position + count].copy_(pool[start : start + count])
        position, start = position + count, 0


def build_pipeline(name: str, dtype: torch.dtype | None = None):
    """Built-in pipeline `name`. Tiny models: PyTorch's default init from fixed seeds, in fp32. Full models:
    `fill_deterministically`, in `dtype` (bf16 unless asked otherwise)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    full, edm = name in FULL_MODELS, name.endswith("-edm")
    unet_config = SDXL_UNET_CONFIG if full else TINY_UNET_CONFIG
    text_configs = SDXL_TEXT_ENCODER_CONFIGS if full else TINY_TEXT_ENCODER_CONFIGS
    vae_config = {**(SDXL_VAE_CONFIG if full else TINY_VAE_CONFIG), **(PLAYGROUND_V25_VAE_CHANGES if edm else {})}
    with tempfile.TemporaryDirectory() as scratch:
        write_clip_tokenizer(Path(scratch) / "tokenizer", pad_token="<|endoftext|>")
        write_clip_tokenizer(Path(scratch) / "tokenizer_2", pad_token="!")  # SDXL's second tokenizer pads with "!"
        tokenizer = CLIPTokenizer.from_pretrained(Path(scratch) / "tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(Path(scratch) / "tokenizer_2")
    constructors = (
        lambda: CLIPTextModel(CLIPTextConfig(**text_configs[0])),
        lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text_configs[1])),
        lambda: UNet2DConditionModel(**unet_config),
        lambda: AutoencoderKL(**vae_config),
    )
    components = []
    for seed, construct in enumerate(constructors):
        if full:
            with init_empty_weights(include_buffers=False):
                components.append(fill_deterministically(construct(), seed, dtype or torch.bfloat16))
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                components.append(construct())
    text_encoder, text_encoder_2, unet, vae = components
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=_scheduler(edm), force_zeros_for_empty_prompt=True,
    )


def write_builtin_model(name: str, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write built-in model `name` as a diffusers pipeline folder, atomically (built aside, then renamed)."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from common.files import atomic_folder

    folder = Path(folder)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    with atomic_folder(folder) as staging:
        twin = _cached_twin(name, folder)
        if twin is not None and dtype in (None, torch.bfloat16):
            _link_twin(twin, name, staging)
        else:
            build_pipeline(name, dtype).save_pretrained(staging, safe_serialization=True)
    return folder


def _cached_twin(name: str, folder: Path) -> Path | None:
    """The other flavour of a full model, when it is already in the same cache: the two have the same
    weights (only the VAE's latent statistics and the scheduler differ), so its files can be linked."""
    if name not in FULL_MODELS:
        return None
    other = FULL_MODELS[1 - FULL_MODELS.index(name)]
    twin = folder.with_name(folder.name.replace(name, other, 1))
    return twin if twin != folder and (twin / "model_index.json").is_file() else None


def _link_twin(twin: Path, name: str, staging: Path) -> None:
    """`name` as hard links to its twin's weight files, with its own VAE statistics and scheduler."""
    shutil.copytree(twin, staging, dirs_exist_ok=True,
                    copy_function=lambda source, target: os.link(source, target) if source.endswith(".safetensors")
                    else shutil.copy2(source, target))
    edm = name.endswith("-edm")
    vae_config = json.loads((twin / "vae" / "config.json").read_text())
    flavour = PLAYGROUND_V25_VAE_CHANGES if edm else {key: SDXL_VAE_CONFIG.get(key) for key in PLAYGROUND_V25_VAE_CHANGES}
    (staging / "vae" / "config.json").write_text(json.dumps({**vae_config, **flavour}, indent=2))
    shutil.rmtree(staging / "scheduler")
    scheduler = _scheduler(edm)
    scheduler.save_pretrained(staging / "scheduler")
    index = json.loads((staging / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (staging / "model_index.json").write_text(json.dumps(index, indent=2))


def builtin_cache_dir() -> Path:
    from common.files import cache_root

    return cache_root() / "models"


def builtin_model_path(name: str) -> Path:
    """The cached folder of built-in model `name`, built on first use."""
    size = "full" if name in FULL_MODELS else "tiny"
    folder = builtin_cache_dir() / f"{name}-v{LAYOUT_VERSION[size]}"
    if not (folder / "model_index.json").is_file():
        note = " (about 7 GB of bf16 weights, a minute or two)" if size == "full" else ""
        print(f"building built-in model {name} into {folder} (first use){note}", file=sys.stderr)
        write_builtin_model(name, folder)
    return folder


def _main() -> None:
    import typer

    from common.cli import UserError, run_app

    app = typer.Typer(add_completion=False)

    @app.command()
    def write(
        name: str = typer.Argument(..., help=f"one of {', '.join(BUILTIN_MODELS)}"),
        folder: Path = typer.Argument(..., help="where to write the pipeline folder"),
        dtype: str = typer.Option("bf16", "--dtype", help="weights of the full models: bf16 or fp32 (tiny models are fp32)"),
    ) -> None:
        """Write a built-in model as an ordinary diffusers pipeline folder."""
        if name not in BUILTIN_MODELS:
            raise UserError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
        if dtype not in ("bf16", "fp32"):
            raise UserError(f"--dtype {dtype!r}; choose bf16 or fp32")
        from common.models import parse_dtype

        print(write_builtin_model(name, folder, parse_dtype(dtype)))

    run_app(app)


if __name__ == "__main__":
    _main()

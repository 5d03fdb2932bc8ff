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

    python -m common.builtin_models full-edm DIR                  # writes an ordinary diffusers pipeline folder
    python -m common.builtin_models full-sdxl sdxl.safetensors    # a single-file checkpoint, as the UIs keep them
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from common.architectures import (
    PLAYGROUND_V25_VAE_CHANGES, SDXL_TEXT_ENCODER_CONFIGS, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, TINY_TEXT_ENCODER_CONFIGS,
    TINY_UNET_CONFIG, TINY_VAE_CONFIG, published_scheduler, write_clip_tokenizer,
)

if TYPE_CHECKING:  # imported where used: the scripts parse options and answer --help without torch
    import torch

TINY_MODELS = ("tiny-sdxl", "tiny-edm")
FULL_MODELS = ("full-sdxl", "full-edm")
BUILTIN_MODELS = TINY_MODELS + FULL_MODELS
# Bump when a config or the weights below change, so that cached folders of an older layout are rebuilt.
LAYOUT_VERSION = {"tiny": 2, "full": 1}

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
        unet=unet, scheduler=published_scheduler(edm), force_zeros_for_empty_prompt=True,
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
    scheduler = published_scheduler(edm)
    scheduler.save_pretrained(staging / "scheduler")
    index = json.loads((staging / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (staging / "model_index.json").write_text(json.dumps(index, indent=2))


def write_builtin_checkpoint(name: str, path: Path, dtype: torch.dtype | None = None) -> int:
    """Write built-in model `name` as a single-file checkpoint (SGM names, its flavour's markers, ModelSpec metadata),
    in `dtype` or as built; the bytes of tensors written."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from common.checkpoints import checkpoint_tensors, modelspec_metadata, save_checkpoint_file
    from common.flavours import flavour_from_scheduler_config

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    dtype = dtype or (torch.bfloat16 if name in FULL_MODELS else torch.float32)
    pipe = StableDiffusionXLPipeline.from_pretrained(builtin_model_path(name), dtype=dtype)
    flavour = flavour_from_scheduler_config(pipe.scheduler.config, pipe.vae.config, edm_native=name.endswith("-edm"))
    tensors = checkpoint_tensors(pipe, flavour, dtype)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    save_checkpoint_file(path, tensors, modelspec_metadata(flavour, title=name, resolution=native))
    return sum(value.numel() * value.element_size() for value in tensors.values())


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
        target: Path = typer.Argument(..., help="a folder (a diffusers pipeline), or a .safetensors file (a single-file "
                                                "checkpoint, as WebUI and ComfyUI keep them)"),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 or fp32 (default: as built: bf16 full models, fp32 "
                                                                  "tiny ones); a single file also takes fp16"),
        force: bool = typer.Option(False, "--force", help="replace an existing single file"),
    ) -> None:
        """Write a built-in model as an ordinary diffusers pipeline folder, or as a single-file checkpoint."""
        from common.cli import parse_dtype

        if name not in BUILTIN_MODELS:
            raise UserError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
        single_file = target.suffix.lower() == ".safetensors"
        accepted = ("bf16", "fp32", "fp16") if single_file else ("bf16", "fp32")
        if dtype is not None and dtype not in accepted:
            raise UserError(f"--dtype {dtype!r}; choose {' or '.join(accepted)}")
        if not single_file:
            print(write_builtin_model(name, target, parse_dtype(dtype or "bf16")))
            return
        if target.exists() and not force:
            raise UserError(f"{str(target)!r} exists; pass --force to replace it")
        size = write_builtin_checkpoint(name, target, parse_dtype(dtype) if dtype else None)
        print(f"{target} ({size / 2**30:.2f} GiB)")

    run_app(app)


if __name__ == "__main__":
    _main()

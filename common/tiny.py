"""Built-in tiny SDXL-shaped models, made offline from configs with seeded random weights.

Two flavours stand in for the real bases:
- `tiny-sdxl`: DDPM/epsilon with an Euler discrete scheduler, like SDXL base 1.0;
- `tiny-edm`: the same networks with Playground v2.5's EDM scheduler and VAE latent statistics.

Both keep SDXL's structure where methods depend on it: two CLIP text encoders of different
widths (the second with a projection), the `text_time` micro-conditioning, three UNet levels
whose first up block is a cross-attention block with `attentions.0` and `attentions.1`
(B-LoRA's content and style blocks), and an 8x VAE.

    python -m common.tiny tiny-sdxl DIR   # writes an ordinary diffusers pipeline folder
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

TINY_MODELS = ("tiny-sdxl", "tiny-edm")
# Bump when a config below changes, so that cached folders of an older layout are rebuilt.
TINY_LAYOUT_VERSION = 1

_TEXT_ENCODER_1_WIDTH = 32  # stands in for CLIP ViT-L (768)
_TEXT_ENCODER_2_WIDTH = 64  # stands in for OpenCLIP ViT-bigG (1280)
_TIME_EMBED_DIM = 8  # SDXL: 256 per micro-conditioning number
_MAX_TOKENS = 77

# Words made single tokens so that demo prompts stay well inside 77 tokens.
_MERGED_WORDS = (
    "a an the of in on with and photo portrait painting drawing style icon dog cat man woman "
    "astronaut riding horse house tree mountain city night sky red blue green sks tok"
).split()

PLAYGROUND_V25_LATENTS_MEAN = [-1.6574, 1.886, -1.383, 2.5155]
PLAYGROUND_V25_LATENTS_STD = [8.4927, 5.9022, 6.5498, 5.2299]


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


def _write_tokenizer(folder: Path, pad_token: str) -> None:
    """A byte-level CLIP BPE vocabulary: every byte, every byte at a word end, a few whole words."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab[symbol] = len(vocab)
    merges: list[str] = []
    for word in _MERGED_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": _MAX_TOKENS,
        "pad_token": pad_token,
        "do_lower_case": True,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": pad_token}, indent=2))


def _text_encoder_config(width: int, vocab_size: int, hidden_act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,  # SDXL reads the penultimate layer, so keep more than two
        num_attention_heads=4,
        max_position_embeddings=_MAX_TOKENS,
        hidden_act=hidden_act,
        projection_dim=projection_dim or width,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def unet_config() -> dict:
    """SDXL's UNet layout (3 levels, text_time conditioning, linear projections), scaled down."""
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 1, 2],
        "attention_head_dim": [2, 4, 4],
        "cross_attention_dim": _TEXT_ENCODER_1_WIDTH + _TEXT_ENCODER_2_WIDTH,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": _TEXT_ENCODER_2_WIDTH + 6 * _TIME_EMBED_DIM,
        "norm_num_groups": 32,
    }


def _vae_config(edm: bool) -> dict:
    config = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 32, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "sample_size": 64,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }
    if edm:
        config.update(
            scaling_factor=0.5,
            latents_mean=PLAYGROUND_V25_LATENTS_MEAN,
            latents_std=PLAYGROUND_V25_LATENTS_STD,
            force_upcast=False,
        )
    return config


def _scheduler(edm: bool):
    from diffusers import EDMDPMSolverMultistepScheduler, EulerDiscreteScheduler

    if edm:
        # Playground v2.5's scheduler_config.json
        return EDMDPMSolverMultistepScheduler(
            sigma_min=0.002,
            sigma_max=80.0,
            sigma_data=0.5,
            rho=7.0,
            prediction_type="epsilon",
            num_train_timesteps=1000,
            solver_order=2,
            algorithm_type="dpmsolver++",
            solver_type="midpoint",
            final_sigmas_type="zero",
        )
    # SDXL base 1.0's scheduler_config.json
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
    )


def build_tiny_pipeline(name: str):
    """The tiny pipeline `name`, with weights drawn from a fixed seed (identical on every machine)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    edm = name == "tiny-edm"
    with tempfile.TemporaryDirectory() as scratch:
        _write_tokenizer(Path(scratch) / "tokenizer", pad_token="<|endoftext|>")
        _write_tokenizer(Path(scratch) / "tokenizer_2", pad_token="!")  # SDXL's second tokenizer pads with "!"
        tokenizer = CLIPTokenizer.from_pretrained(Path(scratch) / "tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(Path(scratch) / "tokenizer_2")
    vocab_size = len(tokenizer)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_encoder_config(_TEXT_ENCODER_1_WIDTH, vocab_size, "quick_gelu"))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(_TEXT_ENCODER_2_WIDTH, vocab_size, "gelu"))
    torch.manual_seed(2)
    unet = UNet2DConditionModel(**unet_config())
    torch.manual_seed(3)
    vae = AutoencoderKL(**_vae_config(edm))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(edm),
        force_zeros_for_empty_prompt=True,
    )


def write_tiny_model(name: str, folder: str | os.PathLike) -> Path:
    """Write tiny model `name` as a diffusers pipeline folder, atomically (built aside, then renamed)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        build_tiny_pipeline(name).save_pretrained(staging, safe_serialization=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def tiny_cache_dir() -> Path:
    from common.files import cache_root

    return cache_root() / "tiny"


def tiny_model_path(name: str) -> Path:
    """The cached folder of tiny model `name`, built on first use."""
    folder = tiny_cache_dir() / f"{name}-v{TINY_LAYOUT_VERSION}"
    if not (folder / "model_index.json").is_file():
        print(f"building built-in model {name} into {folder} (first use)", file=sys.stderr)
        write_tiny_model(name, folder)
    return folder


def _main() -> None:
    import typer

    from common.cli import UserError, run_app

    app = typer.Typer(add_completion=False)

    @app.command()
    def write(
        name: str = typer.Argument(..., help=f"one of {', '.join(TINY_MODELS)}"),
        folder: Path = typer.Argument(..., help="where to write the pipeline folder"),
    ) -> None:
        """Write a built-in tiny model as an ordinary diffusers pipeline folder."""
        if name not in TINY_MODELS:
            raise UserError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
        print(write_tiny_model(name, folder))

    run_app(app)


if __name__ == "__main__":
    _main()

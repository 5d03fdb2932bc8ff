"""The SDXL-family architectures as published: SDXL base 1.0's and Playground v2.5's configs (UNet, CLIP ViT-L/14
and OpenCLIP ViT-bigG/14 text encoders, VAE, schedulers), their tiny scale-down for the tests and the demo, and
OpenAI CLIP's tokenizer files, made from the BPE merges vendored in `common/clip_vocab/` (MIT licence, OpenAI; the
same file open-clip-torch ships). Configs only: the built-in models (`common.builtin_models`) and the single-file
loader's config folders (`common.checkpoints`) are made from them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

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


# SDXL base 1.0's and Playground v2.5's published scheduler_config.json
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
    "interpolation_type": "linear",
}
PLAYGROUND_V25_SCHEDULER_CONFIG = {
    "_class_name": "EDMDPMSolverMultistepScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "rho": 7.0,
    "prediction_type": "epsilon", "num_train_timesteps": 1000, "solver_order": 2, "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint", "final_sigmas_type": "zero",
}


def published_scheduler(edm: bool):
    """SDXL base 1.0's Euler scheduler, or with `edm` Playground v2.5's EDM DPM++ 2M, as their configs publish them."""
    import diffusers

    config = PLAYGROUND_V25_SCHEDULER_CONFIG if edm else SDXL_SCHEDULER_CONFIG
    return getattr(diffusers, config["_class_name"]).from_config(config)

"""Pivotal-tuning token embeddings: files with `clip_l`/`clip_g` rows, one row per new token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import UserError

# Key names used by diffusers' advanced DreamBooth script, WebUI and ComfyUI for SDXL embeddings.
CLIP_L_KEY = "clip_l"  # first text encoder (CLIP ViT-L)
CLIP_G_KEY = "clip_g"  # second text encoder (OpenCLIP ViT-bigG)


def default_tokens(count: int, start: int = 0) -> list[str]:
    """The new tokens pivotal tuning inserts: <s0>, <s1>, ..."""
    return [f"<s{i}>" for i in range(start, start + count)]


@dataclass(frozen=True)
class EmbeddingSpec:
    path: Path
    tokens: tuple[str, ...] | None = None  # None: <s0>, <s1>, ... as many as the file has rows


def parse_embedding_spec(spec: str) -> EmbeddingSpec:
    """`PATH` or `PATH:TOKEN,TOKEN,...` (an existing path is always taken whole)."""
    if Path(spec).expanduser().exists():
        return EmbeddingSpec(Path(spec).expanduser())
    head, sep, tail = spec.rpartition(":")
    if sep and head and Path(head).expanduser().exists():
        tokens = tuple(t.strip() for t in tail.split(",") if t.strip())
        if not tokens:
            raise UserError(f"embedding spec {spec!r} names no tokens after ':'; expected PATH or PATH:<s0>,<s1>")
        return EmbeddingSpec(Path(head).expanduser(), tokens)
    raise UserError(f"embedding file {spec!r} not found; expected PATH or PATH:<s0>,<s1>")


def read_embedding(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip_l rows, clip_g rows) of an embedding file, checked to be a matching pair of 2-D tables."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"could not read embedding {str(path)!r}: {error}") from None
    missing = [key for key in (CLIP_L_KEY, CLIP_G_KEY) if key not in tensors]
    if missing:
        raise UserError(
            f"embedding {str(path)!r} lacks {', '.join(missing)}; an SDXL embedding holds '{CLIP_L_KEY}' and "
            f"'{CLIP_G_KEY}' tensors (found: {', '.join(sorted(tensors)) or 'none'})"
        )
    clip_l, clip_g = tensors[CLIP_L_KEY], tensors[CLIP_G_KEY]
    if clip_l.ndim != 2 or clip_g.ndim != 2 or clip_l.shape[0] != clip_g.shape[0]:
        raise UserError(
            f"embedding {str(path)!r}: '{CLIP_L_KEY}' {tuple(clip_l.shape)} and '{CLIP_G_KEY}' {tuple(clip_g.shape)} "
            "must be 2-D with one row per token, the same number of rows"
        )
    return clip_l, clip_g


def load_embedding(pipe, spec: EmbeddingSpec) -> list[str]:
    """Add the embedding's tokens to both tokenizers and their rows to both text encoders."""
    clip_l, clip_g = read_embedding(spec.path)
    tokens = list(spec.tokens) if spec.tokens else default_tokens(clip_l.shape[0])
    if len(tokens) != clip_l.shape[0]:
        raise UserError(
            f"embedding {str(spec.path)!r} has {clip_l.shape[0]} rows but {len(tokens)} tokens were given "
            f"({','.join(tokens)}); give one token per row"
        )
    pairs = ((CLIP_L_KEY, clip_l, pipe.text_encoder, pipe.tokenizer), (CLIP_G_KEY, clip_g, pipe.text_encoder_2, pipe.tokenizer_2))
    for key, rows, encoder, tokenizer in pairs:
        width = encoder.get_input_embeddings().weight.shape[1]
        if rows.shape[1] != width:
            raise UserError(
                f"embedding {str(spec.path)!r}: '{key}' rows are {rows.shape[1]} wide but this model's text encoder "
                f"takes {width}; was it trained for another base model?"
            )
        taken = [token for token in tokens if token in tokenizer.get_vocab()]
        if taken:
            raise UserError(
                f"tokens {', '.join(taken)} of embedding {str(spec.path)!r} are already in the vocabulary "
                "(another --embedding?); name other tokens with PATH:<s2>,<s3>"
            )
    from common.models import quiet_libraries

    with quiet_libraries():
        for _, rows, encoder, tokenizer in pairs:
            pipe.load_textual_inversion(rows, token=tokens, text_encoder=encoder, tokenizer=tokenizer)
    return tokens

"""Pivotal-tuning token embeddings: files with `clip_l`/`clip_g` rows, one row per new token."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import UserError

# Key names used by diffusers' advanced DreamBooth script, WebUI and ComfyUI for SDXL embeddings.
CLIP_L_KEY = "clip_l"  # first text encoder (CLIP ViT-L)
CLIP_G_KEY = "clip_g"  # second text encoder (OpenCLIP ViT-bigG)


def cut_off_part(tokenizer, text: str, max_tokens: int | None = None) -> str | None:
    """The end of `text` that CLIP never reads, or None when it all fits.

    SDXL's text encoders see 77 positions: <|startoftext|>, 75 tokens, <|endoftext|>. diffusers (and so
    training and sampling here, by default) cut a longer prompt there; WebUI and ComfyUI instead encode it in
    chunks of 75 tokens (common/long_prompts.py, --max_token_length), so a prompt that is cut here means more to
    them. `max_tokens`: where the cut is (default CLIP's 75).
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    room = max_tokens or tokenizer.model_max_length - 2
    return tokenizer.decode(ids[room:], clean_up_tokenization_spaces=True) if len(ids) > room else None


def warn_about_long_prompts(tokenizer, prompts, what: str = "prompt", warn=None, limit: int = 5, max_tokens: int | None = None) -> int:
    """A warning for each distinct prompt that is cut (at CLIP's 75 tokens, or at `max_tokens` where prompts are
    encoded in chunks), naming the part it drops (the first `limit`, then a count; `warning: ...` lines on stderr
    unless `warn` is given); returns how many are cut."""
    import sys

    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    room = max_tokens or tokenizer.model_max_length - 2
    where = "CLIP's 75 tokens" if room == tokenizer.model_max_length - 2 else f"--max_token_length {room}"
    cut = [(prompt, dropped) for prompt in dict.fromkeys(prompts) if (dropped := cut_off_part(tokenizer, prompt, room)) is not None]
    for prompt, dropped in cut[:limit]:
        warn(f"{what} longer than {where} is cut there: {prompt[:50]!r}... loses {dropped!r}")
    if len(cut) > limit:
        warn(f"... and {len(cut) - limit} more {what}s longer than {room} tokens")
    return len(cut)


def default_tokens(count: int, start: int = 0) -> list[str]:
    """The new tokens pivotal tuning inserts: <s0>, <s1>, ..."""
    return [f"<s{i}>" for i in range(start, start + count)]


@dataclass(frozen=True)
class EmbeddingSpec:
    path: Path
    tokens: tuple[str, ...] | None = None  # None: <s0>, <s1>, ... as many as the file has rows


def embedding_names(path: Path) -> tuple[str, ...]:
    """The names a prompt calls an embedding file by: its file stem, as WebUI and ComfyUI name it, and for a file this
    toolkit trained (NAME_emb.safetensors) also NAME, the name convert_for_webui.py exports it under."""
    stem = path.name.removesuffix(".safetensors")
    short = stem.removesuffix("_emb")
    return (stem, short) if short and short != stem else (stem,)


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
    """(clip_l rows, clip_g rows) of an embedding file, checked to be a matching pair of 2-D tables of finite values."""
    from common.lora_formats import read_finite_safetensors

    tensors = read_finite_safetensors(path, "embedding")
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


def abstraction_tokens(abstractions: list[str], per_abstraction: int) -> dict[str, list[str]]:
    """Pivotal tuning's new tokens: TOK -> <s0><s1>, TOK2 -> <s2><s3> (in the order given)."""
    return {name: default_tokens(per_abstraction, start=k * per_abstraction) for k, name in enumerate(abstractions)}


def expand_abstractions(text: str, mapping: dict[str, list[str]]) -> str:
    """Each abstraction in `text` replaced by its tokens; longer names first, so TOK2 is not read as TOK + 2."""
    for name in sorted(mapping, key=len, reverse=True):
        text = text.replace(name, "".join(mapping[name]))
    return text


class NewTokenRows(torch.nn.Module):
    """A token-embedding table whose original rows stay frozen while only the rows of added tokens train.

    Ids below the original vocabulary size read the frozen table; ids above it read `rows`. Training
    the whole table and restoring the old rows after each step (the reference's way) holds optimizer
    state for every row: about 101 M parameters for SDXL's two tables.
    """

    def __init__(self, table: torch.nn.Embedding, rows: torch.Tensor):
        super().__init__()
        self.table = table
        self.original_size = table.num_embeddings
        self.new_rows = torch.nn.Parameter(rows.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:  # what transformers and diffusers read as the embedding table
        return torch.cat([self.table.weight, self.new_rows.to(self.table.weight.dtype)])

    @property
    def num_embeddings(self) -> int:
        return self.original_size + self.new_rows.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.table.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.original_size
        old = self.table(ids.clamp(max=self.original_size - 1))
        new = torch.nn.functional.embedding((ids - self.original_size).clamp(min=0), self.new_rows).to(old.dtype)
        return torch.where(is_new.unsqueeze(-1), new, old)


def save_embedding(path, clip_l_rows: torch.Tensor, clip_g_rows: torch.Tensor, tokens: list[str]) -> None:
    """`clip_l`/`clip_g` rows as diffusers' load_textual_inversion, WebUI and ComfyUI read SDXL embeddings."""
    from safetensors.torch import save_file

    from common.files import atomic_path

    tensors = {CLIP_L_KEY: clip_l_rows.detach().float().cpu().contiguous(), CLIP_G_KEY: clip_g_rows.detach().float().cpu().contiguous()}
    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata={"tokens": ",".join(tokens)})


def is_clip_word(text: str) -> bool:
    """Whether `text` is one whole word of CLIP's vocabulary (lower-cased, as CLIP's tokenizer reads it):
    a single token that ordinary prompts use."""
    return f"{text.lower()}</w>" in clip_tokens()


@functools.cache
def clip_tokens() -> frozenset[str]:
    """The 49,408 tokens of CLIP's tokenizer (SDXL's two tokenizers share them)."""
    from common.architectures import clip_merges, clip_vocabulary

    return frozenset(clip_vocabulary(clip_merges()))

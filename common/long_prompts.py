"""Prompts longer than CLIP's window, encoded in 75-token chunks exactly as ComfyUI encodes them.

CLIP reads 77 positions: <|startoftext|>, 75 tokens, <|endoftext|>. diffusers cuts a prompt there; ComfyUI (and
WebUI) cut it into chunks of 75 tokens, give each chunk its own start and end tokens, encode the chunks as a
batch and lay their hidden states end to end, so the UNet's cross-attention reads 77·k positions. The functions
here follow ComfyUI's source (comfyanonymous/ComfyUI: comfy/sd1_clip.py at b55c224, comfy/sdxl_clip.py at
565d674, comfy/conds.py at 6edd534), each naming the function it matches. A prompt of at most 75 tokens is one
chunk, the very ids diffusers gives the encoders, so its encoding is today's bit for bit.

Prompts are read as plain text, as diffusers reads them: ComfyUI's `(word:1.2)` weights are not parsed, so a
prompt is one token group, and at weight 1.0 ComfyUI encodes no empty chunk and changes nothing.

Nothing here imports torch at module level: the option check runs while scripts answer --help.
"""

from __future__ import annotations

import itertools
import math

from common.cli import UserError

CLIP_WINDOW = 75  # tokens between <|startoftext|> and <|endoftext|>
MAX_WORD_LENGTH = 8  # ComfyUI's SDTokenizer.max_word_length: a group this long may be cut between chunks


def check_max_token_length(value: int) -> int:
    """--max_token_length: 75 (cut at CLIP's window, as diffusers does) or a larger multiple of 75 (chunks)."""
    if value < CLIP_WINDOW or value % CLIP_WINDOW:
        raise UserError(f"--max_token_length {value} is not a positive multiple of {CLIP_WINDOW}; use {CLIP_WINDOW} "
                        f"(prompts cut at CLIP's window, as diffusers does) or {2 * CLIP_WINDOW}, {3 * CLIP_WINDOW}, ... "
                        f"(long prompts in {CLIP_WINDOW}-token chunks, as ComfyUI and WebUI encode them)")
    return value


def chunk_token_groups(groups: list[list[int]], *, start: int, end: int, pad: int, window: int = CLIP_WINDOW,
                       max_word_length: int = MAX_WORD_LENGTH) -> list[list[int]]:
    """Token groups (a prompt's words or weighted segments, without start and end tokens) laid into chunks of
    `window` + 2 ids: ComfyUI's SDTokenizer.tokenize_with_weights, its "reshape token array to CLIP input size".

    Each chunk is start, up to `window` tokens, end, then `pad` up to full length. A group that does not fit in
    what is left of the current chunk is cut exactly at the chunk's end if it has at least `max_word_length`
    tokens; a shorter one moves whole to the next chunk, the current one being closed (end, pad). The last chunk
    is closed the same way, so an empty prompt is one chunk [start, end, pad, ...].
    """
    chunks: list[list[int]] = []
    current: list[int] = []

    def close() -> None:
        chunks.append([start, *current, end] + [pad] * (window - len(current)))
        current.clear()

    for group in groups:
        rest = list(group)
        may_be_cut = len(rest) >= max_word_length  # decided on the whole group, as ComfyUI does
        while rest:
            room = window - len(current)
            if len(rest) <= room:
                current.extend(rest)
                rest = []
            elif may_be_cut:
                current.extend(rest[:room])
                rest = rest[room:]
                close()
            else:
                close()
    close()
    return chunks


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids without start and end tokens (all of them: nothing is cut here)."""
    return tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids


def prompt_chunks(tokenizer, prompt: str, max_token_length: int) -> list[list[int]]:
    """One prompt's chunks for one tokenizer, at most max_token_length / 75 of them (later ones are cut).

    The prompt is one group (plain text, one weight); start and end are the tokenizer's, and so is the padding:
    <|endoftext|> for SDXL's first tokenizer, "!" (id 0) for its second, as ComfyUI pads clip_l and clip_g.
    """
    chunks = chunk_token_groups([prompt_token_ids(tokenizer, prompt)], start=tokenizer.bos_token_id,
                                end=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    return chunks[: max_token_length // CLIP_WINDOW]


def count_cut_tokens(tokenizer, prompt: str, max_token_length: int) -> int:
    """How many of the prompt's tokens fall beyond max_token_length and are not encoded. A plain-text prompt
    is one group, cut only at chunk ends, so every chunk but the last holds exactly 75 tokens."""
    return max(0, len(prompt_token_ids(tokenizer, prompt)) - max_token_length)


def repeat_to_common_length(embeddings: list) -> list:
    """Text embeddings (batch, length, features) of different lengths, each repeated along its length to their
    least common multiple: ComfyUI's CONDCrossAttn.concat (comfy/conds.py; cond_cat in older comfy/samplers.py),
    which batches a 77-token negative with a 154-token prompt this way.

    Why this is exact: the UNet reads text only through cross-attention, softmax(q·kᵀ/√d)·v over the text
    positions, which is a weighted mean of the values with weights exp(q·k_j/√d) / Σ exp(q·k_j'/√d). Repeating the
    sequence r times repeats every term r times in both sums, so each mean, and the image, is unchanged; only
    the order of floating-point additions differs, so results agree to float rounding. The text's position plays
    no part there (the text encoders added it already).
    """
    length = math.lcm(*(embedding.shape[-2] for embedding in embeddings))
    return [embedding.repeat(1, length // embedding.shape[-2], 1) for embedding in embeddings]


def encode_long_prompts(tokenizers, encoders, prompts: list[str], *, max_token_length: int, clip_skip: int | None = None,
                        device=None):
    """SDXL's conditioning for each prompt from its chunks: (prompt_embeds (B, 77·k, 2048), pooled (B, 1280)).

    For each encoder, every chunk of every prompt is encoded in one batch and a prompt's chunks' hidden states are
    laid end to end (ComfyUI's ClipTokenWeightEncoder.encode_token_weights: torch.cat(chunks, dim=-2)); the two
    encoders' states go side by side, cut to the shorter if their lengths differ (SDXLClipModel.encode_token_weights).
    The hidden state is the penultimate layer's without the final layer norm (or the clip_skip-th from last,
    diffusers' numbering), and the pooled conditioning the last encoder's projection at the first end token of the
    first chunk, as ComfyUI pools. Prompts with different chunk counts are repeated to the least common multiple
    of their lengths (repeat_to_common_length) so they batch.

    The encoders are called as train_lora.encode_captions calls them, `encoder(ids, output_hidden_states=True)`
    with output[0] of the last one as pooled, so wrapped, LoRA or training encoders work; gradients flow.
    """
    import torch

    check_max_token_length(max_token_length)
    per_encoder = []
    for tokenizer, encoder in zip(tokenizers, encoders):
        chunks = [prompt_chunks(tokenizer, prompt, max_token_length) for prompt in prompts]
        firsts = list(itertools.accumulate((len(c) for c in chunks[:-1]), initial=0))  # each prompt's first chunk
        ids = torch.tensor([chunk for own in chunks for chunk in own], device=device)
        output = encoder(ids, output_hidden_states=True)
        hidden = output.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)]
        per_encoder.append([hidden[first : first + len(c)].reshape(1, -1, hidden.shape[-1]) for first, c in zip(firsts, chunks)])
        pooled = output[0][firsts]
    embeddings = []
    for states in zip(*per_encoder):
        length = min(state.shape[1] for state in states)
        embeddings.append(torch.cat([state[:, :length] for state in states], dim=-1))
    return torch.cat(repeat_to_common_length(embeddings)), pooled


def pipeline_prompt_embeds(pipe, prompts: list[str], negative_prompts: list[str] | None, *, max_token_length: int) -> dict:
    """`prompt_embeds`, `pooled_prompt_embeds`, `negative_prompt_embeds` and `negative_pooled_prompt_embeds` for a
    diffusers SDXL pipeline, prompts and negative prompts encoded in chunks (encode_long_prompts) and repeated to a
    common length so that the pipeline can batch them for classifier-free guidance.

    An absent negative prompt is what diffusers makes of it: zeros where the model asks for them
    (force_zeros_for_empty_prompt, SDXL base's setting), else the empty prompt encoded. Our embeddings give each
    new token its own name, so diffusers' multi-vector prompt rewriting (maybe_convert_prompt) has nothing to do.
    """
    import torch

    def encode(texts: list[str]):
        return encode_long_prompts([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], texts,
                                   max_token_length=max_token_length, device=pipe._execution_device)

    embeds, pooled = encode(prompts)
    if negative_prompts is None and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        negative, negative_pooled = encode(negative_prompts or [""] * len(prompts))
    embeds, negative = repeat_to_common_length([embeds, negative])
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative, "negative_pooled_prompt_embeds": negative_pooled}

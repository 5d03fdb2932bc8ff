"""Prompts longer than CLIP's window, encoded in 75-token chunks exactly as ComfyUI encodes them.

CLIP reads 77 positions: <|startoftext|>, 75 tokens, <|endoftext|>. diffusers cuts a prompt there; ComfyUI (and
WebUI) cut it into chunks of 75 tokens, give each chunk its own start and end tokens, encode the chunks as a
batch and lay their hidden states end to end, so the UNet's cross-attention reads 77·k positions. The functions
here follow ComfyUI's source (comfyanonymous/ComfyUI: comfy/sd1_clip.py at b55c224, comfy/sdxl_clip.py at
565d674, comfy/conds.py at 6edd534), each naming the function it matches. A prompt of at most 75 tokens is one
chunk, the very ids diffusers gives the encoders, so its encoding is today's bit for bit.

A prompt is read by a syntax (`common.prompt_syntax`): plain text by default, as diffusers reads it (one token group
of weight 1.0, where ComfyUI encodes no empty chunk and changes nothing), or WebUI's or ComfyUI's weighting, each
with its own chunking and emphasis arithmetic.

Nothing here imports torch at module level: the option check runs while scripts answer --help.
"""

from __future__ import annotations

import itertools
import math

from common.cli import UserError
from common.prompt_syntax import (
    BREAK, CLIP_WINDOW, SYNTAXES, WEBUI_BREAK_WEIGHT, Chunk, PromptSyntax, Tokens, comfyui_embedding_segments,
    comfyui_emphasis, webui_embedding_ids, webui_no_norm_emphasis, webui_original_emphasis,
)


def check_max_token_length(value: int) -> int:
    """--max_token_length: 75 (cut at CLIP's window, as diffusers does) or a larger multiple of 75 (chunks)."""
    if value < CLIP_WINDOW or value % CLIP_WINDOW:
        raise UserError(f"--max_token_length {value} is not a positive multiple of {CLIP_WINDOW}; use {CLIP_WINDOW} "
                        f"(prompts cut at CLIP's window, as diffusers does) or {2 * CLIP_WINDOW}, {3 * CLIP_WINDOW}, ... "
                        f"(long prompts in {CLIP_WINDOW}-token chunks, as the UIs encode them)")
    return value


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids without start and end tokens (all of them: nothing is cut here)."""
    return tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids


def special_tokens(tokenizer, embeddings: tuple = ()) -> Tokens:
    """The ids chunking needs of a tokenizer: start, end, padding (<|endoftext|> for SDXL's first tokenizer, "!" (id 0)
    for its second, as ComfyUI pads clip_l and clip_g), the comma (WebUI cuts long prompts after one) and the id
    sequences of loaded embeddings."""
    return Tokens(start=tokenizer.bos_token_id, end=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
                  comma=tokenizer.convert_tokens_to_ids(",</w>"), embeddings=embeddings)


def prompt_weighted_chunks(tokenizer, prompt: str, max_token_length: int, syntax: PromptSyntax = SYNTAXES["plain"],
                           embeddings: dict[str, str] | None = None) -> list[Chunk]:
    """One prompt's chunks for one tokenizer as `syntax` lays them, (77 ids, 77 weights) each, at most
    max_token_length / 75 of them (later ones are cut): its segments tokenised one by one without start and end
    tokens (a WebUI BREAK marker as the chunk break it is, an embedding named as the syntax's UI finds it: WebUI's
    file name among the segment's tokens, ComfyUI's `embedding:NAME` as a segment of its own), then
    chunked by the syntax's rule. `embeddings`: each loaded embedding's file stem -> its tokens' text."""
    embeddings = embeddings or {}
    segments = syntax.parse(prompt)
    if syntax.name == "comfyui":
        segments = comfyui_embedding_segments(segments, embeddings)
    by_name = {tuple(prompt_token_ids(tokenizer, stem)): tuple(prompt_token_ids(tokenizer, token_text))
               for stem, token_text in embeddings.items()}
    groups = []
    for segment in segments:
        if syntax.name == "webui" and segment.text == BREAK and segment.weight == WEBUI_BREAK_WEIGHT:
            groups.append((None, segment.weight))
            continue
        ids = prompt_token_ids(tokenizer, segment.text)
        groups.append((webui_embedding_ids(ids, by_name) if syntax.name == "webui" else ids, segment.weight))
    return syntax.chunk(groups, special_tokens(tokenizer, tuple(by_name.values())))[: max_token_length // CLIP_WINDOW]


def prompt_chunks(tokenizer, prompt: str, max_token_length: int) -> list[list[int]]:
    """The ids of a plain-text prompt's chunks (`prompt_weighted_chunks`): ComfyUI's chunking of one token group."""
    return [ids for ids, _ in prompt_weighted_chunks(tokenizer, prompt, max_token_length)]


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
                        device=None, syntax: str = "plain", emphasis: str = "original", embeddings: dict[str, str] | None = None):
    """SDXL's conditioning for each prompt from its chunks: (prompt_embeds (B, 77·k, 2048), pooled (B, 1280)).

    For each encoder, every chunk of every prompt is encoded in one batch and a prompt's chunks' hidden states are
    laid end to end (ComfyUI's ClipTokenWeightEncoder.encode_token_weights: torch.cat(chunks, dim=-2)); the two
    encoders' states go side by side, cut to the shorter if their lengths differ (SDXLClipModel.encode_token_weights).
    The hidden state is the penultimate layer's without the final layer norm (or the clip_skip-th from last,
    diffusers' numbering), and the pooled conditioning the last encoder's projection at the first end token of the
    first chunk, as both UIs pool, never weighted. `syntax` (common.prompt_syntax: plain, webui, comfyui) parses and
    chunks each prompt and weighs each chunk's states, per encoder: WebUI's emphasis (`emphasis`: original or
    no_norm) or ComfyUI's interpolation from the empty prompt's encoding; plain text weighs nothing; `embeddings` (file
    stem -> tokens) are the loaded embeddings ComfyUI's syntax names and WebUI's never splits. Prompts with
    different chunk counts are repeated to the least common multiple of their lengths (repeat_to_common_length) so
    they batch.

    The encoders are called as train_lora.encode_captions calls them, `encoder(ids, output_hidden_states=True)`
    with output[0] of the last one as pooled, so wrapped, LoRA or training encoders work; gradients flow.
    """
    import torch

    check_max_token_length(max_token_length)
    dialect = SYNTAXES[syntax]
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    per_encoder = []
    for tokenizer, encoder in zip(tokenizers, encoders):
        chunks = [prompt_weighted_chunks(tokenizer, prompt, max_token_length, dialect, embeddings) for prompt in prompts]
        firsts = list(itertools.accumulate((len(c) for c in chunks[:-1]), initial=0))  # each prompt's first chunk
        ids = torch.tensor([chunk for own in chunks for chunk, _ in own], device=device)
        output = encoder(ids, output_hidden_states=True)
        hidden = output.hidden_states[layer]
        weights = torch.tensor([w for own in chunks for _, w in own], device=hidden.device)
        if dialect.name != "plain" and bool((weights != 1.0).any()):
            hidden = weigh_chunks(hidden, weights, dialect.name, emphasis, lambda: empty_state(encoder, tokenizer, layer, device))
        per_encoder.append([hidden[first : first + len(c)].reshape(1, -1, hidden.shape[-1]) for first, c in zip(firsts, chunks)])
        pooled = output[0][firsts]
    embeddings_out = []
    for states in zip(*per_encoder):
        length = min(state.shape[1] for state in states)
        embeddings_out.append(torch.cat([state[:, :length] for state in states], dim=-1))
    return torch.cat(repeat_to_common_length(embeddings_out)), pooled


def weigh_chunks(hidden, weights, syntax: str, emphasis: str, empty):
    """Each chunk's hidden states (chunks, 77, C) weighed by its weights (chunks, 77) as the syntax's UI does, in
    float32 (ComfyUI's dtype; WebUI's differs only in rounding): WebUI's emphasis per chunk and encoder, or ComfyUI's
    interpolation from `empty()`, the empty prompt's states (77, C) at the same layer."""
    import torch

    states = hidden.float()
    if syntax == "webui":
        weigh = webui_original_emphasis if emphasis == "original" else webui_no_norm_emphasis
        states = torch.stack([weigh(chunk, chunk_weights) for chunk, chunk_weights in zip(states, weights.float())])
    else:
        states = comfyui_emphasis(states, empty().float(), weights.float())
    return states.to(hidden.dtype)


def empty_state(encoder, tokenizer, layer: int, device):
    """The empty prompt's hidden states (77, C): [start, end, pad, ...] through the encoder (ComfyUI's gen_empty_tokens)."""
    import torch

    tokens = special_tokens(tokenizer)
    ids = torch.tensor([[tokens.start, tokens.end] + [tokens.pad] * CLIP_WINDOW], device=device)
    return encoder(ids, output_hidden_states=True).hidden_states[layer][0]


def pipeline_prompt_embeds(pipe, prompts: list[str], negative_prompts: list[str] | None, *, max_token_length: int,
                           syntax: str = "plain", emphasis: str = "original", clip_skip: int | None = None,
                           embeddings: dict[str, str] | None = None) -> dict:
    """`prompt_embeds`, `pooled_prompt_embeds`, `negative_prompt_embeds` and `negative_pooled_prompt_embeds` for a
    diffusers SDXL pipeline, prompts and negative prompts encoded in chunks by `syntax` (encode_long_prompts) and
    repeated to a common length so that the pipeline can batch them for classifier-free guidance.

    An empty negative prompt is what the syntax's program makes of it: plain follows diffusers (zeros for an absent
    one where the model asks for them, force_zeros_for_empty_prompt, SDXL base's setting; "" encoded), WebUI zeros
    every empty one (its SDXL conditioner's force_zero_embeddings, pooled included), ComfyUI encodes "". Our
    embeddings give each new token its own name, so diffusers' multi-vector prompt rewriting has nothing to do.
    """
    import torch

    def encode(texts: list[str]):
        return encode_long_prompts([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], texts,
                                   max_token_length=max_token_length, device=pipe._execution_device, syntax=syntax,
                                   emphasis=emphasis, clip_skip=clip_skip, embeddings=embeddings)

    embeds, pooled = encode(prompts)
    zero = SYNTAXES[syntax].zero_empty_negative
    if zero is None:
        zero = negative_prompts is None and getattr(pipe.config, "force_zeros_for_empty_prompt", False)
    else:
        zero = zero and all(not text for text in negative_prompts or [""])
    if zero:
        negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        negative, negative_pooled = encode(negative_prompts or [""] * len(prompts))
    embeds, negative = repeat_to_common_length([embeds, negative])
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative, "negative_pooled_prompt_embeds": negative_pooled}

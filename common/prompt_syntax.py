"""Prompts as WebUI and ComfyUI read them: each UI's weighting grammar, its way of laying tokens into 75-token chunks,
and its emphasis arithmetic, as small pure functions, one record per dialect (`SYNTAXES`).

The two UIs disagree, so there is no single "weighted prompt":
- WebUI (AUTOMATIC1111 modules/prompt_parser.py `parse_prompt_attention`, modules/sd_hijack_clip.py `tokenize_line`
  and `process_tokens`, modules/sd_emphasis.py; Forge's backend/text_processing is the same) multiplies every
  enclosing bracket, (x) x1.1 and [x] /1.1, explicit weights included; it cuts long prompts at a comma within 20
  tokens of a chunk's end, starts a new chunk at BREAK, and by default ("Original" emphasis) multiplies each token's
  hidden state by its weight and rescales the chunk to its unweighted mean.
- ComfyUI (comfy/sd1_clip.py `parse_parentheses`, `token_weights`, `SDTokenizer.tokenize_with_weights`,
  `ClipTokenWeightEncoder.encode_token_weights`) reads only ( ), an explicit weight replacing the outer ones, moves
  whole token groups of under 8 tokens to the next chunk, and interpolates each weighted token from the empty
  prompt's encoding: z' = e + w (z - e).
Neither weights the pooled vector. The code is written from the behaviour of those functions (the research note
shared/research/prompt-weighting.md describes them), not copied from them. Nothing here imports torch at module level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from common.cli import UserError

CLIP_WINDOW = 75
BREAK = "BREAK"
WEBUI_BREAK_WEIGHT = -1.0  # WebUI marks a BREAK with this weight; only a marker of exactly this weight starts a chunk
WEBUI_COMMA_BACKTRACK = 20  # WebUI's comma_padding_backtrack default (Forge hard-codes it)
COMFYUI_GROUP_CUT = 8  # ComfyUI's max_word_length: a group this long may be cut at a chunk's end
EMPHASES = ("original", "no_norm")


@dataclass(frozen=True)
class Segment:
    """A run of prompt text and its weight."""

    text: str
    weight: float = 1.0


# ---------------------------------------------------------------- WebUI's grammar

# its lexemes, in priority order: escapes, a lone backslash, brackets, ":number)" closing a round bracket, closers,
# a run of ordinary text, a colon
_WEBUI_LEXEME = re.compile(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
_WEBUI_BREAK = re.compile(r"\s*\bBREAK\b\s*")
# the step number of WebUI's schedule grammar: lark's SIGNED_NUMBER, exponents included ([a:b:1e1] is step 10)
_NUMBER_END = re.compile(r":\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*$")


def parse_webui(prompt: str) -> list[Segment]:
    """WebUI's emphasis parse (`parse_prompt_attention`): segments with the product of every enclosing bracket's
    weight ((x) 1.1, [x] 1/1.1, (x:w) w, nested ones multiplying), unclosed brackets still counting from where they
    open, escapes \\( \\) \\[ \\] \\\\ as literal characters (a lone backslash is dropped), BREAK as a marker segment of
    weight -1 (inside brackets it is scaled too, and WebUI then reads it as the word "break"), adjacent segments of
    equal weight merged. A weight WebUI's float() cannot read ("1.2.3") is refused: WebUI fails on it too."""
    segments: list[list] = []
    round_opened, square_opened = [], []

    def multiply(start: int, factor: float) -> None:
        for segment in segments[start:]:
            segment[1] *= factor

    for match in _WEBUI_LEXEME.finditer(prompt):
        lexeme, number = match.group(0), match.group(1)
        if lexeme.startswith("\\"):
            segments.append([lexeme[1:], 1.0])
        elif lexeme == "(":
            round_opened.append(len(segments))
        elif lexeme == "[":
            square_opened.append(len(segments))
        elif number is not None and round_opened:
            try:
                multiply(round_opened.pop(), float(number))
            except ValueError:
                raise UserError(f"prompt {prompt[:60]!r}: weight {number!r} is not a number (WebUI fails on it too)") from None
        elif lexeme == ")" and round_opened:
            multiply(round_opened.pop(), 1.1)
        elif lexeme == "]" and square_opened:
            multiply(square_opened.pop(), 1 / 1.1)
        else:
            for index, part in enumerate(_WEBUI_BREAK.split(lexeme)):
                if index:
                    segments.append([BREAK, WEBUI_BREAK_WEIGHT])
                segments.append([part, 1.0])
    for start in round_opened:
        multiply(start, 1.1)
    for start in square_opened:
        multiply(start, 1 / 1.1)
    if not segments:
        segments = [["", 1.0]]
    merged = [segments[0]]
    for text, weight in segments[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [Segment(text, weight) for text, weight in merged]


def webui_scheduling(prompt: str) -> str | None:
    """The first of WebUI's per-step constructs in a prompt, which this toolkit does not sample (prompt editing
    `[a:b:N]`, `[a:N]`, `[a::N]`, alternation `[a|b]`, composable `AND`), as written; None when there is none. A square
    bracket pair whose content (outside nested brackets) ends in ':number' or holds '|' is one, as WebUI's schedule
    grammar reads it; plain `[x]` is emphasis."""
    if re.search(r"\bAND\b", prompt):
        return "AND"
    stack: list[int] = []
    depth_text: list[list[str]] = [[]]
    index = 0
    while index < len(prompt):
        char = prompt[index]
        if char == "\\":
            index += 2
            continue
        if char == "[":
            stack.append(index)
            depth_text.append([])
        elif char == "]" and stack:
            start = stack.pop()
            inner = "".join(depth_text.pop())
            if "|" in inner or (":" in inner and _NUMBER_END.search(inner)):
                return prompt[start : index + 1]
            depth_text[-1].append(" ")
        else:
            depth_text[-1].append(char)
        index += 1
    return None


# ---------------------------------------------------------------- ComfyUI's grammar

_ESCAPED_OPEN, _ESCAPED_CLOSE = "\0open\0", "\0close\0"


def _parenthesised(text: str) -> list[str]:
    """ComfyUI's `parse_parentheses`: the text cut into top-level items, each bracketed item whole (brackets
    included); a stray ')' drives the depth below zero and every later bracket stays in the text."""
    items, current, depth = [], "", 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    items.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                items.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        items.append(current)
    return items


def _comfyui_weights(text: str, weight: float) -> list[Segment]:
    """ComfyUI's `token_weights`: a bracketed item weighs 1.1 times its surroundings, unless it ends in ':number'
    (anything float() reads), which then replaces the weight; items nest."""
    segments = []
    for item in _parenthesised(text):
        if len(item) >= 2 and item[0] == "(" and item[-1] == ")":
            inner, inner_weight = item[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1 :])
                    inner = inner[:colon]
                except ValueError:
                    pass
            segments += _comfyui_weights(inner, inner_weight)
        else:
            segments.append(Segment(item, weight))
    return segments


def parse_comfyui(prompt: str) -> list[Segment]:
    """ComfyUI's weighting parse: only \\( and \\) are escapes; [x] and {x} are text; never merged."""
    escaped = prompt.replace("\\(", _ESCAPED_OPEN).replace("\\)", _ESCAPED_CLOSE)
    return [Segment(s.text.replace(_ESCAPED_OPEN, "(").replace(_ESCAPED_CLOSE, ")"), s.weight)
            for s in _comfyui_weights(escaped, 1.0)]


def parse_plain(prompt: str) -> list[Segment]:
    """The prompt as plain text, as diffusers reads it: one segment of weight 1."""
    return [Segment(prompt)]


# ---------------------------------------------------------------- chunks: (77 ids, 77 weights) each


@dataclass(frozen=True)
class Tokens:
    """What chunking needs of a tokenizer: its start, end and padding ids, the comma's id, and the id sequences of
    loaded embeddings (which WebUI never splits between chunks)."""

    start: int
    end: int
    pad: int
    comma: int
    embeddings: tuple[tuple[int, ...], ...] = ()


Chunk = tuple[list[int], list[float]]


def webui_chunks(groups: list[tuple[list[int], float]], tokens: Tokens, window: int = CLIP_WINDOW,
                 backtrack: int = WEBUI_COMMA_BACKTRACK) -> list[Chunk]:
    """WebUI's `tokenize_line`: the segments' tokens (with their weights) laid into chunks of `window`; a BREAK
    marker (ids None) closes the chunk; when a chunk is full and its last comma is at most `backtrack` tokens back,
    the tokens after that comma move to the next chunk, weights with them; a loaded embedding's tokens never straddle
    two chunks. Start, end and padding have weight 1; an empty prompt is one chunk."""
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal last_comma
        padding = window - len(ids)
        chunks.append(([tokens.start, *ids, tokens.end] + [tokens.pad] * padding, [1.0, *weights, 1.0] + [1.0] * padding))
        ids.clear()
        weights.clear()
        last_comma = -1

    for group, weight in groups:
        if group is None:  # BREAK
            close()
            continue
        position = 0
        while position < len(group):
            token = group[position]
            if token == tokens.comma:
                last_comma = len(ids)
            elif backtrack and len(ids) == window and last_comma != -1 and len(ids) - last_comma <= backtrack:
                moved_ids, moved_weights = ids[last_comma + 1 :], weights[last_comma + 1 :]
                del ids[last_comma + 1 :], weights[last_comma + 1 :]
                close()
                ids.extend(moved_ids)
                weights.extend(moved_weights)
            if len(ids) == window:
                close()
            embedding = next((e for e in tokens.embeddings if tuple(group[position : position + len(e)]) == e), None)
            if embedding is not None:
                if len(ids) + len(embedding) > window:
                    close()
                ids.extend(embedding)
                weights.extend([weight] * len(embedding))
                position += len(embedding)
            else:
                ids.append(token)
                weights.append(weight)
                position += 1
    if ids or not chunks:
        close()
    return chunks


def comfyui_chunks(groups: list[tuple[list[int], float]], tokens: Tokens, window: int = CLIP_WINDOW,
                   cut: int = COMFYUI_GROUP_CUT) -> list[Chunk]:
    """ComfyUI's `tokenize_with_weights` ("reshape token array to CLIP input size"): each group (a weighted segment,
    or an embedding) goes whole into the current chunk, or, not fitting, is cut at the chunk's end if it has at least
    `cut` tokens, else moves whole to the next chunk; the last chunk is closed too, so an empty prompt is one chunk."""
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []

    def close() -> None:
        padding = window - len(ids)
        chunks.append(([tokens.start, *ids, tokens.end] + [tokens.pad] * padding, [1.0, *weights, 1.0] + [1.0] * padding))
        ids.clear()
        weights.clear()

    for group, weight in groups:
        rest = list(group or [])
        may_be_cut = len(rest) >= cut
        while rest:
            room = window - len(ids)
            if len(rest) <= room:
                ids.extend(rest)
                weights.extend([weight] * len(rest))
                rest = []
            elif may_be_cut:
                ids.extend(rest[:room])
                weights.extend([weight] * room)
                rest = rest[room:]
                close()
            else:
                close()
    close()
    return chunks


# ---------------------------------------------------------------- emphasis arithmetic, on one chunk of one encoder


def webui_original_emphasis(hidden, weights):
    """WebUI's "Original" emphasis (modules/sd_emphasis.py `EmphasisOriginal`): each position's hidden state times its
    weight, then the whole chunk (every position and channel) rescaled so that its mean is the unweighted one:
    z' = (z w) mean(z) / mean(z w)."""
    weighted = hidden * weights[..., None]
    return weighted * (hidden.mean() / weighted.mean())


def webui_no_norm_emphasis(hidden, weights):
    """WebUI's "No norm" emphasis (`EmphasisOriginalNoNorm`): z' = z w."""
    return hidden * weights[..., None]


def comfyui_emphasis(hidden, empty, weights):
    """ComfyUI's `encode_token_weights`: each weighted position moved from the empty prompt's encoding at that
    position, z' = e + w (z - e); positions of weight exactly 1 are left as they are."""
    import torch

    moved = empty + weights[..., None] * (hidden - empty)
    return torch.where((weights != 1.0)[..., None], moved, hidden)


# ---------------------------------------------------------------- the dialects


@dataclass(frozen=True)
class PromptSyntax:
    """One way of reading prompts: its parser, its chunker, and whether an empty negative prompt is zeros (WebUI's
    SDXL conditioner zeroes it; ComfyUI encodes ""; plain follows diffusers)."""

    name: str
    parse: Callable[[str], list[Segment]]
    chunk: Callable[..., list[Chunk]]
    zero_empty_negative: bool | None  # None: diffusers' rule (zeros only for an absent negative prompt)


SYNTAXES = {
    "plain": PromptSyntax("plain", parse_plain, comfyui_chunks, None),
    "webui": PromptSyntax("webui", parse_webui, webui_chunks, True),
    "comfyui": PromptSyntax("comfyui", parse_comfyui, comfyui_chunks, False),
}

_LOOKS_WEIGHTED = re.compile(r"\([^()]*:\s*[+-]?[\d.]+\s*\)|\(\(|\[[^\[\]]+\]|\bBREAK\b")


def check_prompt_syntax(syntax: str, emphasis: str) -> None:
    if syntax not in SYNTAXES:
        raise UserError(f"--prompt_syntax {syntax!r}; choose one of {', '.join(SYNTAXES)}")
    if emphasis not in EMPHASES:
        raise UserError(f"--emphasis {emphasis!r}; choose one of {', '.join(EMPHASES)} (WebUI's Original and No norm)")


def looks_weighted(prompt: str) -> bool:
    """Whether a prompt holds what a UI reads as weighting ((x:1.2), ((x)), [x], BREAK)."""
    return bool(_LOOKS_WEIGHTED.search(prompt))


def check_prompts(prompts: list[str], syntax: str, embedding_stems: list[str] | None = None) -> str | None:
    """Prompts checked for the syntax before anything loads: WebUI's per-step constructs are refused naming the
    construct (never misread as weights), a weight WebUI cannot read is refused, a ComfyUI `embedding:NAME` that
    names none of `embedding_stems` (the --embedding files) is refused; with plain, the one warning line to show when
    a prompt holds weighting syntax (None when none does)."""
    for prompt in prompts:
        if syntax == "comfyui" and embedding_stems is not None:
            comfyui_embedding_segments(parse_comfyui(prompt), dict.fromkeys(embedding_stems, ""))
        if syntax == "webui":
            construct = webui_scheduling(prompt)
            if construct:
                raise UserError(f"prompt {prompt[:60]!r}: {construct!r} is WebUI's per-step prompt editing, alternation or "
                                "AND, which this toolkit does not sample; write the prompt without it")
            parse_webui(prompt)
    if syntax == "plain":
        weighted = next((p for p in prompts if looks_weighted(p)), None)
        if weighted is not None:
            return (f"prompt {weighted[:60]!r} holds weighting syntax ((x:1.2), [x], BREAK), which --prompt_syntax plain reads "
                    "as text; --prompt_syntax webui or comfyui weights it as that UI does")
    return None


def webui_embedding_ids(ids: list[int], embeddings: dict[tuple[int, ...], tuple[int, ...]]) -> list[int]:
    """WebUI's embeddings in a segment's token ids (`EmbeddingDatabase.find_embedding_at_position`): at each position
    the longest loaded embedding name whose token ids start there is replaced by the embedding's ids (`embeddings`:
    the name's ids -> the embedding's). WebUI matches tokens, not text, so a name is found in any case and inside a
    longer word ("my_y2k_emb" holds y2k_emb's tokens)."""
    names = sorted((name for name in embeddings if name), key=len, reverse=True)
    out: list[int] = []
    index = 0
    while index < len(ids):
        name = next((name for name in names if tuple(ids[index : index + len(name)]) == name), None)
        if name is None:
            out.append(ids[index])
            index += 1
        else:
            out.extend(embeddings[name])
            index += len(name)
    return out


_COMFYUI_EMBEDDING = "embedding:"
_COMFYUI_EMBEDDING_SUFFIXES = ("", ".safetensors", ".pt", ".bin")


def comfyui_embedding_segments(segments: list[Segment], names: dict[str, str]) -> list[Segment]:
    """ComfyUI's embeddings in its weighted segments (`SDTokenizer.tokenize_with_weights` with `_try_get_embedding`):
    a segment is cut before each `embedding:` that opens it or follows a space or newline; the first white-space
    separated word after it names the embedding (as its file stem or file name; commas around it are stripped if the
    whole word names none), which becomes a segment of its own, so chunking moves it whole like any short group; the
    rest of that piece follows as another segment. A name that no loaded embedding has is refused (ComfyUI drops the
    word with a warning in its console)."""
    def lookup(name: str) -> str | None:
        return next((names[name[: len(name) - len(suffix)]] for suffix in _COMFYUI_EMBEDDING_SUFFIXES
                     if name.endswith(suffix) and name[: len(name) - len(suffix)] in names), None)

    pieces: list[Segment] = []
    for segment in segments:
        split = re.split(rf"[ \n]{_COMFYUI_EMBEDDING}", segment.text)
        words = [split[0], *(_COMFYUI_EMBEDDING + rest for rest in split[1:])]
        for word in (w for w in words if w):
            if word.startswith(_COMFYUI_EMBEDDING):
                name, *rest = word[len(_COMFYUI_EMBEDDING):].strip("\n").split() or [""]
                leftover = " ".join(rest)
                token_text = lookup(name)
                stripped = name.strip(",")
                if token_text is None and len(stripped) < len(name):
                    token_text, leftover = lookup(stripped), f"{name[len(stripped):]} {leftover}"
                if token_text is None:
                    raise UserError(f"prompt names embedding:{name}, which no --embedding is (loaded: "
                                    f"{', '.join(names) or 'none'}); ComfyUI would drop the word")
                pieces.append(Segment(token_text, segment.weight))
                word = leftover
            if word:
                pieces.append(Segment(word, segment.weight))
    return pieces

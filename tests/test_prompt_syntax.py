"""common/prompt_syntax.py against each UI's own functions, reproduced from their source in tests/ui_prompts.py:
the parsers against WebUI's parse_prompt_attention and ComfyUI's token_weights, the per-step construct check against
WebUI's schedule grammar, the chunkers (with the real CLIP tokenizer of the tiny pipeline) against WebUI's
tokenize_line and ComfyUI's tokenize_with_weights, the emphasis arithmetic against float64 formulas and against
EmphasisOriginal, EmphasisOriginalNoNorm and encode_token_weights. Disagreements found are kept as strict xfails
naming the prompt and what the UI does (see the reason of each)."""

from __future__ import annotations

import copy
import functools
import math
import random

import pytest
import torch

import ui_prompts as ui
from common.cli import UserError
from common.prompt_syntax import (
    BREAK, WEBUI_BREAK_WEIGHT, Segment, Tokens, check_prompts, comfyui_chunks, comfyui_embedding_segments, comfyui_emphasis,
    parse_comfyui, parse_webui, webui_embedding_ids, webui_chunks, webui_no_norm_emphasis, webui_original_emphasis, webui_scheduling,
)

START, END, COMMA = 49406, 49407, 267


def pairs(segments: list[Segment]) -> list[tuple[str, float]]:
    return [(segment.text, segment.weight) for segment in segments]


def assert_same_segments(ours, reference, prompt):
    """Texts equal and weights equal as floats (both sides multiply the same Python floats in the same order); nan
    equals nan (ComfyUI reads `(a:nan)`)."""
    reference = [(text, float(weight)) for text, weight in reference]
    assert [text for text, _ in ours] == [text for text, _ in reference], f"{prompt!r}: {ours} != {reference}"
    for (_, mine), (_, theirs) in zip(ours, reference):
        assert mine == theirs or (math.isnan(mine) and math.isnan(theirs)), f"{prompt!r}: {ours} != {reference}"


# ====================================================================================================== parsers

RESEARCH_PROMPTS = [  # shared/research/prompt-weighting.md §8.1, P1 to P25
    "(masterpiece:1.2), ((long neck:1.3)), [blurry], {{bad hands}}, (y2k_emb:1.2)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "((a:0.5)b:2.0)", "(a (b:2):0.5)", "((a:1.2):1.3)", "(unbalanced", "a) (b)", "((a) b", "[x]", "[[x]]", "[a(b:2)c]",
    "(x: 1.2)", "(x:1e2)", "(:1.2)", "(a:b)", r"\(x\) \[y\]", r"(a\b:1.2)", "{x}", "(unnecessary)(parens)", "a BREAK b",
    "(a BREAK b)", "BREAK a", "[blurry:0.5]", "[a|b] c", "(word)1.2", "word++",
]
MORE_PROMPTS = [
    "", "plain text, no syntax", "((x:1.3))", "((((x))))", "[[[[x]]]]", "([x])", "[(x)]", "(a:1.3)(b:1.3)", "(a:1.21)((b))",
    "(a)(b)(c:1.1)", "(a:1.1)(b)", "[a][b]", "(a)[b]", "a, (b:0.9), c",
    # zero and negative weights
    "(x:0)", "((x:0))", "(x:0.0), y", "(x:-1)", "(x:-0.5), y", "((x:-2))", "[(x:0)]",
    # spaces and number forms around a weight
    "(x : 1.2 )", "(a: 2 )", "(x:+1.5)", "(x:.5)", "(x:5.)", "(a:inf)", "(a:nan)", "(a:1_0)", "(a:2.5)text", "(x:1e-1)",
    # escapes
    "\\\\", "a\\", "a \\\\(b)", r"\(a:1.2\)", r"(a\):1.2)", r"(a\(b:1.3)", r"\[x\] (y)", r"(\[x\]:1.5)", r"a\b\c",
    # unbalanced brackets both ways
    "((a)", "a))", "(a))b(", "[a", "a]", "]a[", "[(a])", "([a)]", ")(", "(a:1.2", "a:1.2)", "(a:1.2))", "((:1.2))",
    "((a) (b", "[[a] b", "a) b (c:1.5)", "(a (b) c",
    # BREAK
    "a BREAK BREAK b", "[a BREAK b]", "((a BREAK b))", "BREAK", "a BREAK", "BREAK BREAK", "aBREAKb", "a break b",
    "a\nBREAK\nb", "(a:1.5) BREAK (b:0.5)", "a BREAKb BREAK c",
    # embeddings as each UI names them (text here: the parse leaves them to the tokenizer)
    "embedding:y2k_emb, a cat", "(embedding:y2k_emb:1.2)", "a (y2k_emb:1.2) b", "embedding:y2k_emb.safetensors",
    # other text
    "line1\nline2 (x)", "  spaced  (x)  ", "a:b:c", "(a:b:c:1.5)", "x (y:1.5", "{{a}} [[b]] ((c))", "1girl, (smile:1.1)",
]
PARSER_PROMPTS = RESEARCH_PROMPTS + MORE_PROMPTS


@pytest.mark.parametrize("prompt", PARSER_PROMPTS)
def test_parse_webui_is_webuis_parse_prompt_attention(prompt):
    assert_same_segments(pairs(parse_webui(prompt)), ui.parse_prompt_attention(prompt), prompt)


@pytest.mark.parametrize("prompt", PARSER_PROMPTS)
def test_parse_comfyui_is_comfyuis_token_weights(prompt):
    assert_same_segments(pairs(parse_comfyui(prompt)), ui.comfyui_parse(prompt), prompt)


def test_parsers_agree_with_the_uis_on_random_prompts_of_syntax_characters():
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "(", ")", "[", "]", ":", "1.2", "0.5", "\\", "BREAK", " BREAK ", "{", "|", "-1", "1e2", ",",
                ".", "\n", "2", "embedding:e"]
    for _ in range(3000):
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 14)))
        try:
            reference = ui.parse_prompt_attention(prompt)
        except ValueError:  # float("1.2.") and the like: generation fails in WebUI
            with pytest.raises(UserError):
                parse_webui(prompt)
        else:
            assert_same_segments(pairs(parse_webui(prompt)), reference, prompt)
        assert_same_segments(pairs(parse_comfyui(prompt)), ui.comfyui_parse(prompt), prompt)


def test_a_weight_webuis_float_cannot_read_is_refused_as_webui_fails_on_it():
    for prompt in ("(x:1.2.3)", "(x:1.2.)", "(a (b:..):2)"):
        with pytest.raises(ValueError):
            ui.parse_prompt_attention(prompt)
        with pytest.raises(UserError, match="not a number"):
            parse_webui(prompt)
        assert_same_segments(pairs(parse_comfyui(prompt)), ui.comfyui_parse(prompt), prompt)  # ComfyUI: text at 1.1


def test_the_research_vectors_p1_to_p22():
    """§8.1's table, weights written as the products the UIs compute."""
    expected = {
        "(masterpiece:1.2), ((long neck:1.3)), [blurry], {{bad hands}}, (y2k_emb:1.2)": (
            [("masterpiece", 1.2), (", ", 1.0), ("long neck", 1.3 * 1.1), (", ", 1.0), ("blurry", 1 / 1.1),
             (", {{bad hands}}, ", 1.0), ("y2k_emb", 1.2)],
            [("masterpiece", 1.2), (", ", 1.0), ("long neck", 1.3), (", [blurry], {{bad hands}}, ", 1.0), ("y2k_emb", 1.2)]),
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": (  # WebUI's doctest
            [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
            [("a ", 1.0), ("(((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", 1.0)]),
        "((a:0.5)b:2.0)": ([("a", 1.0), ("b", 2.0)], [("a", 0.5), ("b", 2.0)]),
        "(a (b:2):0.5)": ([("a ", 0.5), ("b", 1.0)], [("a ", 0.5), ("b", 2.0)]),
        "((a:1.2):1.3)": ([("a", 1.2 * 1.3)], [("a", 1.2)]),
        "(unbalanced": ([("unbalanced", 1.1)], [("(unbalanced", 1.0)]),
        "a) (b)": ([("a) ", 1.0), ("b", 1.1)], [("a) (b)", 1.0)]),
        "((a) b": ([("a", 1.1 * 1.1), (" b", 1.1)], [("((a) b", 1.0)]),
        "[x]": ([("x", 1 / 1.1)], [("[x]", 1.0)]),
        "[[x]]": ([("x", 1 / 1.1 / 1.1)], [("[[x]]", 1.0)]),
        "[a(b:2)c]": ([("a", 1 / 1.1), ("b", 2 / 1.1), ("c", 1 / 1.1)], [("[a", 1.0), ("b", 2.0), ("c]", 1.0)]),
        "(x: 1.2)": ([("x", 1.2)], [("x", 1.2)]),
        "(x:1e2)": ([("x:1e2", 1.1)], [("x", 100.0)]),
        "(:1.2)": ([("", 1.0)], [(":1.2", 1.1)]),
        "(a:b)": ([("a:b", 1.1)], [("a:b", 1.1)]),
        r"\(x\) \[y\]": ([("(x) [y]", 1.0)], [(r"(x) \[y\]", 1.0)]),
        r"(a\b:1.2)": ([("ab", 1.2)], [(r"a\b", 1.2)]),
        "{x}": ([("{x}", 1.0)], [("{x}", 1.0)]),
        "(unnecessary)(parens)": ([("unnecessaryparens", 1.1)], [("unnecessary", 1.1), ("parens", 1.1)]),
        "a BREAK b": ([("a", 1.0), (BREAK, -1.0), ("b", 1.0)], [("a BREAK b", 1.0)]),
        "(a BREAK b)": ([("a", 1.1), (BREAK, -1.1), ("b", 1.1)], [("a BREAK b", 1.1)]),
        "BREAK a": ([("", 1.0), (BREAK, -1.0), ("a", 1.0)], [("BREAK a", 1.0)]),
    }
    for prompt, (webui, comfyui) in expected.items():
        for ours, theirs in ((pairs(parse_webui(prompt)), webui), (pairs(parse_comfyui(prompt)), comfyui)):
            assert [t for t, _ in ours] == [t for t, _ in theirs], prompt
            assert [w for _, w in ours] == pytest.approx([w for _, w in theirs], rel=1e-12), prompt


def test_the_quirks_each_ui_has():
    # an explicit weight inside brackets: WebUI multiplies, ComfyUI replaces
    assert pairs(parse_webui("((x:1.3))")) == [("x", 1.4300000000000002)] == [("x", 1.3 * 1.1)]
    assert pairs(parse_comfyui("((x:1.3))")) == [("x", 1.3)]
    # [x]: WebUI divides by 1.1, ComfyUI reads the brackets as text
    assert pairs(parse_webui("[x]")) == [("x", 1 / 1.1)]
    assert pairs(parse_comfyui("[x]")) == [("[x]", 1.0)] and pairs(parse_comfyui("a [x] b")) == [("a [x] b", 1.0)]
    # unbalanced: WebUI's unclosed bracket still counts, ComfyUI's makes the rest text; a stray ")" is text in WebUI,
    # and in ComfyUI it drives the depth below zero so that every later bracket is text too
    assert pairs(parse_webui("(unbalanced")) == [("unbalanced", 1.1)]
    assert pairs(parse_comfyui("a (unbalanced")) == [("a ", 1.0), ("(unbalanced", 1.0)]
    assert pairs(parse_webui("a) (b)")) == [("a) ", 1.0), ("b", 1.1)]
    assert pairs(parse_comfyui("a) (b)")) == [("a) (b)", 1.0)]
    # escapes: WebUI \( \) \[ \] \\ and a lone backslash dropped; ComfyUI only \( \)
    assert pairs(parse_webui(r"\(x\) \[y\] a\\b c\d")) == [(r"(x) [y] a\b cd", 1.0)]
    assert pairs(parse_comfyui(r"\(x\) \[y\] a\\b c\d")) == [(r"(x) \[y\] a\\b c\d", 1.0)]
    assert pairs(parse_webui(r"(\(x\))")) == [("(x)", 1.1)] and pairs(parse_comfyui(r"(\(x\))")) == [("(x)", 1.1)]
    # BREAK: WebUI's marker, scaled with its brackets (then only the word "break" to WebUI's chunker); ComfyUI: text
    assert pairs(parse_webui("a BREAK b")) == [("a", 1.0), (BREAK, WEBUI_BREAK_WEIGHT), ("b", 1.0)]
    assert pairs(parse_webui("(a BREAK b)")) == [("a", 1.1), (BREAK, -1.1), ("b", 1.1)]
    assert pairs(parse_webui("[a BREAK b]")) == [("a", 1 / 1.1), (BREAK, -1 / 1.1), ("b", 1 / 1.1)]
    assert pairs(parse_webui("a break b")) == [("a break b", 1.0)] and pairs(parse_webui("aBREAKb")) == [("aBREAKb", 1.0)]
    assert pairs(parse_comfyui("a BREAK b")) == [("a BREAK b", 1.0)]
    # weight 0, as written (WebUI's mean restore and ComfyUI's empty-prompt state do the rest)
    assert pairs(parse_webui("(x:0)")) == pairs(parse_comfyui("(x:0)")) == [("x", 0.0)]
    assert pairs(parse_webui("a (x:0)")) == [("a ", 1.0), ("x", 0.0)]
    # adjacent equal weights merge in WebUI only (which changes the tokens: "unnecessaryparens")
    assert pairs(parse_webui("(a)(b) c")) == [("ab", 1.1), (" c", 1.0)]
    assert pairs(parse_comfyui("(a)(b) c")) == [("a", 1.1), ("b", 1.1), (" c", 1.0)]
    # the number: WebUI's [+-]?[.\d]+ with spaces around, ComfyUI's float()
    assert pairs(parse_webui("(x:1e2)")) == [("x:1e2", 1.1)] and pairs(parse_comfyui("(x:1e2)")) == [("x", 100.0)]
    assert pairs(parse_webui("(:1.2)")) == [("", 1.0)] and pairs(parse_comfyui("(:1.2)")) == [(":1.2", 1.1)]
    assert pairs(parse_webui("(x : 1.5 )")) == pairs(parse_comfyui("(x : 1.5 )")) == [("x ", 1.5)]
    # the empty prompt
    assert pairs(parse_webui("")) == [("", 1.0)] and pairs(parse_comfyui("")) == []


# ====================================================================================================== WebUI's per-step constructs

# Whether WebUI encodes anything but the prompt's own text at some step (prompt editing, alternation, AND): WebUI's
# schedule grammar (modules/prompt_parser.py, run with lark 1.1.2, the version WebUI's requirements_versions.txt
# pins) and its AND split, read for 20 and 7 steps, stable under every PYTHONHASHSEED tried (0 to 7).
WEBUI_SCHEDULED = {
    # scheduled: prompt editing, alternation, AND
    "[a:b:10]": True, "[a:0.5]": True, "[a::0.5]": True, "[a|b]": True, "a AND b": True, "[blurry:0.5]": True,
    "[a|b] c": True, "a [b:3]": True, "[a: 5]": True, "[a:5 ]": True, "[a : b : 5 ]": True, "[a:b:1.5]": True,
    "[a:-1]": True, "[a:b:0]": True, "[a:+3]": True, "[a:5.]": True, "[fe|]male": True, "[|]": True, "[a||b]": True,
    "[(a:1.2)|b]": True, "[a:(b:1.2):3]": True, "[(x:1.2):0.5]": True, "[[x]:0.5]": True, "((a][:b:c [d:3]": True,
    "[[a:b:3]": True, "([a:3])": True, "[a(b:1.2)c:3]": True, "[a:b:10] BREAK c": True, "AND": True,
    "a [b|c] (d) [e]": True, "[ a | b ]": True, "[a:b: 3]": True, "[a:b:3 ]": True, "[a:b :3]": True, "[:3]": True,
    "[::3]": True, "[ :3]": True, "[[a|b]:3]": True, "[a:[b|c]]": True, "[x:3] (y)": True, "(x) [y:2] ((z:1.5))": True,
    "a\n[b:3]": True, "[a\n:3]": True, "[a:3\n]": True, "[x: 0.5]": True, "[blue:green:5] jeweled": True,
    "[a:b:1.0]": True, "[a: b: 2]": True, "([a|b])": True, "x [a|b]": True, "[x [a|b]": True, "(x [a:b:3])": True,
    "[a\\]:3]": True, "[a:b:3] ]": True, "([a:b:3]": True, "a: [b:3]": True, "[[a:3]]": True, "[a:3][b:4]": True,
    "[|]x": True, "[a:b:3]x]": True, "[a:3] )": True, "a ( [b:3]": True, ") [b:3]": True, "[a:3] [": True,
    "(a:1.2 [b:3]": True, "[a:3] [x": True, "(x:1.2) AND (y:0.8)": True, "[[a]:[b]:3]": True,
    # not scheduled: emphasis, text, or a prompt the grammar cannot parse (then used unchanged at every step)
    "[x]": False, "[[x]]": False, "(x:1.2)": False, "\\[a:b:1\\]": False, "[a:b]": False, "[a:b:c]": False,
    "a [unbalanced": False, "a [b:3": False, "(a:b:3)": False, "ANDROID": False, "a and b": False, "a ANDb": False,
    "[a:b:10\\]": False, "\\[a:3]": False, "[a\\:3]": False, "[x] | y": False, "(a|b)": False, "[a|b": False,
    "[a::]": False, "[a:b:]": False, "[a:]": False, "[x:y]": False, "[x:1:y]": False, "[x]:3": False, "x:3": False,
    "(x:0.5)": False, "[(x:0.5)]": False, "[]": False, "[:]": False, "]": False, "a | b": False, "(a:1) [b]": False,
    # numbers as lark's SIGNED_NUMBER reads them: exponents schedule, a malformed number fails the grammar
    "[a:1e2]": True, "[a:b:1E1]": True, "[a:1.5e-1]": True, "[a:.5.]": False, "[x:1.2.3]": False,
}
# WebUI's grammar fails on these (a stray "|", a lone trailing backslash, a colon or bracket its rules do not place),
# so WebUI uses the prompt unchanged at every step and reads the brackets as emphasis. We refuse them: each holds what
# reads as a schedule or alternation, and a refusal names it where the UI would silently weigh it.
WEBUI_GRAMMAR_FAILS_WE_REFUSE = ["[a|b] c | d", "[a:3\\]]", "[a:3] \\", "[a:b:c:3]", "[a:[b:c]:3]", "[a|b:3]", "[a:b|c:3]"]
# Not in the table: a construct directly followed by a stray "]", ")", "(" or ":" ("[a:b:3]]", "[a:3]]x", "[a:b:3](",
# "[a:b:3]) ", "[a:3]:"): lark's ambiguity resolution picks a different tree under different PYTHONHASHSEEDs, so WebUI
# itself schedules them in some runs and not in others. We refuse them (checked below), the answer safe either way.


def _scheduling_cases():
    for prompt, scheduled in WEBUI_SCHEDULED.items():
        yield pytest.param(prompt, scheduled, id=repr(prompt))


@pytest.mark.parametrize(("prompt", "scheduled"), list(_scheduling_cases()))
def test_webui_scheduling_flags_what_webuis_grammar_schedules(prompt, scheduled):
    assert (webui_scheduling(prompt) is not None) == scheduled, webui_scheduling(prompt)


def test_webui_scheduling_names_the_construct():
    for prompt, construct in (("a [a:b:10] c", "[a:b:10]"), ("[a:0.5]", "[a:0.5]"), ("x [a::0.5]", "[a::0.5]"),
                              ("[a|b] c", "[a|b]"), ("a AND b", "AND"), ("(x:1.2) AND y", "AND")):
        assert webui_scheduling(prompt) == construct, prompt
    for prompt in ("[x]", "[[x]]", "(x:1.2)", r"\[a:b:1\]", "[x] (y:0.5) ((z))", "", "ANDROID"):
        assert webui_scheduling(prompt) is None, prompt
    for prompt in ("[a:b:3]]", "[a:3]]x", "[a:b:3](", "[a:b:3]) ", "[a:3]:"):  # WebUI itself undecided
        assert webui_scheduling(prompt) is not None, prompt


def test_where_webuis_grammar_fails_we_refuse_what_reads_as_a_schedule():
    for prompt in WEBUI_GRAMMAR_FAILS_WE_REFUSE:
        assert not ui.webui_is_scheduled(prompt), prompt
        with pytest.raises(UserError, match="per-step prompt editing"):
            check_prompts([prompt], "webui")


def test_the_table_is_what_webuis_grammar_says():
    """Re-derives WEBUI_SCHEDULED with WebUI's grammar (lark, pinned in requirements.txt for the tests)."""
    for prompt, scheduled in WEBUI_SCHEDULED.items():
        assert ui.webui_is_scheduled(prompt) == scheduled, prompt
        assert ui.webui_is_scheduled(prompt, 7) == scheduled, prompt
    assert ui.get_learned_conditioning_prompt_schedules(["a [b:3]"], 10) == [[[3, "a "], [10, "a b"]]]  # its doctests
    assert ui.get_learned_conditioning_prompt_schedules(["[fe|]male"], 4) == [[[1, "female"], [2, "male"], [3, "female"],
                                                                              [4, "male"]]]


def test_and_is_webuis_word_bounded_upper_case_split():
    for prompt in ("a AND b", "AND", "(x:1.2) AND (y:0.8)", "a AND b:0.5"):
        assert len(ui.get_multicond_prompt_list([prompt])[1]) > 1 or prompt == "AND"
        assert webui_scheduling(prompt) == "AND"
    for prompt in ("ANDROID", "a and b", "a ANDb", "BRAND"):
        assert ui.get_multicond_prompt_list([prompt])[1] == [prompt]
        assert webui_scheduling(prompt) is None


# ====================================================================================================== chunks


@pytest.fixture(scope="module")
def tokenizers(tiny_sdxl_path):
    """The tiny pipeline's two CLIP tokenizers (OpenAI CLIP's vocabulary): ids, and the padding ids 49407 and 0."""
    from transformers import CLIPTokenizer

    return (CLIPTokenizer.from_pretrained(tiny_sdxl_path, subfolder="tokenizer"),
            CLIPTokenizer.from_pretrained(tiny_sdxl_path, subfolder="tokenizer_2"))


@pytest.fixture(scope="module")
def ids(tokenizers):
    tokenizer = tokenizers[0]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(",</w>")) == (START, END, COMMA)

    @functools.lru_cache(maxsize=None)
    def cached(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)

    return lambda text: list(cached(text))


@pytest.fixture(scope="module")
def pads(tokenizers):
    assert (tokenizers[0].pad_token_id, tokenizers[1].pad_token_id) == (END, 0)
    return END, 0


def webui_groups(prompt: str, ids) -> list:
    """Our segments as the encoder hands them to the chunker: a WebUI BREAK marker as None."""
    return [(None, s.weight) if s.text == BREAK and s.weight == WEBUI_BREAK_WEIGHT else (ids(s.text), s.weight)
            for s in parse_webui(prompt)]


def ours_webui(prompt, ids, pad, backtrack=20, embeddings=()):
    return webui_chunks(webui_groups(prompt, ids), Tokens(START, END, pad, COMMA, embeddings), backtrack=backtrack)


def ours_comfyui(prompt, ids, pad, embeddings=()):
    return comfyui_chunks([(ids(s.text), s.weight) for s in parse_comfyui(prompt)], Tokens(START, END, pad, COMMA, embeddings))


def reference_webui(prompt, ids, pad, backtrack=20, embedding_db=None, placeholders=None):
    """tokenize_line's chunks as process_tokens hands them to the encoder (ids after the first end made id_pad), with
    each embedding's placeholder ids (zeros) replaced by `placeholders[name]` at its fix, for comparison with ours."""
    model = ui.TextConditionalModel(ids, comma_token=COMMA, id_start=START, id_end=END, id_pad=pad,
                                    comma_padding_backtrack=backtrack, embedding_db=embedding_db)
    chunks, _ = model.tokenize_line(prompt)
    tokens = model.process_tokens_ids([chunk.tokens for chunk in chunks])
    for chunk_tokens, chunk in zip(tokens, chunks):
        for offset, embedding in chunk.fixes:  # the offset counts from the token after the start token
            chunk_tokens[offset + 1 : offset + 1 + embedding.vectors] = placeholders[embedding.name]
    return [(chunk_tokens, chunk.multipliers) for chunk_tokens, chunk in zip(tokens, chunks)]


def reference_comfyui(prompt, ids, pad, embeddings=None):
    tokenizer = ui.SDTokenizer(ids, start_token=START, end_token=END, pad_with_end=pad == END, embeddings=embeddings)
    return [([t for t, _ in chunk], [w for _, w in chunk]) for chunk in tokenizer.tokenize_with_weights(prompt)]


def content(chunk) -> list[int]:
    """A chunk's ids between its start token and its first end token."""
    chunk_ids = chunk[0]
    return chunk_ids[1 : chunk_ids.index(END)]


LONG_WEIGHTED = ("(masterpiece:1.2), best quality, [blurry], ((detailed face)), a photo of a dog on the beach, "
                 "golden hour, ") * 7  # 210 tokens
CHUNK_PROMPTS = {
    "C1 comma 10 tokens before the boundary": "cat " * 70 + ", " + "dog " * 10,
    "C2 weighted group across the boundary": "a " * 74 + "(b c d:1.2)",
    "C3 BREAK at the start": "BREAK a",
    "C4 BREAK twice": "a BREAK BREAK b",
    "C5 76 tokens": "cat " * 75 + "dog",
    "comma 1 token before the boundary": "cat " * 74 + ", " + "dog " * 30,
    "comma 19 tokens before the boundary": "cat " * 56 + ", " + "dog " * 30,
    "comma 20 tokens before the boundary": "cat " * 55 + ", " + "dog " * 30,
    "comma 21 tokens before the boundary": "cat " * 54 + ", " + "dog " * 30,
    "comma as the 76th token": "cat " * 75 + ", dog",
    "exactly 75 tokens": "cat " * 75,
    "exactly 75 tokens, a comma near the end": "cat " * 70 + ", cat cat cat cat",
    "empty": "",
    "BREAK in brackets": "(a BREAK b)",
    "BREAK in square brackets": "[a BREAK b] c",
    "BREAK alone": "BREAK",
    "BREAK at the end": "a, b BREAK",
    "BREAK after a full chunk": "cat " * 75 + "BREAK dog",
    "BREAK after a comma near the boundary": "cat " * 60 + ", dog dog BREAK " + "cow " * 10,
    "weighted group of 10 across the boundary": "cat " * 70 + "(a b c d e f g h i j:1.3) tail",
    "weighted group of 3 across the boundary": "cat " * 73 + "(x y z:0.5) tail",
    "weighted group of 7 at the boundary": "cat " * 70 + "[a b c d e f g] tail",
    "weighted group of 8 at the boundary": "cat " * 70 + "((a b c d e f g h)) tail",
    "weight 0 and negative": "a (b:0) c (d:-1), " * 20,
    "200 tokens with weights": LONG_WEIGHTED,
    "comma-separated tags, 3 chunks": ", ".join(f"tag{i} word" for i in range(60)),
    "P1": "(masterpiece:1.2), ((long neck:1.3)), [blurry], {{bad hands}}, (y2k_emb:1.2)",
    "P19": "(unnecessary)(parens)",
    "unbalanced, long": "(" + "cat " * 80 + "[dog " * 10,
}


@pytest.mark.parametrize("backtrack", [20, 0, 5])
@pytest.mark.parametrize("name", list(CHUNK_PROMPTS))
def test_webui_chunks_are_webuis_tokenize_line(name, backtrack, ids, pads):
    prompt = CHUNK_PROMPTS[name]
    for pad in pads:
        ours = ours_webui(prompt, ids, pad, backtrack)
        assert ours == reference_webui(prompt, ids, pad, backtrack), name
        assert all(len(chunk_ids) == len(weights) == 77 for chunk_ids, weights in ours)


@pytest.mark.parametrize("name", list(CHUNK_PROMPTS))
def test_comfyui_chunks_are_comfyuis_tokenize_with_weights(name, ids, pads):
    prompt = CHUNK_PROMPTS[name]
    for pad in pads:
        ours = ours_comfyui(prompt, ids, pad)
        assert ours == reference_comfyui(prompt, ids, pad), name
        assert all(len(chunk_ids) == len(weights) == 77 for chunk_ids, weights in ours)


def test_chunks_agree_with_the_uis_on_random_long_weighted_prompts(ids, pads):
    rng = random.Random(1)
    words = ["cat", "dog", "a photo", "golden hour", "masterpiece", "very detailed face", "y2k", "a b c d e f g h i"]
    for trial in range(40):
        parts = []
        for _ in range(rng.randrange(0, 60)):
            word = rng.choice(words)
            form = rng.randrange(8)
            parts.append([word, f"({word})", f"[{word}]", f"({word}:{rng.choice(['0', '0.5', '1.3', '-1'])})", f"(({word}))",
                          "BREAK", ",", f"{word},"][form])
        prompt = " ".join(parts)
        for pad in pads:
            assert ours_webui(prompt, ids, pad) == reference_webui(prompt, ids, pad), (trial, prompt)
            assert ours_comfyui(prompt, ids, pad) == reference_comfyui(prompt, ids, pad), (trial, prompt)


def test_the_chunk_layouts_of_the_research_vectors(ids):
    """§8.3's C1 to C5 and the comma rule, in ids: WebUI backtracks to a comma at most 20 tokens before a chunk's
    end, ComfyUI moves a group of under 8 tokens whole."""
    cat, dog, comma = ids("cat")[0], ids("dog")[0], COMMA

    def layout(chunks):
        return [content(chunk) for chunk in chunks]

    prompt = CHUNK_PROMPTS["C1 comma 10 tokens before the boundary"]
    assert layout(ours_webui(prompt, ids, END)) == [[cat] * 70 + [comma], [dog] * 10]
    assert layout(ours_webui(prompt, ids, END, backtrack=0)) == layout(ours_comfyui(prompt, ids, END)) == \
        [[cat] * 70 + [comma] + [dog] * 4, [dog] * 6]
    b, c, d = ids("b c d")
    chunks = ours_webui(CHUNK_PROMPTS["C2 weighted group across the boundary"], ids, END)
    assert layout(chunks) == [ids("a") * 74 + [b], [c, d]] and chunks[0][1][75] == chunks[1][1][1] == chunks[1][1][2] == 1.2
    chunks = ours_comfyui(CHUNK_PROMPTS["C2 weighted group across the boundary"], ids, END)
    assert layout(chunks) == [ids("a") * 74, [b, c, d]] and chunks[1][1][1:4] == [1.2, 1.2, 1.2]
    assert layout(ours_webui("BREAK a", ids, END)) == [[], ids("a")]
    assert layout(ours_comfyui("BREAK a", ids, END)) == [ids("BREAK a")] == [ids("break a")]
    assert layout(ours_webui("a BREAK BREAK b", ids, END)) == [ids("a"), [], ids("b")]
    assert layout(ours_comfyui("a BREAK BREAK b", ids, END)) == [ids("a break break b")]
    for chunks in (ours_webui(CHUNK_PROMPTS["C5 76 tokens"], ids, END), ours_comfyui(CHUNK_PROMPTS["C5 76 tokens"], ids, END)):
        assert layout(chunks) == [[cat] * 75, [dog]]
    # a comma N tokens before the boundary: WebUI cuts after it for N <= 20, not for 21
    for n in (1, 19, 20, 21):
        first = layout(ours_webui("cat " * (75 - n) + ", " + "dog " * 30, ids, END))[0]
        assert first == ([cat] * (75 - n) + [comma] if n <= 20 else [cat] * 54 + [comma] + [dog] * 20), n
    # a comma arriving at a full chunk opens the next one
    assert layout(ours_webui(CHUNK_PROMPTS["comma as the 76th token"], ids, END)) == [[cat] * 75, [comma, dog]]
    # exactly 75 tokens: one chunk, whatever commas it holds
    for prompt in (CHUNK_PROMPTS["exactly 75 tokens"], CHUNK_PROMPTS["exactly 75 tokens, a comma near the end"]):
        assert len(ids(prompt)) == 75
        assert len(ours_webui(prompt, ids, END)) == len(ours_comfyui(prompt, ids, END)) == 1
    assert len(ids(LONG_WEIGHTED)) >= 200 and len(ours_webui(LONG_WEIGHTED, ids, END)) == 3


def test_bos_eos_and_padding_weigh_1_and_the_empty_prompt_is_one_chunk(ids, pads):
    for pad in pads:
        for chunks in (ours_webui("", ids, pad), ours_comfyui("", ids, pad)):
            assert chunks == [([START, END] + [pad] * 75, [1.0] * 77)]
        for chunks in (ours_webui(LONG_WEIGHTED, ids, pad), ours_comfyui(LONG_WEIGHTED, ids, pad)):
            for chunk_ids, weights in chunks:
                end = chunk_ids.index(END)
                assert chunk_ids[0] == START and chunk_ids[end + 1 :] == [pad] * (76 - end)
                assert weights[0] == 1.0 and weights[end:] == [1.0] * (77 - end)
    # BREAK at the start: an empty first chunk, which WebUI pools from
    assert ours_webui("BREAK a", ids, END)[0] == ([START, END] + [END] * 75, [1.0] * 77)


def test_break_inside_brackets_is_the_word_break_weighted_minus_1_1(ids):
    """WebUI scales the marker with its brackets to -1.1; tokenize_line then no longer sees a BREAK and encodes the
    word "break" with multiplier -1.1, in the same chunk."""
    chunks = ours_webui("(a BREAK b)", ids, END)
    assert chunks == reference_webui("(a BREAK b)", ids, END)
    (chunk_ids, weights), = chunks
    assert content(chunks[0]) == ids("a break b") and weights[1:4] == [1.1, -1.1 * 1.0, 1.1]
    assert weights[2] == -1.1 and -1.1 != WEBUI_BREAK_WEIGHT


def test_the_research_token_vectors_of_p1_and_p19(ids):
    """§8.2's ids and weights up to the first end token."""
    p1 = CHUNK_PROMPTS["P1"]
    webui_ids = [49406, 12066, 267, 1538, 6906, 267, 21977, 267, 90, 346, 2103, 3500, 92, 92, 267, 344, 273, 330, 318, 908,
                 321, 49407]
    webui_weights = [1.0, 1.2, 1.0, 1.43, 1.43, 1.0, 0.909091, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.2, 1.2,
                     1.2, 1.2, 1.0]
    comfyui_ids = [49406, 12066, 267, 1538, 6906, 267, 314, 21977, 34067, 90, 346, 2103, 3500, 92, 92, 267, 344, 273, 330,
                   318, 908, 321, 49407]
    comfyui_weights = [1.0, 1.2, 1.0, 1.3, 1.3, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.2, 1.2,
                       1.2, 1.2, 1.0]
    (chunk_ids, weights), = ours_webui(p1, ids, END)
    assert chunk_ids[:22] == webui_ids and weights[:22] == pytest.approx(webui_weights, abs=1e-6)
    (chunk_ids, weights), = ours_comfyui(p1, ids, END)
    assert chunk_ids[:23] == comfyui_ids and weights[:23] == pytest.approx(comfyui_weights, abs=1e-6)
    assert content(ours_webui("(unnecessary)(parens)", ids, END)[0]) == [569, 6961, 4617, 3106, 338]
    assert content(ours_comfyui("(unnecessary)(parens)", ids, END)[0]) == [24100, 3106, 338]


# ---------------------------------------------------------------- embeddings in chunks


@pytest.fixture(scope="module")
def embedding_ids(tokenizers):
    """A tokenizer with one loaded two-vector embedding's tokens, as the toolkit names them ("<s0><s1>")."""
    tokenizer = copy.deepcopy(tokenizers[0])
    tokenizer.add_tokens(["<s0>", "<s1>"])

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False).input_ids

    return ids, tuple(ids("<s0><s1>"))


NAMES = {"y2k_emb": "<s0><s1>"}


def ours_with_embedding(prompt, syntax, embedding_ids):
    ids, vectors = embedding_ids
    if syntax == "webui":
        named = {tuple(ids("y2k_emb")): vectors}
        groups = [(group if group is None else webui_embedding_ids(group, named), w) for group, w in webui_groups(prompt, ids)]
        return webui_chunks(groups, Tokens(START, END, END, COMMA, (vectors,)))
    segments = comfyui_embedding_segments(parse_comfyui(prompt), NAMES)
    return comfyui_chunks([(ids(s.text), s.weight) for s in segments], Tokens(START, END, END, COMMA, (vectors,)))


def webui_embedding_reference(prompt, embedding_ids):
    ids, vectors = embedding_ids
    database = ui.EmbeddingDatabase(ids)
    database.register_embedding_by_name(ui.Embedding("y2k_emb", len(vectors)), "y2k_emb")
    return reference_webui(prompt, ids, END, embedding_db=database, placeholders={"y2k_emb": list(vectors)})


@pytest.mark.parametrize("prompt", ["a y2k_emb cat", "(y2k_emb:1.2), x", "[y2k_emb]", "y2k_emb.png", "cat " * 73 + "y2k_emb",
                                    "cat " * 74 + "y2k_emb", "cat " * 75 + "(y2k_emb:0.5)",
                                    "my_y2k_emb", "A Y2K_EMB cat", "y2k_emb BREAK y2k_emb", "(y2k_emb y2k_emb:1.3)"])
def test_a_webui_embedding_is_found_by_name_and_never_split(prompt, embedding_ids):
    assert ours_with_embedding(prompt, "webui", embedding_ids) == webui_embedding_reference(prompt, embedding_ids), prompt


def test_webui_leaves_an_embeddings_fix_behind_when_the_comma_backtrack_moves_it_and_we_move_it_whole(embedding_ids):
    """tokenize_line moves the tokens and multipliers after the last comma to the next chunk but not the chunk's
    `fixes`: the embedding's vectors land on the old chunk's padding and its moved placeholders are token 0 ("!").
    We keep the embedding's tokens together (what WebUI means), so here we differ from it on purpose."""
    ids, vectors = embedding_ids
    prompt = "cat " * 60 + ", " + "dog y2k_emb " + "cow " * 20
    database = ui.EmbeddingDatabase(ids)
    database.register_embedding_by_name(ui.Embedding("y2k_emb", 2), "y2k_emb")
    model = ui.TextConditionalModel(ids, comma_token=COMMA, id_start=START, id_end=END, id_pad=END, embedding_db=database)
    chunks, _ = model.tokenize_line(prompt)
    assert [fix.offset for fix in chunks[0].fixes] == [62] and chunks[1].fixes == []  # 62: past the comma, now padding
    assert chunks[1].tokens[1:4] == [ids("dog")[0], 0, 0]
    ours = ours_with_embedding(prompt, "webui", embedding_ids)
    assert content(ours[0]) == ids("cat") * 60 + [COMMA] and content(ours[1])[:3] == [ids("dog")[0], *vectors]


def comfyui_embedding_reference(prompt, embedding_ids):
    ids, vectors = embedding_ids
    return reference_comfyui(prompt, ids, END, embeddings={"y2k_emb.safetensors": list(vectors)})


@pytest.mark.parametrize("prompt", [
    "a embedding:y2k_emb cat", "embedding:y2k_emb, x", "a,embedding:y2k_emb", "x\nembedding:y2k_emb",
    "embedding:y2k_emb.safetensors x", "cat " * 70 + "embedding:y2k_emb dog", "(embedding:y2k_emb:1.2)",
    "( embedding:y2k_emb:1.2)", "(x embedding:y2k_emb:0.5)", "((embedding:y2k_emb))", "(a)embedding:y2k_emb",
    "a(embedding:y2k_emb)", "a) embedding:y2k_emb", "[embedding:y2k_emb]", "{embedding:y2k_emb}", "a:embedding:y2k_emb",
    "cat " * 74 + "embedding:y2k_emb", "\\(embedding:y2k_emb", "a (embedding:y2k_emb", "embedding:y2k_emb,, x",
    ",embedding:y2k_emb", "a  embedding: y2k_emb", "x embedding:y2k_emb embedding:y2k_emb y",
])
def test_a_comfyui_embedding_is_where_comfyui_puts_it(prompt, embedding_ids):
    assert ours_with_embedding(prompt, "comfyui", embedding_ids) == comfyui_embedding_reference(prompt, embedding_ids)


@pytest.mark.parametrize("prompt", ["embedding:y2k_emb,x", "embedding:y2k_emb:1.2", "a embedding:other", "(embedding:)"])
def test_an_embedding_comfyui_would_drop_is_refused_naming_it(prompt, embedding_ids):
    """ComfyUI looks the whole word up ('y2k_emb,x': strip(',') leaves it; 'y2k_emb:1.2'), finds nothing and drops it
    with a console warning; we refuse the prompt naming the word, where the image would silently lack it."""
    ids, vectors = embedding_ids
    reference = comfyui_embedding_reference(prompt, embedding_ids) if prompt != "(embedding:)" else None  # IndexError there
    assert reference is None or vectors[0] not in reference[0][0]
    with pytest.raises(UserError, match="which no --embedding is"):
        ours_with_embedding(prompt, "comfyui", embedding_ids)


# ====================================================================================================== arithmetic

Z = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]
W = [1.0, 2.0, 0.5, 1.0]
E = [[1.0, 1.0]] * 4


def test_the_research_arithmetic_example():
    """§8.4: one text, 4 positions, 2 channels, evaluated in float64."""
    z, w, e = torch.tensor(Z, dtype=torch.float64), torch.tensor(W, dtype=torch.float64), torch.tensor(E, dtype=torch.float64)
    original = [[0.96, 1.92], [5.76, 7.68], [2.4, 2.88], [6.72, 7.68]]
    torch.testing.assert_close(webui_original_emphasis(z, w), torch.tensor(original, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(webui_no_norm_emphasis(z, w), torch.tensor([[1, 2], [6, 8], [2.5, 3], [7, 8]], dtype=torch.float64))
    comfyui = comfyui_emphasis(z, e, w)
    assert torch.equal(comfyui, torch.tensor([[1, 2], [5, 7], [3, 3.5], [7, 8]], dtype=torch.float64))
    assert torch.equal(comfyui[[0, 3]], z[[0, 3]])


def float64_formulas(z, w, e):
    """The three formulas written out element by element in Python floats (float64)."""
    rows, channels = len(z), len(z[0])
    weighted = [[z[j][c] * w[j] for c in range(channels)] for j in range(rows)]
    factor = (sum(map(sum, z)) / (rows * channels)) / (sum(map(sum, weighted)) / (rows * channels))
    original = [[weighted[j][c] * factor for c in range(channels)] for j in range(rows)]
    comfyui = [[e[j][c] + w[j] * (z[j][c] - e[j][c]) if w[j] != 1.0 else z[j][c] for c in range(channels)] for j in range(rows)]
    return original, weighted, comfyui


def random_chunk(generator, rng, channels):
    z = torch.randn(77, channels, generator=generator, dtype=torch.float64) * 0.8 + 0.05
    e = torch.randn(77, channels, generator=generator, dtype=torch.float64)
    w = [1.0] + [rng.choice([1.0, 1.0, 1.0, 1.1, 1.21, 1 / 1.1, 1.4300000000000002, 0.5, 0.0, -1.1, 2.0]) for _ in range(75)] + [1.0]
    return z, e, w


def test_random_chunks_against_the_formulas_in_float64():
    generator, rng = torch.Generator().manual_seed(0), random.Random(0)
    for channels in (2, 32, 64):
        z, e, w = random_chunk(generator, rng, channels)
        original, no_norm, comfyui = float64_formulas(z.tolist(), w, e.tolist())
        weights = torch.tensor(w, dtype=torch.float64)
        torch.testing.assert_close(webui_original_emphasis(z, weights), torch.tensor(original, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(webui_no_norm_emphasis(z, weights), torch.tensor(no_norm, dtype=torch.float64), rtol=0, atol=0)
        torch.testing.assert_close(comfyui_emphasis(z, e, weights), torch.tensor(comfyui, dtype=torch.float64),
                                   rtol=1e-15, atol=1e-15)
        # and in float32, as the encoder runs, to float32 rounding
        torch.testing.assert_close(webui_original_emphasis(z.float(), weights.float()).double(),
                                   torch.tensor(original, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_webui_emphasis_is_webuis_emphasis_classes_bit_for_bit():
    """process_tokens: multipliers as torch.asarray of Python floats (float32), z float32 (B, 77, C); B = 1 for a
    prompt without schedule, B = 2 where two texts share the chunk's mean."""
    generator, rng = torch.Generator().manual_seed(1), random.Random(1)
    for channels in (32, 64, 768):
        z, _, w = random_chunk(generator, rng, channels)
        z = z.float()
        weights = torch.tensor(w)
        assert torch.equal(webui_original_emphasis(z, weights), ui.webui_emphasis(ui.EmphasisOriginal, z[None].clone(), [w])[0])
        assert torch.equal(webui_no_norm_emphasis(z, weights),
                           ui.webui_emphasis(ui.EmphasisOriginalNoNorm, z[None].clone(), [w])[0])
        other, _, w2 = random_chunk(generator, rng, channels)
        batch = torch.stack([z, other.float()])
        shared = ui.webui_emphasis(ui.EmphasisOriginal, batch.clone(), [w, w2])
        assert torch.equal(webui_original_emphasis(batch, torch.tensor([w, w2])), shared)
        assert not torch.equal(shared[0], webui_original_emphasis(z, weights))  # the second text moves the first's factor
    # all weights 1: the chunk is unchanged (factor mean/mean = 1)
    z = torch.randn(77, 64, generator=generator)
    assert torch.equal(webui_original_emphasis(z, torch.ones(77)), z)


def test_comfyui_emphasis_is_encode_token_weights_bit_for_bit():
    """encode_token_weights on 3 chunks, the empty prompt's states encoded last; weight-1 positions are the encoder's
    own states to the bit, the others equal too (the same float32 operations)."""
    generator, rng = torch.Generator().manual_seed(2), random.Random(2)
    for channels in (32, 64, 1280):
        chunks = [random_chunk(generator, rng, channels) for _ in range(3)]
        z = torch.stack([c[0] for c in chunks]).float()
        empty = chunks[0][1].float()
        weights = [c[2] for c in chunks]
        encoder = ui.ClipTokenWeightEncoder(lambda to_encode: (torch.cat([z.clone(), empty[None]]), None),
                                            {"start": START, "end": END, "pad": END})
        expected, _ = encoder.encode_token_weights([[(0, weight) for weight in row] for row in weights])
        ours = comfyui_emphasis(z, empty, torch.tensor(weights))
        assert torch.equal(ours.reshape(1, -1, channels), expected)
        unit = torch.tensor(weights) == 1.0
        assert torch.equal(ours[unit], z[unit])
    assert ui.gen_empty_tokens({"start": START, "end": END, "pad": 0}, 77) == [START, END] + [0] * 75

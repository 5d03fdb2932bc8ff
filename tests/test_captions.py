"""kohya's caption options (common.captions): every option alone and combined draws, seed for seed, the caption
sd-scripts' process_caption draws (reproduced in kohya_captions.py) with the same draws of the generator; the four
options the trainer had already draw what its earlier transformed_caption drew; bad values are refused in one line."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from common.captions import CaptionOptions, caption_from_file, processed_caption
from common.cli import UserError
from kohya_captions import process_caption, read_caption

# our field -> kohya's subset attribute, written out here rather than read from the module under test
KOHYA_NAME = {"shuffle": "shuffle_caption", "keep_tokens": "keep_tokens", "keep_tokens_separator": "keep_tokens_separator",
              "caption_separator": "caption_separator", "secondary_separator": "secondary_separator",
              "caption_prefix": "caption_prefix", "caption_suffix": "caption_suffix", "dropout": "caption_dropout_rate",
              "dropout_every_n_epochs": "caption_dropout_every_n_epochs", "tag_dropout": "caption_tag_dropout_rate",
              "enable_wildcard": "enable_wildcard"}

CAPTIONS = [
    "sks dog, on grass,  sunny, wide angle ,photo, 35mm",
    "sks dog",
    "",
    "a, , b,",
    "1girl, hatsune miku, vocaloid ||| stage, microphone, white shirt, smile ||| best quality, rating: general",
    "aaa ||| bbb, ccc ||| ddd ||| eee, fff",
    "head only |||",
    "1girl, hatsune miku, vocaloid, upper body, looking at viewer, sky;;;cloud;;;day, outdoors",
    "1girl, {simple|white|black} background, {a|b}, {{retro style}}, {single}, sky;;;{cloud|rain}",
    "{{{a|b}}}, {a}}, {{b}, }{, {a{b|c}, {|x}",
    "1girl, hatsune miku, vocaloid\na girl with a microphone, {on|off} stage\ndetailed art ||| of a girl, on a stage",
    "line one; a; b; c\nline two; d; e\n\nline four; {f|g}",
]

ALONE = {
    "shuffle": CaptionOptions(shuffle=True),
    "keep_tokens": CaptionOptions(keep_tokens=2),
    "keep_tokens_separator": CaptionOptions(keep_tokens_separator="|||"),
    "caption_separator": CaptionOptions(caption_separator=";"),
    "secondary_separator": CaptionOptions(secondary_separator=";;;"),
    "caption_prefix": CaptionOptions(caption_prefix="masterpiece, best quality,"),
    "caption_suffix": CaptionOptions(caption_suffix=", from side"),
    "dropout": CaptionOptions(dropout=0.3),
    "dropout_every_n_epochs": CaptionOptions(dropout_every_n_epochs=2),
    "tag_dropout": CaptionOptions(tag_dropout=0.3),
    "enable_wildcard": CaptionOptions(enable_wildcard=True),
}

COMBINED = {
    "shuffle, keep_tokens": CaptionOptions(shuffle=True, keep_tokens=1),
    "shuffle, keep_tokens past short captions": CaptionOptions(shuffle=True, keep_tokens=4),
    "tag dropout, keep_tokens": CaptionOptions(tag_dropout=0.4, keep_tokens=2),
    "shuffle, separator markers": CaptionOptions(shuffle=True, keep_tokens=2, keep_tokens_separator="|||",
                                                  secondary_separator=";;;"),
    "tag dropout, separator markers": CaptionOptions(tag_dropout=0.3, keep_tokens_separator="|||", secondary_separator=";;;"),
    "shuffle, other separator": CaptionOptions(shuffle=True, caption_separator=";", keep_tokens=1),
    "shuffle, prefix, suffix, keep_tokens": CaptionOptions(shuffle=True, keep_tokens=2, caption_prefix="masterpiece,",
                                                           caption_suffix=", from side"),
    "docs' prefix and suffix with markers": CaptionOptions(
        shuffle=True, tag_dropout=0.1, keep_tokens_separator="|||", secondary_separator=";;;", enable_wildcard=True,
        caption_prefix="1girl, hatsune miku, vocaloid |||", caption_suffix=", anime screencap ||| masterpiece, rating: general"),
    "wildcard, shuffle, tag dropout": CaptionOptions(enable_wildcard=True, shuffle=True, tag_dropout=0.2, keep_tokens=1),
    "wildcard, prefix, suffix": CaptionOptions(enable_wildcard=True, caption_prefix="p", caption_suffix="s"),
    "every dropout": CaptionOptions(dropout=0.2, dropout_every_n_epochs=3, tag_dropout=0.2, shuffle=True),
    "everything": CaptionOptions(shuffle=True, keep_tokens=1, keep_tokens_separator="|||", secondary_separator=";;;",
                                 caption_prefix="pre,", caption_suffix=", post", dropout=0.15, dropout_every_n_epochs=4,
                                 tag_dropout=0.25, enable_wildcard=True),
}


def kohyas(caption: str, options: CaptionOptions, rng: random.Random, epoch: int) -> str:
    subset = {KOHYA_NAME[name]: getattr(options, name) for name in KOHYA_NAME}
    return process_caption(caption, rng, epoch, **subset)


def assert_draws_as_kohya(options: CaptionOptions, seeds: range, epochs=(1, 2, 3, 4)) -> set[str]:
    """Ours equals kohya's caption, and leaves the generator where kohya's leaves it, for every caption, seed and epoch."""
    drawn = set()
    for caption in CAPTIONS:
        for epoch in epochs:
            for seed in seeds:
                ours_rng, kohya_rng = random.Random(seed), random.Random(seed)
                ours, theirs = processed_caption(caption, options, ours_rng, epoch), kohyas(caption, options, kohya_rng, epoch)
                assert ours == theirs, (caption, epoch, seed, ours, theirs)
                assert ours_rng.getstate() == kohya_rng.getstate(), f"a different number of draws: {caption!r} seed {seed}"
                drawn.add(ours)
    return drawn


@pytest.mark.parametrize("name", ALONE)
def test_each_option_alone_draws_kohyas_caption_for_every_seed(name):
    options = ALONE[name].check()
    assert_draws_as_kohya(options, range(300))


@pytest.mark.parametrize("name", COMBINED)
def test_options_combined_draw_kohyas_caption_for_every_seed(name):
    options = COMBINED[name].check()
    drawn = assert_draws_as_kohya(options, range(200))
    assert len(drawn) > len(CAPTIONS), f"{len(drawn)} different captions from {len(CAPTIONS)}: the draws should differ"


def test_random_combinations_of_options_draw_kohyas_caption():
    pick = random.Random(30)
    values = {"shuffle": [False, True], "keep_tokens": [0, 1, 3], "keep_tokens_separator": [None, "", "|||"],
              "caption_separator": [",", ";"], "secondary_separator": [None, ";;;"], "caption_prefix": [None, "", "a, b,"],
              "caption_suffix": [None, "y ||| z"], "dropout": [0.0, 0.3], "dropout_every_n_epochs": [0, 1, 2, 3],
              "tag_dropout": [0.0, 0.5], "enable_wildcard": [False, True]}
    checked = 0
    for _ in range(200):
        options = CaptionOptions(**{name: pick.choice(choices) for name, choices in values.items()})
        if options.caption_separator == ";" and options.secondary_separator:
            continue  # refused: see test_hostile_values_are_refused_in_one_line
        assert_draws_as_kohya(options.check(), range(pick.randrange(1000), 1000, 97), epochs=(0, 1, 2, 5, 6))
        checked += 1
    assert checked > 130


def transformed_caption(caption: str, shuffle: bool, keep_tokens: int, dropout: float, tag_dropout: float, rng) -> str:
    """What the trainer drew before common.captions replaced it (common/data.py at 0eb5e63, `transformed_caption`), kept
    here so that the replacement is shown to draw the same captions for the options it had: a run resumed across the
    change, or repeated, trains on the same captions."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not (shuffle or tag_dropout > 0):
        return caption
    tags = [tag.strip() for tag in caption.strip().split(",")]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        rng.shuffle(rest)
    if tag_dropout > 0:
        rest = [tag for tag in rest if rng.random() >= tag_dropout]
    return ", ".join(kept + rest)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("keep_tokens", [0, 1, 3])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("tag_dropout", [0.0, 0.3])
def test_the_trainers_four_caption_options_draw_what_transformed_caption_drew(shuffle, keep_tokens, dropout, tag_dropout):
    options = CaptionOptions(shuffle=shuffle, keep_tokens=keep_tokens, dropout=dropout, tag_dropout=tag_dropout).check()
    assert options.changes_per_draw == (shuffle or dropout > 0 or tag_dropout > 0)
    # captions as the trainer reads them: one line, stripped
    for caption in [c for c in CAPTIONS if "\n" not in c] + ["a photo of sks dog", "sks dog, tag0a, tag0b, tag0c, tag0d"]:
        for seed in range(300):
            ours_rng, before_rng = random.Random(seed), random.Random(seed)
            ours = processed_caption(caption, options, ours_rng, epoch=1 + seed % 5)
            before = transformed_caption(caption, shuffle, keep_tokens, dropout, tag_dropout, before_rng)
            assert ours == before, (caption, seed, ours, before)
            assert ours_rng.getstate() == before_rng.getstate(), f"a different number of draws: {caption!r} seed {seed}"


def test_no_options_leave_a_one_line_caption_as_it_is_and_draw_nothing():
    options = CaptionOptions().check()
    assert not options.changes_per_draw
    for caption in [c for c in CAPTIONS if "\n" not in c]:
        rng = random.Random(0)
        state = rng.getstate()
        assert processed_caption(caption, options, rng, epoch=1) == caption
        assert rng.getstate() == state


def draws(caption: str, options: CaptionOptions, seeds=range(300), epoch: int = 1) -> list[str]:
    return [processed_caption(caption, options, random.Random(seed), epoch) for seed in seeds]


def test_keep_tokens_separator_keeps_the_head_and_tail_and_shuffles_the_middle_as_kohyas_docs_say():
    caption = "1girl, hatsune miku, vocaloid ||| stage, microphone, white shirt, smile ||| best quality, rating: general"
    drawn = draws(caption, CaptionOptions(shuffle=True, keep_tokens=5, keep_tokens_separator="|||"))
    middles = set()
    for text in drawn:
        tags = text.split(", ")
        assert tags[:3] == ["1girl", "hatsune miku", "vocaloid"] and tags[-2:] == ["best quality", "rating: general"], text
        assert sorted(tags[3:-2]) == sorted(["stage", "microphone", "white shirt", "smile"]), text
        middles.add(tuple(tags[3:-2]))
    assert len(middles) == 24, f"{len(middles)} orders of the 4 middle tags drawn in 300 draws"


def test_keep_tokens_separator_stays_in_the_caption_without_shuffle_or_tag_dropout_as_in_kohya():
    caption = "aaa ||| bbb, ccc ||| ddd"
    assert draws(caption, CaptionOptions(keep_tokens_separator="|||"), range(3)) == [caption] * 3
    assert set(draws(caption, CaptionOptions(keep_tokens_separator="|||", tag_dropout=0.01))) >= {"aaa, bbb, ccc, ddd"}


def test_secondary_separator_joins_its_parts_into_one_tag_kept_or_dropped_whole():
    caption = "1girl, hatsune miku, vocaloid, upper body, looking at viewer, sky;;;cloud;;;day, outdoors"
    drawn = draws(caption, CaptionOptions(shuffle=True, tag_dropout=0.4, secondary_separator=";;;"))
    for text in drawn:
        tags = text.split(", ")
        assert ";;;" not in text and all(t == "sky,cloud,day" or not {"sky", "cloud", "day"} & set(t.split(",")) for t in tags), text
    assert sum("sky,cloud,day" in text for text in drawn) not in (0, len(drawn)), "kept in some draws, dropped in others"
    assert draws(caption, CaptionOptions(secondary_separator=";;;"), range(1)) == [caption.replace(";;;", ",")]


def test_wildcards_draw_each_choice_and_doubled_braces_stand_for_braces():
    drawn = draws("1girl, {simple|white|black} background, {{retro style}}", CaptionOptions(enable_wildcard=True))
    assert set(drawn) == {f"1girl, {c} background, {{retro style}}" for c in ("simple", "white", "black")}, set(drawn)
    assert draws("{a|b}", CaptionOptions(), range(1)) == ["{a|b}"], "wildcards are text unless enable_wildcard"


def test_a_multi_line_caption_draws_one_line_with_wildcard_else_gives_its_first():
    caption = "line one, a\nline two, {b|c}\nline three"
    drawn = set(draws(caption, CaptionOptions(enable_wildcard=True)))
    assert drawn == {"line one, a", "line two, b", "line two, c", "line three"}, drawn
    assert set(draws(caption, CaptionOptions(shuffle=True))) <= {"line one, a", "a, line one"}


def test_prefix_and_suffix_are_joined_with_a_space_and_counted_as_the_captions_tags():
    options = CaptionOptions(caption_prefix="masterpiece,", caption_suffix=", from side")
    assert draws("sks dog", options, range(1)) == ["masterpiece, sks dog , from side"]
    # keep_tokens = 1 keeps the prefix's tag, and the suffix's is shuffled with the caption's
    shuffled = set(draws("sks dog, grass", replace(options, shuffle=True, keep_tokens=1)))
    assert all(d.startswith("masterpiece, ") for d in shuffled), shuffled
    assert {d.split(", ")[1] for d in shuffled} == {"sks dog", "grass", "from side"}, shuffled
    # on a multi-line caption the prefix goes on the first line only, the suffix on the last only
    lines = set(draws("one\ntwo\nthree", replace(options, enable_wildcard=True)))
    assert lines == {"masterpiece, one", "two", "three , from side"}, lines


@pytest.mark.parametrize("every", [1, 2, 3])
def test_dropout_every_n_epochs_empties_every_caption_of_epochs_n_2n_counted_from_1(every):
    for epoch in range(1, 10):
        drawn = set(draws("sks dog, grass", CaptionOptions(dropout_every_n_epochs=every, shuffle=True), range(50), epoch))
        dropped = epoch % every == 0
        assert (drawn == {""}) == dropped and ("" in drawn) == dropped, (every, epoch, drawn)


def test_the_caption_dropout_draw_is_made_even_in_an_epoch_that_drops_every_caption():
    rng, plain = random.Random(5), random.Random(5)
    assert processed_caption("a, b", CaptionOptions(dropout=0.1, dropout_every_n_epochs=2), rng, epoch=2) == ""
    plain.random()
    assert rng.getstate() == plain.getstate()


def test_caption_dropout_empties_about_its_share_of_captions():
    drawn = draws("sks dog, grass", CaptionOptions(dropout=0.3), range(2000))
    share = drawn.count("") / len(drawn)
    assert 0.26 < share < 0.34, f"{share:.3f} of captions dropped at caption_dropout_rate 0.3"


def test_doubled_braces_beside_kohyas_placeholder_characters_keep_their_place():
    # kohya's placeholders grow to ⦅⦅ here, and the brace it puts back lands on the wrong side of the caption's ⦅
    caption = "⦅{{a}}"
    assert kohyas(caption, CaptionOptions(enable_wildcard=True), random.Random(0), 1) == "{⦅a}"
    assert processed_caption(caption, CaptionOptions(enable_wildcard=True), random.Random(0), 1) == "⦅{a}"


@pytest.mark.parametrize("text", [
    "sks dog, grass\nsecond line\n", "  sks dog  \r\n\r\nsecond {a|b}\r\n", "first\rsecond\rthird", "\n\nthird only\n",
    "one line", "   \n  \n", "\n", "tab\tinside, \x0bvertical\ttab \n next", "a\u2028b\nc", "\ufeffmarked\nnext",
])
@pytest.mark.parametrize("enable_wildcard", [False, True])
def test_a_caption_files_text_reads_as_kohya_reads_the_file(text, enable_wildcard, tmp_path):
    path = tmp_path / "image.txt"
    path.write_bytes(text.encode("utf-8"))
    assert caption_from_file(text, enable_wildcard) == read_caption(path, enable_wildcard)


def test_a_caption_file_gives_its_first_line_or_with_wildcard_its_lines():
    text = " sks dog, grass \n\n  a dog on grass\n"
    assert caption_from_file(text, enable_wildcard=False) == "sks dog, grass"
    assert caption_from_file(text, enable_wildcard=True) == "sks dog, grass\na dog on grass"


HOSTILE = {
    "dropout 1": ({"dropout": 1.0}, "caption_dropout_rate 1.0: give a number in [0, 1)"),
    "dropout negative": ({"dropout": -0.1}, "caption_dropout_rate -0.1: "),
    "dropout NaN": ({"dropout": float("nan")}, "caption_dropout_rate nan: "),
    "dropout infinite": ({"dropout": float("inf")}, "caption_dropout_rate inf: "),
    "dropout text": ({"dropout": "0.1"}, "caption_dropout_rate '0.1': "),
    "dropout true": ({"dropout": True}, "caption_dropout_rate True: "),
    "tag dropout 1": ({"tag_dropout": 1}, "caption_tag_dropout_rate 1: give a number in [0, 1)"),
    "tag dropout NaN": ({"tag_dropout": float("nan")}, "caption_tag_dropout_rate nan: "),
    "keep_tokens negative": ({"keep_tokens": -1}, "keep_tokens -1: give a whole number >= 0"),
    "keep_tokens fraction": ({"keep_tokens": 1.5}, "keep_tokens 1.5: "),
    "keep_tokens true": ({"keep_tokens": True}, "keep_tokens True: "),
    "every n negative": ({"dropout_every_n_epochs": -2}, "caption_dropout_every_n_epochs -2: give a whole number >= 0"),
    "every n fraction": ({"dropout_every_n_epochs": 2.0}, "caption_dropout_every_n_epochs 2.0: "),
    "empty separator": ({"caption_separator": ""}, "caption_separator '': give non-empty text"),
    "no separator": ({"caption_separator": None}, "caption_separator None: "),
    "separator number": ({"caption_separator": 1}, "caption_separator 1: "),
    "marker number": ({"keep_tokens_separator": 3}, "keep_tokens_separator 3: give text"),
    "prefix list": ({"caption_prefix": ["a"]}, "caption_prefix ['a']: give text"),
    "suffix number": ({"caption_suffix": 2}, "caption_suffix 2: give text"),
    "shuffle text": ({"shuffle": "yes"}, "shuffle_caption 'yes': give true or false"),
    "wildcard number": ({"enable_wildcard": 1}, "enable_wildcard 1: give true or false"),
    "secondary holds the separator": ({"secondary_separator": ",,"}, "secondary_separator ',,' holds caption_separator ','"),
    "secondary holds another separator": ({"caption_separator": ";", "secondary_separator": ";;;"},
                                          "secondary_separator ';;;' holds caption_separator ';'"),
    "secondary is the marker": ({"secondary_separator": "|||", "keep_tokens_separator": "|||"},
                                "secondary_separator '|||' is also keep_tokens_separator"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_values_are_refused_in_one_line(case):
    values, message = HOSTILE[case]
    with pytest.raises(UserError) as refused:
        CaptionOptions(**values).check()
    text = str(refused.value)
    assert text.startswith(message) and "\n" not in text, text


def test_options_that_draw_change_captions_per_draw_and_fixed_text_does_not():
    drawing = {"shuffle", "dropout", "dropout_every_n_epochs", "tag_dropout", "enable_wildcard"}
    for name, options in ALONE.items():
        assert options.changes_per_draw == (name in drawing), name
    fixed = CaptionOptions(caption_prefix="a", caption_suffix="b", secondary_separator=";;;", keep_tokens=2)
    assert not fixed.changes_per_draw and len(set(draws("x;;;y, z", fixed, range(20)))) == 1

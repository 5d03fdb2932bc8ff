"""kohya sd-scripts' caption processing, reproduced from its source as written there (its branches, its order, its
calls of Python's `random`), for the tests to check common.captions against.

Source: kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb (2026-02-16), library/train_util.py:
BaseDataset.process_caption, and read_caption inside DreamBoothDataset.__init__. Departures, all of them no-ops for
the options reproduced: kohya's module-level `random.random()`, `random.choice` and `random.shuffle` are called on
the `rng` passed in; the subset's attributes are keyword arguments (kohya's names, with its defaults); token warm-up
(token_warmup_min, token_warmup_step) is left at kohya's default, off, and its branch left out; the textual-inversion
`replacements` are left at the default, none, and their loop left out.
"""

from __future__ import annotations

import os
import random
import re

KOHYA_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"


def process_caption(caption: str, rng: random.Random, current_epoch: int, *, caption_prefix: str | None = None,
                    caption_suffix: str | None = None, caption_dropout_rate: float = 0.0,
                    caption_dropout_every_n_epochs: int = 0, enable_wildcard: bool = False, shuffle_caption: bool = False,
                    caption_tag_dropout_rate: float = 0.0, keep_tokens_separator: str | None = None,
                    caption_separator: str = ",", keep_tokens: int = 0, secondary_separator: str | None = None) -> str:
    """BaseDataset.process_caption(subset, caption) with `self.current_epoch` = `current_epoch`."""
    if caption_prefix:
        caption = caption_prefix + " " + caption
    if caption_suffix:
        caption = caption + " " + caption_suffix

    is_drop_out = caption_dropout_rate > 0 and rng.random() < caption_dropout_rate
    is_drop_out = (
        is_drop_out
        or caption_dropout_every_n_epochs > 0
        and current_epoch % caption_dropout_every_n_epochs == 0
    )

    if is_drop_out:
        caption = ""
    else:
        if enable_wildcard:
            if "\n" in caption:
                caption = rng.choice(caption.split("\n"))

            replacer1 = "⦅"
            replacer2 = "⦆"
            while replacer1 in caption or replacer2 in caption:
                replacer1 += "⦅"
                replacer2 += "⦆"

            caption = caption.replace("{{", replacer1).replace("}}", replacer2)

            def replace_wildcard(match):
                return rng.choice(match.group(1).split("|"))

            caption = re.sub(r"\{([^}]+)\}", replace_wildcard, caption)

            caption = caption.replace(replacer1, "{").replace(replacer2, "}")
        else:
            caption = caption.split("\n")[0]

        if shuffle_caption or caption_tag_dropout_rate > 0:
            fixed_tokens = []
            flex_tokens = []
            fixed_suffix_tokens = []
            if keep_tokens_separator and keep_tokens_separator in caption:
                fixed_part, flex_part = caption.split(keep_tokens_separator, 1)
                if keep_tokens_separator in flex_part:
                    flex_part, fixed_suffix_part = flex_part.split(keep_tokens_separator, 1)
                    fixed_suffix_tokens = [t.strip() for t in fixed_suffix_part.split(caption_separator) if t.strip()]

                fixed_tokens = [t.strip() for t in fixed_part.split(caption_separator) if t.strip()]
                flex_tokens = [t.strip() for t in flex_part.split(caption_separator) if t.strip()]
            else:
                tokens = [t.strip() for t in caption.strip().split(caption_separator)]
                flex_tokens = tokens[:]
                if keep_tokens > 0:
                    fixed_tokens = flex_tokens[:keep_tokens]
                    flex_tokens = tokens[keep_tokens:]

            def dropout_tags(tokens):
                if caption_tag_dropout_rate <= 0:
                    return tokens
                l = []
                for token in tokens:
                    if rng.random() >= caption_tag_dropout_rate:
                        l.append(token)
                return l

            if shuffle_caption:
                rng.shuffle(flex_tokens)

            flex_tokens = dropout_tags(flex_tokens)

            caption = ", ".join(fixed_tokens + flex_tokens + fixed_suffix_tokens)

        if secondary_separator:
            caption = caption.replace(secondary_separator, caption_separator)

    return caption


def read_caption(cap_path: str | os.PathLike, enable_wildcard: bool) -> str:
    """read_caption's reading of one caption file that exists (its search for the file left out)."""
    with open(cap_path, "rt", encoding="utf-8") as f:
        lines = f.readlines()
        assert len(lines) > 0, f"caption file is empty / キャプションファイルが空です: {cap_path}"
        if enable_wildcard:
            caption = "\n".join([line.strip() for line in lines if line.strip() != ""])
        else:
            caption = lines[0].strip()
    return caption

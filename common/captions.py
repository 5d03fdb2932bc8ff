"""kohya's caption options, one record per subset (`CaptionOptions`), and the caption an example trains on drawn from
its image's caption (`processed_caption`), a pure function of the caption, the options, a generator and the epoch.

Reference: kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb (2026-02-16),
library/train_util.py: BaseDataset.process_caption (what each option does, in which order, and the draws of Python's
`random` it makes) and read_caption in DreamBoothDataset.__init__ (which lines of a caption file are read). The options'
documented meaning is in that commit's docs/config_README-en.md. kohya's token warm-up (token_warmup_min,
token_warmup_step) is not supported.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, fields

from common.cli import UserError

KOHYA_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"


def _kohya(name: str, default):
    """A field and the name kohya's files and flags give it, which the refusals use."""
    return field(default=default, metadata={"kohya": name})


@dataclass(frozen=True)
class CaptionOptions:
    """kohya's caption options of one subset, under kohya's defaults. A text option that is None or empty is off, as
    in kohya."""

    shuffle: bool = _kohya("shuffle_caption", False)
    keep_tokens: int = _kohya("keep_tokens", 0)  # tags at the start that are neither shuffled nor dropped
    keep_tokens_separator: str | None = _kohya("keep_tokens_separator", None)  # marks the kept head (and tail)
    caption_separator: str = _kohya("caption_separator", ",")
    secondary_separator: str | None = _kohya("secondary_separator", None)  # joins parts into one tag
    caption_prefix: str | None = _kohya("caption_prefix", None)
    caption_suffix: str | None = _kohya("caption_suffix", None)
    dropout: float = _kohya("caption_dropout_rate", 0.0)
    dropout_every_n_epochs: int = _kohya("caption_dropout_every_n_epochs", 0)
    tag_dropout: float = _kohya("caption_tag_dropout_rate", 0.0)
    enable_wildcard: bool = _kohya("enable_wildcard", False)

    @property
    def changes_per_draw(self) -> bool:
        """Whether one caption can come out differently from one draw to the next (a random draw, or an epoch that
        drops every caption); if not, an image's processed caption is the same every time and can be encoded once."""
        return (self.shuffle or self.enable_wildcard or self.dropout > 0 or self.tag_dropout > 0
                or self.dropout_every_n_epochs > 0)

    def check(self) -> CaptionOptions:
        """These options, or a UserError naming kohya's option, the value and what is accepted."""
        for option in fields(self):
            value = getattr(self, option.name)
            accepts, accepted = ACCEPTED[option.name]
            if not accepts(value):
                raise UserError(f"{option.metadata['kohya']} {value!r}: {accepted}")
        if self.secondary_separator and self.caption_separator in self.secondary_separator:
            # its parts would be split apart as separate tags before it is replaced, so they would not stay one tag
            raise UserError(f"secondary_separator {self.secondary_separator!r} holds caption_separator "
                            f"{self.caption_separator!r}: choose one without it, e.g. ';;;'")
        if self.secondary_separator and self.secondary_separator == self.keep_tokens_separator:
            raise UserError(f"secondary_separator {self.secondary_separator!r} is also keep_tokens_separator: give them "
                            "different text, e.g. ';;;' and '|||'")
        return self


def _is_flag(value) -> bool:
    return isinstance(value, bool)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_rate(value) -> bool:
    # 1 would drop every caption (or tag): nothing of it would train; NaN compares false and fails too
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value < 1


def _is_text(value) -> bool:
    return value is None or isinstance(value, str)


def _is_separator(value) -> bool:
    return isinstance(value, str) and value != ""


ACCEPTED = {
    "shuffle": (_is_flag, "give true or false"),
    "keep_tokens": (_is_count, "give a whole number >= 0"),
    "keep_tokens_separator": (_is_text, "give text, e.g. '|||'"),
    "caption_separator": (_is_separator, "give non-empty text, e.g. ','"),
    "secondary_separator": (_is_text, "give text, e.g. ';;;'"),
    "caption_prefix": (_is_text, "give text"),
    "caption_suffix": (_is_text, "give text"),
    "dropout": (_is_rate, "give a number in [0, 1), e.g. 0.1"),
    "dropout_every_n_epochs": (_is_count, "give a whole number >= 0 (0: never)"),
    "tag_dropout": (_is_rate, "give a number in [0, 1), e.g. 0.1"),
    "enable_wildcard": (_is_flag, "give true or false"),
}


def caption_from_file(text: str, enable_wildcard: bool) -> str:
    """The caption kohya takes from a caption file's text: its first line, stripped; with `enable_wildcard`, every line
    that is not blank, stripped, joined by newlines (`processed_caption` then draws one of them each time). Lines end
    at \\n, \\r\\n or \\r, as in Python's text mode. kohya refuses a file of no bytes; refusing an empty caption is the
    caller's."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not enable_wildcard:
        return lines[0].strip()
    return "\n".join(line.strip() for line in lines if line.strip())


def processed_caption(caption: str, options: CaptionOptions, rng: random.Random, epoch: int) -> str:
    """One draw of the caption an example trains on, as kohya's BaseDataset.process_caption makes it, with its calls of
    Python's `random` made on `rng` in the same order, so that each seed gives kohya's caption (one departure:
    `_drawn_wildcards`).

    `epoch` counts as kohya's trainers set `current_epoch`: from 1 (`epoch + 1`), so that `dropout_every_n_epochs = n`
    drops every caption of epochs n, 2n, ... (kohya's collator sets the count after the batch it collates was drawn, so
    there a DataLoader worker's first batch of an epoch sees the previous count, 0 in a fresh worker; not reproduced.)

    In order: the prefix and suffix are joined on with a space (so a multi-line caption gets the prefix on its first
    line and the suffix on its last, and they are shuffled, dropped and counted by `keep_tokens` like the caption's own
    tags); the caption is dropped (one draw when `dropout` > 0, made even in an epoch that drops every caption);
    otherwise one line is kept (with `enable_wildcard` a drawn one, then each `{a|b}` drawn left to right, `{{` and `}}`
    standing for braces; else the first); if shuffling or tag dropout is on, the tags are split into a kept head, a
    shuffled and dropped middle and a kept tail, and joined with ", "; last the secondary separator becomes the caption
    separator. keep_tokens_separator is only removed when the tags are split: without shuffle or tag dropout it stays in
    the caption, as in kohya.
    """
    if options.caption_prefix:
        caption = f"{options.caption_prefix} {caption}"
    if options.caption_suffix:
        caption = f"{caption} {options.caption_suffix}"
    if _dropped(options, rng, epoch):
        return ""
    if options.enable_wildcard:  # a single line draws no line, as in kohya (a choice of one would take a draw)
        caption = _drawn_wildcards(rng.choice(caption.split("\n")) if "\n" in caption else caption, rng)
    else:
        caption = caption.split("\n")[0]
    if options.shuffle or options.tag_dropout > 0:
        head, middle, tail = _split_tags(caption, options)
        if options.shuffle:
            rng.shuffle(middle)
        if options.tag_dropout > 0:
            middle = [tag for tag in middle if rng.random() >= options.tag_dropout]
        caption = ", ".join(head + middle + tail)  # ", " whatever caption_separator is, as in kohya
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return caption


def _dropped(options: CaptionOptions, rng: random.Random, epoch: int) -> bool:
    drawn = options.dropout > 0 and rng.random() < options.dropout
    return drawn or (options.dropout_every_n_epochs > 0 and epoch % options.dropout_every_n_epochs == 0)


_WILDCARD = re.compile(r"\{([^}]+)\}")


def _drawn_wildcards(caption: str, rng: random.Random) -> str:
    """Each `{a|b|c}` replaced by one of its choices, drawn left to right; `{{` and `}}` (paired left to right) stand
    for literal braces. kohya holds those aside as runs of ⦅ and ⦆ that the caption does not hold, which can put a
    brace back on the wrong side of a ⦅ or ⦆ written next to it; single characters the caption does not hold, used
    here, cannot. Elsewhere the two agree."""
    unused = (chr(code) for code in range(0xE000, 0xF900) if chr(code) not in caption)  # Unicode's private use area
    left, right = next(unused), next(unused)
    held = caption.replace("{{", left).replace("}}", right)
    drawn = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), held)
    return drawn.replace(left, "{").replace(right, "}")


def _split_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(kept head, shuffled middle, kept tail) of a caption's tags. With keep_tokens_separator in the caption, its first
    two occurrences bound the middle and empty tags are left out; otherwise the first `keep_tokens` tags are the head
    and empty tags stay."""
    separator, marker = options.caption_separator, options.keep_tokens_separator
    if marker and marker in caption:
        head, _, rest = caption.partition(marker)
        middle, _, tail = rest.partition(marker)
        return tuple([tag.strip() for tag in part.split(separator) if tag.strip()] for part in (head, middle, tail))
    tags = [tag.strip() for tag in caption.strip().split(separator)]
    return tags[: options.keep_tokens], tags[options.keep_tokens :], []

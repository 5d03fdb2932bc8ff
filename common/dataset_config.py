"""kohya's dataset configuration read into finished records, and kohya's counting of an epoch as pure functions.

Two sources give the same records (`DatasetSpec`, each holding its `SubsetSpec`s): a `--dataset_config` file
(`read_dataset_config`) and kohya's folder layout, `N_name` folders in `--train_data_dir` and `--reg_data_dir`
(`datasets_from_folders`). Every option is resolved once, here, with kohya's precedence: a subset's own value, else
its dataset's, else `[general]`'s, else the command line's, else kohya's default. What comes out holds its own
caption and augmentation options; nothing after it consults the command line again.

Reference: kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb (2026-02-16):
library/config_util.py (ConfigSanitizer's schema: which key goes where; BlueprintGenerator's fallbacks;
generate_dreambooth_subsets_config_by_subdirs; load_user_config), library/train_util.py (DreamBoothDataset: repeats and
regularisation images; BaseDataset.make_buckets: batches; DatasetGroup; split_train_val) and train_network.py (one
DataLoader over all datasets). The file format is described in that commit's docs/config_README-en.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.cli import UserError
from common.files import has_images, parse_toml, read_text_file

logger = logging.getLogger(__name__)

KOHYA_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"


@dataclass(frozen=True)
class SubsetSpec:
    """One image folder and how its images train: kohya's DreamBooth subset, every option resolved. The defaults are
    kohya's: its argparse defaults where it has the option, else its DreamBoothSubsetParams'."""

    image_dir: Path
    num_repeats: int = 1
    class_tokens: str | None = None  # the caption of an image without a caption file
    is_reg: bool = False  # a regularisation (prior-preservation) folder
    caption_extension: str = ".caption"  # kohya's default; the kohya_ss GUI writes ".txt"
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    enable_wildcard: bool = False
    flip_aug: bool = False
    random_crop: bool = False  # kohya's default crop is centred
    alpha_mask: bool = False  # the loss mask is the image's alpha channel
    conditioning_data_dir: Path | None = None  # the loss masks: a file of each image's stem (kohya's masked_loss)
    resize_interpolation: str | None = None  # one of INTERPOLATIONS' values; None: the run's own choice


@dataclass(frozen=True)
class DatasetSpec:
    """Subsets trained at one resolution and batch size: kohya's dataset. The defaults are kohya's."""

    resolution: tuple[int, int]  # (width, height), kohya's order
    subsets: tuple[SubsetSpec, ...]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None


# kohya's interpolation names (library/utils.py) as PIL's, which common.data resizes with. OpenCV's INTER_AREA,
# kohya's "area", averages the source pixels under each target pixel when shrinking, as PIL's box filter does.
INTERPOLATIONS = {"lanczos": "lanczos", "nearest": "nearest", "bilinear": "bilinear", "linear": "bilinear",
                  "bicubic": "bicubic", "cubic": "bicubic", "area": "box", "box": "box"}


# --- what each key accepts -------------------------------------------------------------------------------------

class _Rejected(Exception):
    """A value a key does not accept; its text says what is accepted."""


def _integer(minimum: int | None) -> Callable[[Any], int]:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Rejected(f"give a whole number{f' >= {minimum}' if minimum is not None else ''}{_unquote_hint(value)}")
        if minimum is not None and value < minimum:
            raise _Rejected(f"give a whole number >= {minimum}")
        return value
    return check


def _fraction(value) -> float:
    """A probability or share: a finite number in [0, 1) (a whole caption dropped every time trains nothing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Rejected(f"give a number in [0, 1), e.g. 0.1{_unquote_hint(value)}")
    if not math.isfinite(value) or not 0 <= value < 1:
        raise _Rejected("give a number in [0, 1), e.g. 0.1")
    return float(value)


def _boolean(value) -> bool:
    if not isinstance(value, bool):
        raise _Rejected("give true or false (without quotes)")
    return value


def _text(value) -> str:
    if not isinstance(value, str):
        raise _Rejected("give text in quotes")
    return value


def _nonempty_text(value) -> str:
    if not isinstance(value, str) or not value:
        raise _Rejected("give non-empty text in quotes")
    return value


def _caption_extension(value) -> str:
    """kohya puts the dot before an extension written without one (DreamBoothSubset)."""
    value = _nonempty_text(value)
    return value if value.startswith(".") else f".{value}"


def _resolution(value) -> tuple[int, int]:
    """One side (a square) or [width, height], as kohya's `resolution`."""
    accepted = "give one side, e.g. 1024, or [width, height], e.g. [1024, 1024]"
    if isinstance(value, (list, tuple)) and len(value) == 2:
        sides = tuple(value)
    else:
        sides = (value, value)
    if any(isinstance(side, bool) or not isinstance(side, int) or side < 1 for side in sides):
        raise _Rejected(accepted + _unquote_hint(value))
    return sides


def _interpolation(value) -> str:
    if value not in INTERPOLATIONS:
        raise _Rejected(f"give one of {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[value]


def _unquote_hint(value) -> str:
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return ""
        return f" (without quotes: {value})"
    return ""


# What each key accepts; a key's default is its record field's. Dataset keys: in [general] or [[datasets]] (kohya's
# DATASET_ASCENDABLE_SCHEMA)
DATASET_KEYS: dict[str, Callable] = {
    "resolution": _resolution,
    "batch_size": _integer(1),
    "enable_bucket": _boolean,
    "min_bucket_reso": _integer(1),
    "max_bucket_reso": _integer(1),
    "bucket_reso_steps": _integer(1),
    "bucket_no_upscale": _boolean,
    "validation_split": _fraction,
    "validation_seed": _integer(None),
}
# Subset keys: at every level, the lowest winning (SUBSET_ASCENDABLE, DB_SUBSET_ASCENDABLE, DO_SUBSET_ASCENDABLE)
SUBSET_KEYS: dict[str, Callable] = {
    "num_repeats": _integer(1),
    "class_tokens": _text,
    "caption_extension": _caption_extension,
    "shuffle_caption": _boolean,
    "caption_separator": _nonempty_text,
    "keep_tokens": _integer(0),
    "keep_tokens_separator": _text,
    "secondary_separator": _nonempty_text,
    "caption_prefix": _text,
    "caption_suffix": _text,
    "caption_dropout_rate": _fraction,
    "caption_dropout_every_n_epochs": _integer(0),
    "caption_tag_dropout_rate": _fraction,
    "enable_wildcard": _boolean,
    "flip_aug": _boolean,
    "random_crop": _boolean,
    "resize_interpolation": _interpolation,
}
# Keys of [[datasets.subsets]] alone (DB_SUBSET_DISTINCT_SCHEMA; conditioning_data_dir from CN_SUBSET_DISTINCT_SCHEMA)
SUBSET_ONLY_KEYS: dict[str, Callable] = {
    "image_dir": _nonempty_text,
    "is_reg": _boolean,
    "alpha_mask": _boolean,
    "conditioning_data_dir": _nonempty_text,
}
# kohya's keys that this toolkit does not do: accepted at kohya's default (configs carry `color_aug = false`), refused
# otherwise; (kohya's default, where kohya allows the key, why it is refused)
UNSUPPORTED_KEYS: dict[str, tuple[Any, str, str]] = {
    "color_aug": (False, "subset", "no colour augmentation here"),
    "face_crop_aug_range": (None, "subset", "no face-centred crops here"),
    "token_warmup_min": (1, "subset", "no token warm-up here: every caption keeps all its tags"),
    "token_warmup_step": (0, "subset", "no token warm-up here: every caption keeps all its tags"),
    "custom_attributes": (None, "subset", "no per-subset custom attributes here"),
    "cache_info": (False, "subset", "image sizes and captions are read afresh each run; cached latents go to --disk_cache_dir"),
    "network_multiplier": (1.0, "dataset", "every dataset trains the adapter at multiplier 1"),
    "metadata_file": (None, "subset only", "kohya's fine-tuning subsets, captioned by --in_json metadata, are not read here; "
                                           "give image_dir with caption files, or a metadata.jsonl imagefolder as --train_data_dir"),
}
# Where a key may be written: the sections a level accepts, by kohya's schema
_LEVEL_KEYS = {
    "general": set(DATASET_KEYS) | set(SUBSET_KEYS) | {k for k, v in UNSUPPORTED_KEYS.items() if v[1] != "subset only"},
    "dataset": set(DATASET_KEYS) | set(SUBSET_KEYS) | {k for k, v in UNSUPPORTED_KEYS.items() if v[1] != "subset only"},
    "subset": set(SUBSET_KEYS) | set(SUBSET_ONLY_KEYS) | {k for k, v in UNSUPPORTED_KEYS.items() if v[1] != "dataset"},
}
_CHECKS = DATASET_KEYS | SUBSET_KEYS | SUBSET_ONLY_KEYS
# kohya's names elsewhere that users write into the file: what to write instead
_RENAMED = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats", "caption_extention": "caption_extension",
            "prior_loss_weight": "--prior_loss_weight on the command line (kohya reads it from there only)",
            "train_data_dir": "image_dir in a [[datasets.subsets]]", "reg_data_dir": "image_dir in a [[datasets.subsets]] with is_reg = true"}

# The command-line option (a TrainConfig field) whose value stands between [general] and kohya's default, where its
# name differs from the key's; kohya maps train_batch_size and dataset_repeats the same way (ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME)
COMMAND_LINE_NAMES = {"batch_size": "train_batch_size", "num_repeats": "repeats", "enable_bucket": "aspect_buckets",
                      "flip_aug": "random_flip"}


# --- reading ---------------------------------------------------------------------------------------------------

def read_dataset_config(path: str | Path, defaults: Mapping[str, Any]) -> list[DatasetSpec]:
    """The datasets of a kohya `--dataset_config` file (.toml or .json; UTF-8, or UTF-16 with its byte-order mark).

    `defaults`: the command line's values by option name (train_batch_size, repeats, caption_extension, ...;
    COMMAND_LINE_NAMES maps the names that differ). They stand where kohya's argparse values stand: below [general],
    above kohya's defaults. Pass the options the user gave: an option left out falls to kohya's default, which for
    caption_extension is ".caption" and for batch_size 1. Every refusal is one line naming the file, the section, the
    key and the value."""
    path = Path(path)
    source = f"--dataset_config {str(path)!r}"
    return _datasets(_load(path, source), defaults, source)


def datasets_from_folders(train_data_dir: str | Path, reg_data_dir: str | Path | None,
                          defaults: Mapping[str, Any]) -> list[DatasetSpec]:
    """kohya's layout without a config file (generate_dreambooth_subsets_config_by_subdirs), as one dataset: each
    `N_name` folder of `train_data_dir` a subset of N x --repeats repeats whose images without a caption file are
    captioned `name`; the same in `reg_data_dir` with is_reg. Every other option comes from `defaults` (as in
    `read_dataset_config`). Unlike kohya, which ignores them, images directly in a folder train too (1 x --repeats,
    captioned by --instance_prompt or, in the regularisation folder, --class_prompt), as they do without
    --reg_data_dir here; `N_name` folders are common.data's `repeat_folders` (N >= 1, sorted by name, where kohya
    takes the file system's order)."""
    from common.data import repeat_folders

    repeats = defaults.get("repeats", 1)
    subsets = []
    for folder, is_reg, prompt_option in ((train_data_dir, False, "instance_prompt"), (reg_data_dir, True, "class_prompt")):
        if folder is None:
            continue
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"{'--reg_data_dir' if is_reg else '--train_data_dir'} {str(folder)!r} is not a folder")
        found = [(folder, 1, defaults.get(prompt_option))] if has_images(folder) else []
        for sub, count, name in found + repeat_folders(folder):
            subsets.append({"image_dir": str(sub), "num_repeats": count * repeats, "is_reg": is_reg}
                           | ({"class_tokens": name} if name else {}))
    source = f"--train_data_dir {str(train_data_dir)!r}"
    if not any(not s["is_reg"] for s in subsets):
        raise UserError(f"{source} has no images, in itself or in N_name folders (e.g. 10_sks dog)")
    return _datasets({"datasets": [{"subsets": subsets}]}, defaults, source)


def _load(path: Path, source: str) -> dict:
    """The file's tables, as kohya's load_user_config reads them (.json by json, anything else named .toml by TOML)."""
    kind = path.suffix.lower()
    if kind not in (".toml", ".json"):
        raise UserError(f"{source} is neither .toml nor .json (kohya's dataset configs are one of the two)")
    if not path.is_file():
        raise UserError(f"{source} is not a file")
    text = read_text_file(path, "--dataset_config")
    if not text.strip():
        raise UserError(f"{source} is empty; it needs [[datasets]] with [[datasets.subsets]] image_dir = '...' "
                        "(kohya's docs/config_README-en.md)")
    if kind == ".json":
        try:
            config = json.loads(text, parse_constant=_refuse_json_constant)
        except ValueError as error:
            raise UserError(f"{source} is not JSON: {error}") from None
    else:
        config = parse_toml(text, source, alternative="; or give the same tables as .json")
    if not isinstance(config, dict):
        raise UserError(f"{source} is not a table of [general] and [[datasets]] but a {type(config).__name__}")
    return config


def _refuse_json_constant(name: str):
    raise ValueError(f"{name} is not a number a dataset option takes")


def _datasets(config: dict, defaults: Mapping[str, Any], source: str) -> list[DatasetSpec]:
    """kohya's sanitizer and blueprint in one pass: each key checked where it is written, then each option resolved
    down the levels (subset, dataset, general, command line, kohya's default: generate_params_by_fallbacks)."""
    _check_keys(config, {"general", "datasets"}, "the top level", "data", source)
    general = _table(config.get("general", {}), "[general]", source)
    datasets = config.get("datasets")
    if datasets is None:
        raise UserError(f"{source} has no [[datasets]]; each dataset lists its [[datasets.subsets]] with image_dir = '...'")
    if not isinstance(datasets, list) or not datasets:
        raise UserError(f"{source}: datasets must be a list of tables ([[datasets]]), got {datasets!r}")
    _check_level(general, "general", "[general]", "data['general']", source)
    specs = []
    for d, dataset in enumerate(datasets):
        where = f"dataset {d}"
        dataset = _table(dataset, where, source)
        _check_level(dataset, "dataset", where, f"data['datasets'][{d}]", source)
        subsets = dataset.get("subsets")
        if not isinstance(subsets, list) or not subsets:
            raise UserError(f"{source}, {where}: no [[datasets.subsets]]; give each image folder as one, with image_dir = '...'")
        levels = [(dataset, where), (general, "[general]")]
        resolved = []
        for s, subset in enumerate(subsets):
            subset_where = f"subset {s} of dataset {d}"
            subset = _table(subset, subset_where, source)
            _check_level(subset, "subset", subset_where, f"data['datasets'][{d}]['subsets'][{s}]", source)
            resolved.append(_subset([(subset, subset_where), *levels], defaults, source, subset_where))
        specs.append(_dataset(levels, _unique(resolved, source, where), defaults, source, where))
    return specs


def _table(value, where: str, source: str) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{source}, {where}: expected a table of options, got {value!r}")
    return value


def _check_keys(table: dict, allowed: set[str], where: str, location: str, source: str) -> None:
    for key in table:
        if key not in allowed:
            raise UserError(f"{source}, {where}: unknown key {key!r} (kohya refuses it too: extra keys not allowed @ "
                            f"{location}[{key!r}]){_key_hint(key, allowed)}")


def _key_hint(key: str, allowed: set[str]) -> str:
    if key in _RENAMED:
        return f"; write {_RENAMED[key]}"
    if key in DATASET_KEYS or (key in UNSUPPORTED_KEYS and UNSUPPORTED_KEYS[key][1] == "dataset"):
        return f"; {key} is a dataset option: write it in [[datasets]] or [general]"
    if key in SUBSET_ONLY_KEYS or (key in UNSUPPORTED_KEYS and UNSUPPORTED_KEYS[key][1] == "subset only"):
        return f"; {key} belongs in [[datasets.subsets]]"
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_level(table: dict, level: str, where: str, location: str, source: str) -> None:
    """Keys this level may hold, each value checked where it is written (as kohya's schema checks it, even where a
    lower level overrides it), and kohya's keys this toolkit does not do refused unless at kohya's default."""
    _check_keys(table, _LEVEL_KEYS[level] | ({"subsets"} if level == "dataset" else set()), where, location, source)
    for key, value in table.items():
        if key in _CHECKS and value is not None:
            _checked(_CHECKS[key], value, f"{source}, {where}: {key} = {value!r}")
        if key in UNSUPPORTED_KEYS:
            default, _, why = UNSUPPORTED_KEYS[key]
            if value is not None and value != default and not (key == "custom_attributes" and value == {}):
                raise UserError(f"{source}, {where}: {key} = {value!r} is kohya's and not supported here ({why}); remove it")


def _resolve(key: str, record: type, checks: Mapping[str, Callable], levels, defaults: Mapping[str, Any], source: str):
    """The first value given for `key`, from the lowest level up, then the command line, else kohya's default (the
    `record`'s); kohya treats a null (JSON's) as not given (search_value)."""
    check = checks[key]
    for table, where in levels:
        value = table.get(key)
        if value is not None:
            return _checked(check, value, f"{source}, {where}: {key} = {value!r}")
    option = COMMAND_LINE_NAMES.get(key, key)
    value = defaults.get(option)
    if value is not None:
        return _checked(check, value, f"--{option} {value!r} (for the config's {key})")
    default = record.__dataclass_fields__[key].default
    return None if default is dataclasses.MISSING else default


def _checked(check: Callable, value, described: str):
    try:
        return check(value)
    except _Rejected as rejected:
        raise UserError(f"{described}: {rejected}") from None


def _subset(levels, defaults: Mapping[str, Any], source: str, where: str) -> SubsetSpec:
    own = levels[0][0]
    values = {key: _resolve(key, SubsetSpec, SUBSET_KEYS, levels, defaults, source) for key in SUBSET_KEYS}
    values |= {key: _resolve(key, SubsetSpec, SUBSET_ONLY_KEYS, levels[:1], {}, source) for key in SUBSET_ONLY_KEYS}
    if values["image_dir"] is None:
        raise UserError(f"{source}, {where}: no image_dir (kohya: required key not provided); give the folder of its images")
    for key in ("image_dir", "conditioning_data_dir"):
        if values[key] is not None:
            values[key] = Path(values[key])
            if not values[key].is_dir():
                raise UserError(f"{source}, {where}: {key} = {own[key]!r} is not a folder (a relative path is read from the "
                                "current folder, as kohya reads it)")
    if values["alpha_mask"] and values["conditioning_data_dir"] is not None:
        raise UserError(f"{source}, {where}: alpha_mask and conditioning_data_dir both give the loss mask; keep one")
    if own.get("alpha_mask") is None and values["conditioning_data_dir"] is None:
        # --masked_loss (kohya's --alpha_mask is its alias here) masks by alpha unless --mask_dir holds the masks; kohya's
        # --alpha_mask reaches the subsets as any command-line value does, its --conditioning_data_dir does not
        values["alpha_mask"] = bool(defaults.get("masked_loss")) and not defaults.get("mask_dir")
    return SubsetSpec(**values)


def _unique(subsets: list[SubsetSpec], source: str, where: str) -> tuple[SubsetSpec, ...]:
    """kohya keeps the first of a dataset's subsets with the same image_dir and ignores the others, with a warning."""
    seen, kept = set(), []
    for subset in subsets:
        folder = subset.image_dir.resolve()
        if folder in seen:
            logger.warning("%s, %s: ignoring a second subset of image_dir %s (kohya trains the first only)", source, where,
                           subset.image_dir)
            continue
        seen.add(folder)
        kept.append(subset)
    return tuple(kept)


def _dataset(levels, subsets: tuple[SubsetSpec, ...], defaults: Mapping[str, Any], source: str, where: str) -> DatasetSpec:
    values = {key: _resolve(key, DatasetSpec, DATASET_KEYS, levels, defaults, source) for key in DATASET_KEYS}
    if values["resolution"] is None:
        raise UserError(f"{source}, {where}: no resolution (kohya requires one); give resolution = 1024 in [general] or "
                        "[[datasets]], or --resolution")
    if all(subset.is_reg for subset in subsets):
        raise UserError(f"{source}, {where}: every subset is is_reg, so nothing trains (kohya repeats a dataset's "
                        "regularisation images to the count of its other images, 0 here); add the images to learn")
    if values["enable_bucket"]:
        values.update(_bucket_limits(values, source, where))
    return DatasetSpec(subsets=subsets, **values)


def _bucket_limits(values: dict, source: str, where: str) -> dict:
    """kohya's checks of the bucket options: steps a multiple of 32 for SDXL (verify_bucket_reso_steps), the limits moved
    to multiples of the steps with a warning (adjust_min_max_bucket_reso_by_steps), the largest side no smaller than the
    resolution's sides and the smallest (BucketManager's asserts)."""
    steps, low, high = values["bucket_reso_steps"], values["min_bucket_reso"], values["max_bucket_reso"]
    if steps % 32:
        raise UserError(f"{source}, {where}: bucket_reso_steps = {steps}: SDXL needs a multiple of 32 (kohya refuses it too)")
    if low % steps:
        logger.warning("%s, %s: min_bucket_reso %d moved down to %d, a multiple of bucket_reso_steps (as kohya does)", source,
                       where, low, low - low % steps)
        low -= low % steps
    if high % steps:
        logger.warning("%s, %s: max_bucket_reso %d moved up to %d, a multiple of bucket_reso_steps (as kohya does)", source,
                       where, high, high + steps - high % steps)
        high += steps - high % steps
    side = max(values["resolution"])
    if high < side:
        raise UserError(f"{source}, {where}: max_bucket_reso = {high} is below the resolution's longer side {side}; give "
                        f"max_bucket_reso >= {side} (2048 is usual for SDXL)")
    if high < low:
        raise UserError(f"{source}, {where}: max_bucket_reso = {high} is below min_bucket_reso = {low}")
    return {"min_bucket_reso": low, "max_bucket_reso": high}


# --- kohya's counting ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetCounts:
    """One dataset's epoch as kohya counts it (DreamBoothDataset and BaseDataset.make_buckets)."""

    train_images: int  # kohya's "N train images with repeats": images x num_repeats over the subsets that are not is_reg
    reg_images: int  # kohya's "N reg images with repeats": the same over is_reg subsets, before matching train_images
    reg_shown: int  # the regularisation images an epoch shows, with repeats: train_images or a little more (`reg_repeats`)
    repeats: tuple[tuple[int, ...], ...]  # per subset, per image: times an epoch shows it (0: a reg image left out)
    buckets: tuple[tuple[Hashable, int], ...]  # (bucket, images in it with repeats), train and reg images together
    batches: int  # sum over buckets of ceil(images / batch_size)


@dataclass(frozen=True)
class Counts:
    """An epoch of all datasets as kohya draws it (train_network.py): one DataLoader of batch_size=1, shuffled, over the
    DatasetGroup (a ConcatDataset) whose items are whole batches, so each step trains one batch of one bucket of one
    dataset, at that dataset's resolution and batch size, and an epoch is every dataset's batches in one random order."""

    datasets: tuple[DatasetCounts, ...]

    @property
    def train_images(self) -> int:
        return sum(d.train_images for d in self.datasets)

    @property
    def reg_images(self) -> int:
        return sum(d.reg_images for d in self.datasets)

    @property
    def batches(self) -> int:
        """kohya's "num batches per epoch": every dataset's batches, each batch from one dataset and one bucket."""
        return sum(d.batches for d in self.datasets)


def reg_repeats(train_images: int, reg_subsets: Sequence[tuple[int, int]]) -> list[list[int]]:
    """How often an epoch shows each regularisation image, per (num_repeats, image count) of a dataset's is_reg
    subsets in order, to balance `train_images` (kohya's DreamBoothDataset): the images, each with its subset's
    repeats, are taken in order until they reach train_images, the rest left out ("some of reg images are not used"),
    so the last one taken may overshoot; if all of them fall short, each gains one repeat in turn until they reach it.
    None are shown when nothing trains."""
    repeats = [[num_repeats] * count for num_repeats, count in reg_subsets]
    flat = [(s, i) for s, (_, count) in enumerate(reg_subsets) for i in range(count)]
    total, taken = 0, 0
    for s, i in flat:
        if total >= train_images:
            break
        total += repeats[s][i]
        taken += 1
    for s, i in flat[taken:]:
        repeats[s][i] = 0
    if flat and total < train_images:
        rounds, extra = divmod(train_images - total, len(flat))
        for position, (s, i) in enumerate(flat):
            repeats[s][i] += rounds + (position < extra)
    return repeats


def dataset_counts(dataset: DatasetSpec, image_buckets: Sequence[Sequence[Hashable]]) -> DatasetCounts:
    """kohya's counts of one dataset, given the bucket of each image of each subset (`image_buckets[s][i]`, in the
    order the images are read; every image the same bucket when the dataset has no buckets). The images are those
    that train: after a validation split (`split_for_validation`)."""
    if len(image_buckets) != len(dataset.subsets):
        raise ValueError(f"{len(image_buckets)} image lists for {len(dataset.subsets)} subsets")
    counts = [len(images) for images in image_buckets]
    train = sum(n * s.num_repeats for n, s in zip(counts, dataset.subsets) if not s.is_reg)
    reg_subsets = [(s.num_repeats, n) for n, s in zip(counts, dataset.subsets) if s.is_reg]
    reg = iter(reg_repeats(train, reg_subsets))
    repeats = tuple(tuple(next(reg)) if s.is_reg else (s.num_repeats,) * n for n, s in zip(counts, dataset.subsets))
    buckets: dict[Hashable, int] = {}
    for images, shown in zip(image_buckets, repeats):
        for bucket, times in zip(images, shown):
            if times:
                buckets[bucket] = buckets.get(bucket, 0) + times
    return DatasetCounts(
        train_images=train,
        reg_images=sum(n * r for r, n in reg_subsets),
        reg_shown=sum(sum(shown) for shown, s in zip(repeats, dataset.subsets) if s.is_reg),
        repeats=repeats,
        buckets=tuple(buckets.items()),
        batches=sum(math.ceil(n / dataset.batch_size) for n in buckets.values()),
    )


def epoch_counts(datasets: Sequence[DatasetSpec], image_buckets: Sequence[Sequence[Sequence[Hashable]]]) -> Counts:
    """kohya's counts of all datasets (`image_buckets[d][s][i]`: the bucket of image i of subset s of dataset d)."""
    return Counts(tuple(dataset_counts(d, b) for d, b in zip(datasets, image_buckets, strict=True)))


def split_for_validation(count: int, split: float, seed: int) -> tuple[list[int], list[int]]:
    """The positions of a subset's images (in their read order) that train and that validate, as kohya's
    split_train_val draws them: shuffled by Python's generator seeded with validation_seed, the first
    ceil(count * (1 - split)) train and the last round(count * split) validate. Its float arithmetic is kept (10
    images at 0.7 train 4: ceil(3.0000000000000004)), so the two parts may share an image. kohya splits only subsets
    that are not is_reg."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order[: math.ceil(count * (1 - split))], order[count - round(count * split) :]


def counts_summary(datasets: Sequence[DatasetSpec], counts: Counts) -> str:
    """One line on an epoch, with kohya's numbers, and what became of the regularisation images."""
    parts = []
    for d, (dataset, count) in enumerate(zip(datasets, counts.datasets)):
        width, height = dataset.resolution
        text = (f"dataset {d} ({width}x{height}{', buckets' if dataset.enable_bucket else ''}, batch {dataset.batch_size}): "
                f"{count.train_images} train images with repeats")
        if count.reg_images > count.reg_shown:
            text += (f", {count.reg_images} reg images with repeats of which {count.reg_shown} are shown to match them "
                     "(kohya: some of reg images are not used)")
        elif count.reg_images < count.reg_shown:
            text += f", {count.reg_images} reg images with repeats, repeated to {count.reg_shown} to match them"
        elif count.reg_images:
            text += f", {count.reg_images} reg images with repeats, all shown"
        parts.append(f"{text}; {count.batches} batches")
    return f"{'; '.join(parts)}; {counts.batches} batches an epoch"

"""What WebUI, Forge, ComfyUI and model sites read from an SDXL LoRA file's safetensors header: kohya's `ss_*` training
metadata, Stability's ModelSpec (`modelspec.*`) and the precomputed hashes `sshs_*`.

Reproduced from kohya-ss/sd-scripts at 48d368fa557731ad0488c07304dfeba8c07910eb: train_network.py (the metadata dict,
`save_model`, `--no_metadata`), library/train_util.py (`set_tag_frequency`, `SS_METADATA_MINIMUM_KEYS`,
`precalculate_safetensors_hashes`, `addnet_hash_safetensors`, `addnet_hash_legacy`) and library/sai_model_spec.py
(`build_metadata` for an SDXL LoRA). What the UIs do with these keys is reproduced in tests/ui_metadata.py.

Every value is a string (safetensors metadata holds only strings), JSON where kohya writes JSON, `str()` of the Python
value where kohya writes that (`ss_resolution` is "(1024, 1024)"). Where kohya writes "None" for a fact it lacks, the
key is left out: every reader treats a missing key and "None" alike. Nothing names a place on the machine that wrote
the file: dataset folders by their last part (kohya's `os.path.basename`), the base model by `public_model_name`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # imported where used: the scripts parse options and answer --help without torch
    import torch

SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's `ss_base_model_version` for SDXL; WebUI reads "sdxl_" as SDXL
MODELSPEC_VERSION = "1.0.1"  # sai_model_spec.BASE_METADATA
LORA_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"  # sai_model_spec ARCH_SD_XL_V1_BASE + "/" + ADAPTER_LORA
LORA_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # sai_model_spec IMPL_STABILITY_AI (SDXL LoRA)
SDXL_RESOLUTION = (1024, 1024)
MODELSPEC_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v"}  # the toolkit's spelling -> sai_model_spec's PRED_TYPE_*
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
# addnet_hash_legacy: SHA-256 of the 64 KiB at offset 1 MiB, first 8 hex digits (WebUI's old model hash)
LEGACY_HASH_OFFSET, LEGACY_HASH_LENGTH = 0x100000, 0x10000


@dataclass(frozen=True)
class DatasetFolder:
    """One folder of training images as kohya's metadata describes it: `folder` (a path or a name; only its last part
    is ever written, kohya's `os.path.basename(subset.image_dir)`), how often an epoch shows each image, how many images
    it holds, each tag's count over their captions (`tag_frequency`), and whether it holds regularisation (class)
    images."""

    folder: str | Path
    repeats: int
    image_count: int
    tags: Mapping[str, int] = field(default_factory=dict)
    is_reg: bool = False

    def __post_init__(self):
        if self.repeats < 0 or self.image_count < 0 or any(count < 0 for count in self.tags.values()):
            raise ValueError(f"dataset folder {folder_label(self.folder)!r}: repeats {self.repeats}, image count "
                             f"{self.image_count} and tag counts must be >= 0")


@dataclass(frozen=True)
class LoraFacts:
    """The facts of one adapter file that its metadata records. Required: what the network is (kohya's module name,
    rank and alpha: "Dynamic" where layers differ, as kohya's merges write; its network_args) and the name the UIs show
    (`output_name`). Everything else is written where it is known:

    - `base_model`: the base as given; written as `public_model_name` gives it (a local path by its last part only);
    - `folders`: the dataset (`DatasetFolder`s, class images with is_reg);
    - `buckets`: {(width, height): images in that bucket, repeats included}, kohya's order of sides (common.data's
      buckets are (height, width): swap them); without aspect buckets, the one square bucket;
    - `resolution`: (width, height) of training (ModelSpec's required resolution is SDXL's 1024x1024 without it, as
      sai_model_spec.py's default);
    - `started_at`, `finished_at`, `made_at`: unix times (`time.time()`); `made_at`, when the file is written, dates
      the ModelSpec (kohya: the time of saving);
    - `prediction_type`: "epsilon" or "v_prediction" (the toolkit's spelling; written as ModelSpec's "epsilon"/"v").
    """

    network_module: str
    dim: int | str | None
    alpha: float | str | None
    output_name: str
    network_args: Mapping[str, object] | None = None
    title: str | None = None  # default: output_name (kohya: --metadata_title, else --output_name)
    base_model: str | None = None
    folders: tuple[DatasetFolder, ...] = ()
    buckets: Mapping[tuple[int, int], int] = field(default_factory=dict)
    resolution: tuple[int, int] | None = None
    clip_skip: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    made_at: float | None = None
    steps: int | None = None
    epoch: int | None = None
    seed: int | None = None
    learning_rate: float | None = None
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    prediction_type: str | None = None
    trigger_phrase: str | None = None
    training_comment: str | None = None
    merged_from: tuple[str, ...] = ()

    def __post_init__(self):
        numbers = {"learning_rate": self.learning_rate, "unet_lr": self.unet_lr, "text_encoder_lr": self.text_encoder_lr,
                   "started_at": self.started_at, "finished_at": self.finished_at, "made_at": self.made_at}
        for name, value in numbers.items():
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} {value!r} cannot go into a LoRA's metadata: expected a finite number >= 0")
        for name in ("steps", "epoch", "clip_skip"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} {value!r} cannot go into a LoRA's metadata: expected a whole number >= 0")
        if self.resolution is not None and (len(self.resolution) != 2 or min(self.resolution) < 1):
            raise ValueError(f"resolution {self.resolution!r}: expected (width, height), both >= 1")
        if self.prediction_type is not None and self.prediction_type not in MODELSPEC_PREDICTIONS:
            raise ValueError(f"prediction_type {self.prediction_type!r}: expected epsilon or v_prediction")


def tag_frequency(captions) -> dict[str, int]:
    """{tag: captions holding it} of one folder's captions, as kohya counts them (train_util.py `set_tag_frequency`): each
    caption split at commas, each part stripped and lowercased, empty parts skipped; tags in order of first appearance."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip()
            if tag:
                tag = tag.lower()
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def dataset_folder(folder: str | Path, captions: list[str], repeats: int, *, is_reg: bool = False) -> DatasetFolder:
    """The record of a folder of images with these captions (one per image) shown `repeats` times an epoch."""
    return DatasetFolder(folder, repeats, len(captions), tag_frequency(captions), is_reg)


def folder_label(folder: str | Path) -> str:
    """A folder as kohya's metadata names it: its last part (`os.path.basename`), for Windows paths too, and without the
    empty name kohya's basename gives a path ending in a separator."""
    return re.split(r"[\\/]+", str(folder).rstrip("\\/"))[-1]


def unique_labels(folders: tuple[DatasetFolder, ...]) -> list[str]:
    """Each folder's label, a repeated one numbered as kohya numbers a folder used twice (`name (2)`, train_network.py)."""
    labels: list[str] = []
    for folder in folders:
        label, number = folder_label(folder.folder), 2
        unique = label
        while unique in labels:
            unique, number = f"{label} ({number})", number + 1
        labels.append(unique)
    return labels


def kohya_metadata(*, rank: int | str | None = None, alpha: float | str | None = None,
                   network_module: str = "networks.lora", **fields: str) -> dict[str, str]:
    """kohya's minimum metadata of an SDXL LoRA file (train_util.py `SS_METADATA_MINIMUM_KEYS`, what `--no_metadata`
    keeps): the network module (kohya's networks.lora, or lycoris.kohya with its algorithm in ss_network_args), ss_v2 and
    the base model version (WebUI's `detect_version` reads this to list the file for SDXL), rank and alpha where one
    holds for the file, and ss_<name> for each further field."""
    metadata = {"ss_network_module": network_module, "ss_v2": "False", "ss_base_model_version": SDXL_BASE_MODEL_VERSION}
    if rank is not None:
        metadata["ss_network_dim"] = str(rank)
    if alpha is not None:
        metadata["ss_network_alpha"] = str(alpha)
    return metadata | {f"ss_{name}": value for name, value in fields.items()}


def lora_metadata(facts: LoraFacts, *, minimal: bool = False) -> dict[str, str]:
    """The metadata of an adapter file (before its hashes, `save_lora_file` adds them). Full: kohya's training and
    dataset keys and the ModelSpec. `minimal` (--no_metadata): kohya's minimum keys and ModelSpec's required ones
    (architecture, implementation, title, resolution: Forge lists the file for SDXL by its architecture); kohya's own
    --no_metadata also writes the full ModelSpec when training and none when merging."""
    network_args = {} if facts.network_args is None else {"network_args": json.dumps(dict(facts.network_args))}
    network = kohya_metadata(rank=facts.dim, alpha=facts.alpha, network_module=facts.network_module, **network_args)
    if minimal:
        return network | modelspec(facts, minimal=True)
    return network | training_keys(facts) | dataset_keys(facts) | modelspec(facts)


def training_keys(facts: LoraFacts) -> dict[str, str]:
    """kohya's per-run keys, each where its fact is known, encoded as train_network.py's `str(value)`."""
    values = {
        "ss_output_name": facts.output_name,
        "ss_sd_model_name": model_label(facts.base_model) if facts.base_model else None,
        "ss_training_started_at": facts.started_at, "ss_training_finished_at": facts.finished_at,
        "ss_steps": facts.steps, "ss_epoch": facts.epoch, "ss_seed": facts.seed,
        "ss_learning_rate": facts.learning_rate, "ss_unet_lr": facts.unet_lr, "ss_text_encoder_lr": facts.text_encoder_lr,
        "ss_resolution": tuple(facts.resolution) if facts.resolution else None, "ss_clip_skip": facts.clip_skip,
        "ss_training_comment": facts.training_comment,
    }
    return {key: str(value) for key, value in values.items() if value is not None}


def model_label(model: str) -> str:
    """A base model as metadata names it: `public_model_name` (a hub id as given, a local path by its last part), and by
    its last part also a path of another system (C:\\Users\\... read on Linux, which no local check recognises)."""
    from common.lora_formats import public_model_name

    name = public_model_name(model)
    return folder_label(name) if names_local_path(name) else name


def dataset_keys(facts: LoraFacts) -> dict[str, str]:
    """kohya's dataset keys (train_network.py, the DreamBooth branch without --dataset_config): images shown per epoch
    with repeats, of training and of regularisation folders; {folder: {n_repeats, img_count}} of each; {folder: {tag:
    count}} of every folder; the buckets as {"buckets": {index: {"resolution": [w, h], "count": n}}} (without kohya's
    "mean_img_ar_error", which no reader shows). None without a dataset (a merge of files that carry none)."""
    keys: dict[str, str] = {}
    if facts.folders:
        labels = unique_labels(facts.folders)
        dirs = {False: {}, True: {}}
        for label, folder in zip(labels, facts.folders):
            dirs[folder.is_reg][label] = {"n_repeats": folder.repeats, "img_count": folder.image_count}
        shown = {reg: sum(f.repeats * f.image_count for f in facts.folders if f.is_reg == reg) for reg in (False, True)}
        keys |= {
            "ss_num_train_images": str(shown[False]), "ss_num_reg_images": str(shown[True]),
            "ss_dataset_dirs": json.dumps(dirs[False]), "ss_reg_dataset_dirs": json.dumps(dirs[True]),
            "ss_tag_frequency": json.dumps({label: dict(folder.tags) for label, folder in zip(labels, facts.folders)}),
        }
    if facts.buckets:
        buckets = {index: {"resolution": list(size), "count": count}
                   for index, (size, count) in enumerate(sorted(facts.buckets.items(), key=lambda item: item[0][0] / item[0][1]))}
        keys["ss_bucket_info"] = json.dumps({"buckets": buckets})
    return keys


def modelspec(facts: LoraFacts, *, minimal: bool = False) -> dict[str, str]:
    """Stability's ModelSpec of an SDXL LoRA as sai_model_spec.py `build_metadata` writes it (lora=True, sdxl=True): the
    required keys, and unless `minimal` the date (ISO 8601 at whole seconds, in UTC where kohya writes local time: no
    machine's time zone), prediction type, encoder layer (clip skip), trigger phrase and what a merge was made from."""
    width, height = facts.resolution or SDXL_RESOLUTION
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION, "modelspec.architecture": LORA_ARCHITECTURE,
        "modelspec.implementation": LORA_IMPLEMENTATION, "modelspec.title": facts.title or facts.output_name,
        "modelspec.resolution": f"{width}x{height}",
    }
    if minimal:
        return spec
    optional = {
        "modelspec.date": (datetime.datetime.fromtimestamp(int(facts.made_at), datetime.timezone.utc).isoformat()
                           if facts.made_at is not None else None),
        "modelspec.prediction_type": MODELSPEC_PREDICTIONS.get(facts.prediction_type),
        "modelspec.encoder_layer": str(facts.clip_skip) if facts.clip_skip is not None else None,
        "modelspec.trigger_phrase": facts.trigger_phrase or None,
        "modelspec.merged_from": ", ".join(facts.merged_from) or None,
    }
    return spec | {key: value for key, value in optional.items() if value is not None}


# ---------------------------------------------------------------- hashes and files


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya precomputes them for sd-webui-additional-networks and WebUI
    (train_util.py `precalculate_safetensors_hashes`): the tensors serialised with the `ss_*` keys of the metadata only
    (so that user metadata written later leaves the hashes true), then the SHA-256 of everything after the header
    (`addnet_hash_safetensors`: the tensor bytes alone, what WebUI computes of a file without sshs_model_hash) and the
    first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (`addnet_hash_legacy`; of no bytes in a smaller
    file). The serialisation is held in memory once, as kohya holds it."""
    from safetensors.torch import save

    data = save(tensors, {key: value for key, value in metadata.items() if key.startswith("ss_")})
    header_end = 8 + int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(memoryview(data)[header_end:]).hexdigest()
    legacy_hash = hashlib.sha256(data[LEGACY_HASH_OFFSET:LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def with_hashes(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """The metadata with the hashes of these tensors (`safetensors_hashes`), which replace any it held."""
    model_hash, legacy_hash = safetensors_hashes(tensors, metadata)
    kept = {key: value for key, value in metadata.items() if key not in HASH_KEYS}
    return kept | {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def save_lora_file(path: Path, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """An adapter file with its metadata and their hashes (`with_hashes`), written atomically."""
    from safetensors.torch import save_file

    from common.files import atomic_path

    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata=with_hashes(tensors, metadata))


def add_file_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """A written adapter file again with these metadata added to its own and fresh hashes: diffusers' save_lora_weights,
    which writes the diffusers file, takes no metadata but its adapter configs."""
    from safetensors.torch import load_file

    save_lora_file(path, load_file(str(path)), file_metadata(path) | dict(metadata))


# ---------------------------------------------------------------- metadata of files we read


def file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})


def carried_metadata(file: Path) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` facts an adapter file carries (not its hashes, which describe its own bytes only);
    for the diffusers file of a training folder, filled in from the kohya file train_lora.py writes beside it
    (NAME.safetensors, NAME the folder's name), where that one is readable."""
    from safetensors import SafetensorError

    from common.lora_formats import DIFFUSERS_LORA_FILE

    own = file_metadata(file)
    beside = file.parent / f"{file.parent.resolve().name}.safetensors"
    if file.name == DIFFUSERS_LORA_FILE and beside.is_file():
        try:
            own = file_metadata(beside) | own
        except (SafetensorError, OSError):
            pass  # a broken copy beside the file read: its facts are lost, the file read is what is converted
    return {key: value for key, value in own.items() if key.startswith(("ss_", "modelspec."))}


# An absolute or home-relative path: POSIX (/home/...), ~/, a Windows drive or UNC share, at the start of a value or
# after a separator that cannot be part of a word or a URL ("stable-diffusion-xl-v1-base/lora", "https://..." are not)
LOCAL_PATH = re.compile(r"""(?:^|[\s"'(\[{=,;])(?:/(?!/)|~[\\/]|[A-Za-z]:[\\/]|\\\\)[^\s"']""")


def names_local_path(value: str) -> bool:
    """Whether a metadata value holds what looks like a path on some machine (JSON escapes a backslash as two)."""
    return bool(LOCAL_PATH.search(value.replace("\\\\", "\\")))


def shareable_metadata(metadata: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """(the metadata without the keys whose value names a local path, those keys): for facts carried over from a file
    that another tool wrote (kohya writes `ss_sd_model_name` as given where the path no longer exists)."""
    dropped = [key for key, value in metadata.items() if names_local_path(value)]
    return {key: value for key, value in metadata.items() if key not in dropped}, dropped


def folders_from_metadata(metadata: Mapping[str, str]) -> tuple[DatasetFolder, ...]:
    """The dataset folders a file's metadata describes (its ss_dataset_dirs, ss_reg_dataset_dirs and ss_tag_frequency,
    the inverse of `dataset_keys`); () where it holds none or they do not parse, as a file from another tool may."""
    def parsed(key: str) -> dict:
        try:
            value = json.loads(metadata.get(key, "{}"))
        except (TypeError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def count(value) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    tags = parsed("ss_tag_frequency")
    folders = []
    for is_reg, key in ((False, "ss_dataset_dirs"), (True, "ss_reg_dataset_dirs")):
        for label, info in parsed(key).items():
            info = info if isinstance(info, dict) else {}
            folder_tags = tags.pop(label, {})
            folder_tags = {str(t): count(n) for t, n in folder_tags.items()} if isinstance(folder_tags, dict) else {}
            folders.append(DatasetFolder(label, count(info.get("n_repeats")), count(info.get("img_count")), folder_tags, is_reg))
    for label, folder_tags in tags.items():  # tags of a folder neither key lists: its images and repeats unknown
        if isinstance(folder_tags, dict):
            folders.append(DatasetFolder(label, 0, 0, {str(t): count(n) for t, n in folder_tags.items()}))
    return tuple(folders)

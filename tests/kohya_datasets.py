"""kohya sd-scripts' dataset configuration and epoch arithmetic, reproduced from its source as written there (its loops,
its order) for the tests to check common.dataset_config against; and a runner of kohya's own code, where a copy of
sd-scripts and its dependencies are at hand.

Source: kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb (2026-02-16): library/config_util.py
(ConfigSanitizer, BlueprintGenerator, generate_dreambooth_subsets_config_by_subdirs), library/train_util.py
(DreamBoothDataset.__init__, BaseDataset.make_buckets, DatasetGroup, split_train_val) and train_network.py (the
DataLoader of batch_size=1 over the DatasetGroup, whose items are whole batches).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

KOHYA_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"

# ConfigSanitizer's schema pieces, by their names there (keys only)
SUBSET_ASCENDABLE = ["color_aug", "face_crop_aug_range", "flip_aug", "num_repeats", "random_crop", "shuffle_caption",
                     "keep_tokens", "keep_tokens_separator", "secondary_separator", "caption_separator", "enable_wildcard",
                     "token_warmup_min", "token_warmup_step", "caption_prefix", "caption_suffix", "custom_attributes",
                     "resize_interpolation"]
DO_SUBSET_ASCENDABLE = ["caption_dropout_every_n_epochs", "caption_dropout_rate", "caption_tag_dropout_rate"]
DB_SUBSET_ASCENDABLE = ["caption_extension", "class_tokens", "cache_info"]
DB_SUBSET_DISTINCT = ["image_dir", "is_reg", "alpha_mask"]
DATASET_ASCENDABLE = ["batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket", "max_bucket_reso",
                      "min_bucket_reso", "validation_seed", "validation_split", "resolution", "network_multiplier",
                      "resize_interpolation"]
# train_network.py builds ConfigSanitizer(True, True, args.masked_loss, True): DreamBooth subsets with dropout
GENERAL_KEYS = set(DATASET_ASCENDABLE + SUBSET_ASCENDABLE + DB_SUBSET_ASCENDABLE + DO_SUBSET_ASCENDABLE)
DATASET_KEYS = GENERAL_KEYS | {"subsets"}
SUBSET_KEYS = set(SUBSET_ASCENDABLE + DB_SUBSET_DISTINCT + DB_SUBSET_ASCENDABLE + DO_SUBSET_ASCENDABLE)

# kohya's values where neither the file nor the command line gives one: argparse's defaults (train_util's
# add_dataset_arguments, add_training_arguments), which BlueprintGenerator reaches before the Params classes' own
ARGPARSE_DEFAULTS = {"caption_extension": ".caption", "batch_size": 1, "num_repeats": 1, "keep_tokens": 0,
                     "caption_separator": ",", "keep_tokens_separator": "", "shuffle_caption": False, "flip_aug": False,
                     "random_crop": False, "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024,
                     "bucket_reso_steps": 64, "bucket_no_upscale": False, "caption_dropout_rate": 0.0,
                     "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.0, "enable_wildcard": False,
                     "alpha_mask": False, "resolution": None}


def search_value(key, fallbacks, default_value=None):
    """BlueprintGenerator.search_value: the first value that is not None."""
    for candidate in fallbacks:
        value = candidate.get(key)
        if value is not None:
            return value
    return default_value


def subset_value(key, subset: dict, dataset: dict, general: dict, argparse: dict):
    """generate_params_by_fallbacks for a subset: [subset, dataset, general, argparse], then the default."""
    return search_value(key, [subset, dataset, general, argparse], ARGPARSE_DEFAULTS.get(key))


def subsets_by_subdirs(base_dir: Path, is_reg: bool) -> list[dict]:
    """generate_dreambooth_subsets_config_by_subdirs for one folder: each subfolder "<N>_<class tokens>" with N >= 1
    (kohya lists them in the file system's order; sorted here)."""
    subsets = []
    for subdir in sorted(base_dir.iterdir()):
        if not subdir.is_dir():
            continue
        tokens = subdir.name.split("_")
        try:
            num_repeats = int(tokens[0])
        except ValueError:
            continue
        if num_repeats < 1:
            continue
        subsets.append({"image_dir": str(subdir), "num_repeats": num_repeats, "is_reg": is_reg, "class_tokens": "_".join(tokens[1:])})
    return subsets


def dreambooth_dataset(subsets: list[dict], batch_size: int) -> dict:
    """DreamBoothDataset.__init__'s counting and make_buckets' batches, in kohya's loops. `subsets`: dicts with
    num_repeats, is_reg and `images`, the bucket of each image in read order."""
    num_train_images = num_reg_images = 0
    registered, reg_infos = [], []
    for subset in subsets:
        if subset["num_repeats"] < 1 or not subset["images"]:
            continue
        if subset["is_reg"]:
            num_reg_images += subset["num_repeats"] * len(subset["images"])
        else:
            num_train_images += subset["num_repeats"] * len(subset["images"])
        for bucket in subset["images"]:
            info = {"num_repeats": subset["num_repeats"], "bucket": bucket, "is_reg": subset["is_reg"]}
            (reg_infos if subset["is_reg"] else registered).append(info)
    if num_reg_images:
        n = 0
        first_loop = True
        while n < num_train_images:
            for info in reg_infos:
                if first_loop:
                    registered.append(info)
                    n += info["num_repeats"]
                else:
                    info["num_repeats"] += 1
                    n += 1
                if n >= num_train_images:
                    break
            first_loop = False
    buckets: dict = {}
    for info in registered:  # make_buckets: each image added num_repeats times to its bucket
        for _ in range(info["num_repeats"]):
            buckets.setdefault(info["bucket"], []).append(info)
    batches = sum(int(math.ceil(len(bucket) / batch_size)) for bucket in buckets.values())
    shown = {id(info) for info in registered}
    reg_repeats = [info["num_repeats"] if id(info) in shown else 0 for info in reg_infos]
    return {"num_train_images": num_train_images, "num_reg_images": num_reg_images, "reg_repeats": reg_repeats,
            "buckets": {bucket: len(images) for bucket, images in buckets.items()}, "batches": batches}


def batches_per_epoch(datasets: list[dict]) -> int:
    """len(train_dataloader): a DataLoader of batch_size=1 over the ConcatDataset of datasets whose items are batches."""
    return sum(dataset["batches"] for dataset in datasets)


def split_train_val(paths: list, is_training_dataset: bool, validation_split: float, validation_seed: int) -> list:
    """split_train_val with a seed (kohya seeds the module's generator and restores it)."""
    paths = list(paths)
    state = random.getstate()
    random.seed(validation_seed)
    random.shuffle(paths)
    random.setstate(state)
    if is_training_dataset:
        return paths[0 : math.ceil(len(paths) * (1 - validation_split))]
    return paths[len(paths) - round(len(paths) * validation_split) :]


# --- kohya's own code --------------------------------------------------------------------------------------------

KOHYA_SOURCE_ENV = "KOHYA_SD_SCRIPTS"

# Run in a child process: kohya's library imports torch, transformers, diffusers, cv2, imagesize and voluptuous, and
# its two long-prompt pipelines import names newer transformers lack; those two are stubbed (the datasets never use
# them). The dataset's __init__ and make_buckets do the counting; nothing is trained.
_RUNNER = r"""
import argparse, json, sys, types
for name, cls in [("library.lpw_stable_diffusion", "StableDiffusionLongPromptWeightingPipeline"),
                  ("library.sdxl_lpw_stable_diffusion", "SdxlStableDiffusionLongPromptWeightingPipeline")]:
    module = types.ModuleType(name)
    setattr(module, cls, type(cls, (), {}))
    sys.modules[name] = module
from library import config_util, train_util

parser = argparse.ArgumentParser()
train_util.add_dataset_arguments(parser, True, True, True)
train_util.add_training_arguments(parser, True)
config_util.add_config_arguments(parser)
args = parser.parse_args(sys.argv[1:])
train_util.prepare_dataset_args(args, True)
user_config = config_util.load_user_config(str(args.dataset_config))
blueprint = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, False, True)).generate(user_config, args)
group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
keys = ["image_dir", "num_repeats", "is_reg", "class_tokens", "caption_extension", "keep_tokens", "shuffle_caption",
        "flip_aug", "caption_separator", "keep_tokens_separator"]
report = {"num_train_images": group.num_train_images, "num_reg_images": group.num_reg_images, "batches": len(group),
          "datasets": []}
for dataset in group.datasets:
    reg = sorted((info.absolute_path, info.num_repeats) for info in dataset.image_data.values() if info.is_reg)
    report["datasets"].append({
        "resolution": [dataset.width, dataset.height], "batch_size": dataset.batch_size, "batches": len(dataset),
        "num_train_images": dataset.num_train_images, "num_reg_images": dataset.num_reg_images,
        "subsets": [{key: getattr(subset, key) for key in keys} for subset in dataset.subsets],
        "reg_repeats": reg,
        "buckets": [[list(reso), len(bucket)] for reso, bucket in zip(dataset.bucket_manager.resos, dataset.bucket_manager.buckets) if bucket],
    })
print("KOHYA" + json.dumps(report))
"""


def run_kohya(config: Path, *arguments: str) -> dict:
    """What kohya's own config_util and DreamBoothDataset make of `config` with command-line `arguments`; needs
    $KOHYA_SD_SCRIPTS (a checkout of sd-scripts at KOHYA_COMMIT) with its dependencies importable."""
    source = os.environ[KOHYA_SOURCE_ENV]
    path = os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _RUNNER, "--dataset_config", str(config), *arguments], cwd=source,
                          env=os.environ | {"PYTHONPATH": path}, capture_output=True, text=True, timeout=600)
    line = next((line for line in done.stdout.splitlines() if line.startswith("KOHYA")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"kohya's code failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(line.removeprefix("KOHYA"))

"""kohya's --dataset_config and folder layout read into finished records with kohya's precedence, kohya's counting
of an epoch (repeats, regularisation images matched to the train images, batches per bucket and dataset), and every
malformed file refused in one line. The reference is tests/kohya_datasets.py, kohya's arithmetic reproduced from
sd-scripts at its KOHYA_COMMIT; with $KOHYA_SD_SCRIPTS set, kohya's own code is run on the same files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from PIL import Image

import kohya_datasets as kohya
from common.cli import UserError
from common.dataset_config import (
    KOHYA_COMMIT,
    DatasetSpec,
    SubsetSpec,
    counts_summary,
    dataset_counts,
    datasets_from_folders,
    epoch_counts,
    read_dataset_config,
    reg_repeats,
    split_for_validation,
)
from common.files import IMAGE_SUFFIXES


def write_image(path: Path, size: tuple[int, int]) -> None:
    """A flat image of `size` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(path)


def two_dataset_config(root: Path) -> Path:
    """The issue's case: dataset 0 at 1024 with buckets, batch 2: a/ (3 images x 5, .txt captions, keep_tokens 1 from
    [general]), b/ (2 images x 2, kohya's default .caption files, keep_tokens 2) and reg/ (7 is_reg images x 1); dataset
    1 at [768, 768] without buckets, batch 1: a/ x 1 and reg/ x 2. Each image's size is one of kohya's buckets at
    1024x1024 (832x1216, 1024x1024, 1216x832), so with buckets an image's bucket is its own size."""
    for i, size in enumerate([(1024, 1024), (832, 1216), (1216, 832)]):
        write_image(root / "a" / f"a_{i}.png", size)
        (root / "a" / f"a_{i}.txt").write_text(f"sks dog, pose {i}, on grass")
    for i, size in enumerate([(1024, 1024), (1216, 832)]):
        write_image(root / "b" / f"b_{i}.png", size)
        (root / "b" / f"b_{i}.caption").write_text(f"sks cat, indoors, {i}")
    for i in range(7):
        write_image(root / "reg" / f"reg_{i}.png", (832, 1216) if i >= 5 else (1024, 1024))
    config = root / "dataset.toml"
    config.write_text(f"""
[general]
enable_bucket = true
max_bucket_reso = 2048
shuffle_caption = true
keep_tokens = 1
flip_aug = true

[[datasets]]
resolution = 1024
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{root}/a'
  num_repeats = 5
  caption_extension = '.txt'

  [[datasets.subsets]]
  image_dir = '{root}/b'
  num_repeats = 2
  keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{root}/reg'
  is_reg = true
  class_tokens = 'person'

[[datasets]]
resolution = [768, 768]
batch_size = 1
enable_bucket = false

  [[datasets.subsets]]
  image_dir = '{root}/a'
  caption_extension = '.txt'

  [[datasets.subsets]]
  image_dir = '{root}/reg'
  is_reg = true
  num_repeats = 2
  class_tokens = 'person'
""")
    return config


def image_buckets(datasets: list[DatasetSpec]) -> list[list[list]]:
    """Each image's bucket, images in kohya's read order (sorted paths): its size with buckets (see
    two_dataset_config), the dataset's resolution without."""
    buckets = []
    for dataset in datasets:
        per_subset = []
        for subset in dataset.subsets:
            paths = sorted(p for p in subset.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            per_subset.append([Image.open(p).size if dataset.enable_bucket else dataset.resolution for p in paths])
        buckets.append(per_subset)
    return buckets


# What kohya's own code made of two_dataset_config at KOHYA_COMMIT (test_kohyas_own_code_agrees reruns it): the
# subsets as its "[Subset j of Dataset i]" lines print them, and its counts
KOHYA_SUBSETS = [
    [{"name": "a", "num_repeats": 5, "is_reg": False, "class_tokens": None, "caption_extension": ".txt", "keep_tokens": 1,
      "shuffle_caption": True, "flip_aug": True},
     {"name": "b", "num_repeats": 2, "is_reg": False, "class_tokens": None, "caption_extension": ".caption", "keep_tokens": 2,
      "shuffle_caption": True, "flip_aug": True},
     {"name": "reg", "num_repeats": 1, "is_reg": True, "class_tokens": "person", "caption_extension": ".caption",
      "keep_tokens": 1, "shuffle_caption": True, "flip_aug": True}],
    [{"name": "a", "num_repeats": 1, "is_reg": False, "class_tokens": None, "caption_extension": ".txt", "keep_tokens": 1,
      "shuffle_caption": True, "flip_aug": True},
     {"name": "reg", "num_repeats": 2, "is_reg": True, "class_tokens": "person", "caption_extension": ".caption",
      "keep_tokens": 1, "shuffle_caption": True, "flip_aug": True}],
]
KOHYA_COUNTS = {
    "num_train_images": 22, "num_reg_images": 21, "batches": 27,  # "num train images * repeats", "num reg images", "num batches per epoch"
    "datasets": [
        {"num_train_images": 19, "num_reg_images": 7, "batches": 20, "reg_repeats": [3, 3, 3, 3, 3, 2, 2],
         "buckets": {(832, 1216): 9, (1024, 1024): 22, (1216, 832): 7}},
        {"num_train_images": 3, "num_reg_images": 14, "batches": 7, "reg_repeats": [2, 2, 0, 0, 0, 0, 0],
         "buckets": {(768, 768): 7}},
    ],
}


def subset_view(subset: SubsetSpec) -> dict:
    keys = ["num_repeats", "is_reg", "class_tokens", "caption_extension", "keep_tokens", "shuffle_caption", "flip_aug"]
    return {"name": subset.image_dir.name} | {key: getattr(subset, key) for key in keys}


def test_a_two_dataset_config_with_reg_images_gives_the_counts_kohya_prints(tmp_path):
    assert KOHYA_COMMIT == kohya.KOHYA_COMMIT  # the module and its reference read the same sd-scripts
    datasets = read_dataset_config(two_dataset_config(tmp_path), {})
    assert [[subset_view(s) for s in d.subsets] for d in datasets] == KOHYA_SUBSETS
    assert [(d.resolution, d.batch_size, d.enable_bucket) for d in datasets] == [((1024, 1024), 2, True), ((768, 768), 1, False)]
    buckets = image_buckets(datasets)
    counts = epoch_counts(datasets, buckets)
    found = {"num_train_images": counts.train_images, "num_reg_images": counts.reg_images, "batches": counts.batches,
             "datasets": [{"num_train_images": d.train_images, "num_reg_images": d.reg_images, "batches": d.batches,
                           "reg_repeats": list(d.repeats[-1]), "buckets": dict(d.buckets)} for d in counts.datasets]}
    assert found == KOHYA_COUNTS, found
    # the same by the reference's reproduction of kohya's loops
    reference = [kohya.dreambooth_dataset([{"num_repeats": s.num_repeats, "is_reg": s.is_reg, "images": images}
                                           for s, images in zip(d.subsets, b)], d.batch_size) for d, b in zip(datasets, buckets)]
    assert [(r["num_train_images"], r["num_reg_images"], r["reg_repeats"], r["buckets"], r["batches"]) for r in reference] == \
        [(k["num_train_images"], k["num_reg_images"], k["reg_repeats"], k["buckets"], k["batches"]) for k in KOHYA_COUNTS["datasets"]]
    assert kohya.batches_per_epoch(reference) == 27
    summary = counts_summary(datasets, counts)
    assert "\n" not in summary
    assert ("dataset 0 (1024x1024, buckets, batch 2): 19 train images with repeats, 7 reg images with repeats, repeated to 19 "
            "to match them; 20 batches") in summary, summary
    assert ("dataset 1 (768x768, batch 1): 3 train images with repeats, 14 reg images with repeats of which 4 are shown to "
            "match them (kohya: some of reg images are not used); 7 batches; 27 batches an epoch") in summary, summary


@pytest.mark.kohya_source  # kohya's own code, from a checkout of sd-scripts: bash scripts/test_against_kohya.sh DIR
def test_kohyas_own_code_agrees(tmp_path):
    """kohya's config_util and DreamBoothDataset run on the same file (they need voluptuous, imagesize and cv2)."""
    report = kohya.run_kohya(two_dataset_config(tmp_path))
    subsets = [[{"name": Path(s["image_dir"]).name} | {k: s[k] for k in KOHYA_SUBSETS[0][0] if k != "name"}
                for s in d["subsets"]] for d in report["datasets"]]
    assert subsets == KOHYA_SUBSETS
    assert {k: report[k] for k in ("num_train_images", "num_reg_images", "batches")} == \
        {k: KOHYA_COUNTS[k] for k in ("num_train_images", "num_reg_images", "batches")}
    for found, expected in zip(report["datasets"], KOHYA_COUNTS["datasets"]):
        assert (found["num_train_images"], found["num_reg_images"], found["batches"]) == \
            (expected["num_train_images"], expected["num_reg_images"], expected["batches"])
        assert {tuple(reso): n for reso, n in found["buckets"]} == expected["buckets"]
        assert [n for _, n in found["reg_repeats"]] == [n for n in expected["reg_repeats"] if n]


def test_reg_images_are_repeated_or_trimmed_as_kohyas_loop_does():
    rng = random.Random(0)
    for _ in range(500):
        train = rng.choice([0, 1, 3, 10, 19, 40, 97])
        reg = [(rng.randint(1, 4), rng.randint(0, 6)) for _ in range(rng.randint(0, 3))]
        subsets = [{"num_repeats": 1, "is_reg": False, "images": ["x"] * train}]
        subsets += [{"num_repeats": r, "is_reg": True, "images": ["x"] * n} for r, n in reg]
        expected = kohya.dreambooth_dataset(subsets, batch_size=1)["reg_repeats"]
        found = [n for per_image in reg_repeats(train, reg) for n in per_image]
        assert found == expected, (train, reg, found, expected)


def test_batches_are_summed_per_bucket_then_over_datasets_as_kohya_counts_them():
    rng = random.Random(1)
    for _ in range(300):
        batch = rng.randint(1, 5)
        subsets = [SubsetSpec(image_dir=Path("."), num_repeats=rng.randint(1, 4), is_reg=rng.random() < 0.3) for _ in range(3)]
        dataset = DatasetSpec(resolution=(1024, 1024), subsets=tuple(subsets), batch_size=batch, enable_bucket=True)
        images = [[rng.choice("ABC") for _ in range(rng.randint(0, 6))] for _ in subsets]
        expected = kohya.dreambooth_dataset([{"num_repeats": s.num_repeats, "is_reg": s.is_reg, "images": i}
                                             for s, i in zip(subsets, images)], batch)
        found = dataset_counts(dataset, images)
        assert (found.train_images, found.reg_images, found.batches, dict(found.buckets)) == \
            (expected["num_train_images"], expected["num_reg_images"], expected["batches"], expected["buckets"]), (images, subsets)
    two = epoch_counts([dataset, dataset], [images, images])
    assert two.batches == 2 * found.batches


def test_each_option_comes_from_the_lowest_level_that_gives_it_then_the_command_line_then_kohyas_default(tmp_path):
    for name in "abcd":
        (tmp_path / name).mkdir()
    config = write(tmp_path, f"""
[general]
keep_tokens = 3
caption_dropout_rate = 0.2

[[datasets]]
keep_tokens = 2
batch_size = 8

  [[datasets.subsets]]
  image_dir = '{tmp_path}/a'
  keep_tokens = 1

  [[datasets.subsets]]
  image_dir = '{tmp_path}/b'

[[datasets]]
resolution = [1216, 832]

  [[datasets.subsets]]
  image_dir = '{tmp_path}/c'
  caption_dropout_rate = 0.05

  [[datasets.subsets]]
  image_dir = '{tmp_path}/d'
  caption_extension = 'txt'
""")
    command_line = {"keep_tokens": 9, "train_batch_size": 4, "resolution": 1024, "caption_extension": ".cap", "repeats": 3,
                    "random_flip": True, "shuffle_caption": True}
    first, second = read_dataset_config(config, command_line)
    assert [s.keep_tokens for s in first.subsets + second.subsets] == [1, 2, 3, 3]
    assert [s.caption_dropout_rate for s in first.subsets + second.subsets] == [0.2, 0.2, 0.05, 0.2]
    assert [s.caption_extension for s in first.subsets + second.subsets] == [".cap", ".cap", ".cap", ".txt"]
    assert [s.num_repeats for s in first.subsets + second.subsets] == [3, 3, 3, 3]  # --repeats: kohya's --dataset_repeats
    assert all(s.flip_aug and s.shuffle_caption for s in first.subsets + second.subsets)
    assert (first.batch_size, first.resolution, second.batch_size, second.resolution) == (8, (1024, 1024), 4, (1216, 832))
    # nothing on the command line: kohya's defaults, ".caption" not this toolkit's ".txt", batch 1
    first, second = read_dataset_config(config, {"resolution": 1024})
    assert [s.caption_extension for s in first.subsets] == [".caption", ".caption"] and second.batch_size == 1
    assert (second.subsets[0].num_repeats, second.subsets[0].shuffle_caption, second.subsets[0].keep_tokens_separator) == (1, False, "")
    # the reference's fallbacks give the same for each subset
    raw = {"general": {"keep_tokens": 3, "caption_dropout_rate": 0.2}, "d0": {"keep_tokens": 2}, "d1": {}}
    argparse = {"keep_tokens": 9, "caption_extension": ".cap"}
    expected = [kohya.subset_value("keep_tokens", {"keep_tokens": 1}, raw["d0"], raw["general"], argparse),
                kohya.subset_value("keep_tokens", {}, raw["d0"], raw["general"], argparse),
                kohya.subset_value("keep_tokens", {}, raw["d1"], raw["general"], argparse)]
    first, second = read_dataset_config(config, command_line)
    assert [s.keep_tokens for s in first.subsets + second.subsets[:1]] == expected


def test_masks_from_alpha_or_a_folder_per_subset(tmp_path):
    for name in ("a", "b", "masks"):
        (tmp_path / name).mkdir()
    config = write(tmp_path, f"""
[[datasets]]
resolution = 1024
  [[datasets.subsets]]
  image_dir = '{tmp_path}/a'
  conditioning_data_dir = '{tmp_path}/masks'
  [[datasets.subsets]]
  image_dir = '{tmp_path}/b'
""")
    masked, plain = read_dataset_config(config, {"masked_loss": True})[0].subsets
    assert (masked.conditioning_data_dir, masked.alpha_mask, plain.conditioning_data_dir, plain.alpha_mask) == \
        (tmp_path / "masks", False, None, True)
    _, plain = read_dataset_config(config, {})[0].subsets
    assert not plain.alpha_mask


def test_kohyas_folder_layout_is_one_dataset_of_n_name_subsets(tmp_path):
    train, reg = tmp_path / "img", tmp_path / "reg"
    for folder in (train / "10_sks dog", train / "2_sks_dog_beach", reg / "1_dog", reg / "dog photos", train / "0_off"):
        write_image(folder / "x.png", (64, 64))
    write_image(train / "top.png", (64, 64))
    [dataset] = datasets_from_folders(train, reg, {"resolution": 1024, "train_batch_size": 2, "repeats": 2,
                                                   "instance_prompt": "sks dog", "caption_extension": ".txt"})
    found = [(s.image_dir.relative_to(tmp_path).as_posix(), s.num_repeats, s.class_tokens, s.is_reg, s.caption_extension)
             for s in dataset.subsets]
    assert found == [("img", 2, "sks dog", False, ".txt"), ("img/10_sks dog", 20, "sks dog", False, ".txt"),
                     ("img/2_sks_dog_beach", 4, "sks_dog_beach", False, ".txt"), ("reg/1_dog", 2, "dog", True, ".txt")]
    assert (dataset.resolution, dataset.batch_size) == ((1024, 1024), 2)
    # the N_name folders are those kohya reads, with its repeats and class tokens (here x --repeats 2)
    expected = [(s["image_dir"], s["num_repeats"] * 2, s["class_tokens"], s["is_reg"])
                for s in kohya.subsets_by_subdirs(train, False) + kohya.subsets_by_subdirs(reg, True)]
    assert [(str(s.image_dir), s.num_repeats, s.class_tokens, s.is_reg) for s in dataset.subsets[1:]] == expected
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--train_data_dir .* has no images"):
        datasets_from_folders(tmp_path / "empty", reg, {"resolution": 1024})


def test_a_config_pasted_from_the_kohya_ss_gui_and_sd_scripts_docs_parses(tmp_path):
    folder = tmp_path / "img" / "10_darius kawasaki person"
    (tmp_path / "img" / "reg" / "1_person").mkdir(parents=True)
    write_image(folder / "0001.png", (64, 64))
    # kohya_ss's test/config/dataset-multires.toml layout, and the docs' keep_tokens_separator example, with the
    # comments, the `= false` of unsupported keys and the int 0 for a rate that such files carry
    config = write(tmp_path, f"""
[general]
# define common settings here
flip_aug = true
color_aug = false
keep_tokens_separator= "|||"
shuffle_caption = false
caption_tag_dropout_rate = 0
caption_extension = ".txt"
min_bucket_reso = 64
max_bucket_reso = 2048

[[datasets]]
# define the first resolution here
batch_size = 1
enable_bucket = true
resolution = [1024, 1024]

  [[datasets.subsets]]
  image_dir = '{folder}'
  num_repeats = 10
  class_tokens = 'darius kawasaki person'
  cache_info = false

  [[datasets.subsets]]
  image_dir = '{tmp_path}/img/reg/1_person'
  is_reg = true
  class_tokens = 'person'

[[datasets]]
# define the second resolution here
batch_size = 6
enable_bucket = true
bucket_no_upscale = true
resolution = [768, 768]
secondary_separator = ";;;" # subset 側に書くこともできます / can be written in the subset side
enable_wildcard = true

  [[datasets.subsets]]
  image_dir = "{folder}"
  num_repeats = 1
  caption_prefix = "1girl, hatsune miku, vocaloid |||"
  caption_suffix = ", anime screencap ||| masterpiece, rating: general"
  resize_interpolation = "area"
""")
    first, second = read_dataset_config(config, {})
    assert [(s.num_repeats, s.is_reg, s.class_tokens, s.flip_aug, s.keep_tokens_separator, s.caption_extension)
            for s in first.subsets] == [(10, False, "darius kawasaki person", True, "|||", ".txt"), (1, True, "person", True, "|||", ".txt")]
    assert (first.min_bucket_reso, first.max_bucket_reso, second.bucket_no_upscale, second.batch_size) == (64, 2048, True, 6)
    [subset] = second.subsets
    assert (subset.secondary_separator, subset.enable_wildcard, subset.caption_prefix, subset.resize_interpolation) == \
        (";;;", True, "1girl, hatsune miku, vocaloid |||", "box")
    assert subset.caption_tag_dropout_rate == 0.0


def test_the_same_config_as_json_with_any_editors_encoding_reads_the_same(tmp_path):
    toml_specs = read_dataset_config(two_dataset_config(tmp_path), {})
    import tomllib

    tables = tomllib.loads((tmp_path / "dataset.toml").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps(tables))
    assert read_dataset_config(tmp_path / "dataset.json", {}) == toml_specs
    text = (tmp_path / "dataset.toml").read_text()
    for encoding, mark in (("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe")):
        path = tmp_path / f"{encoding}.toml"
        path.write_bytes(mark + text.encode(encoding))
        assert read_dataset_config(path, {}) == toml_specs, encoding


def test_kohya_keeps_the_first_of_two_subsets_of_one_folder_in_a_dataset_but_not_across_datasets(tmp_path, caplog):
    (tmp_path / "a").mkdir()
    subset = f"  [[datasets.subsets]]\n  image_dir = '{tmp_path}/a'\n"
    config = write(tmp_path, f"[general]\nresolution = 512\n[[datasets]]\n{subset}  num_repeats = 4\n{subset}  num_repeats = 9\n"
                             f"[[datasets]]\n{subset}")
    first, second = read_dataset_config(config, {})
    assert [s.num_repeats for s in first.subsets] == [4] and len(second.subsets) == 1
    assert "ignoring a second subset of image_dir" in caplog.text


def test_bucket_limits_move_to_multiples_of_the_steps_as_kohya_moves_them(tmp_path):
    (tmp_path / "a").mkdir()
    config = write(tmp_path, f"[[datasets]]\nresolution = 1024\nenable_bucket = true\nmin_bucket_reso = 300\n"
                             f"max_bucket_reso = 2000\n  [[datasets.subsets]]\n  image_dir = '{tmp_path}/a'\n")
    [dataset] = read_dataset_config(config, {})
    assert (dataset.min_bucket_reso, dataset.max_bucket_reso) == (256, 2048)


def test_the_validation_split_takes_the_images_kohyas_split_takes():
    for count in (1, 3, 5, 10, 17):
        for split in (0.1, 0.2, 0.3, 0.5):
            for seed in (0, 42):
                train, validation = split_for_validation(count, split, seed)
                assert train == kohya.split_train_val(range(count), True, split, seed)
                assert validation == kohya.split_train_val(range(count), False, split, seed)
    train, validation = split_for_validation(10, 0.7, 0)  # kohya's ceil(10 * (1 - 0.7)) = ceil(3.0000000000000004)
    assert (len(train), len(validation), len(set(train) & set(validation))) == (4, 7, 1)


def test_every_key_kohya_accepts_is_read_where_kohya_accepts_it_and_refused_where_it_does_not(tmp_path):
    (tmp_path / "a").mkdir()
    values = {"color_aug": False, "face_crop_aug_range": None, "flip_aug": True, "num_repeats": 2, "random_crop": True,
              "shuffle_caption": True, "keep_tokens": 1, "keep_tokens_separator": "|||", "secondary_separator": ";;;",
              "caption_separator": ",", "enable_wildcard": True, "token_warmup_min": 1, "token_warmup_step": 0,
              "caption_prefix": "p", "caption_suffix": "s", "custom_attributes": {}, "resize_interpolation": "lanczos",
              "caption_dropout_every_n_epochs": 3, "caption_dropout_rate": 0.1, "caption_tag_dropout_rate": 0.1,
              "caption_extension": ".txt", "class_tokens": "dog", "cache_info": False, "image_dir": str(tmp_path / "a"),
              "is_reg": False, "alpha_mask": True, "batch_size": 2, "bucket_no_upscale": True, "bucket_reso_steps": 64,
              "enable_bucket": True, "max_bucket_reso": 2048, "min_bucket_reso": 256, "validation_seed": 1,
              "validation_split": 0.1, "resolution": 1024, "network_multiplier": 1.0}
    assert set(values) == kohya.GENERAL_KEYS | kohya.SUBSET_KEYS
    subset_only = {"image_dir", "is_reg", "alpha_mask"}

    def read(general: dict, dataset: dict, subset: dict):
        tables = {"general": general, "datasets": [dataset | {"subsets": [{"image_dir": str(tmp_path / "a")} | subset]}]}
        (tmp_path / "c.json").write_text(json.dumps({k: v for k, v in tables.items()}, default=str))
        return read_dataset_config(tmp_path / "c.json", {"resolution": 1024})

    for key, value in values.items():
        if value is None:
            continue
        for level in ("general", "dataset", "subset"):
            allowed = {"general": kohya.GENERAL_KEYS, "dataset": kohya.DATASET_KEYS, "subset": kohya.SUBSET_KEYS}[level]
            tables = {"general": {}, "dataset": {}, "subset": {}} | {level: {key: value}}
            if key in allowed:
                read(tables["general"], tables["dataset"], tables["subset"])
            else:
                with pytest.raises(UserError, match=f"unknown key '{key}' .*extra keys not allowed") as refused:
                    read(tables["general"], tables["dataset"], tables["subset"])
                hint = "belongs in \\[\\[datasets.subsets\\]\\]" if key in subset_only else "is a dataset option"
                assert refused.match(hint), (key, level, str(refused.value))


def write(folder: Path, text: str, name: str = "dataset.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def subsets(folder: Path, subset: str = "", dataset: str = "resolution = 1024", general: str = "") -> str:
    (folder / "img").mkdir(exist_ok=True)
    return f"[general]\n{general}\n[[datasets]]\n{dataset}\n  [[datasets.subsets]]\n  image_dir = '{folder}/img'\n  {subset}\n"


REFUSED = {
    "a misspelt key": (lambda d: subsets(d, "num_repeat = 3"),
                       "subset 0 of dataset 0: unknown key 'num_repeat' (kohya refuses it too: extra keys not allowed @ "
                       "data['datasets'][0]['subsets'][0]['num_repeat']); did you mean 'num_repeats'?"),
    "a section kohya lacks": (lambda d: subsets(d) + "[dataset]\nresolution = 1\n", "the top level: unknown key 'dataset'"),
    "a subset key in [general]": (lambda d: subsets(d, general="image_dir = 'x'"),
                                  "[general]: unknown key 'image_dir' (kohya refuses it too: extra keys not allowed @ "
                                  "data['general']['image_dir']); image_dir belongs in [[datasets.subsets]]"),
    "a dataset key in a subset": (lambda d: subsets(d, "batch_size = 2"), "batch_size is a dataset option: write it in [[datasets]] or [general]"),
    "kohya's argparse name": (lambda d: subsets(d, general="train_batch_size = 2"), "write batch_size"),
    "prior_loss_weight": (lambda d: subsets(d, general="prior_loss_weight = 0.5"), "write --prior_loss_weight on the command line"),
    "color_aug": (lambda d: subsets(d, "color_aug = true"), "color_aug = True is kohya's and not supported here (no colour augmentation here); remove it"),
    "face_crop_aug_range": (lambda d: subsets(d, "face_crop_aug_range = [2.0, 4.0]"), "face_crop_aug_range = [2.0, 4.0] is kohya's and not supported"),
    "token_warmup_min": (lambda d: subsets(d, general="token_warmup_min = 3"), "token_warmup_min = 3 is kohya's and not supported here (no token warm-up here"),
    "token_warmup_step": (lambda d: subsets(d, "token_warmup_step = 0.5"), "token_warmup_step = 0.5 is kohya's and not supported"),
    "metadata_file": (lambda d: subsets(d, "metadata_file = 'meta.json'"), "metadata_file = 'meta.json' is kohya's and not supported here (kohya's fine-tuning subsets"),
    "cache_info": (lambda d: subsets(d, "cache_info = true"), "cache_info = True is kohya's and not supported"),
    "custom_attributes": (lambda d: subsets(d, "custom_attributes = {diff_output_preservation = true}"), "custom_attributes = {'diff_output_preservation': True} is kohya's"),
    "network_multiplier": (lambda d: subsets(d, dataset="resolution = 1024\nnetwork_multiplier = 0.5"), "network_multiplier = 0.5 is kohya's and not supported"),
    "resolution as text": (lambda d: subsets(d, dataset="resolution = 'abc'"),
                           "dataset 0: resolution = 'abc': give one side, e.g. 1024, or [width, height], e.g. [1024, 1024]"),
    "resolution as kohya's command-line text": (lambda d: subsets(d, dataset="resolution = '1024,1024'"), "resolution = '1024,1024': give one side"),
    "resolution of three sides": (lambda d: subsets(d, dataset="resolution = [1024, 1024, 3]"), "resolution = [1024, 1024, 3]: give one side"),
    "resolution of 0": (lambda d: subsets(d, dataset="resolution = 0"), "resolution = 0: give one side"),
    "no resolution": (lambda d: subsets(d, dataset=""), "dataset 0: no resolution (kohya requires one); give resolution = 1024 in [general] or [[datasets]], or --resolution"),
    "a bad value that a lower level overrides": (lambda d: subsets(d, "keep_tokens = 1", general="keep_tokens = 'first'"),
                                                  "[general]: keep_tokens = 'first': give a whole number >= 0"),
    "num_repeats 0": (lambda d: subsets(d, "num_repeats = 0"), "subset 0 of dataset 0: num_repeats = 0: give a whole number >= 1"),
    "num_repeats -1": (lambda d: subsets(d, "num_repeats = -1"), "num_repeats = -1: give a whole number >= 1"),
    "num_repeats 1.5": (lambda d: subsets(d, "num_repeats = 1.5"), "num_repeats = 1.5: give a whole number >= 1"),
    "num_repeats true": (lambda d: subsets(d, "num_repeats = true"), "num_repeats = True: give a whole number >= 1"),
    "batch_size 0": (lambda d: subsets(d, general="batch_size = 0"), "[general]: batch_size = 0: give a whole number >= 1"),
    "batch_size in quotes": (lambda d: subsets(d, general="batch_size = '4'"), "batch_size = '4': give a whole number >= 1 (without quotes: 4)"),
    "keep_tokens -1": (lambda d: subsets(d, "keep_tokens = -1"), "keep_tokens = -1: give a whole number >= 0"),
    "a rate of NaN": (lambda d: subsets(d, "caption_dropout_rate = nan"), "caption_dropout_rate = nan: give a number in [0, 1)"),
    "a rate of 1": (lambda d: subsets(d, "caption_tag_dropout_rate = 1.0"), "caption_tag_dropout_rate = 1.0: give a number in [0, 1)"),
    "validation_split 1": (lambda d: subsets(d, dataset="resolution = 1024\nvalidation_split = 1.0"), "validation_split = 1.0: give a number in [0, 1)"),
    "a bool as text": (lambda d: subsets(d, "shuffle_caption = 'yes'"), "shuffle_caption = 'yes': give true or false (without quotes)"),
    "an unknown interpolation": (lambda d: subsets(d, "resize_interpolation = 'sinc'"), "resize_interpolation = 'sinc': give one of lanczos, nearest"),
    "an empty caption_extension": (lambda d: subsets(d, "caption_extension = ''"), "caption_extension = '': give non-empty text in quotes"),
    "no image_dir": (lambda d: "[[datasets]]\nresolution = 1024\n  [[datasets.subsets]]\n  num_repeats = 2\n",
                     "subset 0 of dataset 0: no image_dir (kohya: required key not provided); give the folder of its images"),
    "an image_dir that is not there": (lambda d: subsets(d).replace("/img'", "/missing'"),
                                       "image_dir = '{d}/missing' is not a folder (a relative path is read from the current folder"),
    "a masks folder that is not there": (lambda d: subsets(d, "conditioning_data_dir = 'nowhere'"), "conditioning_data_dir = 'nowhere' is not a folder"),
    "alpha and a masks folder": (lambda d: subsets(d, f"alpha_mask = true\n  conditioning_data_dir = '{d}/img'"), "alpha_mask and conditioning_data_dir both give the loss mask; keep one"),
    "no datasets": (lambda d: "[general]\nresolution = 1024\n", "has no [[datasets]]"),
    "a dataset without subsets": (lambda d: "[[datasets]]\nresolution = 1024\n", "dataset 0: no [[datasets.subsets]]"),
    "datasets as a table": (lambda d: "[datasets]\nresolution = 1024\n", "datasets must be a list of tables ([[datasets]])"),
    "only reg subsets": (lambda d: subsets(d, "is_reg = true"), "dataset 0: every subset is is_reg, so nothing trains"),
    "bucket steps SDXL refuses": (lambda d: subsets(d, dataset="resolution = 1024\nenable_bucket = true\nbucket_reso_steps = 48"),
                                  "bucket_reso_steps = 48: SDXL needs a multiple of 32 (kohya refuses it too)"),
    "buckets smaller than the resolution": (lambda d: subsets(d, dataset="resolution = [1280, 768]\nenable_bucket = true"),
                                            "max_bucket_reso = 1024 is below the resolution's longer side 1280; give max_bucket_reso >= 1280"),
    "not TOML": (lambda d: "[[datasets]\nresolution = 1024\n", "is not TOML: "),
    "a Windows path in double quotes": (lambda d: '[[datasets]]\nresolution = 1024\n  [[datasets.subsets]]\n  image_dir = "C:\\hoge\\fuga"\n',
                                        "a Windows path in double quotes? write it in single quotes: image_dir = 'C:\\images'"),
    "an empty file": (lambda d: "  \n\n", "is empty; it needs [[datasets]] with [[datasets.subsets]] image_dir = '...'"),
    "only comments": (lambda d: "# nothing yet\n", "has no [[datasets]]"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_malformed_config_is_refused_in_one_line_naming_the_file_the_place_and_the_value(case, tmp_path):
    text, message = REFUSED[case]
    path = write(tmp_path, text(tmp_path))
    with pytest.raises(UserError) as refused:
        read_dataset_config(path, {})
    assert message.replace("{d}", str(tmp_path)) in str(refused.value) and "\n" not in str(refused.value), str(refused.value)
    assert str(refused.value).startswith(f"--dataset_config {str(path)!r}"), str(refused.value)


REFUSED_FILES = {
    "a YAML file": ("dataset.yaml", b"datasets: []\n", "is neither .toml nor .json"),
    "UTF-16 without its byte-order mark": ("dataset.toml", "[[datasets]]\n".encode("utf-16-le"), "is not text: byte 0x00"),
    "latin-1": ("dataset.toml", "[general]\ncaption_prefix = 'caf\xe9'\n".encode("latin-1"), "is not UTF-8 text: byte 0xe9"),
    "JSON with NaN": ("dataset.json", b'{"datasets": [{"resolution": NaN}]}', "is not JSON: NaN is not a number a dataset option takes"),
    "JSON that is a list": ("dataset.json", b'[{"resolution": 1024}]', "is not a table of [general] and [[datasets]] but a list"),
    "an empty JSON file": ("dataset.json", b"", "is empty"),
    "not JSON": ("dataset.json", b"{datasets: 1}", "is not JSON: Expecting property name"),
    "a missing file": ("missing.toml", None, "is not a file"),
}


@pytest.mark.parametrize("case", REFUSED_FILES)
def test_a_file_that_is_not_a_readable_config_is_refused_in_one_line(case, tmp_path):
    name, data, message = REFUSED_FILES[case]
    if data is not None:
        (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError) as refused:
        read_dataset_config(tmp_path / name, {})
    assert message in str(refused.value) and "\n" not in str(refused.value), str(refused.value)


def test_a_bad_command_line_value_is_refused_naming_the_option(tmp_path):
    path = write(tmp_path, subsets(tmp_path, dataset=""))
    with pytest.raises(UserError, match=r"--train_batch_size 0 \(for the config's batch_size\): give a whole number >= 1"):
        read_dataset_config(path, {"resolution": 1024, "train_batch_size": 0})

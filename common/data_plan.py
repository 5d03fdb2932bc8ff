"""The training data in one pass: datasets -> subsets -> examples -> images and masks -> buckets -> the datasets the
loader draws from (their latent caches are made in train_lora.py, which holds the VAE).

A dataset is kohya's: subsets trained at one resolution and batch size (common.dataset_config.DatasetSpec, read from
--dataset_config, or made of the command line's folders). Each subset's options live in its own record
(`SubsetPlan`: its augmentation, caption options and loss weight), so the loader never consults a global option.
Regularisation subsets (kohya's is_reg, --reg_data_dir) train in the same batches as the others, each image's loss
weighted by --prior_loss_weight, repeated or trimmed to the instance images' count as kohya does (`reg_repeats`).
A dataset's validation split is held out before that count: those images never train.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import UserError
from common.captions import CaptionOptions
from common.data import ALPHA, Augment, Example, check_images, check_masks, image_caption, with_masks
from common.dataset_config import DatasetSpec, SubsetSpec, reg_repeats, split_for_validation
from common.files import IMAGE_SUFFIXES


@dataclass(frozen=True)
class RunData:
    """The few run-wide settings the data path needs beside the datasets."""

    seed: int = 0
    masked_loss: bool = False
    skip_bad_images: bool = False
    prior_loss_weight: float = 1.0
    interpolation: str = "lanczos"


@dataclass(frozen=True)
class SubsetPlan:
    """How one subset's images train: its folder's name (as kohya records it), its augmentation, caption options
    and loss weight."""

    name: str
    is_reg: bool
    augment: Augment
    captions: CaptionOptions
    loss_weight: float = 1.0
    num_repeats: int = 1


@dataclass
class DatasetPlan:
    """One dataset's subsets and examples (each Example.subset indexes `subsets`), their images' (height, width), the
    images held out for validation, and lines on what was left out."""

    resolution: tuple[int, int]  # (width, height)
    batch_size: int
    subsets: list[SubsetPlan]
    examples: list[Example]
    sizes: list[tuple[int, int]]
    held_out: list[Example] = field(default_factory=list)
    held_out_sizes: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def reg_images(self) -> int:
        return sum(1 for e in self.examples if self.subsets[e.subset].is_reg)


def subset_augment(dataset: DatasetSpec, subset: SubsetSpec, run: RunData, masked: bool) -> Augment:
    """A kohya subset's augmentation: the dataset's size (or kohya's buckets), the subset's flip, crop (kohya's
    default is centred) and resize filter."""
    width, height = dataset.resolution
    bucket_rule = None
    if dataset.enable_bucket:
        from common.buckets import BucketOptions

        bucket_rule = BucketOptions(resolution_wh=dataset.resolution, min_reso=dataset.min_bucket_reso,
                                    max_reso=dataset.max_bucket_reso, steps=dataset.bucket_reso_steps, no_upscale=dataset.bucket_no_upscale)
        bucket_rule.check()
    return Augment(resolution=round(math.sqrt(width * height)), center_crop=not subset.random_crop, random_flip=subset.flip_aug,
                   interpolation=subset.resize_interpolation or run.interpolation, masked=masked,
                   size=None if width == height else (height, width), bucket_rule=bucket_rule)


def subset_captions(subset: SubsetSpec) -> CaptionOptions:
    """A subset's kohya caption options (common.captions), checked."""
    return CaptionOptions(shuffle=subset.shuffle_caption, keep_tokens=subset.keep_tokens,
                          keep_tokens_separator=subset.keep_tokens_separator or None, caption_separator=subset.caption_separator,
                          secondary_separator=subset.secondary_separator, caption_prefix=subset.caption_prefix,
                          caption_suffix=subset.caption_suffix, dropout=subset.caption_dropout_rate,
                          dropout_every_n_epochs=subset.caption_dropout_every_n_epochs, tag_dropout=subset.caption_tag_dropout_rate,
                          enable_wildcard=subset.enable_wildcard).check()


def subset_examples(subset: SubsetSpec, index: int) -> list[Example]:
    """A kohya subset's images (those directly in its folder, by name) with their captions: the file beside each with
    the subset's caption extension, else its class tokens. An image with neither is refused naming it (kohya trains
    it with an empty caption)."""
    folder = Path(subset.image_dir)
    examples, uncaptioned = [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption, source = image_caption(path, path.name, {}, subset.caption_extension, subset.enable_wildcard)
        if caption is None and subset.class_tokens:
            caption, source = subset.class_tokens, "folder"
        if caption is None:
            uncaptioned.append(path.name)
            continue
        examples.append(Example(path, caption, f"{folder.name}/{path.name}", subset.num_repeats, source, subset=index))
    if uncaptioned:
        raise UserError(f"{len(uncaptioned)} image(s) of {str(folder)!r} have no caption, e.g. {uncaptioned[0]}: no "
                        f"{subset.caption_extension} file beside them and no class_tokens for the folder (kohya would train them "
                        "with an empty caption)")
    if not examples:
        raise UserError(f"subset folder {str(folder)!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return examples


def subset_masks(examples: list[Example], subset: SubsetSpec, masked_loss: bool) -> list[Example]:
    """Each example's loss-mask source under its subset's options: the file of its stem in conditioning_data_dir,
    the image's alpha channel (alpha_mask, or --masked_loss without a folder), or none."""
    if subset.conditioning_data_dir is not None:
        return with_masks(examples, Path(subset.conditioning_data_dir))
    if subset.alpha_mask or masked_loss:
        return [dataclasses.replace(e, mask=ALPHA) for e in examples]
    return examples


def held_out(count: int, split: float, seed: int) -> tuple[list[int], list[int]]:
    """The positions of a subset's images that train and that validate: shuffled by `seed` as kohya's split_train_val
    shuffles them, the last round(count x split) validating and only the others training. kohya trains on the first
    ceil(count x (1 - split)) of the same order, which by float rounding can include a validation image (10 at 0.7);
    here the two never share one."""
    _, validating = split_for_validation(count, split, seed)
    return sorted(set(range(count)) - set(validating)), sorted(validating)


def plan_dataset(dataset: DatasetSpec, run: RunData, *, first_examples: list[Example] | None = None,
                 first_subset: SubsetPlan | None = None) -> DatasetPlan:
    """A dataset's subsets found, captioned, masked, read and checked, split for validation, and its regularisation
    images repeated or trimmed to its training images (kohya's DreamBoothDataset). `first_examples` and
    `first_subset` stand for a first subset found otherwise (the command line's instance folder, in its own layout,
    each example's repeats already its own: an N_prompt folder's N times --repeats)."""
    masked = run.masked_loss or any(s.alpha_mask or s.conditioning_data_dir for s in dataset.subsets)
    plans, examples_by_subset = [], []
    if first_examples is not None:
        plans.append(first_subset)
        examples_by_subset.append(first_examples)
    for subset in dataset.subsets:
        index = len(plans)
        # the command line's regularisation folders train as its instance folder does (its buckets, crop and flip)
        augment = first_subset.augment if first_subset is not None else subset_augment(dataset, subset, run, masked)
        plans.append(SubsetPlan(name=Path(subset.image_dir).name, is_reg=subset.is_reg, augment=augment,
                                captions=subset_captions(subset),
                                loss_weight=run.prior_loss_weight if subset.is_reg else 1.0, num_repeats=subset.num_repeats))
        examples_by_subset.append(subset_masks(subset_examples(subset, index), subset, run.masked_loss))
    plan = DatasetPlan(dataset.resolution, dataset.batch_size, plans, [], [])
    checked = []
    for examples in examples_by_subset:
        good, sizes = check_images(examples, run.skip_bad_images)
        if masked:
            _, black = check_masks(good, sizes)
            if black:
                plan.notes.append(f"{black} of {len(good)} masks are all black: those images train nothing (white trains, black not)")
        checked.append((good, sizes))
    if dataset.validation_split > 0:
        seed = run.seed if dataset.validation_seed is None else dataset.validation_seed
        for k, (good, sizes) in enumerate(checked):
            if plans[k].is_reg:
                continue
            training, validating = held_out(len(good), dataset.validation_split, seed)
            if not training:
                raise UserError(f"validation_split {dataset.validation_split} holds out every image of {plans[k].name}; "
                                "leave some to train")
            plan.held_out += [good[i] for i in validating]
            plan.held_out_sizes += [sizes[i] for i in validating]
            checked[k] = ([good[i] for i in training], [sizes[i] for i in training])
    train_images = sum(e.repeats for k, (good, _) in enumerate(checked) if not plans[k].is_reg for e in good)
    reg = [(plans[k].num_repeats, len(good)) for k, (good, _) in enumerate(checked) if plans[k].is_reg]
    shown = iter(reg_repeats(train_images, reg))
    for k, (good, sizes) in enumerate(checked):
        if plans[k].is_reg:
            times = next(shown)
            good, sizes = [dataclasses.replace(e, repeats=t) for e, t in zip(good, times) if t], [s for s, t in zip(sizes, times) if t]
        plan.examples += good
        plan.sizes += sizes
    return plan

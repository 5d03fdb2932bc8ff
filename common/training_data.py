"""train_lora.py's data path around common.data_plan and common.data: the options checked, the datasets planned
before any model loads (`plan_data`), then built into the datasets training draws from once the models are there
(`build_data`: captions, cached latents, class images, buckets.json), the line saying what the run trains on, and
the batches (`make_loader`, `ClassBatches`).

`config` is train_lora.py's TrainConfig (common/ never imports a script).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import UserError
from common.files import atomic_path

logger = logging.getLogger(__name__)


def check_data_sources(config) -> None:
    """The data options that exclude each other, and kohya's bucket options checked (common.buckets)."""
    if config.dataset_config:
        others = [f"--{name}" for name in ("instance_data_dir", "dataset_name", "reg_data_dir", "mask_dir") if getattr(config, name)]
        if others:
            raise UserError(f"--dataset_config holds the folders (image_dir, is_reg, conditioning_data_dir per subset); "
                            f"{', '.join(others)} cannot go with it")
    if config.reg_data_dir and config.dataset_name:
        raise UserError("--reg_data_dir goes with --instance_data_dir (kohya's --train_data_dir), not --dataset_name")
    if not 0 <= config.validation_split < 1 or math.isnan(config.validation_split):
        raise UserError(f"--validation_split must be in [0, 1), got {config.validation_split}")
    for name in ("validate_every_n_steps", "validate_every_n_epochs"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UserError(f"--{name} must be a whole number >= 1, got {getattr(config, name)}")
        if getattr(config, name) is not None and not config.validation_split and not config.dataset_config:
            raise UserError(f"--{name} computes the loss of held-out images: give --validation_split too (e.g. 0.1)")
    if not config.aspect_buckets and (config.bucket_no_upscale or any(
            v is not None for v in (config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps))):
        logger.warning("the bucket options apply with --aspect_buckets (kohya's --enable_bucket), which is not given: ignored, "
                       "as kohya ignores them")
    rule = kohya_bucket_options(config)
    if rule is not None:
        rule.check()


def kohya_bucket_options(config):
    """kohya's bucket rule where --aspect_buckets comes with any of kohya's bucket options (common.buckets); None
    for SDXL's published buckets or none."""
    from common.buckets import BucketOptions

    given = {"min_reso": config.min_bucket_reso, "max_reso": config.max_bucket_reso, "steps": config.bucket_reso_steps}
    if not config.aspect_buckets or (all(v is None for v in given.values()) and not config.bucket_no_upscale):
        return None
    size = config.training_size or (config.resolution, config.resolution)
    return BucketOptions(resolution_wh=size, no_upscale=config.bucket_no_upscale, **{k: v for k, v in given.items() if v is not None})


def plan_data(config) -> tuple[list, list[str]]:
    """The first half of the data path (`build_data` is the second, once the models are loaded), in one pass
    (common.data_plan): the datasets (kohya's --dataset_config, or the command line's folders), their subsets'
    examples found and captioned, every image and mask read, validation images held out and regularisation images
    counted to the instance images; (datasets, lines saying what was left out or trains nothing)."""
    from common.data_plan import plan_dataset

    run = run_data(config)
    if config.dataset_config:
        from common.dataset_config import read_dataset_config

        plans = [plan_dataset(spec, run) for spec in read_dataset_config(config.dataset_config, given_data_options(config))]
        return plans, [note for plan in plans for note in plan.notes]
    examples, notes = command_line_examples(config)
    plan = plan_dataset(command_line_dataset(config), run, first_examples=examples, first_subset=command_line_subset(config))
    return [plan], notes + plan.notes


def run_data(config):
    from common.data_plan import RunData

    return RunData(seed=config.seed, masked_loss=config.masked_loss, skip_bad_images=config.skip_bad_images,
                   prior_loss_weight=config.prior_loss_weight, interpolation=config.image_interpolation_mode)


def given_data_options(config) -> dict:
    """The data options given on the command line (or in --config_file) by name, for --dataset_config's levels to
    stand on (common.dataset_config): an option left at its default gives way to kohya's default."""
    names = ("train_batch_size", "repeats", "caption_extension", "shuffle_caption", "keep_tokens", "caption_dropout_rate",
             "caption_tag_dropout_rate", "caption_dropout_every_n_epochs", "caption_prefix", "caption_suffix", "caption_separator",
             "keep_tokens_separator", "secondary_separator", "enable_wildcard", "random_flip", "aspect_buckets", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
             "bucket_no_upscale", "masked_loss", "validation_split", "validation_seed")
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    given = {name: getattr(config, name) for name in names if getattr(config, name) != defaults[name]}
    if config.resolution != defaults["resolution"] or config.training_size:
        given["resolution"] = config.training_size or (config.resolution, config.resolution)
    return given


def command_line_examples(config) -> tuple[list, list[str]]:
    """The instance images of --instance_data_dir (kohya's --train_data_dir, with its N_prompt folders) or
    --dataset_name, captioned by the one caption rule of every layout, each with its repeats (N x --repeats), and the
    lines on folders left out."""
    from common.data import find_examples, skipped_folders, with_masks

    folder = Path(config.instance_data_dir) if config.instance_data_dir else None
    examples = find_examples(
        instance_data_dir=folder,
        instance_prompt=config.instance_prompt,
        dataset_name=config.dataset_name,
        dataset_config_name=config.dataset_config_name,
        image_column=config.image_column,
        caption_column=config.caption_column,
        caption_extension=config.caption_extension,
        prompt_as_prefix=config.prefix_instance_prompt,
        enable_wildcard=config.enable_wildcard,
    )
    examples = [dataclasses.replace(e, repeats=e.repeats * config.repeats) for e in examples]
    if config.masked_loss:
        examples = with_masks(examples, Path(config.mask_dir) if config.mask_dir else None)
    return examples, skipped_folders(folder) if folder is not None and not config.dataset_name else []


def command_line_subset(config):
    """How the command line's instance images train (common.data_plan.SubsetPlan)."""
    from common.data import Augment, sdxl_buckets
    from common.data_plan import SubsetPlan

    size = config.training_size
    augment = Augment(
        resolution=config.resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        interpolation=config.image_interpolation_mode,
        buckets=tuple(sdxl_buckets(config.resolution)) if config.aspect_buckets else (),
        masked=config.masked_loss,
        size=(size[1], size[0]) if size else None,
        bucket_rule=kohya_bucket_options(config),
    )
    name = Path(config.instance_data_dir).name if config.instance_data_dir else str(config.dataset_name)
    return SubsetPlan(name=name, is_reg=False, augment=augment, captions=caption_transform(config))


def command_line_dataset(config):
    """The command line's dataset (common.dataset_config.DatasetSpec) beside its instance subset: --reg_data_dir's
    N_class folders as kohya's regularisation subsets (images directly in it captioned by --class_prompt)."""
    from common.data import repeat_folders
    from common.dataset_config import DatasetSpec, SubsetSpec

    width, height = config.training_size or (config.resolution, config.resolution)
    subsets = []
    if config.reg_data_dir:
        folder = Path(config.reg_data_dir)
        if not folder.is_dir():
            raise UserError(f"--reg_data_dir {str(folder)!r} is not a folder")
        from common.files import has_images

        direct = [(folder, 1, config.class_prompt)] if has_images(folder) else []
        for sub, count, name in direct + repeat_folders(folder):
            subsets.append(SubsetSpec(image_dir=sub, num_repeats=count * config.repeats, class_tokens=name or None, is_reg=True,
                                      caption_extension=config.caption_extension, shuffle_caption=config.shuffle_caption,
                                      keep_tokens=config.keep_tokens, caption_dropout_rate=config.caption_dropout_rate,
                                      caption_tag_dropout_rate=config.caption_tag_dropout_rate,
                                      caption_dropout_every_n_epochs=config.caption_dropout_every_n_epochs,
                                      caption_prefix=config.caption_prefix, caption_suffix=config.caption_suffix,
                                      caption_separator=config.caption_separator,
                                      keep_tokens_separator=config.keep_tokens_separator or "",
                                      secondary_separator=config.secondary_separator, enable_wildcard=config.enable_wildcard))
        if not subsets:
            raise UserError(f"--reg_data_dir {str(folder)!r} has no images, in itself or in N_class folders (e.g. 1_dog)")
    return DatasetSpec(resolution=(width, height), subsets=tuple(subsets), batch_size=config.train_batch_size,
                       enable_bucket=False, validation_split=config.validation_split, validation_seed=config.validation_seed)


@dataclass
class TrainingData:
    """Instance images (one dataset, or a DatasetGroup of several) and class images for prior preservation, with
    each example's caption."""

    instances: object
    captions: list  # every dataset's examples' captions, abstractions already expanded
    classes: object = None
    class_captions: list = field(default_factory=list)
    plans: list = field(default_factory=list)  # common.data_plan.DatasetPlan of each dataset
    captions_vary: bool = False  # a subset's options draw captions no list can hold ahead (shuffles, wildcards, ...)
    held_out: list = field(default_factory=list)  # one dataset item per held-out image, the same at every evaluation

    def all_captions(self) -> list[str]:
        return sorted(set(self.captions) | set(self.class_captions))


def shown_captions(examples: list, options: list) -> tuple[list[str], bool]:
    """(the captions training can show, whether they vary beyond that list): each example's caption under its
    subset's kohya options (prefix, suffix, separators: the same every time), and the empty one where captions are
    dropped; or, where tags are shuffled or dropped, wildcards drawn or whole epochs dropped, the written captions and
    True (they are then encoded as they come)."""
    import random

    from common.captions import processed_caption

    undropped = [dataclasses.replace(o, dropout=0.0) for o in options]  # a dropped caption is the empty one, listed
    if any(undropped[e.subset].changes_per_draw for e in examples):
        return [e.caption for e in examples], True
    fixed = [processed_caption(e.caption, undropped[e.subset], random.Random(0), 1) for e in examples]
    return fixed + ([""] if any(options[e.subset].dropout > 0 for e in examples) else []), False


def build_data(config, checked, pipe, accelerator) -> TrainingData:
    """The second half of the data path (`plan_data` is the first): each dataset's checked examples (the preflight's
    `checked.datasets`), their captions' token abstractions expanded, as a dataset of its subsets' own options
    (optionally as cached latents), several datasets as one group, with the class images; buckets.json written."""
    import torch

    from common.data import CAPTIONS_AS_WRITTEN, CachedLatents, DatasetGroup, TrainingImages, check_images, find_examples
    from common.tokens import expand_abstractions, warn_about_long_prompts

    parts, captions, vary = [], [], False
    for plan in checked.datasets:
        examples = [dataclasses.replace(e, caption=expand_abstractions(e.caption, config.token_map)) for e in plan.examples]
        shown, varies = shown_captions(examples, [s.captions for s in plan.subsets])
        captions, vary = captions + shown, vary or varies
        parts.append(TrainingImages(examples, [s.augment for s in plan.subsets], 1, config.seed,
                                    captions=[s.captions for s in plan.subsets], sizes=plan.sizes,
                                    loss_weights=[s.loss_weight for s in plan.subsets]))
    data = TrainingData(parts[0], captions, plans=checked.datasets, captions_vary=vary)
    # the held-out images centred, unflipped and captioned as written: the same item at every evaluation
    held_out = [TrainingImages([dataclasses.replace(e, caption=expand_abstractions(e.caption, config.token_map)) for e in plan.held_out],
                               [dataclasses.replace(s.augment, center_crop=True, random_flip=False) for s in plan.subsets],
                               1, config.seed, captions=[CAPTIONS_AS_WRITTEN] * len(plan.subsets), sizes=plan.held_out_sizes)
                for plan in checked.datasets if plan.held_out]
    data.captions += [e.caption for part in held_out for e in part.examples]  # encoded like the others
    if config.with_prior_preservation:
        class_examples = find_examples(
            instance_data_dir=Path(config.class_data_dir), instance_prompt=config.class_prompt
        )
        class_examples, class_sizes = check_images(class_examples, config.skip_bad_images)
        count = config.num_class_images
        augment = dataclasses.replace(checked.datasets[0].subsets[0].augment, masked=config.masked_loss)
        data.classes = TrainingImages(class_examples[:count], augment, 1, config.seed + 1, sizes=class_sizes[:count])
        class_examples = class_examples[:count]
        data.class_captions = [e.caption for e in class_examples]
    if config.cache_latents or config.cache_latents_to_disk:
        encode = lambda pixels: vae_posterior(pipe.vae, pixels, accelerator.device)  # noqa: E731
        files, vae_key = None, ""
        if config.cache_latents_to_disk:
            from common.disk_cache import TensorFiles, module_digest

            files, vae_key = TensorFiles(disk_cache_folder(config) / "latents"), module_digest(pipe.vae)
        with torch.no_grad():
            parts = [CachedLatents(part, encode, files=files, model_key=vae_key) for part in parts]
            held_out = [CachedLatents(part, encode, files=files, model_key=vae_key) for part in held_out]
            if data.classes is not None:
                data.classes = CachedLatents(data.classes, encode, files=files, model_key=vae_key)
        if files is not None and accelerator.is_main_process:
            cached = parts + ([data.classes] if data.classes is not None else [])
            healed = sum(d.healed for d in cached)
            accelerator.print(f"latents: {sum(d.encoded for d in cached)} encoded, {sum(d.found for d in cached)} read from the "
                              f"disk cache {files.folder}" + (f"; {healed} of the encoded replaced broken entries (cut short, "
                                                              "incomplete or not finite)" if healed else ""))
        pipe.vae.to("cpu")  # the loop needs it no more: about 0.3 GiB of GPU memory for SDXL
    data.instances = parts[0] if len(parts) == 1 else DatasetGroup(parts, [plan.batch_size for plan in checked.datasets])
    data.held_out = [part[position] for part in held_out for position in range(len(part))]
    if accelerator.is_main_process:
        warn_about_long_prompts(pipe.tokenizer, data.all_captions(), "caption", logger.warning, max_tokens=config.max_token_length)
        accelerator.print(data_summary(data, config))
        write_bucket_record(data, config)
    return data


def disk_cache_folder(config) -> Path:
    from common.disk_cache import default_cache_folder

    return Path(config.disk_cache_dir) if config.disk_cache_dir else default_cache_folder()


def caption_transform(config):
    """kohya's caption options of the command line (common.captions), checked."""
    from common.captions import CaptionOptions

    return CaptionOptions(shuffle=config.shuffle_caption, keep_tokens=config.keep_tokens, keep_tokens_separator=config.keep_tokens_separator,
                          caption_separator=config.caption_separator, secondary_separator=config.secondary_separator,
                          caption_prefix=config.caption_prefix, caption_suffix=config.caption_suffix, dropout=config.caption_dropout_rate,
                          dropout_every_n_epochs=config.caption_dropout_every_n_epochs, tag_dropout=config.caption_tag_dropout_rate,
                          enable_wildcard=config.enable_wildcard).check()


def data_summary(data: TrainingData, config) -> str:
    """One line on what the run trains on: images, where their captions came from, repeats, buckets; with several
    datasets or regularisation images, kohya's counts of each."""
    from collections import Counter

    from common.data import open_mask

    examples = [e for plan in data.plans for e in plan.examples]
    sources = Counter(e.caption_from for e in examples)
    named = {"file": "from caption files", "metadata": "from metadata.jsonl", "folder": "from folder names",
             "prompt": "from --instance_prompt", "dataset": "from the dataset"}
    captions = ", ".join(f"{count} {named[source]}" for source, count in sources.items())
    repeats = Counter(e.repeats for e in examples)
    buckets = Counter(data.instances.bucket(position) for position in range(len(data.instances)))
    classes = f"; {len(data.class_captions)} class images" if data.classes is not None else ""
    masked_runs = [plan for plan in data.plans if any(s.augment.masked for s in plan.subsets)]
    if masked_runs:
        masked = sum(open_mask(e, size) is not None for plan in masked_runs for e, size in zip(plan.examples, plan.sizes))
        source = f"from {config.mask_dir}" if config.mask_dir else "from alpha channels"
        classes += f"; masked loss: {masked} of {len(examples)} images masked ({source}; the others train everywhere)"
    line = (f"{len(examples)} images, captions {captions} ({len({e.caption for e in examples})} distinct); "
            f"repeats {', '.join(f'{n} x{r}' for r, n in sorted(repeats.items()))}: {len(data.instances)} examples an epoch; "
            f"{len(buckets)} bucket(s) (width x height): {', '.join(f'{w}x{h} ({n})' for (h, w), n in sorted(buckets.items()))}"
            f"{classes}")
    held_out = sum(len(plan.held_out) for plan in data.plans)
    if held_out:
        line += f"; {held_out} images held out for the validation loss"
    reg = sum(plan.reg_images for plan in data.plans)
    if len(data.plans) > 1 or reg:
        line += "\n" + kohya_counts_line(data)
    return line


def kohya_counts_line(data: TrainingData) -> str:
    """kohya's numbers of an epoch, per dataset: train and regularisation images with repeats, what became of the
    regularisation images (repeated or trimmed to the train images), batches."""
    parts = []
    for k, plan in enumerate(data.plans):
        train = sum(e.repeats for e in plan.examples if not plan.subsets[e.subset].is_reg)
        reg = sum(e.repeats for e in plan.examples if plan.subsets[e.subset].is_reg)
        width, height = plan.resolution
        text = f"dataset {k} ({width}x{height}, batch {plan.batch_size}): {train} train images with repeats"
        if reg:
            weight = next(s.loss_weight for s in plan.subsets if s.is_reg)
            text += f", {reg} regularisation images with repeats, repeated or trimmed to match them as kohya does (loss x{weight:g})"
        parts.append(text)
    return "; ".join(parts)


def write_bucket_record(data: TrainingData, config) -> None:
    """buckets.json in the output folder: each image's bucket and the size it was resized to, and each bucket's count."""
    from common.data import fitted_size

    images = []
    for k, plan in enumerate(data.plans):
        for example, size in zip(plan.examples, plan.sizes):
            (height, width), (resized_h, resized_w) = fitted_size(size, plan.subsets[example.subset].augment)
            images.append({"dataset": k, "image": example.name, "size": [size[1], size[0]], "bucket": [width, height],
                           "resized": [resized_w, resized_h], "repeats": example.repeats})
    counts: dict = {}
    for item in images:
        key = f"{item['dataset']}: {item['bucket'][0]}x{item['bucket'][1]}"
        counts[key] = counts.get(key, 0) + item["repeats"]
    with atomic_path(Path(config.output_dir) / "buckets.json") as partial:
        partial.write_text(json.dumps({"buckets (dataset: width x height): images with repeats": counts, "images": images}, indent=1))


class ClassBatches:
    """Class-image batches for prior preservation, one per micro-step, in a seeded order that is the
    same after a resume; process p takes batch (micro_step * processes + p), so processes differ."""

    def __init__(self, data: TrainingData, config, accelerator):
        from common.data import BucketBatches

        self.dataset = data.classes
        self.order = BucketBatches(data.classes, config.train_batch_size, config.seed + 1)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes

    def batch(self, micro_step: int) -> dict:
        from common.data import collate

        global_index = micro_step * self.world + self.rank  # over all processes' class batches so far
        per_epoch = len(self.order)
        self.order.start_epoch(global_index // per_epoch)
        positions = self.order.batches()[global_index % per_epoch]
        return collate([self.dataset[p] for p in positions])


def vae_posterior(vae, pixels, device):
    """(mean, std) of the VAE's latent distribution, still unnormalised."""
    distribution = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    # the mean is a view of the VAE's output, whose other half (the log-variance) a cached view would keep alive
    return distribution.mean.float().cpu().clone(), distribution.std.float().cpu()


def make_loader(config, dataset, batch_size: int, pin_memory: bool = False):
    """The instance batches in BucketBatches' order; on a GPU in pinned memory, so that their copies to it need not wait
    for the device (batch_latents copies them with non_blocking)."""
    import torch

    from common.data import BucketBatches, collate

    batch_order = BucketBatches(dataset, batch_size, config.seed)  # a DatasetGroup batches each dataset at its own size
    # A loader without a generator of its own draws its workers' base seed from the global generator each time
    # an iterator is made (each epoch, and mid-epoch after a resume), shifting the noise of every later step.
    # accelerate's prepare_data_loader and skip_first_batches pass this generator on to the loaders they make.
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_order,
        collate_fn=collate,
        num_workers=config.dataloader_num_workers,
        generator=torch.Generator().manual_seed(config.seed),
        pin_memory=pin_memory,
    )
    return loader, batch_order

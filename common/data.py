"""Training images: folders or datasets, SDXL crops and micro-conditioning, aspect buckets, seeded order.

Every random choice (order, crop, flip) is drawn from a generator seeded by (seed, epoch, example),
so an interrupted run resumes with the same data as an uninterrupted one.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from common.captions import CaptionOptions, processed_caption
from common.cli import UserError
from common.files import IMAGE_SUFFIXES, has_images
from common.losses import latent_grid_mask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training image and its caption; `image` is a path, the file's bytes (datasets) or a PIL image. `repeats`:
    how often an epoch shows it (a kohya N_prompt folder's N); `caption_from`: where its caption came from (a
    caption file, a folder's name, the instance prompt, a dataset column); `mask`: where its loss mask comes from."""

    image: object
    caption: str
    name: str
    repeats: int = 1
    caption_from: str = "prompt"
    mask: object = None  # --masked_loss: a mask file's path, or ALPHA (the image's own transparency)
    subset: int = 0  # which of its dataset's subsets it belongs to: their own augmentation, captions and loss weight


ALPHA = "alpha"


@dataclass(frozen=True)
class Placement:
    """How an image is fitted into its bucket: SDXL's micro-conditioning numbers come from here."""

    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    target_size: tuple[int, int]  # (height, width) of the bucket
    flip: bool

    def time_ids(self) -> torch.Tensor:
        """SDXL's add_time_ids: original size, crop top-left, target size (Podell et al. 2023, Sec. 2.2)."""
        return torch.tensor([*self.original_size, *self.crop_top_left, *self.target_size], dtype=torch.float32)


def sdxl_buckets(resolution: int, step: int | None = None, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(height, width) buckets of about resolution^2 pixels, sides multiples of `step` (64 at 1024, as SDXL's
    training buckets 1024x1024, 896x1152, 832x1216, 768x1344, 640x1536 ...), aspect ratio up to `max_ratio`."""
    step = step or max(32, resolution // 16)
    area = resolution * resolution
    buckets = set()
    for width in range(step, 4 * resolution + 1, step):
        height = int(area / width) // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            buckets.add((height, width))
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - ratio))


def find_examples(
    *,
    instance_data_dir: Path | None,
    instance_prompt: str | None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    caption_column: str | None = None,
    caption_extension: str = ".txt",
    prompt_as_prefix: bool = False,
    enable_wildcard: bool = False,
) -> list[Example]:
    """Images with their captions: a datasets dataset (a caption column), or a folder in kohya's layouts, with or
    without a `metadata.jsonl` (`folder_examples`)."""
    if dataset_name:
        return _dataset_examples(dataset_name, dataset_config_name, image_column, caption_column, instance_prompt)
    if instance_data_dir is None:
        raise UserError("give --instance_data_dir FOLDER (with --instance_prompt) or --dataset_name DATASET")
    if not instance_data_dir.is_dir():
        raise UserError(f"--instance_data_dir {str(instance_data_dir)!r} is not a folder")
    return folder_examples(instance_data_dir, instance_prompt=instance_prompt, caption_extension=caption_extension,
                           prompt_as_prefix=prompt_as_prefix, caption_column=caption_column, enable_wildcard=enable_wildcard)


REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$")  # kohya's DreamBooth subfolders: `10_sks dog` is 10 repeats of "sks dog"
METADATA_FILE = "metadata.jsonl"


def folder_examples(folder: Path, *, instance_prompt: str | None, caption_extension: str = ".txt",
                    prompt_as_prefix: bool = False, caption_column: str | None = None,
                    enable_wildcard: bool = False) -> list[Example]:
    """The images of a folder in kohya's layouts (sd-scripts, library/config_util.py and train_util.py): the images in
    it and in each `N_prompt` subfolder (N repeats; the rest of the name, kohya's class tokens, the prompt of its
    images). One rule gives every image its caption, whatever the layout: the first line of the file beside it with
    `caption_extension` (`0001.txt` for `0001.png`), else its row in the folder's `metadata.jsonl` (`caption_column`,
    default `text`), else its folder's prompt (--instance_prompt for the folder itself); with `prompt_as_prefix` the
    prompt goes before a caption file's or metadata row's caption. An image without any, or an empty caption, is
    refused in one line. Text files may be UTF-8 or UTF-16 (`read_text_file`)."""
    metadata = metadata_captions(folder, caption_column) if (folder / METADATA_FILE).is_file() else {}
    groups = [(folder, 1, instance_prompt)] + [(sub, repeats, prompt) for sub, repeats, prompt in repeat_folders(folder)]
    examples, uncaptioned = [], []
    for group, repeats, prompt in groups:
        for path in sorted(p for p in group.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            name = path.relative_to(folder).as_posix()
            caption, source = image_caption(path, name, metadata, caption_extension, enable_wildcard)
            if caption is not None:
                caption = f"{prompt}, {caption}" if prompt_as_prefix and prompt else caption
            elif prompt:
                caption, source = prompt, "folder" if group != folder else "prompt"
            else:
                uncaptioned.append(name)
                continue
            examples.append(Example(path, caption, name, repeats, source))
    if uncaptioned:
        row = f", no {METADATA_FILE} row" if metadata else ""
        if "/" in uncaptioned[0]:  # an N_ folder without a prompt after its count
            folder_name = uncaptioned[0].split("/")[0]
            raise UserError(f"{len(uncaptioned)} image(s) have no caption, e.g. {uncaptioned[0]}: no {caption_extension} file beside "
                            f"them{row}, and folder {folder_name}/ names no prompt after its repeat count (N_prompt, e.g. "
                            f"{folder_name}sks dog)")
        raise UserError(f"{len(uncaptioned)} image(s) have no caption, e.g. {uncaptioned[0]}: no {caption_extension} file beside "
                        f"them{row} and no --instance_prompt (give one, or a caption file per image)")
    if not examples:
        raise UserError(f"--instance_data_dir {str(folder)!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}), "
                        "in itself or in N_prompt subfolders")
    listed = set(metadata) - {e.name for e in examples}
    if listed:
        logger.warning("%s names %d image(s) that are not in the folder (or not in an N_prompt folder), e.g. %s",
                       METADATA_FILE, len(listed), sorted(listed)[0])
    return examples


def image_caption(path: Path, name: str, metadata: dict[str, str], caption_extension: str,
                  enable_wildcard: bool = False) -> tuple[str | None, str]:
    """An image's own caption and its source ("file", "metadata"), or (None, "") when it has none of its own. A
    caption file's first line, or with `enable_wildcard` its every line (kohya's: one is drawn each time)."""
    from common.captions import caption_from_file
    from common.files import read_text_file

    caption_file = path.with_suffix(caption_extension)
    if caption_file.is_file():
        caption = caption_from_file(read_text_file(caption_file, "caption file"), enable_wildcard)
        if not caption:
            raise UserError(f"caption file {str(caption_file)!r} is empty; write the image's caption on its first line")
        return caption, "file"
    if name in metadata:
        return metadata[name], "metadata"
    return None, ""


def repeat_folders(folder: Path) -> list[tuple[Path, int, str]]:
    """The N_prompt subfolders kohya trains on: (folder, N, prompt), N >= 1."""
    return [(sub, int(match[1]), match[2]) for sub in sorted(folder.iterdir())
            if sub.is_dir() and (match := REPEATS_FOLDER.match(sub.name)) and int(match[1]) > 0]


def skipped_folders(folder: Path) -> list[str]:
    """One line per rule under which folders holding images are not trained on, naming them, as kohya reports (or
    silently applies) its rules: subfolders without a repeat count (kohya: "ignore directory without repeats"), with 0
    repeats (kohya skips them without a word), and folders inside an N_prompt folder (kohya reads one level)."""
    subfolders = [sub for sub in sorted(folder.iterdir()) if sub.is_dir() and not sub.name.startswith(".")]
    no_count = [sub.name for sub in subfolders if not REPEATS_FOLDER.match(sub.name) and has_images(sub)]
    zero = [sub.name for sub in subfolders if (m := REPEATS_FOLDER.match(sub.name)) and int(m[1]) == 0 and has_images(sub)]
    nested = [inner.relative_to(folder).as_posix() for sub, _, _ in repeat_folders(folder) for inner in sorted(sub.rglob("*"))
              if inner.is_dir() and has_images(inner)]
    lines = []
    if no_count:
        lines.append(f"ignoring folder(s) without a repeat count: {', '.join(no_count)} (kohya's folders are N_prompt, e.g. "
                     "10_sks dog; kohya ignores these too)")
    if zero:
        lines.append(f"ignoring folder(s) of 0 repeats: {', '.join(zero)} (0 repeats trains nothing; kohya skips them too)")
    if nested:
        lines.append(f"ignoring folder(s) inside N_prompt folders: {', '.join(nested)} (kohya reads one level; move their "
                     "images up, or into an N_prompt folder of their own)")
    return lines


def metadata_captions(folder: Path, caption_column: str | None) -> dict[str, str]:
    """file_name -> caption of a folder's metadata.jsonl (an imagefolder's: one JSON object a line), from
    `caption_column` (default `text`); a line that is not such an object is refused naming its number."""
    import json

    from common.files import read_text_file

    column = caption_column or "text"
    captions = {}
    path = folder / METADATA_FILE
    for number, line in enumerate(read_text_file(path, METADATA_FILE).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise UserError(f"{str(path)!r} line {number} is not JSON: {error}") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise UserError(f"{str(path)!r} line {number} has no \"file_name\" (an imagefolder's rows name their image)")
        if row.get(column) is None:
            continue
        caption = str(row[column]).strip()
        if not caption:
            raise UserError(f"{str(path)!r} line {number}: the {column!r} caption of {row['file_name']} is empty")
        captions[Path(row["file_name"]).as_posix()] = caption
    if not captions and caption_column:
        raise UserError(f"{str(path)!r} has no {caption_column!r} column (--caption_column)")
    return captions


def _dataset_examples(dataset_name: str, config_name: str | None, image_column: str, caption_column: str | None,
                      instance_prompt: str | None):
    import datasets

    is_image_folder = Path(dataset_name).is_dir() and not any(Path(dataset_name).glob("*.py"))
    if is_image_folder and config_name:
        raise UserError(f"--dataset_config_name {config_name!r}: {dataset_name!r} is a folder of images, which has no configurations")
    try:
        if is_image_folder:
            dataset = datasets.load_dataset("imagefolder", data_dir=dataset_name, split="train")
        else:
            dataset = datasets.load_dataset(dataset_name, config_name, split="train")
    except Exception as error:  # datasets raises many types for a missing or remote dataset
        raise UserError(f"could not load dataset {dataset_name!r} (hub datasets need network access): {error}") from None
    columns = dataset.column_names
    if image_column not in columns:
        raise UserError(f"--image_column {image_column!r} is not in dataset {dataset_name!r}; columns: {', '.join(columns)}")
    if caption_column is not None and caption_column not in columns:
        raise UserError(f"--caption_column {caption_column!r} is not in dataset {dataset_name!r}; columns: {', '.join(columns)}")
    if caption_column is None and not instance_prompt and "text" in columns:
        caption_column = "text"  # an imagefolder's metadata.jsonl usually names its captions so
    if caption_column is None and not instance_prompt:
        raise UserError(f"dataset {dataset_name!r}: give --caption_column (columns: {', '.join(columns)}) or --instance_prompt")
    # the files themselves, not datasets' decoding (PIL's, which clips 16-bit images): common.images reads them
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return [
        Example(_image_source(row[image_column]), str(row[caption_column]) if caption_column else instance_prompt,
                f"{dataset_name}[{i}]", caption_from="dataset" if caption_column else "prompt")
        for i, row in enumerate(dataset)
    ]


def _image_source(cell: dict):
    """An undecoded datasets image: its bytes where the dataset holds them, else its file's path."""
    return cell["bytes"] if cell.get("bytes") is not None else Path(cell["path"])


def open_rgb(example: Example):
    """The example's image as 8-bit RGB, as a viewer shows it (common.images)."""
    from common.images import read_image

    return read_image(example.image)


def with_masks(examples: list[Example], mask_dir: Path | None) -> list[Example]:
    """Each example with the source of its --masked_loss mask: the file of the same stem in `mask_dir` (kohya's
    conditioning images; any image type), else the image's own alpha channel. A folder missing some masks is refused
    in one line naming one."""
    import dataclasses

    if mask_dir is None:
        return [dataclasses.replace(e, mask=ALPHA) for e in examples]
    if not mask_dir.is_dir():
        raise UserError(f"--mask_dir {str(mask_dir)!r} is not a folder")
    files = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [e.name for e in examples if Path(e.name).stem not in files]
    if missing:
        raise UserError(f"--mask_dir {str(mask_dir)!r} has no mask for {len(missing)} image(s), e.g. {missing[0]} (a mask "
                        f"has the image's file stem: {Path(missing[0]).stem}.png)")
    return [dataclasses.replace(e, mask=files[Path(e.name).stem]) for e in examples]


def open_mask(example: Example, size: tuple[int, int]):
    """The example's mask as an "L" image of the image's `size` (height, width), or None for an image without
    transparency (it trains everywhere). A mask file of the image's aspect ratio but another size is scaled to it;
    one that is no image, or of another aspect ratio, is refused naming it."""
    from PIL import Image

    from common.images import read_alpha, read_mask_file

    if example.mask is None:
        return None
    if example.mask == ALPHA:
        return read_alpha(example.image) if isinstance(example.image, (str, Path, bytes, bytearray)) else None
    try:
        mask = read_mask_file(example.mask)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for a file that is no image
        raise UserError(f"mask {str(example.mask)!r} (of {example.name}) cannot be read as an image: {error}") from None
    if (mask.height, mask.width) != size:
        if abs(mask.width / mask.height - size[1] / size[0]) > 0.01:
            raise UserError(f"mask {str(example.mask)!r} is {mask.width}x{mask.height}, its image {example.name} "
                            f"{size[1]}x{size[0]}: a mask has its image's size (or at least its aspect ratio)")
        mask = mask.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return mask


def check_masks(examples: list[Example], sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """Every mask read and fitted to its image as training will (`open_mask`), before any model loads: (masked images,
    all-black masks). A black mask trains nothing of its image; masks that are all black are refused, since the
    LoRA would come out unchanged from its start."""
    masked = black = 0
    for example, size in zip(examples, sizes):
        mask = open_mask(example, size)
        if mask is not None:
            masked += 1
            black += mask.getextrema()[1] == 0
    if masked and black == len(examples):
        source = "alpha channel" if examples[0].mask == ALPHA else "mask"
        raise UserError(f"every image's {source} is all black ({black} of {len(examples)}): a black mask excludes its image from "
                        "the loss, so the LoRA would learn nothing (white trains, black does not)")
    return masked, black


def check_images(examples: list[Example], skip_bad: bool) -> tuple[list[Example], list[tuple[int, int]]]:
    """Every image decodes; a bad one is an error naming it, or is skipped with a warning when asked. (The readable
    examples, their images' (height, width).)"""
    good, sizes = [], []
    for example in examples:
        try:
            image = open_rgb(example)
            image.load()
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            if not skip_bad:
                raise UserError(f"cannot read image {example.name}: {error}; fix or remove it, or pass --skip_bad_images") from None
            logger.warning("skipping unreadable image %s: %s", example.name, error)
            continue
        good.append(example)
        sizes.append((image.height, image.width))
    if not good:
        raise UserError("no readable training images left")
    return good, sizes


@dataclass(frozen=True)
class Augment:
    """How a subset's images are fitted into their training size: the dataset's size and buckets, the subset's crop,
    flip and resize filter."""

    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    interpolation: str = "lanczos"
    buckets: tuple[tuple[int, int], ...] = ()  # empty: every image is `size`, or a resolution x resolution square
    masked: bool = False  # every item carries a loss mask (--masked_loss)
    size: tuple[int, int] | None = None  # (height, width) of every image without buckets, where it is no square
    bucket_rule: object = None  # kohya's bucket options (common.buckets.BucketOptions): each image's bucket from its size


INTERPOLATIONS = ("lanczos", "bicubic", "bilinear", "nearest", "box", "hamming")


def bucket_of(size: tuple[int, int], augment: Augment) -> tuple[int, int]:
    """(height, width) that an image of `size` (height, width) is trained at."""
    return fitted_size(size, augment)[0]


def fitted_size(size: tuple[int, int], augment: Augment) -> tuple[tuple[int, int], tuple[int, int]]:
    """(the bucket, the size the image is resized to before it is cropped to the bucket), both (height, width): scaled
    to cover the bucket, or as kohya's bucket rule resizes it (common.buckets; with --bucket_no_upscale never larger)."""
    if augment.bucket_rule is not None:
        from common.buckets import image_bucket

        choice = image_bucket(augment.bucket_rule, (size[1], size[0]), _kohya_buckets(augment.bucket_rule))
        return (choice.bucket_wh[1], choice.bucket_wh[0]), (choice.resized_wh[1], choice.resized_wh[0])
    if not augment.buckets:
        target = augment.size or (augment.resolution, augment.resolution)
    else:
        target = nearest_bucket(*size, list(augment.buckets))
    scale = max(target[0] / size[0], target[1] / size[1])
    return target, (max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale)))


@functools.lru_cache(maxsize=8)
def _kohya_buckets(rule) -> list[tuple[int, int]]:
    from common.buckets import bucket_resolutions

    return bucket_resolutions(rule)


def place_image(image, augment: Augment, rng: random.Random, flip: bool | None = None):
    """Resize to cover the bucket, crop to it, maybe flip: (pixel tensor in [-1, 1], Placement)."""
    pixels, placement, _ = place_image_and_mask(image, None, augment, rng, flip)
    return pixels, placement


def place_image_and_mask(image, mask, augment: Augment, rng: random.Random, flip: bool | None = None):
    """`place_image`, and the mask ("L" image of the image's size, or None) given the same resize, crop and flip (a
    (height, width) tensor in [0, 1], all ones for None). The mask is resized bilinearly: a Lanczos kernel would ring
    past 0 and 1 at its edges."""
    import numpy as np
    from PIL import Image

    original = (image.height, image.width)
    (target_h, target_w), (resized_h, resized_w) = fitted_size(original, augment)
    resample = getattr(Image.Resampling, augment.interpolation.upper())
    image = image.resize((resized_w, resized_h), resample=resample)
    if augment.center_crop:
        top, left = (resized_h - target_h) // 2, (resized_w - target_w) // 2
    else:
        top, left = rng.randint(0, resized_h - target_h), rng.randint(0, resized_w - target_w)
    image = image.crop((left, top, left + target_w, top + target_h))
    if flip is None:
        flip = augment.random_flip and rng.random() < 0.5
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    placed_mask = None
    if mask is not None:
        mask = mask.resize((resized_w, resized_h), resample=Image.Resampling.BILINEAR).crop((left, top, left + target_w, top + target_h))
        if flip:
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        placed_mask = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)
    elif mask is None and augment.masked:
        placed_mask = torch.ones(target_h, target_w)
    return pixels, Placement(original, (top, left), (target_h, target_w), flip), placed_mask


def example_rng(seed: int, epoch: int, position: int) -> random.Random:
    # string seeds are hashed with SHA-512 by `random`, the same in every process (unlike hash())
    return random.Random(f"{seed}:{epoch}:{position}")


CAPTIONS_AS_WRITTEN = CaptionOptions()  # kohya's defaults: every caption file's first line as it stands


def caption_rng(seed: int, epoch: int, position: int) -> random.Random:
    """The generator of an example's caption draws, apart from its image's (`example_rng`), so that caption options
    leave crops and flips as they were."""
    return random.Random(f"{seed}:{epoch}:{position}:caption")


class TrainingImages(torch.utils.data.Dataset):
    """(index, pixels, placement, caption) for each repeated example: the example's caption drawn through its subset's
    kohya caption options (common.captions `processed_caption`) for this epoch and position, its image placed by its subset's augment, and,
    where subsets weigh their losses differently (kohya's regularisation images), its `loss_weight`.

    `augment`, `captions` and `loss_weights` are one per subset (Example.subset), or one for all."""

    def __init__(self, examples: list[Example], augment: Augment | list[Augment], repeats: int, seed: int,
                 captions: CaptionOptions | list[CaptionOptions] = CaptionOptions(),
                 sizes: list[tuple[int, int]] | None = None, loss_weights: list[float] | None = None):
        self.examples, self.seed = examples, seed
        self.augments = augment if isinstance(augment, list) else [augment]
        self.caption_options = captions if isinstance(captions, list) else [captions]
        self.loss_weights = loss_weights if loss_weights and any(w != 1.0 for w in loss_weights) else None
        self.indices = [i for i, example in enumerate(examples) for _ in range(repeats * example.repeats)]
        if sizes is None:  # (height, width) of each image, when `check_images` has not read them already
            sizes = [(image.height, image.width) for image in map(open_rgb, examples)]
        self.sizes = list(sizes)
        self.epoch = 0

    @property
    def augment(self) -> Augment:
        """The first subset's augment (the one of a dataset of one subset)."""
        return self.augments[0]

    def augment_of(self, index: int) -> Augment:
        return self.augments[self.examples[index].subset if len(self.augments) > 1 else 0]

    def captions_of(self, index: int) -> CaptionOptions:
        return self.caption_options[self.examples[index].subset if len(self.caption_options) > 1 else 0]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = self.indices[position]
        example = self.examples[index]
        pixels, placement, mask = place_image_and_mask(open_rgb(example), open_mask(example, self.sizes[index]), self.augment_of(index),
                                                       example_rng(self.seed, self.epoch, position))
        item = {"index": index, "pixels": pixels, "placement": placement, "caption": self.caption(position)}
        return item | ({"mask": mask} if mask is not None else {}) | self.weight(index)

    def weight(self, index: int) -> dict:
        """{"loss_weight": w} where subsets weigh their losses differently; {} otherwise, so batches stay as they were."""
        return {} if self.loss_weights is None else {"loss_weight": self.loss_weights[self.examples[index].subset]}

    def caption(self, position: int) -> str:
        index = self.indices[position]
        caption, options = self.examples[index].caption, self.captions_of(index)
        if options == CAPTIONS_AS_WRITTEN:
            return caption
        # kohya counts epochs from 1 (its trainers' current_epoch is epoch + 1)
        return processed_caption(caption, options, caption_rng(self.seed, self.epoch, position), self.epoch + 1)

    def bucket(self, position: int) -> tuple[int, int]:
        index = self.indices[position]
        return bucket_of(self.sizes[index], self.augment_of(index))


class BucketBatches(torch.utils.data.Sampler):
    """Batches of positions that share a bucket, shuffled by (seed, epoch): identical in every process
    and after a resume. Incomplete batches are kept (small DreamBooth sets would lose images). A DatasetGroup's
    datasets are batched each at its own batch size, one bucket of one dataset a batch, and all their batches
    shuffled together, as kohya's DatasetGroup draws them."""

    def __init__(self, dataset, batch_size: int, seed: int, shuffle: bool = True):
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        # not `set_epoch`: accelerate calls that with its own count of iterations, which restarts at 0 on resume
        self.epoch = epoch
        self.dataset.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}:order")
        parts = self.dataset.parts() if isinstance(self.dataset, DatasetGroup) else [(0, len(self.dataset), self.batch_size)]
        batches = []
        for start, length, batch_size in parts:
            groups: dict[tuple[int, int], list[int]] = {}
            for position in range(start, start + length):
                groups.setdefault(self.dataset.bucket(position), []).append(position)
            for positions in groups.values():
                if self.shuffle:
                    rng.shuffle(positions)
                batches += [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class DatasetGroup(torch.utils.data.Dataset):
    """Datasets trained together, each at its own resolution and batch size (kohya's DatasetGroup): their positions
    end to end; BucketBatches batches each at its batch size. Items keep their dataset's example index and gain
    `dataset`, so a caption or latent is always found in its own dataset."""

    def __init__(self, datasets: list, batch_sizes: list[int]):
        self.datasets, self.batch_sizes = datasets, batch_sizes
        self.starts = [sum(len(d) for d in datasets[:k]) for k in range(len(datasets))]

    def parts(self) -> list[tuple[int, int, int]]:
        """(first position, length, batch size) of each dataset."""
        return [(start, len(d), size) for start, d, size in zip(self.starts, self.datasets, self.batch_sizes)]

    def locate(self, position: int) -> tuple[int, int]:
        """(dataset, its own position) of a group position."""
        k = max(k for k, start in enumerate(self.starts) if start <= position)
        return k, position - self.starts[k]

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    @property
    def epoch(self) -> int:
        return self.datasets[0].epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        for dataset in self.datasets:
            dataset.epoch = value

    def bucket(self, position: int) -> tuple[int, int]:
        k, own = self.locate(position)
        return self.datasets[k].bucket(own)

    def __getitem__(self, position: int) -> dict:
        k, own = self.locate(position)
        return self.datasets[k][own] | {"dataset": k}


# Pixels encoded per VAE call when caching latents: one 1024x1024 image. At batch 8 the fp32 SDXL VAE's
# encoder needs about 20 GiB at 1024x1024 (bench/gpu_memory.py), more than the whole training step.
ENCODE_PIXELS = 1024 * 1024


class CachedLatents(torch.utils.data.Dataset):
    """TrainingImages encoded once: the VAE posterior (mean, std) of each example's fixed crop, for both
    flips when flipping is on; each step draws its flip and samples the posterior. Items keep their
    example index, so latent, caption and size stay paired whatever order the loader takes.

    With `files` (a common.disk_cache.TensorFiles) the posteriors live on disk, not in memory, named by their content
    (`latent_key`: the image's and mask's bytes, its placement and flip, and `model_key`, the VAE's weights): entries
    already there are read instead of encoded, and memory stays flat in the dataset's size."""

    def __init__(self, images: TrainingImages, encode, batch_size: int | None = None, files=None, model_key: str = ""):
        self.images, self.files, self.cache, self._digests = images, files, {}, {}
        self.encoded = self.found = self.healed = 0  # entries encoded now, found whole on disk, found broken and encoded again
        if batch_size is None:  # the fp32 VAE encoder's activations grow with the pixels: about 1 Mpx at a time
            batch_size = max(1, ENCODE_PIXELS // max(math.prod(a.size) if a.size else a.resolution**2 for a in images.augments))
        keys = [(index, flip) for index in range(len(images.examples))
                for flip in ((False, True) if images.augment_of(index).random_flip else (False,))]
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            placed = [place_image_and_mask(open_rgb(images.examples[i]), open_mask(images.examples[i], images.sizes[i]),
                                           images.augment_of(i), example_rng(images.seed, 0, i), flip) for i, flip in chunk]
            names = [latent_key(self._sources(i), images.augment_of(i), placed[k][1], model_key) if files is not None else None
                     for k, (i, _) in enumerate(chunk)]
            by_size: dict[tuple[int, int], list[int]] = {}
            wanted = {"mean", "std"} | ({"mask"} if images.augment.masked else set())
            for k, (pixels, _, _) in enumerate(placed):
                if names[k] is not None and names[k] in files:
                    if files.whole(names[k], wanted):
                        self.cache[chunk[k]] = (names[k], placed[k][1])
                        self.found += 1
                        continue
                    self.healed += 1  # cut short, a tensor missing or not finite: encoded again below, replacing it
                by_size.setdefault(tuple(pixels.shape[1:]), []).append(k)
            for members in by_size.values():
                means, stds = encode(torch.stack([placed[k][0] for k in members]))
                self.encoded += len(members)
                if not (torch.isfinite(means).all() and torch.isfinite(stds).all()):
                    names_of = ", ".join(images.examples[chunk[k][0]].name for k in members)
                    raise UserError(f"the VAE encoded {names_of} to non-finite latents (an fp16 VAE overflowing? give an fp16-safe "
                                    "one with --pretrained_vae_model_name_or_path, or let it run in fp32)")
                for k, mean, std in zip(members, means, stds):
                    mask = placed[k][2]
                    if mask is not None:  # kept on the latent grid, where the loss uses it (`latent_grid_mask`)
                        mask = latent_grid_mask(mask[None], mean.shape[-2:])[0, 0]
                    if files is None:
                        self.cache[chunk[k]] = (mean, std, placed[k][1], mask)
                    else:
                        files.put(names[k], {"mean": mean, "std": std} | ({"mask": mask} if mask is not None else {}))
                        self.cache[chunk[k]] = (names[k], placed[k][1])

    def _sources(self, index: int) -> dict:
        """The digests of an example's image and mask bytes, read once for both of its flips."""
        from common.disk_cache import source_digest

        if index not in self._digests:
            mask = self.images.examples[index].mask
            self._digests[index] = {"image": source_digest(self.images.examples[index].image),
                                    "mask": None if mask is None else (ALPHA if mask == ALPHA else source_digest(mask))}
        return self._digests[index]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def epoch(self) -> int:
        return self.images.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.images.epoch = value

    def bucket(self, position: int) -> tuple[int, int]:
        return self.images.bucket(position)

    def __getitem__(self, position: int) -> dict:
        index = self.images.indices[position]
        flip = self.images.augment_of(index).random_flip and example_rng(self.images.seed, self.epoch, position).random() < 0.5
        mean, std, placement, mask = self._entry(index, flip)
        item = {"index": index, "latent_mean": mean, "latent_std": std, "placement": placement, "caption": self.images.caption(position)}
        return item | ({"mask": mask} if mask is not None else {}) | self.images.weight(index)

    def _entry(self, index: int, flip: bool):
        if self.files is None:
            return self.cache[(index, flip)]
        name, placement = self.cache[(index, flip)]
        entry = self.files.get(name)
        if entry is None:
            raise UserError(f"cached latent {self.files.path(name)} of {self.images.examples[index].name} could not be read; "
                            "delete it and run again")
        return entry["mean"], entry["std"], placement, entry.get("mask")


def latent_key(sources: dict, augment: Augment, placement: Placement, model_key: str) -> str:
    """The name of an example's cached posterior: everything it depends on (`sources`: its image's and mask's digests)."""
    from common.disk_cache import content_key

    return content_key(image=sources["image"], mask=sources["mask"], placement=placement, interpolation=augment.interpolation,
                       model=model_key)


def collate(items: list[dict]) -> dict:
    batch = {
        "index": torch.tensor([item["index"] for item in items]),
        "time_ids": torch.stack([item["placement"].time_ids() for item in items]),
        "captions": [item["caption"] for item in items],
    }
    for key in ("pixels", "latent_mean", "latent_std", "mask"):
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    if "loss_weight" in items[0]:  # kohya's regularisation images: prior_loss_weight on each one's loss
        batch["loss_weight"] = torch.tensor([item["loss_weight"] for item in items])
    if "dataset" in items[0]:
        batch["dataset"] = items[0]["dataset"]  # a batch is one bucket of one dataset
    return batch

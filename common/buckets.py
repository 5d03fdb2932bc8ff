"""Aspect-ratio buckets under the user's control, with kohya's meanings: --resolution W,H, --min_bucket_reso,
--max_bucket_reso, --bucket_reso_steps and --bucket_no_upscale; and the record of buckets.json, which bucket each
image went to and how it was resized.

Reproduces kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb: library/model_util.py
(make_bucket_resolutions), library/train_util.py (BucketManager: make_buckets, round_to_steps, select_bucket, sort;
BaseDataset.adjust_min_max_bucket_reso_by_steps, BaseDataset.make_buckets' bucket_info; trim_and_resize_if_required)
and sdxl_train_network.py (verify_bucket_reso_steps(32)).

Every size here is (width, height), kohya's order, and its name ends in `_wh`: common.data's sizes are (height, width).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence

from common.cli import UserError

# kohya's SDXL trainers refuse other steps (verify_bucket_reso_steps(32)): the UNet halves its latents twice, so a
# bucket side, 8x its latent side, has to be a multiple of 8 * 4 pixels for the skip connections to line up.
SDXL_STEP_MULTIPLE = 32
# A whole latent per side: the VAE downsamples by 8.
VAE_FACTOR = 8
# No GPU holds SDXL's activations at a side this long; a larger value is a typo, and would make the bucket search
# loop for hours (kohya has no such limit).
MAX_SIDE = 16384

KOHYA_MIN_BUCKET_RESO, KOHYA_MAX_BUCKET_RESO, KOHYA_BUCKET_RESO_STEPS = 256, 1024, 64  # kohya's argparse defaults


@dataclass(frozen=True)
class BucketOptions:
    """kohya's bucket options: the training area `resolution_wh` (its --resolution, (width, height)), the shortest and
    longest bucket side, the step of bucket sides, and `no_upscale` (each image gets a bucket from its own size, never
    enlarged; min_reso and max_reso are then unused, as in kohya)."""

    resolution_wh: tuple[int, int]
    min_reso: int = KOHYA_MIN_BUCKET_RESO
    max_reso: int = KOHYA_MAX_BUCKET_RESO
    steps: int = KOHYA_BUCKET_RESO_STEPS
    no_upscale: bool = False

    def check(self) -> None:
        """Refuse options kohya's SDXL trainers refuse or cannot train with, in one line each: what was wrong, the value
        and what is accepted. The limits are compared after `aligned`, as kohya compares them."""
        for flag, value in (("--bucket_reso_steps", self.steps), ("--min_bucket_reso", self.min_reso),
                            ("--max_bucket_reso", self.max_reso)):
            if not _is_whole(value) or not 0 < value <= MAX_SIDE:
                raise UserError(f"{flag} {value!r} must be a whole number of pixels in [1, {MAX_SIDE}]")
        if self.steps % SDXL_STEP_MULTIPLE:
            raise UserError(f"--bucket_reso_steps {self.steps} must be a multiple of {SDXL_STEP_MULTIPLE} for SDXL (kohya's "
                            f"sdxl trainers refuse it too); {KOHYA_BUCKET_RESO_STEPS} is usual")
        width, height = self.resolution_wh
        for value in (width, height):
            if not _is_whole(value) or not 0 < value <= MAX_SIDE or value % VAE_FACTOR:
                raise UserError(f"--resolution {width},{height}: each side must be a multiple of {VAE_FACTOR} in "
                                f"[{VAE_FACTOR}, {MAX_SIDE}], e.g. 1024 or 1024,768")
        aligned = self.aligned()
        if aligned.min_reso == 0:
            raise UserError(f"--min_bucket_reso {self.min_reso} is below --bucket_reso_steps {self.steps}, and would round "
                            f"down to 0: give at least {self.steps}")
        if aligned.max_reso < aligned.min_reso:
            raise UserError(f"--max_bucket_reso {aligned.max_reso} is below --min_bucket_reso {aligned.min_reso}")
        if max(width, height) > aligned.max_reso:
            raise UserError(f"--max_bucket_reso {aligned.max_reso} is below --resolution's longer side "
                            f"{max(width, height)}: give at least that (2048 is usual for SDXL)")
        if min(width, height) < aligned.min_reso:
            raise UserError(f"--min_bucket_reso {aligned.min_reso} is above --resolution's shorter side "
                            f"{min(width, height)}: give at most that")

    def aligned(self) -> BucketOptions:
        """min_reso rounded down and max_reso up to multiples of `steps`, as kohya does with a warning
        (BaseDataset.adjust_min_max_bucket_reso_by_steps) rather than refusing them."""
        return replace(self, min_reso=self.min_reso - self.min_reso % self.steps,
                       max_reso=-(-self.max_reso // self.steps) * self.steps)

    def warnings(self) -> list[str]:
        """kohya's warnings about these options, for the caller to log: limits moved to multiples of the steps, and
        limits ignored by --bucket_no_upscale (kohya warns of that always; here only when they differ from its
        defaults, which nobody then chose)."""
        aligned, notes = self.aligned(), []
        if aligned.min_reso != self.min_reso:
            notes.append(f"--min_bucket_reso {self.min_reso} moved down to {aligned.min_reso}, a multiple of "
                         f"--bucket_reso_steps {self.steps} (as kohya does)")
        if aligned.max_reso != self.max_reso:
            notes.append(f"--max_bucket_reso {self.max_reso} moved up to {aligned.max_reso}, a multiple of "
                         f"--bucket_reso_steps {self.steps} (as kohya does)")
        if self.no_upscale and (self.min_reso, self.max_reso) != (KOHYA_MIN_BUCKET_RESO, KOHYA_MAX_BUCKET_RESO):
            notes.append("--min_bucket_reso and --max_bucket_reso are ignored with --bucket_no_upscale: each image's "
                         "bucket comes from its own size (as in kohya)")
        return notes


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def bucket_resolutions(options: BucketOptions) -> list[tuple[int, int]]:
    """The (width, height) buckets of checked `options`, sorted as kohya sorts them (by width, then height):
    model_util.make_bucket_resolutions after adjust_min_max_bucket_reso_by_steps. For each width from min_reso to
    max_reso in steps, the tallest height within resolution's area (in steps, at most max_reso), with its transpose,
    where that height is at least min_reso; and the square of that area. Empty with no_upscale: each image's own size
    makes its bucket (`image_bucket`)."""
    if options.no_upscale:
        return []
    options = options.aligned()
    area = options.resolution_wh[0] * options.resolution_wh[1]
    square_side = math.isqrt(area) // options.steps * options.steps
    buckets = {(square_side, square_side)}
    for width in range(options.min_reso, options.max_reso + 1, options.steps):
        height = min(options.max_reso, area // width // options.steps * options.steps)
        if height >= options.min_reso:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets)


@dataclass(frozen=True)
class BucketChoice:
    """Where one image trains: it is resized to `resized_wh`, which covers `bucket_wh`, and cropped to the bucket."""

    bucket_wh: tuple[int, int]
    resized_wh: tuple[int, int]

    @property
    def centre_crop_left_top(self) -> tuple[int, int]:
        """(left, top) of the bucket in the resized image when the crop is centred, kohya's crop without --random_crop
        (trim_and_resize_if_required: half the excess, rounded down)."""
        return ((self.resized_wh[0] - self.bucket_wh[0]) // 2, (self.resized_wh[1] - self.bucket_wh[1]) // 2)


def image_bucket(options: BucketOptions, image_wh: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> BucketChoice:
    """kohya's BucketManager.select_bucket for an image of `image_wh` among `bucket_resolutions(options)` (or, without
    bucketing, the one bucket `[resolution_wh]`).

    Buckets are predefined: the image's own size if it is a bucket, else the bucket nearest in aspect ratio (least
    |bucket w/h - image w/h|, the first in sorted order on ties); it is scaled to cover the bucket (the side that fits
    exactly, the other rounded half up) and the rest is cropped.
    With no_upscale: an image larger than resolution's area is shrunk to about that area, keeping its aspect ratio
    (`_shrunk_to_area`); a smaller one keeps its size. The bucket is that size rounded down to steps; the image is
    never enlarged. An image thinner than one step has no bucket: it is refused (kohya makes a bucket 0 wide, or fails
    on a division by zero; where only one of its two roundings divides by zero, the other is taken here)."""
    image_wh = tuple(image_wh)
    image_w, image_h = image_wh
    if not options.no_upscale:
        bucket = image_wh if image_wh in buckets else min(buckets, key=lambda wh: abs(wh[0] / wh[1] - image_w / image_h))
        # the side whose ratio is the tighter fit is matched exactly; the other then overhangs the bucket
        scale = bucket[1] / image_h if image_w / image_h > bucket[0] / bucket[1] else bucket[0] / image_w
        return BucketChoice(bucket, (_round_half_up(image_w * scale), _round_half_up(image_h * scale)))
    max_area = options.resolution_wh[0] * options.resolution_wh[1]
    resized = _shrunk_to_area(image_wh, max_area, options.steps) if image_w * image_h > max_area else image_wh
    bucket = (resized[0] - resized[0] % options.steps, resized[1] - resized[1] % options.steps)
    if 0 in bucket:
        raise UserError(f"an image of {image_w}x{image_h} has no bucket with --bucket_no_upscale: resized to "
                        f"{resized[0]}x{resized[1]}, a side is under --bucket_reso_steps {options.steps}; crop or "
                        "remove it, or train without --bucket_no_upscale")
    return BucketChoice(bucket, resized)


def _round_half_up(value: float) -> int:
    # kohya's int(x + 0.5), not Python's round(), which rounds halves to even
    return int(value + 0.5)


def _down_to_steps(value: float, steps: int) -> int:
    """kohya's BucketManager.round_to_steps: to the nearest pixel, then down to a multiple of steps."""
    pixels = _round_half_up(value)
    return pixels - pixels % steps


def _shrunk_to_area(image_wh: tuple[int, int], max_area: int, steps: int) -> tuple[int, int]:
    """The no_upscale size of an image larger than `max_area` (select_bucket): scaled to max_area at its aspect ratio,
    then either its width or its height put on a multiple of steps, whichever keeps the aspect ratio closer once the
    other side is also put on steps; the other side follows the aspect ratio, rounded half up."""
    aspect = image_wh[0] / image_wh[1]
    exact_w = math.sqrt(max_area * aspect)
    exact_h = max_area / exact_w
    width_on_steps = _down_to_steps(exact_w, steps)
    height_on_steps = _down_to_steps(exact_h, steps)
    width_first_aspect = _ratio(width_on_steps, _down_to_steps(width_on_steps / aspect, steps))
    height_first_aspect = _ratio(_down_to_steps(height_on_steps * aspect, steps), height_on_steps)
    if abs(width_first_aspect - aspect) < abs(height_first_aspect - aspect):
        return (width_on_steps, _round_half_up(width_on_steps / aspect))
    return (_round_half_up(height_on_steps * aspect), height_on_steps)


def _ratio(width: int, height: int) -> float:
    # a side rounded to 0 steps is no fit at all (kohya divides by it and fails)
    return width / height if height else math.inf


def bucket_record(names_and_sizes: Sequence[tuple[str, tuple[int, int]]], choices: Sequence[BucketChoice],
                  repeats: Sequence[int] | None = None) -> dict:
    """buckets.json: per image (its file name relative to its dataset folder, `names_and_sizes`' (name, image_wh)) its
    original size, bucket and resized size; and kohya's bucket_info (BaseDataset.make_buckets, also the LoRA's
    ss_bucket_info): {"buckets": {index: {"resolution": [w, h], "count": images with repeats}}} over the buckets in
    use, numbered as BucketManager.sort numbers them (by width, then height), and the mean |bucket w/h - image w/h| of the images
    (without repeats), its "mean_img_ar_error"."""
    repeats = repeats if repeats is not None else [1] * len(choices)
    if not len(names_and_sizes) == len(choices) == len(repeats):
        raise ValueError(f"{len(names_and_sizes)} images, {len(choices)} choices and {len(repeats)} repeats")
    images = [{"image": name, "original_wh": list(image_wh), "bucket_wh": list(choice.bucket_wh),
               "resized_wh": list(choice.resized_wh), "repeats": times}
              for (name, image_wh), choice, times in zip(names_and_sizes, choices, repeats)]
    counts = Counter()
    for choice, times in zip(choices, repeats):
        counts[choice.bucket_wh] += times
    # kohya numbers every bucket an image chose, and lists those that an epoch shows (repeats 0 shows none)
    chosen = sorted({choice.bucket_wh for choice in choices})
    errors = [abs(c.bucket_wh[0] / c.bucket_wh[1] - w / h) for (_, (w, h)), c in zip(names_and_sizes, choices)]
    return {"images": images,
            "buckets": {str(index): {"resolution": list(bucket), "count": counts[bucket]}
                        for index, bucket in enumerate(chosen) if counts[bucket] > 0},
            "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}

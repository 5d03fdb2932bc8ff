"""kohya sd-scripts' aspect-ratio buckets, reproduced from its source as written there (its loops, its order, its
numpy argmin), for the tests to check common.buckets against; and the same functions taken from a checkout of
sd-scripts itself, where one is at hand.

Source: kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb (2026-02-16): library/model_util.py
(make_bucket_resolutions), library/train_util.py (BaseDataset.adjust_min_max_bucket_reso_by_steps; BucketManager:
__init__'s asserts, make_buckets, set_predefined_resos, add_if_new_reso, round_to_steps, select_bucket, sort;
BaseDataset.make_buckets' bucket_info; trim_and_resize_if_required's centre trim).
"""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path

import numpy as np

KOHYA_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
KOHYA_SOURCE_ENV = "KOHYA_SD_SCRIPTS"  # a checkout of sd-scripts at KOHYA_COMMIT (as tests/kohya_datasets.py)


def make_bucket_resolutions(max_reso, min_size=256, max_size=1024, divisible=64):
    """model_util.make_bucket_resolutions."""
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    resos = list(resos)
    resos.sort()
    return resos


def adjust_min_max_bucket_reso_by_steps(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps):
    """BaseDataset.adjust_min_max_bucket_reso_by_steps (its warnings left out; its asserts kept)."""
    if min_bucket_reso % bucket_reso_steps != 0:
        min_bucket_reso = min_bucket_reso - min_bucket_reso % bucket_reso_steps
    if max_bucket_reso % bucket_reso_steps != 0:
        max_bucket_reso = max_bucket_reso + bucket_reso_steps - max_bucket_reso % bucket_reso_steps
    assert min(resolution) >= min_bucket_reso, "min_bucket_reso must be equal or less than resolution"
    assert max(resolution) <= max_bucket_reso, "max_bucket_reso must be equal or greater than resolution"
    return min_bucket_reso, max_bucket_reso


class BucketManager:
    """train_util.BucketManager, the parts that choose buckets."""

    def __init__(self, no_upscale, max_reso, min_size, max_size, reso_steps) -> None:
        if max_size is not None:
            if max_reso is not None:
                assert max_size >= max_reso[0], "the max_size should be larger than the width of max_reso"
                assert max_size >= max_reso[1], "the max_size should be larger than the height of max_reso"
            if min_size is not None:
                assert max_size >= min_size, "the max_size should be larger than the min_size"
        self.no_upscale = no_upscale
        self.max_reso = max_reso
        self.max_area = max_reso[0] * max_reso[1]
        self.min_size = min_size
        self.max_size = max_size
        self.reso_steps = reso_steps
        self.resos = []
        self.reso_to_id = {}
        self.buckets = []

    def add_image(self, reso, image_or_info):
        self.buckets[self.reso_to_id[reso]].append(image_or_info)

    def sort(self):
        sorted_resos = self.resos.copy()
        sorted_resos.sort()
        sorted_buckets = []
        sorted_reso_to_id = {}
        for i, reso in enumerate(sorted_resos):
            bucket_id = self.reso_to_id[reso]
            sorted_buckets.append(self.buckets[bucket_id])
            sorted_reso_to_id[reso] = i
        self.resos = sorted_resos
        self.buckets = sorted_buckets
        self.reso_to_id = sorted_reso_to_id

    def make_buckets(self):
        self.set_predefined_resos(make_bucket_resolutions(self.max_reso, self.min_size, self.max_size, self.reso_steps))

    def set_predefined_resos(self, resos):
        self.predefined_resos = resos.copy()
        self.predefined_resos_set = set(resos)
        self.predefined_aspect_ratios = np.array([w / h for w, h in resos])

    def add_if_new_reso(self, reso):
        if reso not in self.reso_to_id:
            self.reso_to_id[reso] = len(self.resos)
            self.resos.append(reso)
            self.buckets.append([])

    def round_to_steps(self, x):
        x = int(x + 0.5)
        return x - x % self.reso_steps

    def select_bucket(self, image_width, image_height):
        aspect_ratio = image_width / image_height
        if not self.no_upscale:
            reso = (image_width, image_height)
            if reso not in self.predefined_resos_set:
                ar_errors = self.predefined_aspect_ratios - aspect_ratio
                predefined_bucket_id = np.abs(ar_errors).argmin()
                reso = self.predefined_resos[predefined_bucket_id]
            ar_reso = reso[0] / reso[1]
            if aspect_ratio > ar_reso:
                scale = reso[1] / image_height
            else:
                scale = reso[0] / image_width
            resized_size = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        else:
            if image_width * image_height > self.max_area:
                resized_width = math.sqrt(self.max_area * aspect_ratio)
                resized_height = self.max_area / resized_width
                assert abs(resized_width / resized_height - aspect_ratio) < 1e-2, "aspect is illegal"
                b_width_rounded = self.round_to_steps(resized_width)
                b_height_in_wr = self.round_to_steps(b_width_rounded / aspect_ratio)
                ar_width_rounded = b_width_rounded / b_height_in_wr
                b_height_rounded = self.round_to_steps(resized_height)
                b_width_in_hr = self.round_to_steps(b_height_rounded * aspect_ratio)
                ar_height_rounded = b_width_in_hr / b_height_rounded
                if abs(ar_width_rounded - aspect_ratio) < abs(ar_height_rounded - aspect_ratio):
                    resized_size = (b_width_rounded, int(b_width_rounded / aspect_ratio + 0.5))
                else:
                    resized_size = (int(b_height_rounded * aspect_ratio + 0.5), b_height_rounded)
            else:
                resized_size = (image_width, image_height)
            bucket_width = resized_size[0] - resized_size[0] % self.reso_steps
            bucket_height = resized_size[1] - resized_size[1] % self.reso_steps
            reso = (bucket_width, bucket_height)
        self.add_if_new_reso(reso)
        ar_error = (reso[0] / reso[1]) - aspect_ratio
        return reso, resized_size, ar_error


def bucket_manager(resolution, min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64, bucket_no_upscale=False,
                   manager_class=BucketManager):
    """What DreamBoothDataset.__init__ and BaseDataset.make_buckets set up with --enable_bucket: the limits adjusted to
    the steps, a BucketManager, its predefined buckets unless bucket_no_upscale."""
    min_size, max_size = adjust_min_max_bucket_reso_by_steps(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
    manager = manager_class(bucket_no_upscale, tuple(resolution), min_size, max_size, bucket_reso_steps)
    if not bucket_no_upscale:
        manager.make_buckets()
    return manager


def bucket_info(manager, image_sizes, num_repeats) -> dict:
    """BaseDataset.make_buckets from select_bucket on: each image's bucket, each added num_repeats times, the manager
    sorted, then its bucket_info (int keys, as kohya holds it before json.dumps)."""
    chosen, ar_errors = [], []
    for width, height in image_sizes:
        reso, _, ar_error = manager.select_bucket(width, height)
        chosen.append(reso)
        ar_errors.append(abs(ar_error))
    manager.sort()
    for index, (reso, repeats) in enumerate(zip(chosen, num_repeats)):
        for _ in range(repeats):
            manager.add_image(reso, index)
    info = {"buckets": {}}
    for i, (reso, bucket) in enumerate(zip(manager.resos, manager.buckets)):
        if len(bucket) > 0:
            info["buckets"][i] = {"resolution": reso, "count": len(bucket)}
    info["mean_img_ar_error"] = float(np.mean(np.abs(np.array(ar_errors)))) if ar_errors else 0
    return info


def centre_trim_left_top(reso, resized_size):
    """trim_and_resize_if_required without random_crop: the first column and row kept, p = trim_size // 2."""
    left = (resized_size[0] - reso[0]) // 2 if resized_size[0] > reso[0] else 0
    top = (resized_size[1] - reso[1]) // 2 if resized_size[1] > reso[1] else 0
    return left, top


# --- kohya's own code --------------------------------------------------------------------------------------------

def kohya_own_functions() -> tuple:
    """(make_bucket_resolutions, BucketManager) compiled from the files of the checkout at $KOHYA_SD_SCRIPTS: the two
    definitions only, taken out of library/model_util.py and library/train_util.py, whose imports (torch, diffusers,
    transformers) they do not use."""
    source = Path(os.environ[KOHYA_SOURCE_ENV])
    namespace = {"math": math, "np": np, "random": __import__("random"), "Tuple": tuple}
    exec(_definition(source / "library" / "model_util.py", "make_bucket_resolutions"), namespace)
    namespace["model_util"] = type("model_util", (), {"make_bucket_resolutions": staticmethod(namespace["make_bucket_resolutions"])})
    exec(_definition(source / "library" / "train_util.py", "BucketManager"), namespace)
    return namespace["make_bucket_resolutions"], namespace["BucketManager"]


def _definition(path: Path, name: str) -> str:
    text = path.read_text(encoding="utf-8")
    node = next(node for node in ast.parse(text).body if getattr(node, "name", None) == name)
    return ast.get_source_segment(text, node)

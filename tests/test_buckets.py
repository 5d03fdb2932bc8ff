"""Buckets under the user's control (common/buckets.py): kohya's bucket lists, each image's bucket and resized size,
--bucket_no_upscale never enlarging, the buckets.json record, and hostile options refused in one line. The
reference is tests/kohya_buckets.py, kohya's functions reproduced from sd-scripts at the commit it names."""

from __future__ import annotations

import json
import os
import random

import pytest

import kohya_buckets as kohya
from common.buckets import BucketChoice, BucketOptions, bucket_record, bucket_resolutions, image_bucket
from common.cli import UserError

OPTION_SETS = [
    BucketOptions((1024, 1024)),
    BucketOptions((512, 512)),
    BucketOptions((1024, 768)),
    BucketOptions((768, 1344), max_reso=2048),
    BucketOptions((1024, 1024), max_reso=2048),
    BucketOptions((1024, 1024), min_reso=512, max_reso=1536, steps=32),
    BucketOptions((1024, 1024), max_reso=2048, steps=128),
    BucketOptions((1024, 1024), min_reso=320, max_reso=1000),  # both limits off the steps: kohya moves them
    BucketOptions((640, 640), min_reso=128, max_reso=1536, steps=32),
    BucketOptions((896, 1152), min_reso=64, max_reso=1152, steps=64),
]
IDS = [f"{o.resolution_wh[0]}x{o.resolution_wh[1]}-{o.min_reso}-{o.max_reso}-{o.steps}" for o in OPTION_SETS]


def kohya_manager(options: BucketOptions, **changes) -> kohya.BucketManager:
    return kohya.bucket_manager(options.resolution_wh, options.min_reso, options.max_reso, options.steps,
                                changes.get("no_upscale", options.no_upscale))


def random_image_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    """Photos, phone shots, thin strips, tiny icons and huge scans, and some sizes that are buckets themselves."""
    rng = random.Random(seed)
    sizes = [(rng.randint(16, 6000), rng.randint(16, 6000)) for _ in range(count)]
    sizes += [(rng.randint(200, 1500), rng.randint(200, 1500)) for _ in range(count)]
    sizes += [(1024, 1024), (832, 1216), (1216, 832), (256, 1024), (4000, 3000), (3000, 4000), (1000, 1001)]
    return sizes


@pytest.mark.parametrize("options", OPTION_SETS, ids=IDS)
def test_bucket_list_equals_kohyas(options):
    options.check()
    ours = bucket_resolutions(options)
    theirs = kohya_manager(options).predefined_resos
    assert ours == theirs, f"{options}: ours {ours}\nkohya's {theirs}"


def test_kohya_defaults_at_1024_are_25_buckets_each_with_a_1024_side():
    """--resolution 1024 --enable_bucket alone: every width 256..1024 in steps of 64, against a height of 1024 (the area
    allows more, --max_bucket_reso 1024 does not), both ways round; not SDXL's ~1 megapixel list."""
    sides = list(range(256, 1024 + 1, 64))
    expected = sorted({(side, 1024) for side in sides} | {(1024, side) for side in sides})
    ours = bucket_resolutions(BucketOptions((1024, 1024)))
    assert ours == expected, f"{len(ours)} buckets: {ours}"


def test_non_square_resolution_gives_its_area_and_holds_itself():
    buckets = bucket_resolutions(BucketOptions((1024, 768)))
    assert (1024, 768) in buckets and (768, 1024) in buckets, buckets
    assert max(w * h for w, h in buckets) <= 1024 * 768, max(buckets, key=lambda wh: wh[0] * wh[1])
    assert (832, 832) in buckets, "the square of the area, floor(sqrt(1024 * 768) / 64) * 64 = 832"


@pytest.mark.parametrize("options", OPTION_SETS, ids=IDS)
def test_each_images_bucket_and_resized_size_equal_kohyas_select_bucket(options):
    buckets = bucket_resolutions(options)
    manager = kohya_manager(options)
    for image_wh in random_image_sizes(200, seed=sum(options.resolution_wh) + options.steps):
        ours = image_bucket(options, image_wh, buckets)
        reso, resized, _ = manager.select_bucket(*image_wh)
        assert (ours.bucket_wh, ours.resized_wh) == (reso, resized), f"{options}, image {image_wh}: ours {ours}, kohya's {reso}, {resized}"


@pytest.mark.parametrize("options", OPTION_SETS, ids=IDS)
def test_each_images_bucket_with_no_upscale_equals_kohyas_or_is_refused_where_kohyas_is_degenerate(options):
    """Where kohya's bucket has a side of 0, or it divides by zero, the image is refused here; elsewhere the same."""
    options = BucketOptions(options.resolution_wh, options.min_reso, options.max_reso, options.steps, no_upscale=True)
    manager = kohya_manager(options)
    compared = refused = 0
    for image_wh in random_image_sizes(200, seed=options.steps) + [(40, 5000), (5000, 40), (63, 63), (100000, 20)]:
        try:
            reso, resized, _ = manager.select_bucket(*image_wh)
        except ZeroDivisionError:
            reso = None
        if reso is None or 0 in reso:
            try:
                ours = image_bucket(options, image_wh, [])
            except UserError:
                refused += 1
                continue
            # kohya divided by zero in one of its two roundings only: the other gives a real bucket
            assert reso is None and 0 not in ours.bucket_wh, f"{options}, image {image_wh}: ours {ours}, kohya's {reso}"
            continue
        ours = image_bucket(options, image_wh, [])
        assert (ours.bucket_wh, ours.resized_wh) == (reso, resized), f"{options}, image {image_wh}: ours {ours}, kohya's {reso}, {resized}"
        compared += 1
    assert compared >= 400 and refused >= 3, f"compared {compared}, refused {refused}"


@pytest.mark.parametrize("steps", [32, 64, 128])
def test_bucket_no_upscale_never_enlarges_an_image(steps):
    options = BucketOptions((1024, 1024), steps=steps, no_upscale=True)
    rng = random.Random(steps)
    for _ in range(2000):
        image_wh = (rng.randint(steps, 9000), rng.randint(steps, 9000))
        try:
            choice = image_bucket(options, image_wh, [])
        except UserError:
            continue  # thinner than a step once shrunk: no bucket at all
        (image_w, image_h), (resized_w, resized_h), (bucket_w, bucket_h) = image_wh, choice.resized_wh, choice.bucket_wh
        assert resized_w <= image_w and resized_h <= image_h, f"image {image_wh} enlarged to {choice.resized_wh}"
        assert bucket_w <= resized_w and bucket_h <= resized_h, f"image {image_wh}: bucket {choice} exceeds its resized size"
        assert bucket_w % steps == 0 and bucket_h % steps == 0, f"image {image_wh}: bucket {choice.bucket_wh} off steps {steps}"


def test_bucket_no_upscale_keeps_a_small_image_at_its_size_in_a_smaller_bucket():
    choice = image_bucket(BucketOptions((1024, 1024), no_upscale=True), (700, 500), [])
    assert choice == BucketChoice(bucket_wh=(640, 448), resized_wh=(700, 500)), choice


def test_without_no_upscale_a_resized_image_covers_its_bucket_with_one_side_exact():
    options = BucketOptions((1024, 768), max_reso=2048)
    buckets = bucket_resolutions(options)
    for image_wh in random_image_sizes(300, seed=7):
        choice = image_bucket(options, image_wh, buckets)
        (bucket_w, bucket_h), (resized_w, resized_h) = choice.bucket_wh, choice.resized_wh
        assert resized_w >= bucket_w and resized_h >= bucket_h, f"image {image_wh}: {choice} leaves a gap"
        assert bucket_w == resized_w or bucket_h == resized_h, f"image {image_wh}: {choice} crops both sides"


def test_one_bucket_without_bucketing_is_the_resolution():
    """Without --enable_bucket kohya's one bucket is --resolution itself, the image scaled to cover it."""
    options = BucketOptions((1024, 768))
    for image_wh in random_image_sizes(100, seed=3):
        ours = image_bucket(options, image_wh, [(1024, 768)])
        manager = kohya.BucketManager(False, (1024, 768), None, None, None)
        manager.set_predefined_resos([(1024, 768)])
        reso, resized, _ = manager.select_bucket(*image_wh)
        assert (ours.bucket_wh, ours.resized_wh) == (reso, resized), f"image {image_wh}: ours {ours}, kohya's {reso}, {resized}"


def test_an_image_the_size_of_a_bucket_takes_it_before_an_equal_aspect_ratio():
    """kohya's select_bucket looks the image's own size up first; its generated lists have no two buckets of one aspect
    ratio, so this shows where a list is given: here two squares."""
    buckets = [(512, 512), (1024, 1024)]
    manager = kohya.BucketManager(False, (1024, 1024), None, None, None)
    manager.set_predefined_resos(buckets)
    for image_wh in [(1024, 1024), (512, 512), (700, 700)]:
        ours = image_bucket(BucketOptions((1024, 1024)), image_wh, buckets)
        reso, resized, _ = manager.select_bucket(*image_wh)
        assert (ours.bucket_wh, ours.resized_wh) == (reso, resized), f"image {image_wh}: ours {ours}, kohya's {reso}, {resized}"
    assert image_bucket(BucketOptions((1024, 1024)), (1024, 1024), buckets).bucket_wh == (1024, 1024)


def test_centre_crop_equals_kohyas_trim_without_random_crop():
    options = BucketOptions((1024, 1024), max_reso=2048)
    buckets = bucket_resolutions(options)
    for image_wh in random_image_sizes(200, seed=11):
        choice = image_bucket(options, image_wh, buckets)
        expected = kohya.centre_trim_left_top(choice.bucket_wh, choice.resized_wh)
        assert choice.centre_crop_left_top == expected, f"image {image_wh}: {choice}, kohya trims at {expected}"


def test_record_lists_every_image_and_kohyas_bucket_info():
    options = BucketOptions((1024, 1024), max_reso=2048)
    buckets = bucket_resolutions(options)
    sizes = random_image_sizes(60, seed=5)
    names = [(f"{index % 3}_dog/{index:04d}.png", size) for index, size in enumerate(sizes)]
    repeats = [index % 3 for index in range(len(sizes))]  # 0 included: kohya numbers its bucket but lists none
    choices = [image_bucket(options, size, buckets) for size in sizes]
    record = json.loads(json.dumps(bucket_record(names, choices, repeats)))
    assert [image["image"] for image in record["images"]] == [name for name, _ in names]
    first = record["images"][0]
    assert first == {"image": names[0][0], "original_wh": list(sizes[0]), "bucket_wh": list(choices[0].bucket_wh),
                     "resized_wh": list(choices[0].resized_wh), "repeats": 0}, first
    info = json.loads(json.dumps(kohya.bucket_info(kohya_manager(options), sizes, repeats)))
    assert record["buckets"] == info["buckets"], f"ours {record['buckets']}\nkohya's {info['buckets']}"
    assert record["mean_img_ar_error"] == pytest.approx(info["mean_img_ar_error"], rel=1e-12)
    assert sum(bucket["count"] for bucket in record["buckets"].values()) == sum(repeats)


def test_record_of_no_upscale_buckets_equals_kohyas_bucket_info():
    options = BucketOptions((1024, 1024), no_upscale=True)
    sizes = [size for size in random_image_sizes(60, seed=9) if min(size) >= 300]
    choices = [image_bucket(options, size, []) for size in sizes]
    record = bucket_record([(str(i), size) for i, size in enumerate(sizes)], choices)
    info = json.loads(json.dumps(kohya.bucket_info(kohya_manager(options), sizes, [1] * len(sizes))))
    assert record["buckets"] == info["buckets"], f"ours {record['buckets']}\nkohya's {info['buckets']}"


@pytest.mark.parametrize("options, words", [
    (BucketOptions((1024, 1024), steps=0), "--bucket_reso_steps 0"),
    (BucketOptions((1024, 1024), steps=-64), "--bucket_reso_steps -64"),
    (BucketOptions((1024, 1024), steps=48), "multiple of 32"),
    (BucketOptions((1024, 1024), steps=8), "multiple of 32"),
    (BucketOptions((1024, 1024), steps=10**9), "--bucket_reso_steps 1000000000"),
    (BucketOptions((1024, 1024), min_reso=0), "--min_bucket_reso 0"),
    (BucketOptions((1024, 1024), min_reso=-256), "--min_bucket_reso -256"),
    (BucketOptions((1024, 1024), min_reso=10), "round down to 0"),
    (BucketOptions((1024, 1024), max_reso=0), "--max_bucket_reso 0"),
    (BucketOptions((1024, 1024), max_reso=10**12), "--max_bucket_reso 1000000000000"),
    (BucketOptions((1024, 1024), max_reso=float("nan")), "--max_bucket_reso nan"),
    (BucketOptions((1024, 1024), min_reso=1024.0), "--min_bucket_reso 1024.0"),
    (BucketOptions((1024, 1024), min_reso=True), "--min_bucket_reso True"),
    (BucketOptions((512, 512), min_reso=768, max_reso=640), "below --min_bucket_reso 768"),
    (BucketOptions((1024, 1024), max_reso=768), "--max_bucket_reso 768 is below --resolution's longer side 1024"),
    (BucketOptions((1024, 1536)), "--max_bucket_reso 1024 is below --resolution's longer side 1536"),
    (BucketOptions((1024, 1152), max_reso=1000, steps=128), "--max_bucket_reso 1024 is below --resolution's longer side 1152"),
    (BucketOptions((256, 1024), min_reso=512), "--min_bucket_reso 512 is above --resolution's shorter side 256"),
    (BucketOptions((1020, 1020), max_reso=2048), "--resolution 1020,1020"),
    (BucketOptions((0, 1024)), "--resolution 0,1024"),
    (BucketOptions((-1024, 1024)), "--resolution -1024,1024"),
    (BucketOptions((1024, 10**6), max_reso=16384), "--resolution 1024,1000000"),
])
def test_hostile_options_are_refused_in_one_line(options, words):
    with pytest.raises(UserError) as refusal:
        options.check()
    message = str(refusal.value)
    assert words in message and "\n" not in message, message


def test_limits_off_the_steps_are_moved_as_kohya_moves_them_and_said():
    options = BucketOptions((1024, 1024), min_reso=300, max_reso=1000)
    options.check()
    assert options.aligned() == BucketOptions((1024, 1024), min_reso=256, max_reso=1024)
    theirs = kohya.adjust_min_max_bucket_reso_by_steps((1024, 1024), 300, 1000, 64)
    assert (options.aligned().min_reso, options.aligned().max_reso) == theirs, theirs
    notes = options.warnings()
    assert len(notes) == 2 and "300 moved down to 256" in notes[0] and "1000 moved up to 1024" in notes[1], notes
    assert BucketOptions((1024, 1024)).warnings() == []
    assert "ignored with --bucket_no_upscale" in BucketOptions((1024, 1024), max_reso=2048, no_upscale=True).warnings()[0]


def test_check_refuses_exactly_the_limits_kohya_asserts_against():
    """Over whole-step options kohya's SDXL trainers take, ours refuses where kohya's adjust_min_max_bucket_reso_by_steps
    or BucketManager's asserts fail, and accepts the rest."""
    for side_w in (512, 768, 1024, 1536):
        for side_h in (512, 1024, 2048):
            for low in (64, 256, 600, 1024):
                for high in (512, 1000, 1024, 2048):
                    options = BucketOptions((side_w, side_h), min_reso=low, max_reso=high)
                    try:
                        kohya_manager(options)
                        kohya_accepts = True
                    except AssertionError:
                        kohya_accepts = False
                    try:
                        options.check()
                        ours_accepts = True
                    except UserError:
                        ours_accepts = False
                    assert ours_accepts == kohya_accepts, f"{options}: ours accepts {ours_accepts}, kohya {kohya_accepts}"


@pytest.mark.kohya_source  # kohya's own code, from a checkout of sd-scripts: bash scripts/test_against_kohya.sh DIR
def test_the_reference_equals_kohyas_own_code():
    make_bucket_resolutions, own_manager_class = kohya.kohya_own_functions()
    for options in OPTION_SETS:
        low, high = kohya.adjust_min_max_bucket_reso_by_steps(options.resolution_wh, options.min_reso, options.max_reso, options.steps)
        assert kohya.make_bucket_resolutions(options.resolution_wh, low, high, options.steps) == \
            make_bucket_resolutions(options.resolution_wh, low, high, options.steps), options
        for no_upscale in (False, True):
            reference = kohya.bucket_manager(options.resolution_wh, low, high, options.steps, no_upscale)
            own = kohya.bucket_manager(options.resolution_wh, low, high, options.steps, no_upscale, own_manager_class)
            for image_wh in random_image_sizes(100, seed=1):
                try:
                    expected = own.select_bucket(*image_wh)
                except ZeroDivisionError:
                    with pytest.raises(ZeroDivisionError):
                        reference.select_bucket(*image_wh)
                    continue
                assert reference.select_bucket(*image_wh) == expected, (options, no_upscale, image_wh)

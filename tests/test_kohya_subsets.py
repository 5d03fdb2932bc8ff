"""Each subset of a kohya dataset trains with its own options, read from its own record: its captions drawn as kohya's
process_caption draws them with that subset's options, its images bucketed by its dataset's rule (never enlarged
with bucket_no_upscale); and the new options refuse bad values in one line before any model loads."""

from __future__ import annotations

import json

import pytest

import kohya_captions as kohya
from common.data import TrainingImages, caption_rng
from common.data_plan import RunData, plan_dataset
from common.dataset_config import read_dataset_config
from training_helpers import train_cli, write_images


def captioned(folder, captions: list[str], size=(64, 64)):
    write_images(folder, count=len(captions), size=size)
    for i, caption in enumerate(captions):
        (folder / f"image_{i}.txt").write_text(caption)
    return folder


SUBSET_OPTIONS = [
    {"shuffle_caption": True, "keep_tokens": 1, "caption_tag_dropout_rate": 0.3, "caption_prefix": "best,"},
    {"caption_dropout_rate": 0.4, "keep_tokens_separator": "|||", "shuffle_caption": True, "secondary_separator": ";;;"},
    {"enable_wildcard": True, "caption_suffix": ", from side", "caption_dropout_every_n_epochs": 2},
]


def toml_value(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)


def test_each_subsets_captions_are_kohyas_process_caption_with_its_own_options(tmp_path):
    captions = [["sks dog, grass, sunny, photo", "sks dog, sofa, lamp"],
                ["sks cat ||| window, rug;;;red, night ||| masterpiece", "sks cat, floor"],
                ["a {red|blue} car\na {fast|slow} car", "a parked car"]]
    lines = ["[[datasets]]", "resolution = 64", "caption_extension = '.txt'"]
    for k, (options, texts) in enumerate(zip(SUBSET_OPTIONS, captions)):
        folder = captioned(tmp_path / f"s{k}", texts)
        lines += ["[[datasets.subsets]]", f"image_dir = {json.dumps(str(folder))}"]
        lines += [f"{key} = {toml_value(value)}" for key, value in options.items()]
    (tmp_path / "data.toml").write_text("\n".join(lines) + "\n")
    plan = plan_dataset(read_dataset_config(tmp_path / "data.toml", {})[0], RunData(seed=4))
    images = TrainingImages(plan.examples, [s.augment for s in plan.subsets], 1, 4, captions=[s.captions for s in plan.subsets],
                            sizes=plan.sizes)
    written = {e.name: e.caption for e in plan.examples}
    assert written["s2/image_0.png"] == "a {red|blue} car\na {fast|slow} car", "a wildcard subset keeps every line"
    drawn = set()
    for epoch in range(4):
        images.epoch = epoch
        for position in range(len(images)):
            example = images.examples[images.indices[position]]
            expected = kohya.process_caption(example.caption, caption_rng(4, epoch, position), epoch + 1,
                                             **SUBSET_OPTIONS[example.subset])
            assert images.caption(position) == expected, (epoch, position)
            drawn.add(expected)
    assert len(drawn) > 8, "the draws differ from epoch to epoch"


def test_bucket_no_upscale_never_enlarges_an_image_and_buckets_json_says_how_each_was_resized(tiny_sdxl_path, tmp_path, capsys):
    folder = tmp_path / "img"
    for k, size in enumerate([(40, 72), (96, 64), (64, 64), (130, 50)]):
        captioned(folder / f"{k + 1}_sks dog", ["sks dog"], size=size)
    out = tmp_path / "out"
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--train_data_dir", folder, "--resolution", 64, "--enable_bucket",
                             "--bucket_no_upscale", "--bucket_reso_steps", 32, "--min_bucket_reso", 32, "--train_batch_size", 1,
                             "--max_train_steps", 2,
                             "--output_dir", out)
    assert code == 0, err
    record = json.loads((out / "buckets.json").read_text())
    assert sorted(i["image"] for i in record["images"]) == [f"{k}_sks dog/image_0.png" for k in range(1, 5)]
    for item in record["images"]:
        (width, height), (bucket_w, bucket_h), (resized_w, resized_h) = item["size"], item["bucket"], item["resized"]
        assert resized_w <= width and resized_h <= height, item
        assert bucket_w <= resized_w and bucket_h <= resized_h and bucket_w % 32 == 0 and bucket_h % 32 == 0, item



def test_resolution_width_comma_height_trains_at_that_width_and_height_and_every_record_says_so(tiny_sdxl_path, tmp_path, capsys):
    """kohya's --resolution W,H: without buckets every image is resized to cover W x H and cropped to it; the start-up
    line, buckets.json and the file's metadata all give width first, as kohya does."""
    from safetensors import safe_open

    images = captioned(tmp_path / "img", ["sks dog", "sks dog"], size=(64, 64))
    out = tmp_path / "out"
    code, stdout, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--resolution", "64,96",
                                  "--train_batch_size", 1, "--max_train_steps", 1, "--output_dir", out, "--output_name", "wide")
    assert code == 0, err
    assert "1 bucket(s) (width x height): 64x96 (2)" in stdout + err, stdout + err
    record = json.loads((out / "buckets.json").read_text())
    assert [(item["bucket"], item["resized"]) for item in record["images"]] == [([64, 96], [96, 96])] * 2
    with safe_open(str(out / "wide.safetensors"), "pt") as file:
        metadata = file.metadata()
    assert metadata["ss_resolution"] == "(64, 96)" and metadata["modelspec.resolution"] == "64x96", metadata



def test_an_epoch_is_every_batch_of_every_bucket_however_short_its_last(tiny_sdxl_path, tmp_path, capsys):
    """3 square and 3 wide images at batch size 2 make 2 + 2 batches an epoch (each bucket's last one short), not
    ceil(6 / 2) = 3: --max_train_epochs 2 trains 8 steps, and the epoch file comes after the first 4."""
    folder = tmp_path / "img"
    write_images(folder / "square", count=3, size=(96, 96))
    write_images(folder / "wide", count=3, size=(64, 128))  # (height, width)
    for image in folder.rglob("*.png"):
        image.rename(folder / f"{image.parent.name}_{image.name}")
    out = tmp_path / "out"
    code, stdout, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", folder, "--instance_prompt", "sks dog",
                                  "--resolution", 96, "--enable_bucket", "--min_bucket_reso", 32, "--bucket_reso_steps", 32,
                                  "--train_batch_size", 2, "--max_train_epochs", 2, "--save_every_n_epochs", 1,
                                  "--checkpointing_steps", 4, "--output_dir", out, "--output_name", "ep")
    assert code == 0, err
    said = stdout + err
    assert "2 bucket(s) (width x height): 128x64 (3), 96x96 (3)" in said and "4 batches each per epoch, 8 steps" in said, said
    assert (out / "ep-000001.safetensors").is_file() and not (out / "ep-000002.safetensors").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]


REFUSED = {
    "--validation_split 1.5": (["--validation_split", "1.5"], "--validation_split must be in [0, 1), got 1.5"),
    "--validation_split nan": (["--validation_split", "nan"], "--validation_split must be in [0, 1), got nan"),
    "--validate_every_n_steps 0": (["--validation_split", "0.2", "--validate_every_n_steps", "0"],
                                   "--validate_every_n_steps must be a whole number >= 1, got 0"),
    "--validate_every_n_epochs without a split": (["--validate_every_n_epochs", "1"], "give --validation_split too"),
    "--lora_layers unknown": (["--lora_layers", "everything"], "--lora_layers 'everything' is no layer set; accepted: attn, "
                                                               "attn-mlp, all-linear"),
    "--save_every_n_epochs 0": (["--save_every_n_epochs", "0"], "--save_every_n_epochs 0: a whole number >= 1"),
    "--output_name ..": (["--output_name", ".."], "--output_name '..': a file name without a folder"),
    "--caption_dropout_every_n_epochs -1": (["--caption_dropout_every_n_epochs", "-1"], "caption_dropout_every_n_epochs -1"),
    "--caption_separator empty": (["--caption_separator", ""], "caption_separator ''"),
    "--reg_data_dir with --dataset_name": (["--reg_data_dir", "x", "--dataset_name", "y"],
                                           "--reg_data_dir goes with --instance_data_dir"),
    "--min_bucket_reso 0": (["--enable_bucket", "--min_bucket_reso", "0"], "--min_bucket_reso 0 must be a whole number of pixels"),
    "--max_bucket_reso below the resolution": (["--enable_bucket", "--max_bucket_reso", "32", "--resolution", "64"], "--max_bucket_reso"),
    "--use_8bit_adam with prodigy": (["--optimizer", "prodigy", "--use_8bit_adam"],
                                     "--use_8bit_adam is bitsandbytes' AdamW8bit; it does not apply to --optimizer prodigy"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_the_new_options_refuse_bad_values_in_one_line_before_any_model_loads(case, tiny_sdxl_path, tmp_path, capsys, monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("a model was loaded before the refusal")))
    extra, message = REFUSED[case]
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", write_images(tmp_path / "img", 2),
                             "--instance_prompt", "x", "--output_dir", tmp_path / "out", *extra)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cuda, bitsandbytes, missing", [(False, True, "no CUDA GPU"), (True, False, "no bitsandbytes")])
def test_an_eight_bit_adam_that_cannot_run_here_is_refused_before_any_model_loads(cuda, bitsandbytes, missing, tiny_sdxl_path,
                                                                                  tmp_path, capsys, monkeypatch):
    """kohya's --optimizer_type AdamW8bit needs bitsandbytes on a CUDA GPU: without either the run stops before the
    model loads, not when the optimizer is made."""
    import importlib.util

    import diffusers
    import torch

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if bitsandbytes else None) if name == "bitsandbytes" else find_spec(name, *a))
    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("a model was loaded before the refusal")))
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", write_images(tmp_path / "img", 2),
                             "--instance_prompt", "x", "--output_dir", tmp_path / "out", "--optimizer_type", "AdamW8bit")
    assert code == 2 and err.count("\n") == 1, err
    assert f"--use_8bit_adam (kohya's --optimizer_type AdamW8bit) needs bitsandbytes on a CUDA GPU; this run has {missing}" in err, err
    assert not (tmp_path / "out").exists()

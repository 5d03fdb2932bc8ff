"""The datasets kohya and SimpleTuner users bring: caption files beside images, kohya's N_prompt folders, a
metadata.jsonl imagefolder, and kohya's flag names, as they would write the command."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from common.cli import UserError
from common.data import find_examples
from training_helpers import train_cli, write_images


def kohya_folder(root: Path) -> Path:
    """img/ with two captioned images and one without, a `3_sks dog` folder (one image captioned, one not) and a
    folder without repeats that kohya ignores."""
    folder = root / "img"
    write_images(folder, count=3)
    (folder / "image_0.txt").write_text("a photo of sks dog, on grass\nsecond line is not read\n")
    (folder / "image_1.txt").write_text("  a photo of sks dog, indoors  \n")
    write_images(folder / "3_sks dog", count=2)
    (folder / "3_sks dog" / "image_1.txt").write_text("sks dog, sleeping")
    write_images(folder / "no_repeats", count=1)
    return folder


def test_caption_files_and_repeat_folders_are_read_as_kohya_reads_them(tmp_path):
    examples = find_examples(instance_data_dir=kohya_folder(tmp_path), instance_prompt="a photo of sks dog")
    found = {e.name: (e.caption, e.repeats, e.caption_from) for e in examples}
    assert found == {
        "image_0.png": ("a photo of sks dog, on grass", 1, "file"),
        "image_1.png": ("a photo of sks dog, indoors", 1, "file"),
        "image_2.png": ("a photo of sks dog", 1, "prompt"),
        "3_sks dog/image_0.png": ("sks dog", 3, "folder"),
        "3_sks dog/image_1.png": ("sks dog, sleeping", 3, "file"),
    }
    prefixed = find_examples(instance_data_dir=kohya_folder(tmp_path / "again"), instance_prompt="TOK", prompt_as_prefix=True)
    assert {e.name: e.caption for e in prefixed}["image_0.png"] == "TOK, a photo of sks dog, on grass"
    assert {e.name: e.caption for e in prefixed}["3_sks dog/image_1.png"] == "sks dog, sks dog, sleeping"


def test_images_without_any_caption_and_empty_caption_files_are_refused(tmp_path):
    folder = write_images(tmp_path / "plain", count=2)
    with pytest.raises(UserError, match=r"2 image\(s\) have no caption, e.g. image_0.png: no .txt file beside them and no --instance_prompt"):
        find_examples(instance_data_dir=folder, instance_prompt=None)
    (folder / "image_0.txt").write_text("\n")
    with pytest.raises(UserError, match="caption file .*image_0.txt' is empty"):
        find_examples(instance_data_dir=folder, instance_prompt="x")
    (folder / "image_0.caption").write_text("from kohya's default extension")
    examples = find_examples(instance_data_dir=folder, instance_prompt="x", caption_extension=".caption")
    assert [e.caption for e in examples] == ["from kohya's default extension", "x"]


def test_a_metadata_jsonl_folder_reads_through_instance_data_dir(tmp_path):
    folder = write_images(tmp_path / "imagefolder", count=2)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"image_{k}.png", "text": f"caption {k}"}) + "\n"
                                                   for k in range(2)))
    examples = find_examples(instance_data_dir=folder, instance_prompt=None)
    assert sorted(e.caption for e in examples) == ["caption 0", "caption 1"] and {e.caption_from for e in examples} == {"metadata"}


def test_a_kohya_users_command_trains_on_every_caption_as_often_as_its_folder_says(tiny_sdxl_path, tmp_path, capsys, monkeypatch):
    import train_lora

    seen = []
    original = train_lora.CaptionEncoder.embed
    monkeypatch.setattr(train_lora.CaptionEncoder, "embed", lambda self, captions, step: seen.extend(captions) or original(self, captions, step))
    folder = kohya_folder(tmp_path)
    code, out, err = train_cli(capsys, "--pretrained_model_name_or_path", tiny_sdxl_path, "--train_data_dir", folder,
                               "--instance_prompt", "a photo of sks dog", "--resolution", 64, "--train_batch_size", 1,
                               "--max_train_epochs", 1, "--network_dim", 4, "--network_alpha", 2, "--unet_lr", 1e-3,
                               "--min_snr_gamma", 5, "--save_every_n_steps", 100, "--seed", 0, "--output_dir", tmp_path / "out")
    assert code == 0, err
    assert ("5 images, captions 3 from caption files, 1 from --instance_prompt, 1 from folder names (5 distinct); "
            "repeats 3 x1, 2 x3: 9 examples an epoch; 1 bucket(s) (width x height): 64x64 (9)") in out, out
    assert Counter(seen) == Counter({"a photo of sks dog, on grass": 1, "a photo of sks dog, indoors": 1, "a photo of sks dog": 1,
                                     "sks dog": 3, "sks dog, sleeping": 3})
    args = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert (args["rank"], args["lora_alpha"], args["learning_rate"], args["snr_gamma"], args["save_every_n_steps"]) == (4, 2, 1e-3, 5, 100)


REFUSED_KOHYA = {
    "--output_name with a folder": (["--output_name", "a/dog"], "--output_name 'a/dog': a file name without a folder"),
    "--network_module": (["--network_module", "networks.dylora"], "accepted: networks.lora, lycoris.kohya"),
    "--network_args": (["--network_args", "algo=lokr"], "--network_args needs kohya's --network_module"),
    "--network_dropout": (["--network_dropout", "0.1"], "--lora_dropout is the nearest"),
    "--optimizer_type": (["--optimizer_type", "Lion8bit"], "accepted: AdamW, AdamW8bit, Prodigy, Adafactor"),
    "--report_to wandb": (["--report_to", "wandb"], "--report_to wandb: the wandb package is not installed (pip install wandb)"),
    "kohya's --log_with wandb": (["--log_with", "wandb"], "--report_to wandb: the wandb package is not installed"),
    "--report_to unknown": (["--report_to", "neptune"], "--report_to 'neptune'; choose none, all or any of tensorboard, wandb"),
}


@pytest.mark.parametrize("case", REFUSED_KOHYA)
def test_kohya_flags_that_mean_something_else_and_missing_trackers_are_refused_in_one_line(case, tiny_sdxl_path, tmp_path, capsys):
    extra, message = REFUSED_KOHYA[case]
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", write_images(tmp_path / "images", 1),
                             "--instance_prompt", "x", "--resolution", 64, "--max_train_steps", 1, "--output_dir", tmp_path / "out", *extra)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and message in lines[-1], err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- caption options

def caption_run(tiny_sdxl_path: str, folder: Path, out: Path, steps: int, *extra) -> list:
    return ["-m", tiny_sdxl_path, "--train_data_dir", folder, "--resolution", 64, "--train_batch_size", 2, "--max_train_steps", steps,
            "--seed", 3, "--learning_rate", 1e-3, "--checkpointing_steps", 2, "--shuffle_caption", "--keep_tokens", 1,
            "--caption_dropout_rate", 0.25, "--caption_tag_dropout_rate", 0.2, "--output_dir", out, *extra]


def tagged_folder(root: Path) -> Path:
    folder = write_images(root / "tagged", count=4)
    for k in range(4):
        (folder / f"image_{k}.txt").write_text(f"sks dog, tag{k}a, tag{k}b, tag{k}c, tag{k}d")
    return folder


def test_each_step_sees_the_captions_its_examples_drew_and_dropped_ones_are_unconditioned(tiny_sdxl_path, tmp_path, capsys,
                                                                                           monkeypatch):
    import train_lora
    from common.captions import CaptionOptions, processed_caption
    from common.data import caption_rng

    seen, zero_rows = [], []
    original = train_lora.CaptionEncoder.embed

    def recording(self, captions, step):
        embeds, pooled = original(self, captions, step)
        seen.extend(captions)
        zero_rows.extend((caption == "", bool((embeds[k] == 0).all() and (pooled[k] == 0).all())) for k, caption in enumerate(captions))
        return embeds, pooled

    monkeypatch.setattr(train_lora.CaptionEncoder, "embed", recording)
    folder = tagged_folder(tmp_path)
    code, _, err = train_cli(capsys, *caption_run(tiny_sdxl_path, folder, tmp_path / "out", 2))  # one epoch: 4 images, batches of 2
    assert code == 0, err
    transform = CaptionOptions(shuffle=True, keep_tokens=1, dropout=0.25, tag_dropout=0.2)
    captions = [f"sks dog, tag{k}a, tag{k}b, tag{k}c, tag{k}d" for k in range(4)]
    expected = [processed_caption(captions[position], transform, caption_rng(3, 0, position), 1) for position in range(4)]
    assert Counter(seen) == Counter(expected), (seen, expected)
    assert "" in expected and any(c and c != captions[k] for k, c in enumerate(expected)), "seed 3 drops one and reshuffles another"
    assert all(is_empty == is_zero for is_empty, is_zero in zero_rows), zero_rows


@pytest.mark.heavy
def test_resume_is_bit_exact_with_caption_shuffling_and_dropout(tiny_sdxl_path, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tagged_folder(tmp_path)
    code, _, err = train_cli(capsys, *caption_run(tiny_sdxl_path, folder, tmp_path / "straight", 4, "--random_flip"))
    assert code == 0, err
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    code, out, err = train_cli(capsys, *caption_run(tiny_sdxl_path, folder, tmp_path / "resumed", 4, "--random_flip",
                                                    "--resume_from_checkpoint", "latest"))
    assert code == 0 and "at step 2" in out, err
    straight, resumed = (load_file(tmp_path / f / "pytorch_lora_weights.safetensors") for f in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

"""kohya's datasets trained end to end: a --dataset_config with two datasets at their own resolutions and batch sizes,
subsets with their own caption options and a regularisation subset; --reg_data_dir's N_class folders; the held-out
validation loss; buckets.json; and the metadata WebUI shows for the LoRA trained."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest
import torch

from training_helpers import train_cli, write_images


def captioned(folder, names: list[str], extension: str = ".txt", size=(64, 64)):
    write_images(folder, count=len(names), size=size)
    for i, caption in enumerate(names):
        (folder / f"image_{i}{extension}").write_text(caption)
    return folder


def record_training_captions(monkeypatch):
    """The captions of every training step's batch (with gradients), not of validation passes (without)."""
    import train_lora

    seen: list[str] = []
    original = train_lora.BatchLoss.network

    def network(self, captions, time_ids, step):
        if torch.is_grad_enabled():
            seen.extend(captions)
        return original(self, captions, time_ids, step)

    monkeypatch.setattr(train_lora.BatchLoss, "network", network)
    return seen


def test_a_dataset_config_trains_its_datasets_subsets_and_regularisation_images_as_kohya_counts(tiny_sdxl_path, tmp_path, capsys,
                                                                                                 monkeypatch):
    a = captioned(tmp_path / "a", ["sks dog, grass, sunny", "sks dog, indoor, lamp"], ".caption")
    b = captioned(tmp_path / "b", ["sks cat, sofa", "sks cat, window", "sks cat, floor"], ".txt", size=(96, 64))
    reg = write_images(tmp_path / "reg", count=5)
    (tmp_path / "data.toml").write_text(f"""
[general]
shuffle_caption = false
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{a}"
  num_repeats = 2
  caption_prefix = "photo,"
  [[datasets.subsets]]
  image_dir = "{reg}"
  class_tokens = "dog"
  is_reg = true

[[datasets]]
resolution = [64, 96]
batch_size = 1
  [[datasets.subsets]]
  image_dir = "{b}"
  caption_extension = ".txt"
  secondary_separator = ";;;"
""")
    seen = record_training_captions(monkeypatch)
    out = tmp_path / "out"
    code, stdout, err = train_cli(capsys, "-m", tiny_sdxl_path, "--dataset_config", tmp_path / "data.toml", "--max_train_epochs", 1,
                                  "--output_dir", out, "--prior_loss_weight", 0.5, "--seed", 2)
    assert code == 0, err
    # dataset 0: 2 images x 2 repeats = 4 train images; the 5 reg images (1 repeat each) trimmed to the first 4;
    # dataset 1: 3 images at 64x96
    assert "dataset 0 (64x64, batch 2): 4 train images with repeats, 4 regularisation images with repeats" in stdout, stdout
    assert "(loss x0.5)" in stdout and "dataset 1 (64x96, batch 1): 3 train images with repeats" in stdout
    assert Counter(seen) == Counter({"photo, sks dog, grass, sunny": 2, "photo, sks dog, indoor, lamp": 2, "dog": 4,
                                     "sks cat, sofa": 1, "sks cat, window": 1, "sks cat, floor": 1})
    # batches: dataset 0: 8 images in batches of 2 = 4; dataset 1: 3 of 1 = 3; one epoch = 7 steps
    assert "1 process(es), 7 batches each per epoch, 7 steps" in stdout, stdout
    record = json.loads((out / "buckets.json").read_text())
    assert sorted((i["dataset"], i["image"]) for i in record["images"]) == sorted(
        [(0, f"a/image_{i}.png") for i in range(2)] + [(0, f"reg/image_{i}.png") for i in range(4)]
        + [(1, f"b/image_{i}.png") for i in range(3)])
    assert all(i["bucket"] == [64, 96] for i in record["images"] if i["dataset"] == 1)


def test_reg_data_dir_folders_train_in_the_instance_batches_at_the_prior_loss_weight(tiny_sdxl_path, tmp_path, capsys, monkeypatch):
    import train_lora

    images = captioned(tmp_path / "img" / "3_sks dog", ["sks dog, one", "sks dog, two"])
    write_images(tmp_path / "reg" / "1_dog", count=10)
    weights = []
    original = train_lora.BatchLoss.__call__

    def call(self, batch, class_batch, step):
        weights.extend(batch["loss_weight"].tolist() if "loss_weight" in batch else [1.0] * len(batch["captions"]))
        return original(self, batch, class_batch, step)

    monkeypatch.setattr(train_lora.BatchLoss, "__call__", call)
    code, stdout, err = train_cli(capsys, "-m", tiny_sdxl_path, "--train_data_dir", tmp_path / "img", "--reg_data_dir", tmp_path / "reg",
                                  "--resolution", 64, "--train_batch_size", 2, "--max_train_epochs", 1, "--prior_loss_weight", 0.25,
                                  "--output_dir", tmp_path / "out")
    assert code == 0, err
    # 2 images x 3 repeats = 6 instance examples; 6 of the 10 reg images shown once each
    assert Counter(weights) == Counter({1.0: 6, 0.25: 6}), weights


def test_the_validation_loss_is_deterministic_held_out_and_in_tensorboard(tiny_sdxl_path, tmp_path, capsys, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from common.data import collate
    from common.validation import HeldOut, validation_loss

    names = [f"sks dog number {i}" for i in range(10)]
    images = captioned(tmp_path / "img", names)
    seen = record_training_captions(monkeypatch)
    values = []
    original = HeldOut.__call__

    def call(self, step):
        loss = original(self, step)
        again = validation_loss(lambda batch: self.batch_loss(batch, None, step), self.data.held_out, collate, self.config.seed,
                                self.models)
        values.append((loss, again, sorted(item["caption"] for item in self.data.held_out)))
        return loss

    monkeypatch.setattr(HeldOut, "__call__", call)
    out = tmp_path / "out"
    code, stdout, err = train_cli(capsys, "-m", tiny_sdxl_path, "--train_data_dir", images, "--resolution", 64, "--train_batch_size", 2,
                                  "--max_train_steps", 8, "--validation_split", 0.3, "--validate_every_n_steps", 4,
                                  "--learning_rate", 1e-2, "--output_dir", out, "--report_to", "tensorboard")
    assert code == 0, err
    assert len(values) == 2 and all(loss == again for loss, again, _ in values), values
    held = values[0][2]
    assert len(held) == 3 and "3 images held out for the validation loss" in stdout
    assert not set(held) & set(seen) and set(seen) == set(names) - set(held), "held-out images never train"
    assert values[0][0] != values[1][0], "the weights changed between the evaluations, and so did the loss"
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss/validation")]
    assert [step for step, _ in logged] == [4, 8]
    assert [pytest.approx(v, rel=1e-6) for _, v in logged] == [loss for loss, _, _ in values]


def test_webui_shows_the_trained_loras_dataset_resolutions_tags_and_clip_skip(tiny_sdxl_path, tmp_path, capsys):
    import ui_metadata as ui

    images = captioned(tmp_path / "img" / "2_sks dog", ["sks dog, grass", "sks dog, sofa"])
    out = tmp_path / "out"
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--train_data_dir", tmp_path / "img", "--resolution", 64,
                             "--max_train_steps", 1, "--clip_skip", 1, "--output_name", "dogs", "--output_dir", out,
                             "--save_precision", "fp16")
    assert code == 0, err
    for name in ("dogs.safetensors", "pytorch_lora_weights.safetensors"):
        metadata = ui.read_metadata_from_safetensors(str(out / name))
        assert ui.detect_version(metadata) == "SDXL", name
        table = dict(ui.get_metadata_table(metadata))
        assert table["Dataset size:"] == 2 and table["Resolution:"] == "64x64" and table["Clip skip:"] == "1"
        assert table["Output name:"] == "dogs"
        tags = dict(ui.build_tags(metadata))
        assert tags["sks dog"] == 2 and tags["grass"] == 1, tags  # kohya counts each image's tags once, not its repeats
        assert str(tmp_path) not in json.dumps(metadata), "no local path in a file others will read"
        data = (out / name).read_bytes()
        header = int.from_bytes(data[:8], "little")
        # addnet's hash is of the tensors' bytes, after the header: independent of the metadata written
        assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()

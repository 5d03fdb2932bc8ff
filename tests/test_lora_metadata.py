"""common/lora_metadata.py, merge_lora.py and convert_for_webui.py: the metadata of every adapter file we write, read back
by WebUI's own code (tests/ui_metadata.py) and hashed as kohya hashes it; no local path in it; --no_metadata's minimum."""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert_for_webui
import merge_lora
import ui_metadata as webui
from common.lora_metadata import (
    DatasetFolder, LoraFacts, add_file_metadata, carried_metadata, dataset_folder, folders_from_metadata, lora_metadata,
    safetensors_hashes, save_lora_file, shareable_metadata, tag_frequency,
)
from helpers import make_peft_lora, run_cli

STARTED = 1_718_000_000.25  # 2024-06-10 06:13:20 UTC
HOSTILE_CAPTIONS = ["Sks Dog, ,  on a BEACH ,,", "sks dog, café au lait, 猫, 🐕", "sks dog, sks dog, \"quoted\", back\\slash",
                    "  ", "line\nbreak, tab\there, sks dog"]
MODELSPEC_REQUIRED = {"modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
                      "modelspec.resolution"}


def run_convert(capsys, *argv):
    return run_cli(convert_for_webui.app, [str(a) for a in argv], capsys)


def run_merge(capsys, *argv):
    return run_cli(merge_lora.app, [str(a) for a in argv], capsys)


def file_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


def bytes_after_header(path: Path) -> bytes:
    data = path.read_bytes()
    return data[8 + int.from_bytes(data[:8], "little"):]


def run_facts(**changes) -> LoraFacts:
    """A training run as train_lora.py will describe it: a repeats folder, a class folder, two buckets."""
    facts = dict(
        network_module="networks.lora", dim=4, alpha=8, output_name="my_dog", network_args={"algo": "lora"},
        base_model="stabilityai/stable-diffusion-xl-base-1.0",
        folders=(dataset_folder("data/10_sks dog", HOSTILE_CAPTIONS, 10), dataset_folder("class", ["a dog"] * 3, 1, is_reg=True)),
        buckets={(832, 1216): 30, (1024, 1024): 20}, resolution=(1024, 1024), clip_skip=2, started_at=STARTED,
        finished_at=STARTED + 600, made_at=STARTED + 600, steps=500, epoch=10, seed=42, learning_rate=1e-4,
        unet_lr=1e-4, text_encoder_lr=5e-5, prediction_type="epsilon", trigger_phrase="a photo of sks dog",
    )
    return LoraFacts(**(facts | changes))


def small_tensors(seed: int = 0, rows: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"lora_unet_a.lora_down.weight": torch.randn(4, rows, generator=generator),
            "lora_unet_a.lora_up.weight": torch.randn(rows, 4, generator=generator).half(), "lora_unet_a.alpha": torch.tensor(8.0)}


# ---------------------------------------------------------------- what WebUI reads


@pytest.mark.parametrize("minimal", [False, True])
def test_webui_lists_our_files_for_sdxl_under_their_output_name(minimal, tmp_path):
    path = tmp_path / "file_name.safetensors"
    save_lora_file(path, small_tensors(), lora_metadata(run_facts(), minimal=minimal))
    read = webui.read_metadata_from_safetensors(str(path))
    assert webui.detect_version(read) == "SDXL", {k: read.get(k) for k in ("ss_base_model_version", "ss_v2")}
    assert webui.network_alias(read, "file_name") == ("file_name" if minimal else "my_dog")
    # the check can fail: metadata without the base model version is taken for SD1, and hidden under SDXL
    assert webui.detect_version({"ss_network_module": "networks.lora"}) == "SD1"


def test_webui_metadata_table_shows_dataset_size_resolutions_clip_skip_and_date(tmp_path):
    path = tmp_path / "my_dog.safetensors"
    facts = run_facts(base_model=str(tmp_path / "models" / "sdxl.safetensors"))
    save_lora_file(path, small_tensors(), lora_metadata(facts))
    table = dict(webui.get_metadata_table(webui.read_metadata_from_safetensors(str(path))))
    assert table == {"Output name:": "my_dog", "Model:": "sdxl.safetensors", "Clip skip:": "2", "Kohya module:": "networks.lora",
                     "Date trained:": "2024-06-10 06:13", "Resolutions:": "1216x832, 1024x1024", "Dataset size:": len(HOSTILE_CAPTIONS)}, table
    # WebUI prints a bucket as resolution[1]xresolution[0]: kohya's (width, height) order is what makes it height x width
    info = json.loads(file_metadata(path)["ss_bucket_info"])
    assert info["buckets"]["0"] == {"resolution": [832, 1216], "count": 30}


def test_webui_tag_list_is_the_captions_tags_most_frequent_first(tmp_path):
    path = tmp_path / "my_dog.safetensors"
    facts = run_facts(folders=(dataset_folder("a", ["sks dog, beach", "sks dog, Beach, sky"], 1),
                               dataset_folder("b", ["sks dog, snow"], 3)))
    save_lora_file(path, small_tensors(), lora_metadata(facts))
    tags = webui.build_tags(webui.read_metadata_from_safetensors(str(path)))
    assert tags == [("sks dog", 3), ("beach", 2), ("sky", 1), ("snow", 1)], tags


# ---------------------------------------------------------------- kohya's encodings


def test_tag_frequency_counts_hostile_captions_as_kohya_does_and_reads_back_through_webui(tmp_path):
    kohya: dict = {}
    webui.set_tag_frequency(kohya, "10_sks dog", HOSTILE_CAPTIONS)
    ours = tag_frequency(HOSTILE_CAPTIONS)
    assert ours == kohya["10_sks dog"] and list(ours) == list(kohya["10_sks dog"]), (ours, kohya)
    assert ours["sks dog"] == 5 and "" not in ours and ours["猫"] == 1 and ours["line\nbreak"] == 1, ours
    written = lora_metadata(run_facts(folders=(dataset_folder("/x/10_sks dog", HOSTILE_CAPTIONS, 10),)))
    assert written["ss_tag_frequency"] == json.dumps(kohya), "byte for byte kohya's json.dumps"
    save_lora_file(tmp_path / "f.safetensors", small_tensors(), written)
    read = webui.read_metadata_from_safetensors(str(tmp_path / "f.safetensors"))
    assert read["ss_tag_frequency"] == kohya and ("🐕", 1) in webui.build_tags(read)


def test_kohya_string_encodings_of_resolution_times_and_dataset_keys():
    metadata = lora_metadata(run_facts(resolution=(832, 1216)))
    assert metadata["ss_resolution"] == "(832, 1216)" and metadata["modelspec.resolution"] == "832x1216"
    assert float(metadata["ss_training_started_at"]) == STARTED and metadata["ss_steps"] == "500" and metadata["ss_epoch"] == "10"
    assert (metadata["ss_learning_rate"], metadata["ss_text_encoder_lr"], metadata["ss_seed"]) == ("0.0001", "5e-05", "42")
    assert json.loads(metadata["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": len(HOSTILE_CAPTIONS)}}
    assert json.loads(metadata["ss_reg_dataset_dirs"]) == {"class": {"n_repeats": 1, "img_count": 3}}
    assert (metadata["ss_num_train_images"], metadata["ss_num_reg_images"]) == (str(10 * len(HOSTILE_CAPTIONS)), "3")
    assert set(json.loads(metadata["ss_tag_frequency"])) == {"10_sks dog", "class"}, "kohya counts the class folder's tags too"
    assert (metadata["modelspec.date"], metadata["modelspec.prediction_type"], metadata["modelspec.encoder_layer"]) == (
        "2024-06-10T06:23:20+00:00", "epsilon", "2")
    assert lora_metadata(run_facts(prediction_type="v_prediction"))["modelspec.prediction_type"] == "v"
    assert all(isinstance(value, str) for value in metadata.values())


def test_a_folder_name_used_twice_is_numbered_as_kohya_numbers_it():
    facts = run_facts(folders=(dataset_folder("a/img", ["x"], 1), dataset_folder("b/img", ["y"], 2), dataset_folder("c/img", ["z"], 3)))
    metadata = lora_metadata(facts)
    assert list(json.loads(metadata["ss_dataset_dirs"])) == ["img", "img (2)", "img (3)"]
    assert json.loads(metadata["ss_tag_frequency"]) == {"img": {"x": 1}, "img (2)": {"y": 1}, "img (3)": {"z": 1}}


def test_huge_tag_counts_and_many_tags_encode_and_read_back(tmp_path):
    many = {f"tag {i}": 1 for i in range(20_000)} | {"common": 10**15}
    facts = run_facts(folders=(DatasetFolder("big", 1, 10**6, many),))
    path = tmp_path / "big.safetensors"
    save_lora_file(path, small_tensors(), lora_metadata(facts))
    read = webui.read_metadata_from_safetensors(str(path))
    tags = webui.build_tags(read)
    assert tags[0] == ("common", 10**15) and len(tags) == 20_001
    assert dict(webui.get_metadata_table(read))["Dataset size:"] == 10**6


@pytest.mark.parametrize("change", [{"learning_rate": math.nan}, {"unet_lr": math.inf}, {"text_encoder_lr": -1e-4},
                                    {"started_at": math.nan}, {"steps": -1}, {"epoch": 1.5}, {"resolution": (0, 1024)},
                                    {"prediction_type": "sample"}])
def test_facts_that_no_reader_could_take_are_refused(change):
    with pytest.raises(ValueError, match=next(iter(change))):
        run_facts(**change)


def test_negative_counts_in_a_dataset_folder_are_refused():
    with pytest.raises(ValueError, match="must be >= 0"):
        DatasetFolder("x", 1, 2, {"tag": -1})


def test_dataset_folders_read_back_from_metadata_and_hostile_metadata_gives_none():
    facts = run_facts()
    read = folders_from_metadata(lora_metadata(facts))
    assert [(f.folder, f.repeats, f.image_count, dict(f.tags), f.is_reg) for f in read] == [
        ("10_sks dog", 10, len(HOSTILE_CAPTIONS), tag_frequency(HOSTILE_CAPTIONS), False), ("class", 1, 3, {"a dog": 3}, True)]
    hostile = {"ss_dataset_dirs": "{not json", "ss_tag_frequency": '["a list"]', "ss_reg_dataset_dirs": '{"r": {"img_count": -5}}'}
    assert [(f.folder, f.image_count) for f in folders_from_metadata(hostile)] == [("r", 0)]


# ---------------------------------------------------------------- --no_metadata


def test_no_metadata_keeps_kohyas_minimum_keys_and_modelspecs_required_ones(tmp_path):
    minimal = lora_metadata(run_facts(), minimal=True)
    assert {k for k in minimal if k.startswith("ss_")} == set(webui.SS_METADATA_MINIMUM_KEYS)
    assert {k for k in minimal if not k.startswith("ss_")} == MODELSPEC_REQUIRED
    assert not any("sks" in value or "1718" in value for value in minimal.values()), "no caption, tag or date goes out"
    full = lora_metadata(run_facts())
    assert set(full) > set(minimal) and {"ss_tag_frequency", "ss_training_started_at", "ss_seed"} <= set(full)


# ---------------------------------------------------------------- hashes


def test_hashes_equal_kohyas_and_the_sha256_of_the_written_files_tensor_bytes(tmp_path):
    tensors = small_tensors(rows=300_000 // 4)  # over 1 MiB + 64 KiB: the legacy hash reads real bytes
    metadata = lora_metadata(run_facts())
    assert safetensors_hashes(tensors, metadata) == webui.precalculate_safetensors_hashes(tensors, metadata)
    path = tmp_path / "f.safetensors"
    save_lora_file(path, tensors, metadata)
    written = file_metadata(path)
    assert written["sshs_model_hash"] == hashlib.sha256(bytes_after_header(path)).hexdigest()
    assert webui.network_hash({}, str(path)) == written["sshs_model_hash"], "what WebUI computes of the file without the key"
    ss_only = tmp_path / "ss_only.safetensors"  # the file kohya hashes: its ss_* metadata only
    save_file(tensors, ss_only, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert written["sshs_legacy_hash"] == hashlib.sha256(ss_only.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert written["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]


def test_hashes_change_with_the_tensors_and_not_with_non_kohya_metadata():
    tensors, metadata = small_tensors(), lora_metadata(run_facts())
    hashes = safetensors_hashes(tensors, metadata)
    assert safetensors_hashes(tensors, metadata | {"modelspec.title": "renamed", "ssmd_cover_images": "[]"}) == hashes
    changed = dict(tensors, **{"lora_unet_a.alpha": torch.tensor(8.5)})
    assert safetensors_hashes(changed, metadata)[0] != hashes[0]


def test_adding_metadata_to_a_written_file_keeps_its_own_and_rehashes(tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(small_tensors(), path, metadata={"format": "pt", "lora_adapter_metadata": "{}"})
    add_file_metadata(path, lora_metadata(run_facts()))
    written = file_metadata(path)
    assert written["format"] == "pt" and written["lora_adapter_metadata"] == "{}" and written["ss_output_name"] == "my_dog"
    assert written["sshs_model_hash"] == hashlib.sha256(bytes_after_header(path)).hexdigest()


# ---------------------------------------------------------------- nothing local


def local_words() -> list[str]:
    return [os.path.expanduser("~"), getpass.getuser(), "alice", "/home/", "C:\\", "Users"]


def test_no_local_path_or_user_name_reaches_the_metadata(tmp_path):
    facts = run_facts(base_model="/home/alice/models/sdxl.safetensors", folders=(
        dataset_folder(Path.home() / "datasets" / "10_sks dog", ["a"], 10), dataset_folder("/home/alice/pics/", ["b"], 1),
        dataset_folder("C:\\Users\\alice\\class", ["c"], 1, is_reg=True)))
    metadata = lora_metadata(facts)
    leaks = {key: value for key, value in metadata.items() for word in local_words() if len(word) > 2 and word in value}
    assert not leaks, leaks
    assert json.loads(metadata["ss_tag_frequency"]).keys() == {"10_sks dog", "pics", "class"}
    assert metadata["ss_sd_model_name"] == "sdxl.safetensors"
    for model in ("C:\\Users\\alice\\sdxl.safetensors", "~/models/sdxl.safetensors"):
        assert lora_metadata(run_facts(base_model=model))["ss_sd_model_name"] == "sdxl.safetensors"


def test_carried_values_that_name_local_paths_are_dropped_and_others_kept():
    carried = {"ss_sd_model_name": "/home/alice/sdxl.safetensors", "ss_vae_name": "C:\\Users\\alice\\vae.pt",
               "ss_tag_frequency": json.dumps({"/home/alice/img": {"a": 1}}), "ss_output_name": "~/run",
               "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
               "modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ss_resolution": "(1024, 1024)",
               "ss_tag_frequency_ok": json.dumps({"img": {"1/2 body": 1, "a/b": 2}})}
    kept, dropped = shareable_metadata(carried)
    assert sorted(dropped) == ["ss_output_name", "ss_sd_model_name", "ss_tag_frequency", "ss_vae_name"], dropped
    assert set(kept) == {"modelspec.implementation", "modelspec.architecture", "ss_resolution", "ss_tag_frequency_ok"}


def test_a_diffusers_file_carries_its_training_folders_kohya_facts_under_its_own(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    save_file(small_tensors(), folder / "pytorch_lora_weights.safetensors",
              metadata={"format": "pt", "ss_output_name": "own", "sshs_model_hash": "stale"})
    save_lora_file(folder / "run.safetensors", small_tensors(1), lora_metadata(run_facts(output_name="beside")))
    carried = carried_metadata(folder / "pytorch_lora_weights.safetensors")
    assert carried["ss_output_name"] == "own" and json.loads(carried["ss_tag_frequency"]).keys() == {"10_sks dog", "class"}
    assert not {"format", "sshs_model_hash", "sshs_legacy_hash"} & set(carried), "hashes describe their own file only"
    (folder / "run.safetensors").write_bytes(b"not a safetensors file")
    assert carried_metadata(folder / "pytorch_lora_weights.safetensors") == {"ss_output_name": "own"}


# ---------------------------------------------------------------- merge and convert outputs


@pytest.fixture(scope="module")
def trained_inputs(tiny_sdxl_path, tmp_path_factory):
    """Two training folders as train_lora.py writes them once it records its facts: the diffusers file, and the kohya
    file NAME.safetensors beside it carrying the run's metadata (one of them naming a local model path)."""
    folder = tmp_path_factory.mktemp("inputs")
    made = []
    for index, (name, rank) in enumerate((("dog_run", 4), ("style_run", 2))):
        lora = make_peft_lora(tiny_sdxl_path, folder / name, rank=rank, alpha=rank, seed=index + 1, text_encoders=index == 0)
        facts = run_facts(output_name=name, dim=rank, alpha=rank, title=f"{name} title",
                          folders=(dataset_folder(f"10_{name}", [f"{name} tag, shared"] * (index + 2), 10),),
                          base_model="/home/alice/models/sdxl.safetensors" if index == 0 else "tiny-sdxl")
        metadata = lora_metadata(facts) | ({"ss_vae_name": "/home/alice/vae.safetensors"} if index == 0 else {})
        save_lora_file(lora.parent / f"{name}.safetensors", small_tensors(index), metadata)
        made.append(lora.parent)
    (made[0] / "training_args.json").write_text(json.dumps({"instance_prompt": "a photo of TOK", "token_map": {"TOK": ["<s0>"]},
                                                            "pretrained_model_name_or_path": "/home/alice/models/sdxl.safetensors",
                                                            "resolution": 64, "learning_rate": float("nan")}))
    return made


def assert_hashes_describe_the_file(path: Path) -> dict[str, str]:
    written = file_metadata(path)
    assert written["sshs_model_hash"] == hashlib.sha256(bytes_after_header(path)).hexdigest(), path
    assert (written["sshs_model_hash"], written["sshs_legacy_hash"]) == webui.precalculate_safetensors_hashes(load_file(path), written)
    assert webui.detect_version(webui.read_metadata_from_safetensors(str(path))) == "SDXL"
    return written


def test_merged_files_carry_the_merge_the_inputs_tags_and_their_own_hashes(trained_inputs, tmp_path, capsys):
    out = tmp_path / "merged_run"
    code, _, err = run_merge(capsys, "--lora", trained_inputs[0], "--lora", f"{trained_inputs[1]}:0.5", "--out", out, "--kohya")
    assert code == 0, err
    for path in (out / "pytorch_lora_weights.safetensors", out / "merged_run.safetensors"):
        written = assert_hashes_describe_the_file(path)
        assert written["modelspec.merged_from"] == "dog_run title, style_run title" and written["modelspec.title"] == "merged_run"
        assert written["ss_network_dim"] == written["ss_network_alpha"] == "Dynamic", "rank 6 where both have a layer, 4 elsewhere"
        read = webui.read_metadata_from_safetensors(str(path))
        assert webui.build_tags(read)[0] == ("shared", 5) and read["ss_dataset_dirs"].keys() == {"10_dog_run", "10_style_run"}
        assert webui.network_alias(read, path.stem) == "merged_run" and read["ss_sd_model_name"] == "tiny-sdxl"
        assert not any("alice" in value for value in written.values()), written


def test_a_merge_with_no_metadata_writes_kohyas_minimum(trained_inputs, tmp_path, capsys):
    out = tmp_path / "merged"
    code, _, err = run_merge(capsys, "--lora", trained_inputs[0], "--lora", trained_inputs[1], "--out", out, "--kohya", "--no_metadata")
    assert code == 0, err
    written = assert_hashes_describe_the_file(out / "merged.safetensors")
    assert set(written) == (set(webui.SS_METADATA_MINIMUM_KEYS) - {"ss_network_args"}) | MODELSPEC_REQUIRED | {"sshs_model_hash", "sshs_legacy_hash"}


def test_no_metadata_is_refused_for_a_checkpoint_bake(trained_inputs, tmp_path, capsys):
    code, _, err = run_merge(capsys, "--lora", trained_inputs[0], "--into_checkpoint", tmp_path / "x.safetensors", "--no_metadata")
    assert code != 0 and "--no_metadata applies to merged LoRA files" in err, err
    assert not (tmp_path / "x.safetensors").exists()


def test_exported_file_carries_the_training_facts_under_its_new_name_with_fresh_hashes(trained_inputs, tmp_path, capsys):
    code, _, err = run_convert(capsys, trained_inputs[0], "--name", "renamed", "--out", tmp_path, "--save_precision", "fp16")
    assert code == 0, err
    written = assert_hashes_describe_the_file(tmp_path / "renamed.safetensors")
    source = file_metadata(trained_inputs[0] / "dog_run.safetensors")
    for key in ("ss_tag_frequency", "ss_dataset_dirs", "ss_training_started_at", "ss_seed", "ss_bucket_info", "modelspec.date"):
        assert written[key] == source[key], key
    assert (written["ss_output_name"], written["modelspec.title"]) == ("renamed", "renamed")
    assert written["modelspec.trigger_phrase"] == "a photo of renamed", "the trigger names the file's new name"
    assert written["ss_sd_model_name"] == "sdxl.safetensors" and "ss_vae_name" not in written, "a local path is not carried"
    assert "ss_vae_name" in err and "local paths" in err
    assert not any("alice" in value for value in written.values())
    refuse = lambda constant: pytest.fail(f"{constant} in ss_training_comment is not JSON")  # noqa: E731
    assert json.loads(written["ss_training_comment"], parse_constant=refuse)["learning_rate"] is None, "training_args' NaN"
    assert written["sshs_model_hash"] != source["sshs_model_hash"]
    table = dict(webui.get_metadata_table(webui.read_metadata_from_safetensors(str(tmp_path / "renamed.safetensors"))))
    assert table["Dataset size:"] == 2 and table["Output name:"] == "renamed"


def test_exported_file_with_no_metadata_carries_nothing(trained_inputs, tmp_path, capsys):
    code, _, err = run_convert(capsys, trained_inputs[0], "--out", tmp_path, "--no_metadata")
    assert code == 0, err
    written = assert_hashes_describe_the_file(tmp_path / "dog_run.safetensors")
    assert set(written) == set(webui.SS_METADATA_MINIMUM_KEYS) | MODELSPEC_REQUIRED | {"sshs_model_hash", "sshs_legacy_hash"}


def test_a_kohya_file_converted_to_diffusers_keeps_its_facts_and_its_adapter_configs(trained_inputs, tmp_path, capsys):
    code, _, err = run_convert(capsys, trained_inputs[0], "--out", tmp_path / "kohya")
    assert code == 0, err
    code, _, err = run_convert(capsys, tmp_path / "kohya" / "dog_run.safetensors", "--to", "diffusers", "--out", tmp_path / "back")
    assert code == 0, err
    written = assert_hashes_describe_the_file(tmp_path / "back" / "pytorch_lora_weights.safetensors")
    assert json.loads(written["lora_adapter_metadata"])["unet.r"] == 4, "diffusers' own configs stay"
    assert written["ss_output_name"] == "dog_run" and json.loads(written["ss_tag_frequency"]) == {"10_dog_run": {"dog_run tag": 2, "shared": 2}}
    assert (written["ss_network_dim"], written["ss_network_alpha"]) == ("4", "4.0")

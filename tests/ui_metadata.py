"""How WebUI reads a LoRA file's metadata, and how kohya's sd-scripts counts tags and hashes a LoRA file, reproduced
from their own source for the tests to compare common/lora_metadata.py with. Each function follows its source
statement by statement, names kept; what the UI gets from its surroundings (its caches, options, gradio) is left out.
This is a test reference, never imported by the toolkit (WebUI is AGPL-3.0, sd-scripts Apache-2.0).

Sources, read with the repository search tools and the sd-scripts mirror:
- WebUI, AUTOMATIC1111/stable-diffusion-webui:
  extensions-builtin/Lora/network.py at f2844bd024ff3cf7ee712153a514afd9085980db (`NetworkOnDisk.__init__`: the alias
    from ss_output_name, the hash from sshs_model_hash before any computed one; `detect_version`);
  extensions-builtin/Lora/ui_edit_user_metadata.py at d4945f4422e5a0bf31a6dbe4c1aeedd78c09eacb (`build_tags`,
    `is_non_comma_tagset`, `LoraUserMetadataEditor.get_metadata_table`);
  modules/sd_models.py `read_metadata_from_safetensors` (a value starting with "{" is parsed as JSON; the function
    is the same in every 1.x release) and modules/hashes.py `addnet_hash_safetensors` (its docstring: "kohya-ss hash
    for safetensors from .../train_util.py", the same function as kohya's below).
- kohya-ss/sd-scripts at 48d368fa557731ad0488c07304dfeba8c07910eb: library/train_util.py `BaseDataset.set_tag_frequency`,
  `SS_METADATA_MINIMUM_KEYS`, `precalculate_safetensors_hashes`, `addnet_hash_legacy`, `addnet_hash_safetensors`.
"""

from __future__ import annotations

import datetime
import hashlib
import html
import json
import re
from io import BytesIO

# ---------------------------------------------------------------- WebUI


def read_metadata_from_safetensors(filename):
    """modules/sd_models.py"""
    with open(filename, mode="rb") as file:
        metadata_len = file.read(8)
        metadata_len = int.from_bytes(metadata_len, "little")
        json_start = file.read(2)

        assert metadata_len > 2 and json_start in (b'{"', b"{'"), f"{filename} is not a safetensors file"
        json_data = json_start + file.read(metadata_len - 2)
        json_obj = json.loads(json_data)

        res = {}
        for k, v in json_obj.get("__metadata__", {}).items():
            res[k] = v
            if isinstance(v, str) and v[0:1] == "{":
                try:
                    res[k] = json.loads(v)
                except Exception:
                    pass

        return res


def detect_version(metadata) -> str:
    """network.py `NetworkOnDisk.detect_version`, the SdVersion's name."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    elif str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    elif len(metadata):
        return "SD1"

    return "Unknown"


def network_hash(metadata, filename) -> str:
    """network.py `NetworkOnDisk`: sshs_model_hash, else (no cached value) `read_hash`'s hashes.sha256 with
    use_addnet_hash for a .safetensors file."""
    if metadata.get("sshs_model_hash"):
        return metadata["sshs_model_hash"]
    with open(filename, "rb") as file:
        return addnet_hash_safetensors(file)


def network_alias(metadata, name) -> str:
    """network.py `NetworkOnDisk.__init__`: the name a prompt's <lora:...> may use."""
    return metadata.get("ss_output_name", name)


def is_non_comma_tagset(tags):
    average_tag_length = sum(len(x) for x in tags.keys()) / len(tags)

    return average_tag_length >= 16


re_word = re.compile(r"[-_\w']+")


def build_tags(metadata):
    """ui_edit_user_metadata.py: the "Training dataset tags" list, most frequent first."""
    tags = {}

    for _, tags_dict in metadata.get("ss_tag_frequency", {}).items():
        for tag, tag_count in tags_dict.items():
            tag = tag.strip()
            tags[tag] = tags.get(tag, 0) + int(tag_count)

    if tags and is_non_comma_tagset(tags):
        new_tags = {}

        for text, text_count in tags.items():
            for word in re.findall(re_word, text):
                if len(word) < 3:
                    continue

                new_tags[word] = new_tags.get(word, 0) + text_count

        tags = new_tags

    ordered_tags = sorted(tags.keys(), key=tags.get, reverse=True)

    return [(tag, tags[tag]) for tag in ordered_tags]


def get_metadata_table(metadata):
    """ui_edit_user_metadata.py `LoraUserMetadataEditor.get_metadata_table`, without the base class's rows (file name,
    size, modification time): [(label, value)]. `utcfromtimestamp`, which Python 3.12 deprecates, is written as the
    same UTC time through `fromtimestamp(..., timezone.utc)`."""
    table = []

    keys = {
        'ss_output_name': "Output name:",
        'ss_sd_model_name': "Model:",
        'ss_clip_skip': "Clip skip:",
        'ss_network_module': "Kohya module:",
    }

    for key, label in keys.items():
        value = metadata.get(key, None)
        if value is not None and str(value) != "None":
            table.append((label, html.escape(value)))

    ss_training_started_at = metadata.get('ss_training_started_at')
    if ss_training_started_at:
        started = datetime.datetime.fromtimestamp(float(ss_training_started_at), datetime.timezone.utc)
        table.append(("Date trained:", started.strftime('%Y-%m-%d %H:%M')))

    ss_bucket_info = metadata.get("ss_bucket_info")
    if ss_bucket_info and "buckets" in ss_bucket_info:
        resolutions = {}
        for _, bucket in ss_bucket_info["buckets"].items():
            resolution = bucket["resolution"]
            resolution = f'{resolution[1]}x{resolution[0]}'

            resolutions[resolution] = resolutions.get(resolution, 0) + int(bucket["count"])

        resolutions_list = sorted(resolutions.keys(), key=resolutions.get, reverse=True)
        resolutions_text = html.escape(", ".join(resolutions_list[0:4]))
        if len(resolutions) > 4:
            resolutions_text += ", ..."
            resolutions_text = f"<span title='{html.escape(', '.join(resolutions_list))}'>{resolutions_text}</span>"

        table.append(('Resolutions:' if len(resolutions_list) > 1 else 'Resolution:', resolutions_text))

    image_count = 0
    for _, params in metadata.get("ss_dataset_dirs", {}).items():
        image_count += int(params.get("img_count", 0))

    if image_count:
        table.append(("Dataset size:", image_count))

    return table


# ---------------------------------------------------------------- kohya's sd-scripts

SS_METADATA_MINIMUM_KEYS = ["ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                            "ss_network_args"]


def set_tag_frequency(tag_frequency, dir_name, captions):
    """train_util.py `BaseDataset.set_tag_frequency`, on the dataset's `tag_frequency` dict."""
    frequency_for_dir = tag_frequency.get(dir_name, {})
    tag_frequency[dir_name] = frequency_for_dir
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip()
            if tag:
                tag = tag.lower()
                frequency = frequency_for_dir.get(tag, 0)
                frequency_for_dir[tag] = frequency + 1


def precalculate_safetensors_hashes(tensors, metadata):
    """train_util.py"""
    import safetensors.torch

    metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}

    bytes = safetensors.torch.save(tensors, metadata)
    b = BytesIO(bytes)

    model_hash = addnet_hash_safetensors(b)
    legacy_hash = addnet_hash_legacy(b)
    return model_hash, legacy_hash


def addnet_hash_legacy(b):
    m = hashlib.sha256()

    b.seek(0x100000)
    m.update(b.read(0x10000))
    return m.hexdigest()[0:8]


def addnet_hash_safetensors(b):
    hash_sha256 = hashlib.sha256()
    blksize = 1024 * 1024

    b.seek(0)
    header = b.read(8)
    n = int.from_bytes(header, "little")

    offset = n + 8
    b.seek(offset)
    for chunk in iter(lambda: b.read(blksize), b""):
        hash_sha256.update(chunk)

    return hash_sha256.hexdigest()

"""Optimizer extras: LoRA+ groups against peft's create_loraplus_optimizer, block learning-rate weights against kohya's
networks/lora.py (get_list presets and get_block_index, reproduced from sd-scripts at 48d368fa), Adafactor, and the
EMA of the adapter against its recursion, through resume."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.cli import UserError
from common.checkpoints import unet_module_to_sgm
from common.lora_formats import kohya_module_name
from common.optim import block_lr_weight, parameter_groups, parse_block_weights, preset_weights
from training_helpers import train_cli, write_images

# ---------------------------------------------------------------- kohya's networks/lora.py, reproduced


def kohya_get_list(name_with_suffix: str, count: int = 9) -> list[float]:
    tokens = name_with_suffix.split("+")
    name = tokens[0]
    base_lr = float(tokens[1]) if len(tokens) > 1 else 0.0
    if name == "cosine":
        return [math.sin(math.pi * (i / (count - 1)) / 2) + base_lr for i in reversed(range(count))]
    if name == "sine":
        return [math.sin(math.pi * (i / (count - 1)) / 2) + base_lr for i in range(count)]
    if name == "linear":
        return [i / (count - 1) + base_lr for i in range(count)]
    if name == "reverse_linear":
        return [i / (count - 1) + base_lr for i in reversed(range(count))]
    return [0.0 + base_lr] * count


def kohya_get_block_index_sdxl(lora_name: str) -> int:
    block_idx = -1
    if lora_name.startswith("lora_unet_"):
        name = lora_name[len("lora_unet_"):]
        if name.startswith("time_embed_") or name.startswith("label_emb_"):
            block_idx = 0
        elif name.startswith("input_blocks_"):
            block_idx = 1 + int(name.split("_")[2])
        elif name.startswith("middle_block_"):
            block_idx = 10 + int(name.split("_")[2])
        elif name.startswith("output_blocks_"):
            block_idx = 13 + int(name.split("_")[2])
        elif name.startswith("out_"):
            block_idx = 22
    return block_idx


def kohya_lr_weights(down, mid, up, zero_threshold):
    """LoRANetwork.set_block_lr_weight for SDXL: [1] + down + mid + up + [1], weights at or below the threshold 0."""
    weights = [1.0] + down + mid + up + [1.0]
    return [w if w > zero_threshold else 0 for w in weights]


@pytest.mark.parametrize("preset", ["cosine", "sine", "linear", "reverse_linear", "zeros", "sine+0.5", "zeros+1"])
def test_block_weight_presets_equal_kohyas(preset):
    assert preset_weights(preset, 9) == kohya_get_list(preset)
    assert parse_block_weights(preset, 9, "--up_lr_weight") == kohya_get_list(preset)


def test_every_sdxl_layer_gets_the_block_weight_kohya_gives_it():
    """On every adaptable layer of full-size SDXL (attention projections, ResNet convolutions, samplers), our weight by
    SGM block equals kohya's lr_weight[get_block_index(kohya's LoRA name)], including the zero threshold."""
    from common.models import sdxl_module_names

    down, mid, up = kohya_get_list("sine"), [0.5, 0.0, 2.0], [float(i % 3) * 0.3 for i in range(9)]
    threshold = 0.25
    reference = kohya_lr_weights(down, mid, up, threshold)
    targets = [n.removeprefix("unet.") for n in sdxl_module_names() if n.startswith("unet.")
               and re.search(r"\.(to_q|to_k|to_v|to_out\.0|conv1|conv2|conv_shortcut|downsamplers\.0\.conv|upsamplers\.0\.conv)$", n)]
    assert len(targets) > 600
    weights = set()
    for module in targets:
        ours = block_lr_weight(unet_module_to_sgm(module), down, mid, up, threshold)
        kohya = reference[kohya_get_block_index_sdxl(kohya_module_name("unet", module))]
        assert ours == kohya, module
        weights.add(ours)
    assert 0 in weights and len(weights) > 5


def test_malformed_block_weights_are_refused_in_one_line():
    with pytest.raises(UserError, match=r"--down_lr_weight '1,1,1': SDXL has 9 such blocks; give 9 weights >= 0 \(got 3\)"):
        parse_block_weights("1,1,1", 9, "--down_lr_weight")
    with pytest.raises(UserError, match=r"--mid_lr_weight 'sine': give 3 comma-separated numbers$"):
        parse_block_weights("sine", 3, "--mid_lr_weight", presets=False)
    assert parse_block_weights("1,,0.5", 3, "--mid_lr_weight", presets=False) == [1.0, 0.0, 0.5]  # kohya reads empty as 0


def test_loraplus_rates_equal_pefts_create_loraplus_optimizer():
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    for use_dora in (False, True):
        base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "2"], use_dora=use_dora))
        reference = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16)
        expected = {id(p): group["lr"] for group in reference.param_groups for p in group["params"]}
        groups = parameter_groups([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01,
                                  loraplus_ratio=16)
        ours = {id(p): group["lr"] for group in groups for p in group["params"]}
        assert ours == expected and sorted(set(ours.values())) == [1e-4, 16e-4]


def test_block_weights_and_loraplus_multiply_and_zero_rates_are_left_out():
    a, b, c = (torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
    named = [("x.lora_A.default.weight", a), ("x.lora_B.default.weight", b), ("y.lora_B.default.weight", c)]
    groups = parameter_groups(named, lr=1.0, weight_decay=0.0, loraplus_ratio=4.0,
                              lr_weight_of=lambda name: 0.5 if name.startswith("x") else 0.0)
    assert [(g["lr"], [id(p) for p in g["params"]]) for g in groups] == [(0.5, [id(a)]), (2.0, [id(b)])]


# ---------------------------------------------------------------- through train_lora.py


def test_block_weights_leave_zero_weight_blocks_out_and_rates_reach_the_optimizer(tiny_sdxl_path, tmp_path, capsys, monkeypatch):
    import train_lora

    made = {}
    original = train_lora.make_optimizer

    def recording(*args, **kwargs):
        made["result"] = original(*args, **kwargs)
        return made["result"]

    monkeypatch.setattr(train_lora, "make_optimizer", recording)
    images = write_images(tmp_path / "img", 2)
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", "a sks dog",
                             "--resolution", 64, "--max_train_steps", 1, "--optimizer", "Adafactor", "--unet_lr", 1e-3,
                             "--loraplus_lr_ratio", 16, "--up_lr_weight", "zeros", "--down_lr_weight", "0,0,0,0,0.5,0.5,1,1,1",
                             "--output_dir", tmp_path / "out")
    assert code == 0, err
    optimizer = made["result"][0]
    assert type(optimizer).__name__ == "Adafactor" and optimizer.defaults["relative_step"] is False
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([5e-4, 1e-3, 8e-3, 16e-3])
    names = {k.split(".")[0] for k in load_file(tmp_path / "out" / "out.safetensors")}
    assert names and all(n.startswith(("lora_unet_input_blocks", "lora_unet_middle_block")) for n in names), names
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", "x",
                             "--adapter", "loha", "--loraplus_lr_ratio", 16, "--output_dir", tmp_path / "bad")
    assert code != 0 and "--loraplus_lr_ratio scales a LoRA's B matrix; --adapter loha has none" in err and err.count("\n") == 1


def ema_reference(raw_by_step: list[dict], decay: float) -> dict:
    """The EMA recursion with diffusers' EMAModel warm-up: d_t = min(decay, (1 + s) / (10 + s)), s = t - 1, d_1 = 0."""
    ema = {}
    for t, raw in enumerate(raw_by_step, start=1):
        s = t - 1
        d = 0.0 if s <= 0 else min(decay, (1 + s) / (10 + s))
        ema = {k: v.double() if not ema else d * ema[k] + (1 - d) * v.double() for k, v in raw.items()}
    return ema


@pytest.mark.heavy
def test_ema_weights_follow_their_recursion_are_saved_beside_the_raw_ones_and_resume_exactly(tiny_sdxl_path, tmp_path, capsys):
    images = write_images(tmp_path / "img", 2)
    common = ["-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", "a sks dog", "--resolution", 64,
              "--train_batch_size", 1, "--unet_lr", 1e-2, "--use_ema", "--ema_decay", 0.2, "--checkpointing_steps", 1, "--seed", 3]
    code, _, err = train_cli(capsys, *common, "--max_train_steps", 4, "--output_dir", tmp_path / "straight")
    assert code == 0, err
    straight = tmp_path / "straight"
    raw_by_step = [load_file(straight / f"checkpoint-{t}" / "lora.safetensors") for t in range(1, 5)]
    expected = ema_reference(raw_by_step, 0.2)
    saved = load_file(straight / "ema" / "pytorch_lora_weights.safetensors")
    assert len(saved) == len(expected)
    for name, value in expected.items():
        torch.testing.assert_close(saved["unet." + name.replace(".default", "")].double(), value, rtol=1e-6, atol=1e-7)
    raw = load_file(straight / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(raw[k], saved[k]) for k in raw)  # the EMA is not the raw weights
    assert (straight / "straight_ema.safetensors").is_file() and (straight / "straight.safetensors").is_file()

    code, _, err = train_cli(capsys, *common, "--max_train_steps", 2, "--output_dir", tmp_path / "resumed")
    assert code == 0, err
    code, _, err = train_cli(capsys, *common, "--max_train_steps", 4, "--resume_from_checkpoint", "latest", "--output_dir",
                             tmp_path / "resumed")
    assert code == 0, err
    resumed = load_file(tmp_path / "resumed" / "resumed_ema.safetensors")
    for name, value in load_file(straight / "straight_ema.safetensors").items():
        assert torch.equal(resumed[name], value), name
    assert json.loads((straight / "training_args.json").read_text())["ema_decay"] == 0.2

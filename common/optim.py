"""Optimizer extras users bring from kohya's sd-scripts: LoRA+ learning rates and per-block learning-rate weights.

Both only shape the optimizer's parameter groups; each rule is a small pure function here, and train_lora.py composes
them. Nothing imports torch at module level (scripts answer --help without it).
"""

from __future__ import annotations

import math
import re

from common.cli import UserError

SDXL_DOWN_BLOCKS, SDXL_MID_BLOCKS, SDXL_UP_BLOCKS = 9, 3, 9  # input_blocks 0-8, middle_block 0-2, output_blocks 0-8
BLOCK_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def preset_weights(preset: str, count: int) -> list[float]:
    """kohya's block-weight presets (sd-scripts networks/lora.py `get_block_lr_weight`'s `get_list`), `count` values,
    optionally `NAME+BASE` (BASE added to each): cosine falls from 1 to 0 over the blocks, sine rises from 0 to 1,
    linear rises i / (n - 1), reverse_linear falls, zeros is 0."""
    name, _, base_text = preset.partition("+")
    base = float(base_text) if base_text else 0.0
    positions = range(count)
    if name == "cosine":
        return [math.sin(math.pi * (i / (count - 1)) / 2) + base for i in reversed(positions)]
    if name == "sine":
        return [math.sin(math.pi * (i / (count - 1)) / 2) + base for i in positions]
    if name == "linear":
        return [i / (count - 1) + base for i in positions]
    if name == "reverse_linear":
        return [i / (count - 1) + base for i in reversed(positions)]
    if name == "zeros":
        return [0.0 + base] * count
    raise ValueError(name)


def parse_block_weights(text: str | None, count: int, option: str, presets: bool = True) -> list[float]:
    """One of --down_lr_weight, --mid_lr_weight, --up_lr_weight: `count` comma-separated weights (kohya pads a short
    list with 1 and cuts a long one; here a list of another length is refused, since it most likely means another
    model's block count), or a preset name (down and up only); None is all ones. An empty entry is 0, as kohya reads it."""
    if text is None:
        return [1.0] * count
    name = text.partition("+")[0]
    if presets and name in BLOCK_PRESETS:
        try:
            return preset_weights(text, count)
        except ValueError:
            raise UserError(f"{option} {text!r}: a preset is NAME or NAME+BASE, e.g. sine+0.5") from None
    try:
        weights = [float(part) if part.strip() else 0.0 for part in text.split(",")]
    except ValueError:
        accepted = f"{count} comma-separated numbers" + (f" or a preset ({', '.join(BLOCK_PRESETS)})" if presets else "")
        raise UserError(f"{option} {text!r}: give {accepted}") from None
    if len(weights) != count or any(w < 0 for w in weights):
        raise UserError(f"{option} {text!r}: SDXL has {count} such blocks; give {count} weights >= 0 (got {len(weights)})")
    return weights


_SGM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")


def block_lr_weight(sgm_module: str, down: list[float], mid: list[float], up: list[float], zero_threshold: float = 0.0) -> float:
    """The learning-rate weight of a UNet module (in SGM naming, `unet_module_to_sgm`) by its block: kohya's
    `get_block_index` (input_blocks N -> down[N], middle_block N -> mid[N], output_blocks N -> up[N]; anything else,
    such as the time embedding, 1), with weights at or below `zero_threshold` made 0 (its block_lr_zero_threshold).
    A layer of weight 0 is not trained at all: kohya does not create its LoRA."""
    match = _SGM_BLOCK.match(sgm_module)
    if not match:
        return 1.0
    weights = {"input_blocks": down, "middle_block": mid, "output_blocks": up}[match[1]]
    weight = weights[int(match[2])]
    return weight if weight > zero_threshold else 0.0


def is_loraplus_b(parameter_name: str, ndim: int) -> bool:
    """A parameter LoRA+ gives the larger rate (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large
    Models", Sec. 3: eta_B = lambda eta_A): a LoRA's B (up) matrix, peft's lora_B and kohya's lora_up, and, as peft's
    `create_loraplus_optimizer` groups them, a 1-D trained parameter (DoRA's magnitude)."""
    return ".lora_B." in parameter_name or ".lora_up." in parameter_name or ndim == 1


def parameter_groups(named_parameters, *, lr: float, weight_decay: float, loraplus_ratio: float | None = None,
                     lr_weight_of=None) -> list[dict]:
    """Optimizer parameter groups of trained parameters (name, parameter): each parameter's learning rate is
    `lr` x its block weight (`lr_weight_of(name)`, 1 without) x the LoRA+ ratio for B matrices, one group per distinct
    rate, in first-seen order. As kohya's `prepare_optimizer_params`, groups of rate 0 are left out."""
    groups: dict[float, list] = {}
    for name, parameter in named_parameters:
        rate = lr * (lr_weight_of(name) if lr_weight_of else 1.0)
        if loraplus_ratio and is_loraplus_b(name, parameter.ndim):
            rate *= loraplus_ratio
        groups.setdefault(rate, []).append(parameter)
    return [{"params": params, "lr": rate, "weight_decay": weight_decay} for rate, params in groups.items() if rate > 0]

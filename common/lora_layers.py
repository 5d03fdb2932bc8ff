"""Which layers of SDXL's UNet an adapter trains: the named sets of --lora_layers, and the convolutions of --conv_rank.

Each set is one rule on a Linear layer's module path in diffusers' UNet, and equals a list another trainer makes
(tests/test_lora_layers.py compares them on every layer of the full-size UNet):

- `attn`: the attention projections to_q, to_k, to_v and to_out.0 of every self- and cross-attention (attn1, attn2):
  the diffusers LoRA scripts' target_modules, and OneTrainer's SDXL preset "attn-only" (Nerogar/OneTrainer @ 23df3832,
  modules/modelSetup/BaseStableDiffusionXLSetup.py LAYER_PRESETS: the filter "attn", matched as a substring of the
  module path of each Linear and Conv2d by modules/util/ModuleFilter.py).
- `attn-mlp`: every Linear layer of the transformer blocks (diffusers' Transformer2DModel, the `attentions` of the
  down, mid and up blocks): attn plus the feed-forward (ff.net.0.proj, GEGLU's input, and ff.net.2) and proj_in and
  proj_out, which are Linear in SDXL (use_linear_projection). It is OneTrainer's SDXL preset "attn-mlp" (the filter
  "attentions") and, the same layers, what kohya's networks.lora adapts in the UNet (kohya-ss/sd-scripts @ 48d368fa,
  networks/lora.py LoRANetwork: every Linear and 1x1 Conv2d inside a module of class Transformer2DModel; its
  3x3-conv targets only with --conv_dim).
- `all-linear`: every Linear layer of the UNet: attn-mlp plus each ResNet block's time_emb_proj and the timestep and
  size/text embeddings (time_embedding and add_embedding, linear_1 and linear_2): peft's target_modules="all-linear"
  on the UNet (peft 0.21.2, tuners/tuners_utils.py `_maybe_include_all_linear_layers`, which excludes only a
  transformers model's output head).

At full size, with a LoRA of rank r on a (out, in) layer holding r (in + out) parameters, rank 16 trains 23,224,320
parameters on attn's 560 layers, 42,557,440 on attn-mlp's 722 and 43,298,816 on all-linear's 743.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from common.cli import UserError

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
CONV_LAYERS = (".conv1", ".conv2", ".conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")


def is_attention_projection(path: str) -> bool:
    return path.endswith(tuple("." + name for name in ATTENTION_PROJECTIONS))


def is_in_transformer_block(path: str) -> bool:
    """Inside a Transformer2DModel: diffusers keeps them, and only them, in the blocks' `attentions` lists."""
    return ".attentions." in path


def is_conv_layer(path: str) -> bool:
    """A convolution --conv_rank adapts: a ResNet block's 3x3 conv1 and conv2 and 1x1 conv_shortcut, and the 3x3
    convolutions of the down- and upsamplers (the convolutions kohya's --conv_dim adapts; conv_in and conv_out are
    left alone)."""
    return path.endswith(CONV_LAYERS) and (".resnets." in path or "samplers.0." in path)


@dataclass(frozen=True)
class LayerSet:
    """One value of --lora_layers: which Linear layers of the UNet it adapts, by module path."""

    name: str
    description: str  # for --help: the layers, whose list it equals, its size at full size
    selects: Callable[[str], bool]


LORA_LAYER_SETS: dict[str, LayerSet] = {s.name: s for s in (
    LayerSet("attn", "the attention projections to_q, to_k, to_v, to_out.0 of attn1 and attn2 (the diffusers scripts', "
                     "OneTrainer's attn-only; 560 layers, 23.2 M parameters at rank 16)", is_attention_projection),
    LayerSet("attn-mlp", "every Linear of the transformer blocks: attn, ff.net.0.proj, ff.net.2, proj_in, proj_out "
                         "(kohya's networks.lora, OneTrainer's attn-mlp; 722 layers, 42.6 M at rank 16)", is_in_transformer_block),
    LayerSet("all-linear", "every Linear of the UNet: attn-mlp and the ResNets' time_emb_proj, time_embedding, "
                           "add_embedding (peft's all-linear; 743 layers, 43.3 M at rank 16)", lambda path: True),
)}
DEFAULT_LAYER_SET = "attn"  # what the diffusers scripts train
KOHYA_LAYER_SET = "attn-mlp"  # what kohya's networks.lora trains

LORA_LAYERS_HELP = ("the UNet's Linear layers to adapt: " + "; ".join(f"{s.name}, {s.description}" for s in LORA_LAYER_SETS.values())
                    + f". Default {DEFAULT_LAYER_SET}, or {KOHYA_LAYER_SET} on a command line with kohya's flag names")


def choose_layer_set(given: str | None, *, kohya_flags: bool) -> tuple[str, str | None]:
    """The run's --lora_layers and the line to tell the user, if any: the set given; else kohya's set where the
    command line uses kohya's flag names (--network_module networks.lora, --network_dim), which is said, since the
    same rank then trains about twice the parameters; else the diffusers scripts' attention projections."""
    if given is not None:
        if given not in LORA_LAYER_SETS:
            raise UserError(f"--lora_layers {given!r} is no layer set; accepted: {', '.join(LORA_LAYER_SETS)}")
        return given, None
    if kohya_flags:
        return KOHYA_LAYER_SET, (f"kohya's flag names: training kohya's layers, --lora_layers {KOHYA_LAYER_SET} (every Linear "
                                 "of the transformer blocks: attention, feed-forward, proj_in, proj_out; 722 in SDXL, 1.8x the "
                                 f"parameters of --lora_layers {DEFAULT_LAYER_SET}, the diffusers scripts' attention projections)")
    return DEFAULT_LAYER_SET, None


def lora_layer_names(unet, layer_set: str, *, convolutions: bool = False) -> list[str]:
    """The module paths, in the model's order, of the UNet's Linear layers in `layer_set` and, with `convolutions`,
    of the convolutions --conv_rank adapts (`is_conv_layer`). Read before an adapter wraps the layers."""
    import torch

    selects = LORA_LAYER_SETS[layer_set].selects
    return [path for path, module in unet.named_modules()
            if (isinstance(module, torch.nn.Linear) and selects(path))
            or (convolutions and isinstance(module, torch.nn.Conv2d) and is_conv_layer(path))]

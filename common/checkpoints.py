"""Single-file SDXL checkpoints (the `.safetensors` files WebUI and ComfyUI keep in their model folders): their SGM key
names, reading what a file is without loading its weights, the config folders diffusers' single-file loader reads
offline, and writing a pipeline back as such a file.

A single file holds the four parts of the pipeline under the SGM (Stability's generative-models) names:
- `model.diffusion_model.` the UNet in the original LDM block layout (`unet_module_to_sgm`);
- `first_stage_model.` the VAE in LDM names, its attention projections as 1x1 convolutions (`vae_key_to_sgm`);
- `conditioner.embedders.0.transformer.text_model.` CLIP ViT-L/14 in transformers' names;
- `conditioner.embedders.1.model.` OpenCLIP ViT-bigG/14 in open_clip's names: q, k and v fused into `in_proj_*`, and
  `text_projection` stored as the matrix P of `pooled @ P`, the transpose of transformers' Linear weight;
plus flavour markers (`common.flavours`) and, in Stability's own file, two buffers: CLIP-L's `position_ids` and
bigG's `logit_scale`. The key maps here are written from that layout; the tests check them against diffusers' own
conversions (its loader, and the maps of its `scripts/convert_diffusers_to_original_sdxl.py`).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from common.architectures import (
    SDXL_TEXT_ENCODER_CONFIGS, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, TINY_TEXT_ENCODER_CONFIGS, TINY_UNET_CONFIG, TINY_VAE_CONFIG,
    write_clip_tokenizer,
)
from common.cli import UserError
from common.flavours import MARKER_KEYS, Flavour, FlavourReading, checkpoint_markers, flavour_from_checkpoint

if TYPE_CHECKING:  # imported where used: the scripts parse options and answer --help without torch
    import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_L_PREFIX, "text_encoder_2": CLIP_G_PREFIX}
COMPONENT_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "CLIP-L text encoder", "text_encoder_2": "OpenCLIP-bigG text encoder"}
CLIP_L_POSITION_IDS = CLIP_L_PREFIX + "text_model.embeddings.position_ids"
CLIP_G_LOGIT_SCALE = CLIP_G_PREFIX + "logit_scale"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # read with torch's weights_only unpickler
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base"

# ---------------------------------------------------------------- SGM names of the UNet (kohya's LoRA names use them too)

_SGM_RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
                     "time_emb_proj": "emb_layers.1", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_SGM_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
                  "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_DIFFUSERS_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_DIFFUSERS_MID = re.compile(r"^mid_block\.(attentions|resnets)\.(\d+)\.(.+)$")
SDXL_UP_LEVELS_WITH_ATTENTION = (0, 1)  # up_blocks 0 and 1 are CrossAttnUpBlock2D: their upsampler comes third


def unet_module_to_sgm(module: str, layers_per_block: int = 2, up_levels_with_attention=SDXL_UP_LEVELS_WITH_ATTENTION) -> str:
    """A diffusers UNet module path in the original SGM/LDM naming that kohya's SDXL trainer writes (the block
    map of kohya's sdxl_model_util and ComfyUI's unet_to_diffusers, which agree).

    input_blocks.0 is conv_in, then each down level holds L = layers_per_block blocks (a ResNet block at .0 and
    its transformer at .1) and a downsampler; each up level holds L + 1 blocks, the last with the upsampler:
    down_blocks.i.{resnets,attentions}.j -> input_blocks.(1 + i(L+1) + j).{0,1}, downsamplers.0.conv ->
    input_blocks.((i+1)(L+1)).0.op; mid_block.attentions.0 -> middle_block.1, mid_block.resnets.j ->
    middle_block.(2j); up_blocks.i.{resnets,attentions}.j -> output_blocks.(i(L+1) + j).{0,1}, upsamplers.0.conv
    -> output_blocks.(i(L+1) + L).{2 after a transformer, else 1}.conv. In ResNet blocks conv1, conv2,
    conv_shortcut and time_emb_proj are in_layers.2, out_layers.3, skip_connection and emb_layers.1.
    """
    for diffusers, sgm in _SGM_TOP_LEVEL.items():
        if module == diffusers or module.startswith(diffusers + "."):
            return sgm + module[len(diffusers):]
    if match := _DIFFUSERS_MID.match(module):
        kind, index, rest = match[1], int(match[2]), match[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * index}.{_resnet_part(rest)}"
    if not (match := _DIFFUSERS_BLOCK.match(module)):
        return module
    side, level, kind, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
    per_level = layers_per_block + 1
    if side == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * per_level}.0.op" + rest.removeprefix("conv")
        block = f"input_blocks.{1 + level * per_level + index}"
    else:
        if kind == "upsamplers":
            return f"output_blocks.{level * per_level + layers_per_block}.{2 if level in up_levels_with_attention else 1}.{rest}"
        block = f"output_blocks.{level * per_level + index}"
    return f"{block}.1.{rest}" if kind == "attentions" else f"{block}.0.{_resnet_part(rest)}"


def _resnet_part(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _SGM_RESNET_PARTS.get(head, head) + (f".{tail}" if tail else "")


# ---------------------------------------------------------------- the other three parts' SGM names

_VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP_LEVEL = {"conv_norm_out": "norm_out"}
_OPEN_CLIP_LAYER_PARTS = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                          "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def vae_key_to_sgm(key: str, up_levels: int) -> str:
    """A diffusers AutoencoderKL parameter in the LDM VAE's names: down_blocks.i -> down.i (resnets.j -> block.j,
    downsamplers.0 -> downsample), up_blocks.i -> up.(n-1-i) (the LDM decoder counts from the lowest resolution),
    mid_block.resnets.j -> mid.block_(j+1), its attention -> mid.attn_1 (norm, q, k, v, proj_out)."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    for diffusers, ldm in _VAE_TOP_LEVEL.items():
        rest = re.sub(rf"^{diffusers}\.", f"{ldm}.", rest)
    if match := re.match(r"^(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", rest):
        kind, level, part, index, tail = match[1], int(match[2]), match[3], int(match[4]), match[5]
        level = level if kind == "down" else up_levels - 1 - level
        if part == "resnets":
            head, _, param = tail.partition(".")
            rest = f"{kind}.{level}.block.{index}.{_VAE_RESNET_PARTS.get(head, head)}.{param}"
        else:
            rest = f"{kind}.{level}.{'downsample' if kind == 'down' else 'upsample'}.{tail}"
    elif match := re.match(r"^mid_block\.resnets\.(\d+)\.(.+)$", rest):
        head, _, param = match[2].partition(".")
        rest = f"mid.block_{int(match[1]) + 1}.{_VAE_RESNET_PARTS.get(head, head)}.{param}"
    elif match := re.match(r"^mid_block\.attentions\.0\.(.+)\.(weight|bias)$", rest):
        rest = f"mid.attn_1.{_VAE_ATTENTION_PARTS[match[1]]}.{match[2]}"
    return f"{side}.{rest}"


def clip_l_key_to_sgm(key: str) -> str:
    """CLIP-L keeps transformers' names under its prefix, with the `text_model.` level that transformers 5 dropped
    from CLIPTextModel (files without it are read by no UI and by no diffusers loader)."""
    return "text_model." + key.removeprefix("text_model.")


def clip_g_state_to_sgm(state: dict) -> dict:
    """OpenCLIP bigG's state in open_clip's names, from transformers' CLIPTextModelWithProjection: q, k, v fused
    into in_proj (in that order), the position embedding as a bare `positional_embedding`, and `text_projection` as
    open_clip's P with pooled @ P, i.e. the transpose of the Linear weight."""
    import torch

    out, fused = {}, {}
    for key, value in state.items():
        inner = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            out["text_projection"] = value.T
        elif inner == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif inner == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif inner.startswith("final_layer_norm."):
            out["ln_final." + inner.rpartition(".")[2]] = value
        elif match := re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", inner):
            layer, part, param = match[1], match[2], match[3]
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault((layer, param), {})[part[-6]] = value
            else:
                out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER_PARTS[part]}.{param}"] = value
        elif not inner.endswith("position_ids"):
            raise ValueError(f"no OpenCLIP name for text_encoder_2 key {key!r}")
    for (layer, param), parts in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def sgm_state_dict(unet, vae, text_encoder, text_encoder_2) -> dict:
    """The four parts of an SDXL pipeline under their single-file names, with Stability's two buffers (CLIP-L's
    position_ids 0..76, bigG's logit_scale ln 100, CLIP's trained temperature): the 2,515 keys of
    sd_xl_base_1.0.safetensors. Tensors are views where the layout allows (a cast or copy is the writer's)."""
    import torch

    config = unet.config
    up_with_attention = tuple(i for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind)
    state = {}
    for key, value in unet.state_dict().items():
        module, _, param = key.rpartition(".")
        state[UNET_PREFIX + unet_module_to_sgm(module, config.layers_per_block, up_with_attention) + "." + param] = value
    up_levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        sgm = vae_key_to_sgm(key, up_levels)
        if ".mid.attn_1." in sgm and value.ndim == 2:
            value = value[:, :, None, None]  # the LDM VAE's attention projections are 1x1 convolutions
        state[VAE_PREFIX + sgm] = value
    for key, value in text_encoder.state_dict().items():
        state[CLIP_L_PREFIX + clip_l_key_to_sgm(key)] = value
    positions = text_encoder.config.max_position_embeddings
    state[CLIP_L_POSITION_IDS] = torch.arange(positions, dtype=torch.int64, device=_device_of(text_encoder))[None]
    for key, value in clip_g_state_to_sgm(text_encoder_2.state_dict()).items():
        state[CLIP_G_PREFIX + key] = value
    state[CLIP_G_LOGIT_SCALE] = torch.tensor(math.log(100.0), device=_device_of(text_encoder_2))
    return state


def _device_of(module):
    return next(module.parameters()).device


# ---------------------------------------------------------------- the architectures a single file may hold


@dataclass(frozen=True, eq=False)  # compared and cached by identity: the records below are the only ones
class Architecture:
    """An SDXL architecture this toolkit loads from a single file: its name and its four configs."""

    key: str
    name: str
    unet: dict
    text_encoders: tuple[dict, dict]
    vae: dict


ARCHITECTURES = (
    Architecture("sdxl", "SDXL base 1.0", SDXL_UNET_CONFIG, SDXL_TEXT_ENCODER_CONFIGS, SDXL_VAE_CONFIG),
    Architecture("tiny", "the built-in tiny SDXL", TINY_UNET_CONFIG, TINY_TEXT_ENCODER_CONFIGS, TINY_VAE_CONFIG),
)


@functools.cache
def expected_shapes(architecture: Architecture) -> dict[str, tuple[int, ...]]:
    """Every key of a single file of `architecture` and its shape, from its models built on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = (UNet2DConditionModel(**architecture.unet), AutoencoderKL(**architecture.vae),
                  CLIPTextModel(CLIPTextConfig(**architecture.text_encoders[0])),
                  CLIPTextModelWithProjection(CLIPTextConfig(**architecture.text_encoders[1])))
        return {key: tuple(value.shape) for key, value in sgm_state_dict(*models).items()}


def expected_vae_keys(vae_config) -> dict[str, tuple[int, ...]]:
    """The LDM names and shapes of a VAE of `vae_config` (what a single-file VAE holds, without a prefix)."""
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config)
    up_levels = len(vae.config.block_out_channels)
    shapes = {}
    for key, value in vae.state_dict().items():
        sgm = vae_key_to_sgm(key, up_levels)
        shapes[sgm] = (*value.shape, 1, 1) if ".mid.attn_1." in sgm and value.ndim == 2 else tuple(value.shape)
    return shapes


# ---------------------------------------------------------------- reading what a file is, without its weights


@dataclass
class CheckpointHeader:
    """A checkpoint file's keys, shapes, dtypes and metadata, read without its weights (safetensors); a `.ckpt` is
    read with torch's weights_only unpickler, memory-mapped where it can be. `values(key)` reads one tensor."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]
    tensor: Callable[[str], "torch.Tensor"] = field(repr=False)

    def values(self, key: str) -> list[float]:
        return [float(v) for v in self.tensor(key).float().flatten()]

    def tensors(self, prefix: str) -> dict:
        return {key: self.tensor(key) for key in self.shapes if key.startswith(prefix)}


def is_checkpoint_file(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().is_file()


def read_checkpoint_header(path: Path, what: str = "--model") -> CheckpointHeader:
    """The header of a `.safetensors` file, or a `.ckpt` pickle's tensors loaded only with torch's weights_only
    unpickler (a pickle can run code; that one builds tensors and plain containers only). Anything else, or a file
    cut short, is refused in one line naming it."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".safetensors":
        return _safetensors_header(path, what)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _pickle_header(path, what)
    raise UserError(f"{what} {str(path)!r} is a file but not a checkpoint: give a .safetensors (or .ckpt) single file, a "
                    f"diffusers folder, a hub id or a built-in name")


def _safetensors_header(path: Path, what: str) -> CheckpointHeader:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), "pt")
        keys = list(handle.keys())
        slices = {key: handle.get_slice(key) for key in keys}
        shapes = {key: tuple(piece.get_shape()) for key, piece in slices.items()}
        dtypes = {key: piece.get_dtype() for key, piece in slices.items()}
        metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"could not read {what} {str(path)!r} as a safetensors file: {reason} (a file cut short?)") from None
    return CheckpointHeader(path, shapes, {k: SAFETENSORS_DTYPES.get(v, v) for k, v in dtypes.items()}, metadata,
                            tensor=handle.get_tensor)


SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32"}


def _pickle_header(path: Path, what: str) -> CheckpointHeader:
    import pickle
    import zipfile

    import torch

    try:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, ValueError):  # mmap needs the zip format; an older pickle is read whole
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise UserError(f"{what} {str(path)!r} is a pickle holding more than tensors ({reason[:120]}); it is read only with "
                        "torch's weights_only loader, since a pickle can run code: convert it to .safetensors with a tool "
                        "you trust") from None
    except (OSError, EOFError, RuntimeError, zipfile.BadZipFile) as error:
        raise UserError(f"could not read {what} {str(path)!r} as a checkpoint: {str(error).strip().splitlines()[0]}") from None
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):  # Lightning's {"state_dict": ...}
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise UserError(f"{what} {str(path)!r} holds a {type(loaded).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    return CheckpointHeader(path, {k: tuple(v.shape) for k, v in tensors.items()},
                            {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}, {}, tensor=tensors.__getitem__)


def vae_file_prefix(header: CheckpointHeader) -> str:
    """Where a single-file VAE's LDM keys start: bare (sdxl_vae.safetensors), under first_stage_model. (a whole
    checkpoint's VAE) or vae.; another file is refused in one line saying what it holds."""
    where = f"--vae {str(header.path)!r}"
    if any(key.startswith("encoder.down_blocks.") for key in header.shapes):  # its conv_in has the LDM name too
        raise UserError(f"{where} holds diffusers-format VAE weights: pass the folder it is in (with its config.json)")
    for prefix in (VAE_PREFIX, "vae.", ""):
        if prefix + "encoder.conv_in.weight" in header.shapes:
            return prefix
    raise UserError(f"{where} holds no VAE (no encoder.conv_in.weight, bare or under {VAE_PREFIX} or vae.)")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single file is: its header, architecture, flavour (with where it was read from) and precision."""

    header: CheckpointHeader
    architecture: Architecture
    reading: FlavourReading
    dtype: str  # the precision of its UNet weights, e.g. "float16"

    @property
    def path(self) -> Path:
        return self.header.path


def inspect_checkpoint(path: Path, what: str = "--model") -> CheckpointInfo:
    """A single file read as an SDXL base checkpoint, without its weights: refused in one line when it is something
    else (another model family, the refiner, an inpainting UNet, a LoRA, a file missing tensors), naming what it is
    or what is missing."""
    header = read_checkpoint_header(path, what)
    architecture = identify_architecture(header, what)
    unet_dtypes = [header.dtypes[k] for k in header.shapes if k.startswith(UNET_PREFIX)]
    dtype = max(set(unet_dtypes), key=unet_dtypes.count)
    return CheckpointInfo(header, architecture, flavour_from_checkpoint(header.shapes, header.values, header.metadata), dtype)


def identify_architecture(header: CheckpointHeader, what: str = "--model") -> Architecture:
    """The SDXL architecture of a file's keys and shapes, or a one-line refusal saying what the file is instead."""
    keys, where = header.shapes, f"{what} {str(header.path)!r}"
    if any(re.search(r"(^|\.)(lora_(up|down|A|B)|hada_w1_a|lokr_w1|alpha)(\.|$)", key) or key.startswith(("lora_unet_", "lora_te"))
           for key in keys):
        raise UserError(f"{where} is a LoRA (or LyCORIS) file, not a model: pass it with --lora, and a base model with {what}")
    if any(key.startswith("cond_stage_model.transformer.") for key in keys):
        raise UserError(f"{where} is a Stable Diffusion 1.x checkpoint (one CLIP-L text encoder); this toolkit trains and "
                        "samples SDXL-family models")
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        raise UserError(f"{where} is a Stable Diffusion 2.x checkpoint (one OpenCLIP-H text encoder); this toolkit trains and "
                        "samples SDXL-family models")
    if any(key.startswith("conditioner.embedders.0.model.") for key in keys):
        raise UserError(f"{where} is the SDXL refiner (its only text encoder is OpenCLIP-bigG): give an SDXL base model; the "
                        "refiner is not a base for LoRAs")
    conv_in = keys.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        present = sorted({name for part, name in COMPONENT_NAMES.items() if any(k.startswith(COMPONENT_PREFIXES[part]) for k in keys)})
        found = f"it holds {', '.join(present)}" if present else f"it holds none of the SGM prefixes ({', '.join(COMPONENT_PREFIXES.values())})"
        raise UserError(f"{where} has no SDXL UNet ({UNET_PREFIX}input_blocks.0.0.weight): {found}")
    if len(conv_in) == 4 and conv_in[1] != 4:
        kind = {9: "an inpainting UNet (9 input channels)", 8: "an instruct-pix2pix UNet (8 input channels)"}.get(
            conv_in[1], f"a UNet with {conv_in[1]} input channels")
        raise UserError(f"{where} is {kind}; text-to-image LoRAs train on a base with 4 (the SDXL base)")
    candidates = [a for a in ARCHITECTURES if expected_shapes(a)[UNET_PREFIX + "input_blocks.0.0.weight"] == conv_in]
    if not candidates:
        sdxl = expected_shapes(ARCHITECTURES[0])[UNET_PREFIX + "input_blocks.0.0.weight"]
        raise UserError(f"{where}: its UNet's input_blocks.0.0.weight has shape {conv_in}, SDXL base's {sdxl}; not an SDXL base")
    architecture = candidates[0]
    check_complete(header, architecture, where)
    return architecture


def check_complete(header: CheckpointHeader, architecture: Architecture, where: str) -> None:
    """Every tensor of the architecture is in the file, at its shape (diffusers' loader would skip a missing one and
    fail later on a meta tensor); the message names the part and a key."""
    expected = expected_shapes(architecture)
    optional = {CLIP_L_POSITION_IDS, CLIP_G_LOGIT_SCALE}  # buffers every loader rebuilds
    for part, prefix in COMPONENT_PREFIXES.items():
        wanted = [k for k in expected if k.startswith(prefix) and k not in optional]
        missing = [k for k in wanted if k not in header.shapes]
        if missing:
            hint = ""
            if part == "text_encoder" and any(k.startswith(CLIP_L_PREFIX + "embeddings.") for k in header.shapes):
                hint = " (its keys lack CLIP's text_model. level, as diffusers' conversion script writes them under transformers 5)"
            raise UserError(f"{where} is incomplete: its {COMPONENT_NAMES[part]} ({prefix}*) lacks {len(missing)} of {len(wanted)} "
                            f"tensors, e.g. {missing[0]}{hint}")
    for key, shape in expected.items():
        found = header.shapes.get(key)
        if found is not None and key not in optional and found != shape:
            raise UserError(f"{where}: tensor {key} has shape {found}, {architecture.name}'s has {shape}; not an SDXL base "
                            "(a distilled or resized variant?)")


# ---------------------------------------------------------------- the config folders diffusers' single-file loader reads


def write_config_folder(architecture: Architecture, folder: Path) -> Path:
    """A weight-free diffusers folder of `architecture`: model_index.json, each model's config.json and both CLIP
    tokenizers, which diffusers' `from_single_file(config=folder)` reads instead of the Hub. The scheduler's config is
    SDXL's; the loader replaces the scheduler with the file's flavour."""
    from transformers import CLIPTextConfig

    from common.architectures import SDXL_SCHEDULER_CONFIG

    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", SDXL_SCHEDULER_CONFIG["_class_name"]],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    configs = {"unet": {"_class_name": "UNet2DConditionModel", **architecture.unet},
               "vae": {"_class_name": "AutoencoderKL", **architecture.vae}}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    for name, config in configs.items():
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER_CONFIG, indent=2))
    for name, config in zip(("text_encoder", "text_encoder_2"), architecture.text_encoders):
        CLIPTextConfig(**config).save_pretrained(folder / name)
    write_clip_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    write_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    return folder


CONFIG_FOLDER_VERSION = 1


def config_folder(architecture: Architecture) -> Path:
    """The cached config folder of `architecture`, written on first use (atomically: processes may race)."""
    from common.files import atomic_folder, cache_root

    folder = cache_root() / "checkpoint_configs" / f"{architecture.key}-v{CONFIG_FOLDER_VERSION}"
    if not (folder / "model_index.json").is_file():
        with atomic_folder(folder) as staging:
            write_config_folder(architecture, staging)
    return folder


# ---------------------------------------------------------------- writing a single file


def modelspec_metadata(flavour: Flavour, *, title: str, resolution: int, merged_from: list[str] | None = None) -> dict[str, str]:
    """Stability's ModelSpec entries as ComfyUI's checkpoint saver and kohya write them (both spellings of the
    prediction: ComfyUI's predict_key, kohya's prediction_type); names only, never a local path."""
    import datetime

    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": "sgm",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.predict_key": flavour.modelspec_prediction,
        "modelspec.prediction_type": flavour.modelspec_prediction,
        "modelspec.date": datetime.date.today().isoformat(),
    }
    if merged_from:
        metadata["modelspec.merged_from"] = ", ".join(merged_from)
    return metadata


def checkpoint_tensors(pipe, flavour: Flavour, dtype: "torch.dtype") -> dict:
    """The single file of a pipeline: its four parts under SGM names in `dtype` (integer buffers as they are),
    contiguous and unshared (safetensors refuses shared storage), plus the flavour's markers. The modules are cast to
    `dtype` in place first, so that a full-size SDXL is never held in two precisions at once: the pipeline is for
    writing only afterwards."""
    import torch

    parts = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    for module in parts:
        torch.nn.Module.to(module, dtype)  # torch's own cast: diffusers' warns of fp32-kept modules, which SDXL has none of
    state = sgm_state_dict(*parts)
    tensors = {}
    for key, value in state.items():
        value = value.detach().to("cpu")
        value = value.to(dtype) if value.is_floating_point() else value
        tensors[key] = value.contiguous().clone() if _shares_storage(value) else value.contiguous()
    tensors.update(checkpoint_markers(flavour))
    return tensors


def _shares_storage(value) -> bool:
    """Whether a tensor is a view into a larger storage (a weight cast to its own dtype, a slice of a fused tensor)."""
    return value.untyped_storage().nbytes() != value.numel() * value.element_size()


def stored_size(tensors: dict) -> int:
    return sum(value.numel() * value.element_size() for value in tensors.values())


def save_checkpoint_file(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Write the tensors as a single safetensors file, atomically (a reader never finds half a file)."""
    from safetensors.torch import save_file

    from common.files import atomic_path

    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata=metadata)

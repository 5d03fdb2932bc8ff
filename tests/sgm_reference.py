"""An independent diffusers -> single-file (SGM) conversion for the tests, made from diffusers' own key tables rather than
from our layout code: the prefix tables of huggingface/diffusers scripts/convert_diffusers_to_original_sdxl.py (commit
0c238d8: hard-coded for SDXL's three levels, applied as string replacements in that script's order), with the two
fixes that script needs today:
- CLIP-L: transformers 5 saves CLIPTextModel without its `text_model.` level, which the script copies verbatim and no
  loader then finds; the level is put back.
- bigG's text_projection: the script passes `text_projection.weight` through unchanged, but diffusers' loader
  (loaders/single_file_utils.py `convert_open_clip_checkpoint`) reads a bare `text_projection` and takes its
  transpose as the Linear weight; the inverse is written here.
"""

from __future__ import annotations

import torch

UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
            "conv_norm_out": "out.0", "conv_out": "out.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}
UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
               ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _unet_layer_table() -> list[tuple[str, str]]:
    """(diffusers prefix, SGM prefix), in the script's order (its last fix-up of the first upsampler included)."""
    table = []
    for i in range(3):
        for j in range(2):
            table.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            if i > 0:
                table.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        for j in range(4):
            table.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            if i < 2:
                table.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        table.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."))
        table.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}."))
    table.append(("output_blocks.2.1.conv.", "output_blocks.2.2.conv."))
    table.append(("mid_block.attentions.0.", "middle_block.1."))
    table += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    return table


def unet_to_sgm(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        name = key
        for diffusers, sgm in UNET_TOP.items():
            if name.startswith(diffusers + "."):
                name = sgm + name[len(diffusers):]
        if "resnets" in key:
            for diffusers, sgm in UNET_RESNET:
                name = name.replace(diffusers, sgm)
        for diffusers, sgm in _unet_layer_table():
            name = name.replace(diffusers, sgm)
        out[name] = value
    return out


def _vae_table() -> list[tuple[str, str]]:
    table = [("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out"), ("mid_block.attentions.0.", "mid.attn_1.")]
    for i in range(4):
        table += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(2)]
        if i < 3:
            table.append((f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."))
            table.append((f"up_blocks.{i}.upsamplers.0.", f"up.{3 - i}.upsample."))
        table += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}.") for j in range(3)]
    table += [(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.") for i in range(2)]
    return table


VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def vae_to_sgm(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        name = key
        for diffusers, sgm in _vae_table():
            name = name.replace(diffusers, sgm)
        if "attentions" in key:
            for diffusers, sgm in VAE_ATTENTION:
                name = name.replace(diffusers, sgm)
        if any(f"mid.attn_1.{part}.weight" in name for part in ("q", "k", "v", "proj_out")) and value.ndim != 1:
            value = value.reshape(*value.shape, 1, 1)
        out[name] = value
    return out


OPEN_CLIP = [("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
             (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn", ".attn"), ("text_model.final_layer_norm.", "ln_final."),
             ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
             ("text_model.embeddings.position_embedding.weight", "positional_embedding")]


def open_clip_to_sgm(state: dict) -> dict:
    out, qkv = {}, {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
            continue
        part = next((p for p in ("q_proj", "k_proj", "v_proj") if key.endswith(f".self_attn.{p}.weight") or key.endswith(f".self_attn.{p}.bias")), None)
        if part is not None:
            stem, _, kind = key.rpartition(f".{part}.")
            qkv.setdefault((stem, kind), {})[part[0]] = value
            continue
        name = key
        for diffusers, sgm in OPEN_CLIP:
            name = name.replace(diffusers, sgm)
        out[name] = value
    for (stem, kind), parts in qkv.items():
        name = stem
        for diffusers, sgm in OPEN_CLIP:
            name = name.replace(diffusers, sgm)
        out[f"{name}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def pipeline_to_sgm(pipe) -> dict:
    """The four parts under the SGM prefixes, as the conversion script writes them (with the two fixes)."""
    state = {"model.diffusion_model." + k: v for k, v in unet_to_sgm(pipe.unet.state_dict()).items()}
    state.update({"first_stage_model." + k: v for k, v in vae_to_sgm(pipe.vae.state_dict()).items()})
    state.update({"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
                  for k, v in pipe.text_encoder.state_dict().items()})
    state.update({"conditioner.embedders.1.model." + k: v for k, v in open_clip_to_sgm(pipe.text_encoder_2.state_dict()).items()})
    return state

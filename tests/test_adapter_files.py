"""Users' LoRA-family files (LoCon, LoHa, LoKr, Tucker forms, dora_scale; kohya, LyCORIS and UI key names) loaded
as the UIs load them: files written by the LyCORIS library itself, each weight checked against ComfyUI's and
WebUI's arithmetic reproduced from their sources."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.adapters import file_layers
from common.cli import UserError
from common.checkpoints import unet_module_to_sgm
from common.lora_formats import LoraSpec, file_layer_names, load_loras
from adapter_helpers import LYCORIS_FILES, UNET_BLOCKS, lycoris_file
from helpers import load_pipe
from ui_loaders import comfyui_patch, webui_patch

def base_weights(pipe) -> dict:
    return {(c, n.removesuffix(".weight")): p.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
            for n, p in getattr(pipe, c).named_parameters() if n.endswith("weight")}


@pytest.mark.parametrize("name", LYCORIS_FILES)
@pytest.mark.heavy
def test_a_lycoris_written_file_loads_as_comfyui_and_webui_patch_it(tiny_sdxl_path, tmp_path, name):
    path = lycoris_file(tiny_sdxl_path, tmp_path, name)
    layers = file_layers(load_file(path))
    pipe = load_pipe(tiny_sdxl_path)
    before = base_weights(pipe)
    assert load_loras(pipe, [LoraSpec(path, 0.8)]) == []
    after = base_weights(pipe)
    targets = file_layer_names(pipe)
    assert set(layers) <= set(targets), sorted(set(layers) - set(targets))[:3]
    moved = {key for key in after if not torch.equal(after[key], before[key])}
    assert moved == {targets[layer] for layer in layers}, "exactly the file's layers, each once"
    uis = {"ComfyUI": comfyui_patch} if "dora" in name else {"ComfyUI": comfyui_patch, "WebUI": webui_patch}
    for layer, tensors in layers.items():
        key = targets[layer]
        for ui, patch in uis.items():
            if ui == "ComfyUI" and "lokr_t2" in tensors:  # its torch.kron fails on that form (test_adapters.py)
                continue
            expected = patch(before[key], tensors, 0.8)
            torch.testing.assert_close(after[key], expected, rtol=1e-5, atol=1e-5, msg=f"{ui}: {name} {layer}")


def test_lycoris_forward_agrees_with_the_loaded_weights(tiny_sdxl_path, tmp_path):
    """A third witness: LyCORIS's own network, run on inputs, equals the patched Linear layers (W + ΔW) x."""
    from lycoris import LycorisNetwork, create_lycoris

    path = lycoris_file(tiny_sdxl_path, tmp_path, "lokr decomposed", seed=3)
    pipe = load_pipe(tiny_sdxl_path)
    load_loras(pipe, [LoraSpec(path)])
    reference = load_pipe(tiny_sdxl_path)
    LycorisNetwork.apply_preset({"target_module": UNET_BLOCKS})
    network = create_lycoris(reference.unet, 1.0, **LYCORIS_FILES["lokr decomposed"])
    network.apply_to()
    network.load_state_dict(load_file(path))
    x = torch.randn(3, 64)
    with torch.no_grad():
        for module in ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.0.attentions.1.proj_out"):
            ours = pipe.unet.get_submodule(module)(x)
            theirs = reference.unet.get_submodule(module)(x)
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=module)


def kohya_sgm_name(module: str) -> str:
    """kohya's diffusers -> SGM block map for SDXL (library/sdxl_model_util.make_unet_conversion_map), reproduced."""
    layer_map = []
    for i in range(3):
        for j in range(2):
            layer_map += [(f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."),
                          (f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")]
        for j in range(3):
            layer_map += [(f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."),
                          (f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}.")]
        layer_map += [(f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."),
                      (f"output_blocks.{3 * i + 2}.2.", f"up_blocks.{i}.upsamplers.0.")]
    layer_map += [("middle_block.1.", "mid_block.attentions.0.")] + [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    resnet_map = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."),
                  ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]
    name = module + "."
    for sd, hf in layer_map:
        if name.startswith(hf):
            name = sd + name[len(hf):]
            if "resnets" in hf:
                for sd_part, hf_part in resnet_map:
                    name = name.replace(hf_part, sd_part)
            break
    return name.rstrip(".")


def test_sgm_names_of_every_sdxl_unet_layer_are_kohyas():
    from common.models import sdxl_module_names

    checked = 0
    for full in sorted(sdxl_module_names()):
        component, _, module = full.partition(".")
        if component == "unet" and module.startswith(("down_blocks", "mid_block", "up_blocks")) and module.endswith((
                ".to_q", ".to_k", ".to_v", ".to_out.0", ".proj_in", ".proj_out", ".conv1", ".conv2", ".conv_shortcut",
                ".time_emb_proj", "samplers.0.conv", ".ff.net.0.proj", ".ff.net.2")):
            assert unet_module_to_sgm(module) == kohya_sgm_name(module), module
            checked += 1
    assert checked > 700, checked


@pytest.mark.heavy
def test_kohya_named_loha_and_lokr_files_load_the_same_weights_as_lycoris_named_ones(tiny_sdxl_path, tmp_path):
    dotted = {m.replace(".", "_"): m for m, _ in load_pipe(tiny_sdxl_path).unet.named_modules()}
    for name in ("loha", "lokr"):
        path = lycoris_file(tiny_sdxl_path, tmp_path, name, seed=1)
        renamed = {}
        for key, value in load_file(path).items():
            layer, _, tensor = key.partition(".")
            module = dotted[layer.removeprefix("lycoris_")]
            renamed[f"lora_unet_{kohya_sgm_name(module).replace('.', '_')}.{tensor}"] = value
        save_file(renamed, tmp_path / f"{name}_kohya.safetensors")
        weights = []
        for file in (path, tmp_path / f"{name}_kohya.safetensors"):
            pipe = load_pipe(tiny_sdxl_path)
            load_loras(pipe, [LoraSpec(file)])
            weights.append(base_weights(pipe))
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), name


@pytest.mark.heavy
def test_weights_and_blocks_work_for_every_type(tiny_sdxl_path, tmp_path):
    path = lycoris_file(tiny_sdxl_path, tmp_path, "loha", seed=2)
    block = "unet.up_blocks.0.attentions.1"
    pipe = load_pipe(tiny_sdxl_path)
    before = base_weights(pipe)
    load_loras(pipe, [LoraSpec(path, 1.0, (block,))])
    moved = {k for k, v in base_weights(pipe).items() if not torch.equal(v, before[k])}
    assert moved and all(f"{c}.{m}".startswith(block + ".") for c, m in moved), sorted(moved)[:3]
    halves = []
    for weight in (1.0, 0.5):
        pipe = load_pipe(tiny_sdxl_path)
        load_loras(pipe, [LoraSpec(path, weight)])
        halves.append({k: v - before[k] for k, v in base_weights(pipe).items()})
    for key in halves[0]:
        torch.testing.assert_close(halves[1][key], 0.5 * halves[0][key], rtol=1e-4, atol=1e-6)


def test_other_lycoris_algorithms_are_refused_by_name(tiny_sdxl_path, tmp_path):
    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    pipe = load_pipe(tiny_sdxl_path)
    LycorisNetwork.apply_preset({"target_module": ["Transformer2DModel"]})
    network = create_lycoris(pipe.unet, 1.0, linear_dim=4, linear_alpha=1, algo="ia3")
    network.apply_to()
    network.save_weights(str(tmp_path / "ia3.safetensors"), torch.float32, {})
    network.restore()
    with pytest.raises(UserError, match=r"is IA3 \(its 'on_input' tensor\), which this toolkit does not read"):
        load_loras(load_pipe(tiny_sdxl_path), [LoraSpec(tmp_path / "ia3.safetensors")])


def test_a_file_of_comfyuis_lora_saver_loads_as_comfyui_reads_it(tiny_sdxl_path, tmp_path):
    """ComfyUI's LoraSave node (comfy_extras/nodes_lora_extract.py) writes `diffusion_model.<SGM path>.lora_up.weight`
    and `.lora_down.weight` in fp16, without alpha (scale 1), convolutions included; such a file, written here to that
    layout from a LoCon of LyCORIS's, loads with every layer, and each weight is ComfyUI's arithmetic's."""
    path = lycoris_file(tiny_sdxl_path, tmp_path, "locon", seed=4)
    dotted = {m.replace(".", "_"): m for m, _ in load_pipe(tiny_sdxl_path).unet.named_modules()}
    saved = {}
    for key, value in load_file(path).items():
        layer, _, tensor = key.partition(".")
        if tensor != "alpha":  # kohya's SDXL block map, reproduced above, gives the SGM path ComfyUI's model has
            saved[f"diffusion_model.{kohya_sgm_name(dotted[layer.removeprefix('lycoris_')])}.{tensor}"] = value.half()
    save_file(saved, tmp_path / "ComfyUI_extracted_lora_00001_.safetensors")
    layers = file_layers(saved)
    assert all(name.startswith("diffusion_model.") and name.count(".") > 2 for name in layers), "dotted layer names stay whole"
    pipe = load_pipe(tiny_sdxl_path)
    before = base_weights(pipe)
    load_loras(pipe, [LoraSpec(tmp_path / "ComfyUI_extracted_lora_00001_.safetensors")])
    after = base_weights(pipe)
    targets = file_layer_names(pipe)
    assert {k for k in after if not torch.equal(after[k], before[k])} == {targets[name] for name in layers}
    for name, tensors in layers.items():
        torch.testing.assert_close(after[targets[name]], comfyui_patch(before[targets[name]], tensors), rtol=1e-5, atol=1e-5)


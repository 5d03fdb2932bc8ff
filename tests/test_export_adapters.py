"""convert_for_webui.py for LoCon, LoHa and LoKr: exports that patch the UIs' weights as the trained files do, in fp32
and fp16, and --check verdicts per UI on their keys and on planted faults."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert_for_webui
from common.adapters import file_layers
from helpers import run_cli
from training_helpers import PROMPT, train_cli, write_images
from ui_loaders import comfyui_patch, webui_patch

RUNS = {"locon": ["--conv_rank", 2, "--train_text_encoder"], "loha": ["--adapter", "loha", "--conv_rank", 2],
        "lokr": ["--adapter", "lokr", "--conv_rank", 2, "--lokr_factor", 4]}


@pytest.fixture(scope="module")
def trained(tiny_sdxl_path, tmp_path_factory) -> dict[str, Path]:
    """A LoCon, a LoHa and a LoKr, trained for two steps each."""
    images = write_images(tmp_path_factory.mktemp("instance"))
    folders = {}
    for name, extra in RUNS.items():
        out = tmp_path_factory.mktemp("runs") / name
        code, _, err = train_cli(None, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", PROMPT,
                                 "--resolution", 64, "--output_dir", out, "--max_train_steps", 2, "--train_batch_size", 2,
                                 "--rank", 4, "--lora_alpha", 2, "--learning_rate", 1e-2, "--seed", 0, *extra)
        assert code == 0, err
        folders[name] = out
    return folders


def run_convert(capsys, *argv):
    return run_cli(convert_for_webui.app, [str(a) for a in argv], capsys)


@pytest.mark.parametrize("name", RUNS)
def test_exports_of_every_type_patch_the_weights_as_the_trained_file_does(name, trained, tmp_path, capsys):
    reference = file_layers(load_file(trained[name] / f"{name}.safetensors"))
    for precision, tolerance in (("fp32", 0.0), ("fp16", 2e-3)):
        code, out, err = run_convert(capsys, trained[name], "--out", tmp_path / precision, "--save_precision", precision)
        assert code == 0, err
        exported = file_layers(load_file(tmp_path / precision / f"{name}.safetensors"))
        assert exported.keys() == reference.keys()
        for layer, tensors in exported.items():
            base = torch.zeros(patch_shape(reference[layer]))  # a stand-in base weight: only ΔW matters here
            for patch in (comfyui_patch, webui_patch):
                expected, found = patch(base, reference[layer]), patch(base, tensors)
                difference = float((found - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
                assert difference <= tolerance, (precision, layer, difference)
        if precision == "fp16":
            assert {v.dtype for k, t in exported.items() for n, v in t.items() if n != "alpha"} == {torch.float16}


def patch_shape(tensors: dict) -> tuple[int, ...]:
    """The weight shape a file layer's ΔW has, from its own tensors (a stand-in base weight of zeros)."""
    from common.adapters import ADAPTERS, adapter_of_layer

    adapter = adapter_of_layer(tensors, "layer")
    if adapter.name == "lora":
        up, down = tensors["lora_up.weight"], tensors["lora_down.weight"]
        return (up.shape[0], *down.shape[1:])
    if adapter.name == "loha":
        return (tensors["hada_w1_a"].shape[0], tensors["hada_w1_b"].shape[1])
    w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    w2 = tensors["lokr_w2"] if "lokr_w2" in tensors else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
    assert adapter is ADAPTERS["lokr"]
    return (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])


@pytest.mark.parametrize("name, kind", [("locon", "LoCon"), ("loha", "LoHa"), ("lokr", "LoKr")])
def test_check_passes_every_types_export(name, kind, trained, tmp_path, capsys):
    assert run_convert(capsys, trained[name], "--out", tmp_path)[0] == 0
    code, out, _ = run_convert(capsys, tmp_path / f"{name}.safetensors", "--check")
    assert code == 0 and "WebUI: every key maps onto SDXL" in out and "ComfyUI: every key maps onto SDXL" in out, out
    assert f" {kind}" in out.splitlines()[0], out


def test_check_gives_each_uis_verdict_on_planted_lycoris_faults(trained, tmp_path, capsys):
    assert run_convert(capsys, trained["loha"], "--out", tmp_path / "loha", "--save_precision", "fp32")[0] == 0
    assert run_convert(capsys, trained["lokr"], "--out", tmp_path / "lokr", "--save_precision", "fp32")[0] == 0
    loha, lokr = load_file(tmp_path / "loha" / "loha.safetensors"), load_file(tmp_path / "lokr" / "lokr.safetensors")

    def check(state: dict) -> tuple[int, str]:
        save_file(state, tmp_path / "planted.safetensors")
        code, out, _ = run_convert(capsys, tmp_path / "planted.safetensors", "--check")
        return code, out

    loha_layer = "lora_unet_input_blocks_4_0_in_layers_2"  # down_blocks.1.resnets.0.conv1
    assert f"{loha_layer}.hada_w1_a" in loha
    code, out = check({k: v for k, v in loha.items() if k != f"{loha_layer}.hada_w2_b"})
    assert code == 1 and "WebUI: refuses the whole file" in out and "ComfyUI: refuses the whole file" in out, out
    lokr_layer = next(k.split(".")[0] for k in lokr if k.endswith("lokr_w2_b"))
    code, out = check({k: v for k, v in lokr.items() if k != f"{lokr_layer}.lokr_w2_b"})
    assert "WebUI: refuses the whole file" in out and f"ComfyUI skips: {lokr_layer}: an incomplete LoKr" in out, out
    tucker = {k: v for k, v in lokr.items() if not k.startswith(lokr_layer + ".lokr_w2")}
    rank = lokr[f"{lokr_layer}.lokr_w2_b"].shape[0]
    tucker |= {f"{lokr_layer}.lokr_w2_a": torch.randn(rank, 4), f"{lokr_layer}.lokr_w2_b": torch.randn(rank, 4),
               f"{lokr_layer}.lokr_t2": torch.randn(rank, rank, 3, 3)}
    code, out = check(tucker)
    assert code == 1 and f"ComfyUI skips: {lokr_layer}: lokr_t2 (Tucker LoKr)" in out and "WebUI: every key maps" in out, out
    # that layer under LyCORIS's own wrapper's name: its diffusers path
    renamed = {k.replace(loha_layer, "lycoris_down_blocks_1_resnets_0_conv1"): v for k, v in loha.items()}
    code, out = check(renamed)
    assert code == 1 and "WebUI skips: lycoris_down_blocks_1_resnets_0_conv1" in out and "ComfyUI: every key maps" in out, out
    code, out = check(loha | {"lora_unet_middle_block_1_proj_in.on_input": torch.tensor(1.0),
                              "lora_unet_middle_block_1_proj_in.weight": torch.ones(64)})
    assert code == 1 and "ComfyUI skips: lora_unet_middle_block_1_proj_in: IA3" in out and "WebUI: every key maps" in out, out


def test_a_diffusers_locon_exports_convolutions_under_sgm_names(trained, tmp_path, capsys):
    assert (trained["locon"] / "pytorch_lora_weights.safetensors").is_file()
    code, _, err = run_convert(capsys, trained["locon"] / "pytorch_lora_weights.safetensors", "--name", "locon", "--out", tmp_path,
                               "--save_precision", "fp32")
    assert code == 0, err
    exported = load_file(tmp_path / "locon.safetensors")
    trained_file = load_file(trained["locon"] / "locon.safetensors")
    assert exported.keys() == trained_file.keys() and any("_in_layers_2.lora_down" in k for k in exported)
    assert all(torch.equal(exported[k], trained_file[k]) for k in exported)


def test_a_loha_has_no_diffusers_form_and_says_so_in_one_line(trained, tmp_path, capsys):
    code, _, err = run_convert(capsys, trained["loha"] / "loha.safetensors", "--to", "diffusers", "--out", tmp_path)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "LoHa layers: diffusers' SDXL loader reads LoRA and LoCon only" in lines[0], err

"""convert_for_webui.py: kohya files equal to the diffusers LoRA through diffusers' loader, keys that map
onto SDXL's modules, embeddings, and installation into WebUI and ComfyUI folder trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert_for_webui
from helpers import load_pipe, make_dora_lora, make_peft_lora, run_cli


def run_convert(capsys, *argv):
    return run_cli(convert_for_webui.app, [str(a) for a in argv], capsys)


@pytest.fixture()
def trained(tiny_sdxl_path, tmp_path) -> Path:
    """A training output folder: alpha != rank, text-encoder LoRAs, an embedding and training_args.json."""
    folder = tmp_path / "my_dog"
    make_peft_lora(tiny_sdxl_path, folder, rank=4, alpha=8, text_encoders=True)
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}, folder / "my_dog_emb.safetensors")
    (folder / "training_args.json").write_text(json.dumps(
        {"instance_prompt": "a TOK icon of an astronaut", "token_map": {"TOK": ["<s0>", "<s1>"]}, "rank": 4}))
    return folder


def fused_weights(pipe) -> dict[str, torch.Tensor]:
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
    weights = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for key, value in getattr(pipe, component).state_dict().items():
            if "lora_" not in key:
                weights[f"{component}.{key.replace('.base_layer', '')}"] = value.clone()
    return weights


def test_exported_file_fuses_to_the_same_weights_as_the_diffusers_file(trained, tiny_sdxl_path, tmp_path, capsys):
    code, out, err = run_convert(capsys, trained, "--out", tmp_path / "export")
    assert code == 0, err
    original, exported = load_pipe(tiny_sdxl_path), load_pipe(tiny_sdxl_path)
    original.load_lora_weights(str(trained))
    exported.load_lora_weights(str(tmp_path / "export"), weight_name="my_dog.safetensors")
    a, b = fused_weights(original), fused_weights(exported)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"largest difference {worst}"
    plain = load_pipe(tiny_sdxl_path)
    moved = max(float((a[k] - v).abs().max()) for k, v in fused_weights_without_lora(plain).items())
    assert moved > 1e-3, "the LoRA must change the weights for the comparison to mean anything"


def fused_weights_without_lora(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v for c in ("unet", "text_encoder", "text_encoder_2") for k, v in getattr(pipe, c).state_dict().items()}


def test_alpha_and_metadata_carry_the_trained_strength(trained, tmp_path, capsys):
    code, out, _ = run_convert(capsys, trained, "--out", tmp_path)
    assert code == 0
    state = load_file(tmp_path / "my_dog.safetensors")
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {8.0}
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_") for k in state)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_") for k in state)
    with safe_open(str(tmp_path / "my_dog.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "8")
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.trigger_phrase"] == "a my_dog icon of an astronaut"
    assert "WebUI prompt: a my_dog icon of an astronaut <lora:my_dog:1>" in out
    assert "prompt: a embedding:my_dog icon of an astronaut" in out


def test_every_exported_key_maps_onto_a_module_of_the_sdxl_architecture(trained, tmp_path, capsys):
    """diffusers' own kohya conversion over the file, against SDXL's UNet and CLIP encoders built on the meta device."""
    import sys

    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from sdxl_unet import SDXL_UNET_CONFIG

    code, _, err = run_convert(capsys, trained, "--out", tmp_path)
    assert code == 0, err
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path), weight_name="my_dog.safetensors",
                                                             unet_config=_frozen(SDXL_UNET_CONFIG))
    with torch.device("meta"):
        modules = {f"unet.{n}" for n, _ in UNet2DConditionModel(**SDXL_UNET_CONFIG).named_modules()}
        modules |= {f"text_encoder.{n}" for n, _ in CLIPTextModel(CLIPTextConfig(hidden_size=768, num_hidden_layers=12)).named_modules()}
        modules |= {f"text_encoder_2.{n}" for n, _ in CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120)).named_modules()}
    renames = {".to_k_lora.": ".k_proj.", ".to_q_lora.": ".q_proj.", ".to_v_lora.": ".v_proj.", ".to_out_lora.": ".out_proj."}
    unmapped = []
    for key in converted:
        module = key.split(".lora")[0].replace(".processor", "")
        for old, new in renames.items():
            if key.startswith("text_encoder") and old in key:
                module = key.split(old)[0] + new.rstrip(".")
        if key.startswith("unet."):
            module = key.split(".processor.")[0] + "." + key.split(".processor.")[1].split("_lora")[0].replace("to_out", "to_out.0")
        module = module.replace("text_encoder.text_model.", "text_encoder.")
        if module not in modules:
            unmapped.append(key)
    assert converted and not unmapped, unmapped[:5]


def _frozen(config: dict):
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(config)


def test_embedding_is_written_for_the_uis_and_loads_in_diffusers(trained, tiny_sdxl_path, tmp_path, capsys):
    code, _, err = run_convert(capsys, trained, "--out", tmp_path)
    assert code == 0, err
    exported = load_file(tmp_path / "embeddings" / "my_dog.safetensors")
    original = load_file(trained / "my_dog_emb.safetensors")
    pipe = load_pipe(tiny_sdxl_path)
    pipe.load_textual_inversion(exported["clip_l"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(exported["clip_g"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    ids = pipe.tokenizer_2.convert_tokens_to_ids(["<s0>", "<s1>"])
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[ids].detach(), original["clip_g"])


def test_installs_into_webui_and_comfyui_trees_and_never_overwrites_without_force(trained, tmp_path, capsys):
    webui, comfyui = tmp_path / "webui", tmp_path / "ComfyUI"
    (webui / "models" / "Stable-diffusion").mkdir(parents=True)
    (comfyui / "models" / "checkpoints").mkdir(parents=True)
    assert run_convert(capsys, trained, "--webui_dir", webui)[0] == 0
    assert (webui / "models" / "Lora" / "my_dog.safetensors").is_file() and (webui / "embeddings" / "my_dog.safetensors").is_file()
    assert run_convert(capsys, trained, "--comfyui_dir", comfyui, "--name", "dog")[0] == 0
    assert (comfyui / "models" / "loras" / "dog.safetensors").is_file() and (comfyui / "models" / "embeddings" / "dog.safetensors").is_file()
    code, _, err = run_convert(capsys, trained, "--webui_dir", webui)
    assert code == 2 and "exists; pass --force to replace it" in err
    assert run_convert(capsys, trained, "--webui_dir", webui, "--force")[0] == 0
    code, _, err = run_convert(capsys, trained, "--webui_dir", tmp_path / "nothing")
    assert code == 2 and "does not look like a stable-diffusion-webui installation" in err
    assert not list(webui.rglob(".*partial"))


def test_round_trip_diffusers_kohya_diffusers_is_bit_identical(trained, tiny_sdxl_path, tmp_path, capsys):
    assert run_convert(capsys, trained, "--out", tmp_path / "kohya")[0] == 0
    code, _, err = run_convert(capsys, tmp_path / "kohya" / "my_dog.safetensors", "--to", "diffusers", "--out", tmp_path / "back")
    assert code == 0, err
    original = load_file(trained / "pytorch_lora_weights.safetensors")
    back = load_file(tmp_path / "back" / "pytorch_lora_weights.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    a, b = load_pipe(tiny_sdxl_path), load_pipe(tiny_sdxl_path)
    a.load_lora_weights(str(trained))
    b.load_lora_weights(str(tmp_path / "back"))
    wa, wb = fused_weights(a), fused_weights(b)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6, "alphas survive the round trip"


def test_a_dora_is_baked_into_a_plain_lora_equal_to_the_dora_adapted_weights(tiny_sdxl_path, tmp_path, capsys):
    make_dora_lora(tiny_sdxl_path, tmp_path / "dora", rank=4, alpha=8, seed=0)
    code, _, err = run_convert(capsys, tmp_path / "dora", "--out", tmp_path / "x")
    assert code == 2 and "needs the base model, --model MODEL" in err
    code, out, err = run_convert(capsys, tmp_path / "dora", "--model", tiny_sdxl_path, "--name", "baked", "--out", tmp_path / "out")
    assert code == 0, err
    assert "DoRA baked into a plain LoRA (rank full)" in out
    dora, baked = load_pipe(tiny_sdxl_path), load_pipe(tiny_sdxl_path)
    dora.load_lora_weights(str(tmp_path / "dora"))
    baked.load_lora_weights(str(tmp_path / "out"), weight_name="baked.safetensors")
    wa, wb = fused_weights(dora), fused_weights(baked)
    worst = max(float((wa[k] - wb[k]).abs().max() / wa[k].abs().max().clamp_min(1e-12)) for k in wa)
    assert worst <= 1e-5, f"largest relative difference {worst}"


def test_check_passes_exports_and_flags_a_misspelled_key(trained, tmp_path, capsys):
    assert run_convert(capsys, trained, "--out", tmp_path)[0] == 0
    code, out, _ = run_convert(capsys, tmp_path / "my_dog.safetensors", "--check")
    assert code == 0 and "every key maps onto SDXL" in out and "parts: te1, te2, unet; ranks: [4]; alphas: [8.0]" in out
    state = load_file(tmp_path / "my_dog.safetensors")
    wrong = next(k for k in state if k.startswith("lora_unet_") and k.endswith("lora_up.weight"))
    state[wrong.replace("transformer_blocks", "transformer_block")] = state.pop(wrong)
    q_proj = next(k for k in state if k.startswith("lora_te2_") and "q_proj.lora_down" in k).split(".")[0]
    for key in [k for k in state if k.startswith(q_proj + ".")]:
        state.pop(key)  # a layer that lacks its q projection altogether
    save_file(state, tmp_path / "broken.safetensors")
    code, out, _ = run_convert(capsys, tmp_path / "broken.safetensors", "--check")
    assert code == 1
    assert "no SDXL module is named" in out and "transformer_block_" in out
    assert "only k_proj, out_proj, v_proj of q/k/v/out_proj" in out


def test_diffusers_converter_writes_alpha_equal_to_rank_where_ours_keeps_the_trained_alpha(trained, tmp_path, capsys):
    """diffusers' convert_state_dict_to_kohya sets every alpha to the rank, so a LoRA trained with
    alpha 8 at rank 4 would load at half strength in the UIs."""
    from diffusers.utils import convert_state_dict_to_kohya

    theirs = convert_state_dict_to_kohya({k: v for k, v in load_file(trained / "pytorch_lora_weights.safetensors").items()
                                          if k.startswith("unet.")})
    assert {float(v) for k, v in theirs.items() if k.endswith(".alpha")} == {4.0}
    assert run_convert(capsys, trained, "--out", tmp_path)[0] == 0
    ours = load_file(tmp_path / "my_dog.safetensors")
    assert {float(v) for k, v in ours.items() if k.endswith(".alpha")} == {8.0}


def test_dora_written_natively_for_comfyui_round_trips_bit_identically(tiny_sdxl_path, tmp_path, capsys):
    make_dora_lora(tiny_sdxl_path, tmp_path / "dora", rank=4, alpha=4, seed=1)
    code, _, err = run_convert(capsys, tmp_path / "dora", "--dora_native", "webui", "--out", tmp_path / "w")
    assert code == 2 and "only comfyui" in err
    code, _, err = run_convert(capsys, tmp_path / "dora", "--dora_native", "comfyui", "--name", "native", "--out", tmp_path / "k")
    assert code == 0, err
    kohya = load_file(tmp_path / "k" / "native.safetensors")
    scales = {k: v for k, v in kohya.items() if k.endswith(".dora_scale")}
    assert scales and all(v.ndim == 2 and v.shape[1] == 1 for v in scales.values())
    code, _, err = run_convert(capsys, tmp_path / "k" / "native.safetensors", "--to", "diffusers", "--out", tmp_path / "back")
    assert code == 0, err
    original = load_file(tmp_path / "dora" / "pytorch_lora_weights.safetensors")
    back = load_file(tmp_path / "back" / "pytorch_lora_weights.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)

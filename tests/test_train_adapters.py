"""train_lora.py with --adapter lora|loha|lokr and --conv_rank: every type trains, its kohya/LyCORIS file gives the
trained weights through ComfyUI's and WebUI's arithmetic, it resumes exactly and continues from its own file, and
combinations peft cannot train are refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import infer
from common.adapters import file_layers
from common.lora_formats import LoraSpec, kohya_module_name, load_loras
from helpers import generate_array, load_pipe, run_cli
from training_helpers import PROMPT, train_cli, write_images
from ui_loaders import comfyui_patch, webui_patch

ADAPTER_RUNS = {  # name: the options that make it
    "locon": ["--adapter", "lora", "--conv_rank", 2, "--conv_alpha", 4, "--train_text_encoder"],
    "loha": ["--adapter", "loha", "--conv_dim", 2, "--rank_dropout", 0.1, "--module_dropout", 0.1],
    "lokr": ["--adapter", "lokr", "--conv_rank", 2, "--lokr_factor", 4, "--train_text_encoder"],
    "lokr tucker, both factors": ["--adapter", "lokr", "--conv_rank", 2, "--use_tucker", "--decompose_both", "--rank", 2],
}


def run_args(model: str, images: Path, out: Path, steps: int, *extra) -> list:
    return ["-m", model, "--instance_data_dir", images, "--instance_prompt", PROMPT, "--resolution", 64, "--output_dir", out,
            "--max_train_steps", steps, "--seed", 0, "--train_batch_size", 2, "--rank", 4, "--lora_alpha", 2,
            "--learning_rate", 1e-2, "--checkpointing_steps", 2, *extra]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("instance"))


def trained_model(tiny_sdxl_path: str, out: Path, step: int):
    """The run's adapted pipeline, rebuilt from its training_args.json and checkpoint-STEP (peft's layers as trained)."""
    import train_lora

    args = json.loads((out / "training_args.json").read_text())
    config = train_lora.TrainConfig(**{k: v for k, v in args.items() if k != "token_map"})
    pipe = load_pipe(tiny_sdxl_path)
    train_lora.add_lora(pipe.unet, config)
    models = {"unet": (pipe.unet, "lora.safetensors")}
    if config.train_text_encoder:
        train_lora.add_text_encoder_lora(pipe, config)
        models |= {"text_encoder": (pipe.text_encoder, "text_encoder.safetensors"),
                   "text_encoder_2": (pipe.text_encoder_2, "text_encoder_2.safetensors")}
    for model, file in models.values():
        result = model.load_state_dict(load_file(out / f"checkpoint-{step}" / file), strict=False)
        assert not result.unexpected_keys
    return pipe, {component: model for component, (model, _) in models.items()}


@pytest.mark.parametrize("run", ADAPTER_RUNS)
@pytest.mark.heavy
def test_each_adapter_trains_and_its_file_gives_the_trained_weights_in_both_uis(run, tiny_sdxl_path, images, tmp_path, capsys):
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = tmp_path / "subject"
    code, _, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, out, 2, *ADAPTER_RUNS[run]))
    assert code == 0, err
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == (["pytorch_lora_weights.safetensors", "subject.safetensors"] if run == "locon" else ["subject.safetensors"])
    layers = file_layers(load_file(out / "subject.safetensors"))
    pipe, models = trained_model(tiny_sdxl_path, out, 2)
    matched, convolutions, moved, unet_layers = 0, 0, 0, 0
    for component, model in models.items():
        for path, layer in model.named_modules():
            if not isinstance(layer, BaseTunerLayer):
                continue
            tensors = layers[kohya_module_name(component, path)]
            base = layer.get_base_layer().weight.detach()
            expected = base + layer.get_delta_weight("default").detach()
            if component == "unet":  # (a text encoder's last layer does not train: SDXL reads its penultimate layer)
                unet_layers += 1
                moved += float((expected - base).abs().max()) > 0
            for ui, patch in (("ComfyUI", comfyui_patch), ("WebUI", webui_patch)):
                torch.testing.assert_close(patch(base, tensors), expected, rtol=1e-5, atol=1e-5, msg=f"{ui}: {run} {path}")
            matched += 1
            convolutions += base.ndim == 4
    assert matched == len(layers), "every file layer is one trained layer"
    assert moved >= 0.8 * unet_layers, f"{moved} of {unet_layers} UNet layers trained (module dropout skips a few)"
    base_unet = load_pipe(tiny_sdxl_path).unet
    assert convolutions == sum(1 for name, m in base_unet.named_modules() if name.endswith(("conv1", "conv2", "conv_shortcut", "samplers.0.conv"))
                               and isinstance(m, torch.nn.Conv2d)) > 0
    metadata = json.loads(__import__("safetensors").safe_open(str(out / "subject.safetensors"), "pt").metadata()["ss_network_args"])
    assert metadata["algo"] == run.split()[0] and metadata["conv_dim"] == 2
    plain = generate_array(load_pipe(tiny_sdxl_path), PROMPT, steps=3)
    adapted_pipe = load_pipe(tiny_sdxl_path)
    load_loras(adapted_pipe, [LoraSpec(out)])
    adapted = generate_array(adapted_pipe, PROMPT, steps=3)
    assert np.abs(adapted - plain).max() > 1e-3, "the trained adapter changes the image"
    code, _, err = run_cli(infer.app, ["-m", tiny_sdxl_path, "--lora", out, "-p", PROMPT, "--num_inference_steps", 3, "--seed", 0,
                                       "-o", tmp_path / "images"], capsys)
    assert code == 0, err
    image = np.asarray(Image.open(next((tmp_path / "images").glob("*.png"))), dtype=np.float32) / 255
    assert np.abs(image - adapted).max() <= 1 / 255 + 1e-6, "infer.py loads the training folder's file"


def test_conv_layers_get_conv_rank_and_alpha_and_attention_the_rest(tiny_sdxl_path, images, tmp_path, capsys):
    code, _, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path / "c", 1, "--conv_rank", 2, "--conv_alpha", 4))
    assert code == 0, err
    layers = file_layers(load_file(tmp_path / "c" / "c.safetensors"))
    conv = {n: t for n, t in layers.items() if t["lora_down.weight"].ndim == 4}
    attention = {n: t for n, t in layers.items() if t["lora_down.weight"].ndim == 2}
    assert {t["lora_down.weight"].shape[0] for t in conv.values()} == {2} and {float(t["alpha"]) for t in conv.values()} == {4.0}
    assert {t["lora_down.weight"].shape[0] for t in attention.values()} == {4} and {float(t["alpha"]) for t in attention.values()} == {2.0}
    assert any("_in_layers_2" in n for n in conv) and any("_skip_connection" in n for n in conv) and any(n.endswith("_op") for n in conv)
    assert any(n.endswith("_2_conv") for n in conv), "the upsamplers after a transformer"


@pytest.mark.heavy
def test_loha_resumes_bit_for_bit(tiny_sdxl_path, images, tmp_path, capsys):
    extra = ["--adapter", "loha", "--conv_rank", 2, "--random_flip"]
    code, _, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path / "straight", 4, *extra))
    assert code == 0, err
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    code, out, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path / "resumed", 4, *extra,
                                                 "--resume_from_checkpoint", "latest"))
    assert code == 0 and "at step 2" in out, err
    straight, resumed = (load_file(tmp_path / f / f"{f}.safetensors") for f in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_init_lora_continues_a_lokr_from_its_file_and_refuses_another_type(tiny_sdxl_path, images, tmp_path, capsys):
    extra = ["--adapter", "lokr", "--conv_rank", 2]
    code, _, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path / "first", 2, *extra))
    assert code == 0, err
    code, _, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path / "again", 1, *extra, "--learning_rate", 1e-12,
                                               "--init_lora", tmp_path / "first"))
    assert code == 0, err
    first, again = load_file(tmp_path / "first" / "first.safetensors"), load_file(tmp_path / "again" / "again.safetensors")
    assert first.keys() == again.keys()
    assert max(float((first[k] - again[k]).abs().max()) for k in first) < 1e-8
    code, _, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path / "other", 1, "--adapter", "loha", "--conv_rank", 2,
                                               "--init_lora", tmp_path / "first"))
    assert code == 2 and "--init_lora is a LoKr; this run trains a LoHa (pass --adapter lokr)" in err, err


REFUSED = {
    "unknown adapter": (["--adapter", "ia3"], "--adapter 'ia3'; choose one of lora, loha, lokr"),
    "dora on loha": (["--adapter", "loha", "--use_dora"], "--use_dora does not apply to --adapter loha; it is for lora"),
    "loha tucker": (["--adapter", "loha", "--conv_rank", 2, "--use_tucker"], "peft 0.21's LoHa Tucker backward computes wrong gradients"),
    "lora tucker": (["--conv_rank", 2, "--use_tucker"], "--use_tucker does not apply to --adapter lora"),
    "lora dropout on lokr": (["--adapter", "lokr", "--lora_dropout", 0.1], "LoHa and LoKr have --rank_dropout and --module_dropout"),
    "rank dropout on lora": (["--rank_dropout", 0.1], "peft's LoRA has --lora_dropout only"),
    "factor on loha": (["--adapter", "loha", "--lokr_factor", 4], "--lokr_factor does not apply to --adapter loha"),
    "tucker without convolutions": (["--adapter", "lokr", "--use_tucker"], "--use_tucker shapes 3x3 convolutions, which --conv_rank adds"),
    "conv alpha alone": (["--conv_alpha", 4], "--conv_alpha needs --conv_rank"),
    "conv rank zero": (["--conv_rank", 0], "--conv_rank must be a positive integer, got 0"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_adapter_options_peft_cannot_train_are_refused_in_one_line(case, tiny_sdxl_path, images, tmp_path, capsys):
    extra, message = REFUSED[case]
    code, _, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path / "out", 1, *extra))
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and message in lines[-1], err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.safetensors"))

"""The built-in tiny models: SDXL's structure, both flavours, deterministic, loadable as plain diffusers folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.models import is_edm_scheduler_config
from helpers import load_pipe

REPO = Path(__file__).resolve().parents[1]


def test_python_m_common_tiny_writes_a_folder_that_stable_diffusion_xl_pipeline_loads(tmp_path):
    from diffusers import EDMDPMSolverMultistepScheduler, StableDiffusionXLPipeline

    result = subprocess.run(
        [sys.executable, "-m", "common.tiny", "tiny-edm", str(tmp_path / "edm")], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "edm")
    assert isinstance(pipe.scheduler, EDMDPMSolverMultistepScheduler)
    config = pipe.scheduler.config
    assert (config.sigma_data, config.sigma_min, config.sigma_max, config.rho, config.prediction_type) == (
        0.5, 0.002, 80.0, 7.0, "epsilon"
    )
    assert pipe.vae.config.scaling_factor == 0.5
    assert len(pipe.vae.config.latents_mean) == len(pipe.vae.config.latents_std) == 4


def test_tiny_sdxl_is_a_discrete_epsilon_model_with_sdxl_vae_scaling(tiny_sdxl_path):
    pipe = load_pipe(tiny_sdxl_path)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    assert not is_edm_scheduler_config(pipe.scheduler.config)


@pytest.mark.parametrize("fixture", ["tiny_sdxl_path", "tiny_edm_path"])
def test_tiny_models_have_sdxl_structure(fixture, request):
    pipe = load_pipe(request.getfixturevalue(fixture))
    width_1 = pipe.text_encoder.config.hidden_size
    width_2 = pipe.text_encoder_2.config.hidden_size
    assert width_1 != width_2, "different widths catch clip_l/clip_g mix-ups"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == width_1 + width_2
    assert pipe.unet.config.projection_class_embeddings_input_dim == (
        pipe.text_encoder_2.config.projection_dim + 6 * pipe.unet.config.addition_time_embed_dim
    )
    modules = dict(pipe.unet.named_modules())
    assert type(modules["up_blocks.0"]).__name__ == "CrossAttnUpBlock2D"
    for block in ("up_blocks.0.attentions.0", "up_blocks.0.attentions.1"):
        assert type(modules[block]).__name__ == "Transformer2DModel"
    assert pipe.vae_scale_factor == 8
    unet_parameters = sum(p.numel() for p in pipe.unet.parameters())
    assert unet_parameters < 5_000_000, f"tiny UNet grew to {unet_parameters} parameters"


def test_tokenizers_accept_added_tokens_as_single_ids(tiny_sdxl_path):
    pipe = load_pipe(tiny_sdxl_path)
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        before = len(tokenizer)
        tokenizer.add_tokens(["<s0>", "<s1>"])
        ids = tokenizer("a <s0><s1> dog", add_special_tokens=False).input_ids
        assert len(tokenizer) == before + 2
        assert tokenizer.convert_tokens_to_ids("<s0>") in ids and tokenizer.convert_tokens_to_ids("<s1>") in ids
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.model_max_length == 77


def test_building_twice_gives_identical_weights(tmp_path):
    from common.tiny import write_tiny_model

    first = write_tiny_model("tiny-sdxl", tmp_path / "a")
    second = write_tiny_model("tiny-sdxl", tmp_path / "b")
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (file_a,) = (first / component).glob("*.safetensors")
        (file_b,) = (second / component).glob("*.safetensors")
        a, b = load_file(file_a), load_file(file_b)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), component


def test_flavour_comes_from_the_scheduler_config_not_the_name(tiny_sdxl_path, tiny_edm_path, tmp_path):
    misnamed_edm = tmp_path / "sdxl-base-lookalike"
    shutil.copytree(tiny_edm_path, misnamed_edm)
    misnamed_discrete = tmp_path / "playground-v2.5-edm"
    shutil.copytree(tiny_sdxl_path, misnamed_discrete)
    assert is_edm_scheduler_config(load_pipe(str(misnamed_edm)).scheduler.config)
    assert not is_edm_scheduler_config(load_pipe(str(misnamed_discrete)).scheduler.config)
    config = json.loads((misnamed_edm / "scheduler" / "scheduler_config.json").read_text())
    assert is_edm_scheduler_config(config)

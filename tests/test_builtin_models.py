"""The built-in models: SDXL's structure, both flavours, the real CLIP tokenizer, deterministic without touching
the global RNG, loadable as plain diffusers folders (the full-size ones are checked in test_full_size.py)."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.models import is_edm_scheduler_config
from helpers import load_pipe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.heavy
def test_python_m_common_builtin_models_writes_a_folder_that_stable_diffusion_xl_pipeline_loads(tmp_path):
    from diffusers import EDMDPMSolverMultistepScheduler, StableDiffusionXLPipeline

    result = subprocess.run(
        [sys.executable, "-m", "common.builtin_models", "tiny-edm", str(tmp_path / "edm")], cwd=REPO, capture_output=True, text=True
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


def test_building_twice_gives_identical_weights_and_leaves_the_global_rng_alone(tmp_path):
    from common.builtin_models import write_builtin_model

    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    first = write_builtin_model("tiny-sdxl", tmp_path / "a")
    assert torch.equal(torch.rand(3), expected_next), "building a model moved the global RNG"
    second = write_builtin_model("tiny-sdxl", tmp_path / "b")
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (file_a,) = (first / component).glob("*.safetensors")
        (file_b,) = (second / component).glob("*.safetensors")
        a, b = load_file(file_a), load_file(file_b)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), component


@pytest.mark.heavy
def test_a_seeded_training_gives_the_same_lora_whether_or_not_the_model_was_built_first(tmp_path, monkeypatch, capsys):
    from training_helpers import train_cli, write_images

    images = write_images(tmp_path / "images", count=2)
    monkeypatch.setenv("SDXL_PERSONALIZE_CACHE", str(tmp_path / "fresh-cache"))
    results = []
    for run in ("builds tiny-sdxl first", "finds it cached"):
        out = tmp_path / run.replace(" ", "-")
        code, _, err = train_cli(capsys, "--model", "tiny-sdxl", "--instance_data_dir", images, "--instance_prompt", "a photo of sks dog",
                                 "--resolution", 64, "--train_batch_size", 2, "--max_train_steps", 2, "--seed", 3, "--output_dir", out)
        assert code == 0, err
        results.append(load_file(out / "pytorch_lora_weights.safetensors"))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_fill_deterministically_scales_by_fan_in_sets_norms_to_one_and_uses_no_global_rng():
    from accelerate import init_empty_weights

    from common.builtin_models import fill_deterministically

    def build():
        with init_empty_weights(include_buffers=False):
            return torch.nn.Sequential(torch.nn.Linear(400, 300), torch.nn.LayerNorm(300), torch.nn.Conv2d(8, 16, 3))

    state = torch.random.get_rng_state()
    first, second = fill_deterministically(build(), 0, torch.bfloat16), fill_deterministically(build(), 0, torch.bfloat16)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), name
    linear, norm, conv = first
    assert float(linear.weight.detach().float().std()) == pytest.approx(400**-0.5, rel=0.05)
    assert float(conv.weight.detach().float().std()) == pytest.approx((8 * 9) ** -0.5, rel=0.1)
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not linear.bias.any() and not norm.bias.any()
    assert not torch.equal(fill_deterministically(build(), 1, torch.bfloat16)[0].weight, linear.weight), "another seed, other weights"


def test_the_full_models_are_sdxl_base_1_0s_architecture_on_the_meta_device():
    """The published parameter counts, checked without building 7 GB (test_full_size.py builds the real thing)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from common.architectures import SDXL_TEXT_ENCODER_CONFIGS, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**SDXL_UNET_CONFIG), "vae": AutoencoderKL(**SDXL_VAE_CONFIG),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIGS[0])),
                  "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIGS[1]))}
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


def test_a_cached_full_model_twin_is_linked_not_rebuilt(tmp_path, monkeypatch):
    """full-edm is full-sdxl's weights with Playground v2.5's VAE statistics and scheduler: its weight files are
    hard links to the twin's, its configs its own (checked here on a stand-in folder with tiny weights)."""
    from diffusers import EDMDPMSolverMultistepScheduler, StableDiffusionXLPipeline

    import common.builtin_models as builtin
    from common.architectures import PLAYGROUND_V25_LATENTS_STD

    twin = builtin.write_builtin_model("tiny-sdxl", tmp_path / "full-sdxl-v1")
    monkeypatch.setattr(builtin, "build_pipeline", lambda *a, **k: pytest.fail("rebuilt instead of linked"))
    linked = builtin.write_builtin_model("full-edm", tmp_path / "full-edm-v1")
    for weights in twin.rglob("*.safetensors"):
        assert weights.stat().st_ino == (linked / weights.relative_to(twin)).stat().st_ino
    pipe = StableDiffusionXLPipeline.from_pretrained(linked)
    assert isinstance(pipe.scheduler, EDMDPMSolverMultistepScheduler) and pipe.scheduler.config.sigma_data == 0.5
    assert pipe.vae.config.scaling_factor == 0.5 and pipe.vae.config.latents_std == PLAYGROUND_V25_LATENTS_STD
    assert StableDiffusionXLPipeline.from_pretrained(twin).vae.config.scaling_factor == pytest.approx(0.13025), "the twin is untouched"


def test_cached_model_folders_get_the_permissions_of_ordinary_new_files(tiny_sdxl_path):
    from common.files import user_umask

    for path in [Path(tiny_sdxl_path), *Path(tiny_sdxl_path).rglob("*")]:
        wanted = (0o777 if path.is_dir() else 0o666) & ~user_umask()
        assert stat.S_IMODE(path.stat().st_mode) == wanted, f"{path} is {oct(path.stat().st_mode)}"


def test_flavour_comes_from_the_scheduler_config_not_the_name(tiny_sdxl_path, tiny_edm_path, tmp_path):
    misnamed_edm = tmp_path / "sdxl-base-lookalike"
    shutil.copytree(tiny_edm_path, misnamed_edm)
    misnamed_discrete = tmp_path / "playground-v2.5-edm"
    shutil.copytree(tiny_sdxl_path, misnamed_discrete)
    assert is_edm_scheduler_config(load_pipe(str(misnamed_edm)).scheduler.config)
    assert not is_edm_scheduler_config(load_pipe(str(misnamed_discrete)).scheduler.config)
    config = json.loads((misnamed_edm / "scheduler" / "scheduler_config.json").read_text())
    assert is_edm_scheduler_config(config)


def saved_scheduler_config(scheduler, folder: Path) -> dict:
    scheduler.save_config(folder)
    return json.loads((folder / "scheduler_config.json").read_text())


def published_sdxl_config() -> dict:
    """SDXL base 1.0's scheduler config as published (saved before EulerDiscreteScheduler had sigma_min/max)."""
    from common.architectures import published_scheduler

    return {key: value for key, value in published_scheduler(False).config.items() if value is not None}


def test_an_edm_sampler_saved_with_betas_is_read_as_discrete_with_one_line_saying_why(tmp_path):
    from diffusers import EDMDPMSolverMultistepScheduler

    from common.architectures import published_scheduler
    from common.cli import UserError
    from common.models import decide_base_formulation

    playground, sdxl = (saved_scheduler_config(published_scheduler(edm), tmp_path / str(edm)) for edm in (True, False))
    swapped = saved_scheduler_config(EDMDPMSolverMultistepScheduler.from_config(published_sdxl_config()), tmp_path / "swapped")
    assert decide_base_formulation(playground) == (True, "") and decide_base_formulation(sdxl) == (False, "")
    edm, note = decide_base_formulation(swapped)
    assert not edm and "\n" not in note
    assert "EDMDPMSolverMultistepScheduler" in note and "beta_schedule" in note and "--base_formulation edm-native" in note, note
    assert decide_base_formulation(swapped, "edm-native")[0] and not decide_base_formulation(swapped, "discrete")[0]
    with pytest.raises(UserError, match="--base_formulation discrete needs the base's beta schedule"):
        decide_base_formulation(playground, "discrete")
    with pytest.raises(UserError, match="--base_formulation edm-native needs an EDM scheduler config"):
        decide_base_formulation(sdxl, "edm-native")
    with pytest.raises(UserError, match="--base_formulation 'edm'; choose one of auto, edm-native, discrete"):
        decide_base_formulation(sdxl, "edm")


def test_sampling_follows_the_same_reading_of_an_ambiguous_config():
    from diffusers import DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler, EulerDiscreteScheduler

    from common.architectures import published_scheduler
    from common.cli import UserError
    from common.schedulers import make_scheduler

    swapped = EDMDPMSolverMultistepScheduler.from_config(published_sdxl_config())
    default = make_scheduler("default", swapped)
    assert isinstance(default, DPMSolverMultistepScheduler) and default.config.use_karras_sigmas
    assert (default.config.beta_schedule, default.config.beta_start, default.config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert isinstance(make_scheduler("euler", swapped), EulerDiscreteScheduler)
    with pytest.raises(UserError, match="scheduler 'edm-euler' is an EDM sampler, but this is a discrete DDPM model"):
        make_scheduler("edm-euler", swapped)
    assert make_scheduler("default", swapped, model_is_edm=True) is swapped
    playground = published_scheduler(True)
    assert make_scheduler("default", playground) is playground

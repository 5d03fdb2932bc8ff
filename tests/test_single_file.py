"""Single-file SDXL checkpoints in: written in the SGM layout (our writer and diffusers' own tables agree tensor for
tensor), read back bit-exact through diffusers' single-file loader offline, their flavour read as ComfyUI reads it, and
everything that is not an SDXL base refused in one line before any weight loads."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from checkpoint_helpers import (
    header_of, meta_tensors, refiner_key_set, sd15_key_set, sdxl_key_set, tiny_checkpoint, v_pred_markers,
)
from common.cli import UserError
from helpers import load_pipe, run_cli
from sgm_reference import pipeline_to_sgm

REPO = Path(__file__).resolve().parents[1]
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# sha256 of "\n".join(sorted(keys)) of sd_xl_base_1.0.safetensors's 2,515 tensor names, computed from two independent
# public listings of the file's layout that agree key for key (arenasys/stable-diffusion-webui-model-toolkit
# components/{UNET-XL,CLIP-XL,VAE-v1,CLIP-v1}-SD.txt @ 8550395 with toolkit.py's prefixes; ljleb/sd-mecha
# model_configs/sdxl-sgm.yaml, generated from a safetensors header, less its v-pred markers), and its published count
SDXL_BASE_KEYS_SHA256 = "d005e41d8aaf62de7dd70a04c6882dfbb14995220adc90d83ef06f857b9e8e34"
SDXL_BASE_KEY_COUNTS = {"model.diffusion_model.": 1680, "first_stage_model.": 248, "conditioner.embedders.0.": 197,
                        "conditioner.embedders.1.": 390}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tmp_path_factory.mktemp("single-files")


def tensors_of(pipe) -> dict:
    return {f"{part}.{key}": value for part in PARTS for key, value in getattr(pipe, part).state_dict().items()}


def assert_same_weights(loaded, reference) -> None:
    ours, theirs = tensors_of(loaded), tensors_of(reference)
    assert ours.keys() == theirs.keys()
    different = [key for key in ours if ours[key].dtype != theirs[key].dtype or not torch.equal(ours[key], theirs[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def infer_image(capsys, model: str, out: Path, *extra) -> np.ndarray:
    import infer

    code, _, err = run_cli(infer.app, ["--model", model, "--prompt", "a photo of a dog", "--seed", "4", "--num_inference_steps", "3",
                                       "--output_dir", out, *extra], capsys)
    assert code == 0, err
    return np.asarray(Image.open(sorted(out.glob("*.png"))[-1]))


# ---------------------------------------------------------------- the layout


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-edm"])
def test_our_writer_and_diffusers_tables_give_the_same_tensors_under_the_same_names(name, request):
    from common.checkpoints import CLIP_G_LOGIT_SCALE, CLIP_L_POSITION_IDS, sgm_state_dict

    pipe = load_pipe(request.getfixturevalue(name.replace("-", "_") + "_path"))
    ours = sgm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    reference = pipeline_to_sgm(pipe)
    assert set(ours) - set(reference) == {CLIP_L_POSITION_IDS, CLIP_G_LOGIT_SCALE}, "only Stability's two buffers are ours alone"
    assert set(reference) <= set(ours)
    different = [key for key in reference if not torch.equal(ours[key], reference[key])]
    assert not different, different[:3]
    assert torch.equal(ours[CLIP_L_POSITION_IDS], torch.arange(77)[None])


def test_the_full_size_key_set_is_sdxl_base_1_0s_published_one():
    from common.checkpoints import ARCHITECTURES, expected_shapes

    keys = sorted(expected_shapes(ARCHITECTURES[0]))
    assert len(keys) == 2515
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest() == SDXL_BASE_KEYS_SHA256
    for prefix, count in SDXL_BASE_KEY_COUNTS.items():
        assert sum(key.startswith(prefix) for key in keys) == count, prefix


def test_text_projection_is_stored_as_open_clips_p_which_diffusers_and_comfyui_apply(tiny_sdxl_path, files):
    """pooled @ P with the file's P gives the loaded encoder's text_embeds; the untransposed matrix (kohya's and
    OneTrainer's savers write that) would not."""
    from safetensors import safe_open

    from common.models import load_sdxl_pipeline
    from ui_checkpoint_loaders import comfyui_clip_g_text_projection

    path = tiny_checkpoint(files)
    with safe_open(str(path), "pt") as handle:
        projection = handle.get_tensor("conditioner.embedders.1.model.text_projection")
    pipe = load_sdxl_pipeline(str(path), torch.float32)
    tokens = pipe.tokenizer_2(["a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        output = pipe.text_encoder_2(tokens, output_hidden_states=True)
        pooled = pipe.text_encoder_2.text_model.final_layer_norm(output.last_hidden_state)[0, tokens[0].tolist().index(49407)]
    torch.testing.assert_close(pooled @ projection, output.text_embeds[0], rtol=1e-5, atol=1e-6)
    comfyui = torch.nn.functional.linear(pooled, comfyui_clip_g_text_projection({"conditioner.embedders.1.model.text_projection": projection}))
    torch.testing.assert_close(comfyui, output.text_embeds[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pooled @ projection.T, output.text_embeds[0], atol=1e-3)


# ---------------------------------------------------------------- reading back


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-edm"])
def test_a_single_file_loads_back_bit_exact_and_draws_the_folders_image(name, request, files, capsys):
    from common.flavours import checkpoint_markers, flavour_from_scheduler_config
    from common.models import load_sdxl_pipeline

    folder = request.getfixturevalue(name.replace("-", "_") + "_path")
    ours = tiny_checkpoint(files, name)
    reference_pipe = load_pipe(folder)
    reference = files / f"{name}-diffusers-tables.safetensors"  # the independent conversion, with the flavour's markers
    flavour = flavour_from_scheduler_config(reference_pipe.scheduler.config, reference_pipe.vae.config, name.endswith("edm"))
    save_file({k: v.contiguous() for k, v in {**pipeline_to_sgm(reference_pipe), **checkpoint_markers(flavour)}.items()}, str(reference))
    for path in (ours, reference):
        pipe = load_sdxl_pipeline(str(path), torch.float32)
        assert_same_weights(pipe, reference_pipe)
        assert not any(p.is_meta for part in PARTS for p in getattr(pipe, part).parameters())
        assert type(pipe.scheduler) is type(reference_pipe.scheduler)
        assert pipe.vae.config.scaling_factor == reference_pipe.vae.config.scaling_factor
    from_folder = infer_image(capsys, folder, files / f"{name}-images-folder")
    from_file = infer_image(capsys, str(ours), files / f"{name}-images-file")
    assert np.array_equal(from_file, from_folder)


@pytest.mark.heavy
def test_the_single_file_path_makes_no_network_call(files):
    """infer.py on a single file in a process whose sockets refuse to connect (and without HF_HUB_OFFLINE)."""
    path = tiny_checkpoint(files)
    guard = (
        "import socket, sys, runpy\n"
        "attempts = []\n"
        "def refuse(*args, **kwargs):\n"
        "    attempts.append(args)\n"
        "    raise OSError('network use in an offline test')\n"
        "socket.socket.connect = refuse; socket.socket.connect_ex = refuse; socket.getaddrinfo = refuse; socket.create_connection = refuse\n"
        "sys.argv = ['infer.py'] + sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_path('infer.py', run_name='__main__')\n"
        "finally:\n"
        "    print('connection attempts:', len(attempts))\n"
    )
    environment = {k: v for k, v in __import__("os").environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    result = subprocess.run([sys.executable, "-c", guard, "--model", str(path), "--prompt", "a dog", "--seed", "1",
                             "--num_inference_steps", "2", "--output_dir", str(files / "offline")],
                            cwd=REPO, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "connection attempts: 0" in result.stdout, result.stdout
    assert len(list((files / "offline").glob("*.png"))) == 1


def test_a_bf16_file_keeps_its_precision_and_a_fp32_vae_is_read_from_the_files_own_vae_tensors(files):
    from common.builtin_models import write_builtin_checkpoint
    from common.checkpoints import VAE_PREFIX
    from common.models import load_sdxl_pipeline

    path = files / "tiny-bf16.safetensors"
    write_builtin_checkpoint("tiny-sdxl", path, torch.bfloat16)
    pipe = load_sdxl_pipeline(str(path), {"default": torch.bfloat16, "vae": torch.float32})
    assert {p.dtype for part in ("unet", "text_encoder", "text_encoder_2") for p in getattr(pipe, part).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    stored = load_file(str(path))[VAE_PREFIX + "decoder.conv_in.weight"]
    assert stored.dtype == torch.bfloat16 and torch.equal(pipe.vae.decoder.conv_in.weight, stored.float())


def test_keys_that_are_not_weights_do_not_change_what_loads(tiny_sdxl_path, files):
    """Other tools' extras: float position ids, EMA copies, OneTrainer's scheduler buffers, a denoiser's sigmas."""
    from common.models import load_sdxl_pipeline

    path = tiny_checkpoint(files, extra={
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77.0)[None],
        "model_ema.decay": torch.tensor(0.999), "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(1),
        "alphas_cumprod": torch.linspace(1, 0, 1000), "betas": torch.linspace(0, 1, 1000), "denoiser.sigmas": torch.ones(1000),
    }, file_name="extras.safetensors")
    assert_same_weights(load_sdxl_pipeline(str(path), torch.float32), load_pipe(tiny_sdxl_path))


def test_a_ckpt_pickle_is_read_with_torchs_weights_only_loader(tiny_sdxl_path, files):
    """Lightning's {"state_dict": ..., "global_step": ...} loads; a pickle holding an object is refused, never run."""
    from common.models import read_model

    tensors = load_file(str(tiny_checkpoint(files)))
    torch.save({"state_dict": tensors, "global_step": 10}, files / "model.ckpt")
    from common.models import load_sdxl_pipeline

    assert_same_weights(load_sdxl_pipeline(str(files / "model.ckpt"), torch.float32), load_pipe(tiny_sdxl_path))
    torch.save({"state_dict": tensors, "optimizer": Path("/")}, files / "unsafe.ckpt")
    with pytest.raises(UserError, match=r"is a pickle holding more than tensors .*weights_only loader, since a pickle can run code"):
        read_model(str(files / "unsafe.ckpt"))


# ---------------------------------------------------------------- what is not an SDXL base


def refusal(tensors: dict, path: str = "model.safetensors") -> str:
    from common.checkpoints import identify_architecture

    with pytest.raises(UserError) as raised:
        identify_architecture(header_of(tensors, path))
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_other_models_are_refused_by_what_they_are_where_comfyui_calls_them_so():
    from ui_checkpoint_loaders import comfyui_classify

    sdxl = sdxl_key_set()
    refiner, sd15 = refiner_key_set(), sd15_key_set()
    inpaint = {**sdxl, "model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 9, 3, 3, device="meta")}
    assert comfyui_classify(sdxl)["model"] == "SDXL"
    assert comfyui_classify(refiner)["model"] == "SDXLRefiner"
    assert "is the SDXL refiner" in refusal(refiner)
    assert comfyui_classify(sd15)["model"] == "SD15"
    assert "is a Stable Diffusion 1.x checkpoint" in refusal(sd15)
    assert comfyui_classify(inpaint)["inpaint"]
    assert "is an inpainting UNet (9 input channels)" in refusal(inpaint)
    sd2 = {**{k: v for k, v in sd15.items() if not k.startswith("cond_stage_model.")},
           "cond_stage_model.model.token_embedding.weight": torch.empty(49408, 1024, device="meta")}
    assert "is a Stable Diffusion 2.x checkpoint" in refusal(sd2)


def test_incomplete_files_name_the_missing_part_before_anything_loads():
    sdxl = sdxl_key_set()
    no_vae = {k: v for k, v in sdxl.items() if not k.startswith("first_stage_model.")}
    assert "its VAE (first_stage_model.*) lacks 248 of 248 tensors" in refusal(no_vae)
    one_short = {k: v for k, v in sdxl.items() if k != "model.diffusion_model.out.2.weight"}
    assert "its UNet (model.diffusion_model.*) lacks 1 of 1680 tensors, e.g. model.diffusion_model.out.2.weight" in refusal(one_short)
    unet_only = {k: v for k, v in sdxl.items() if k.startswith("model.diffusion_model.")}
    assert "is incomplete: its VAE" in refusal(unet_only)
    no_text_model_level = {k.replace("transformer.text_model.", "transformer."): v for k, v in sdxl.items()}
    assert "lack CLIP's text_model. level" in refusal(no_text_model_level)
    resized = {**sdxl, "model.diffusion_model.out.2.weight": torch.empty(8, 320, 3, 3, device="meta")}
    assert "has shape (8, 320, 3, 3), SDXL base 1.0's has (4, 320, 3, 3)" in refusal(resized)
    assert "has no SDXL UNet" in refusal({"first_stage_model.encoder.conv_in.weight": torch.empty(128, 3, 3, 3, device="meta")})


@pytest.mark.parametrize("case", ["lora", "cut short", "random bytes", "text file", "missing tensor"])
def test_a_bad_model_file_is_refused_in_one_line_before_any_model_loads(case, files, capsys, monkeypatch):
    import diffusers

    import infer

    plain = tiny_checkpoint(files)
    path = files / f"bad-{case.replace(' ', '-')}.safetensors"
    if case == "lora":
        save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 64)}, str(path))
        expected = "is a LoRA (or LyCORIS) file, not a model: pass it with --lora"
    elif case == "cut short":
        path.write_bytes(plain.read_bytes()[: plain.stat().st_size // 2])
        expected = "as a safetensors file"
    elif case == "random bytes":
        path.write_bytes(bytes(range(256)) * 40)
        expected = "as a safetensors file"
    elif case == "text file":
        path = files / "notes.txt"
        path.write_text("not a model")
        expected = "is a file but not a checkpoint"
    else:
        tiny_checkpoint(files, drop=("model.diffusion_model.out.2.weight",), file_name=path.name)
        expected = "lacks 1 of"
    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_single_file",
                        classmethod(lambda *a, **k: pytest.fail("a model was loaded before the refusal")))
    code, out, err = run_cli(infer.app, ["--model", str(path), "--prompt", "x", "--output_dir", files / "never"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert "Traceback" not in err + out and not (files / "never").exists()


# ---------------------------------------------------------------- the flavour, as ComfyUI reads it

MARKER_SETS = {
    "none": {},
    "v_pred": {"v_pred": torch.tensor([])},
    "v_pred ztsnr": {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])},
    "ztsnr alone": {"ztsnr": torch.tensor([])},
    "playground": {"edm_mean": torch.tensor([-1.6574, 1.886, -1.383, 2.5155]).view(1, 4, 1, 1),
                   "edm_std": torch.tensor([8.4927, 5.9022, 6.5498, 5.2299]).view(1, 4, 1, 1)},
    "edm_mean alone": {"edm_mean": torch.zeros(1, 4, 1, 1)},
    "cosxl": {"edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.001)},
    "cosxl without sigma_min": {"edm_vpred.sigma_max": torch.tensor(80.0)},
    "playground and v_pred": {"edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1), "v_pred": torch.tensor([])},
}
METADATA = {"none": {}, "kohya says epsilon": {"modelspec.prediction_type": "epsilon"},
            "comfyui says v": {"modelspec.predict_key": "v"}, "kohya lora flag": {"ss_v_parameterization": "True"}}
COMFYUI_TYPES = {("epsilon", False): "EPS", ("v_prediction", False): "V_PREDICTION", ("epsilon", True): "EDM",
                 ("v_prediction", True): "V_PREDICTION_EDM"}


@pytest.mark.parametrize("metadata", METADATA)
@pytest.mark.parametrize("markers", MARKER_SETS)
def test_the_flavour_is_read_as_comfyui_reads_it_whatever_the_metadata_says(markers, metadata):
    from common.flavours import flavour_from_checkpoint
    from ui_checkpoint_loaders import comfyui_classify, webui_classify

    tensors = {**sdxl_key_set(), **MARKER_SETS[markers]}
    header = header_of(tensors, metadata=METADATA[metadata])
    reading = flavour_from_checkpoint(header.shapes, header.values, header.metadata)
    comfyui = comfyui_classify(tensors)
    flavour = reading.flavour
    assert comfyui["model"] == "SDXL"
    assert COMFYUI_TYPES[flavour.prediction_type, flavour.edm] == comfyui["model_type"]
    assert flavour.zero_terminal_snr == bool(comfyui["zsnr"])
    if flavour.edm:
        assert (flavour.sigma_min, flavour.sigma_max, flavour.sigma_data) == pytest.approx(
            (comfyui["sigma_min"], comfyui["sigma_max"], comfyui["sigma_data"]), rel=1e-6)
    else:  # WebUI reads v_pred alike (it has no EDM flavour, and rescales for ztsnr even without v_pred)
        assert webui_classify(dict(tensors))["v_prediction"] == (flavour.prediction_type == "v_prediction")
    said_v = metadata in ("comfyui says v", "kohya lora flag")
    disagrees = (said_v or metadata == "kohya says epsilon") and said_v != (flavour.prediction_type == "v_prediction")
    assert any("metadata says" in w for w in reading.warnings) == disagrees, reading.warnings
    assert any("ztsnr without v_pred" in w for w in reading.warnings) == (markers == "ztsnr alone")


def test_a_single_files_flavour_sets_the_scheduler_every_script_samples_and_trains_with(files):
    from diffusers import EDMDPMSolverMultistepScheduler, EulerDiscreteScheduler

    from common.architectures import SDXL_SCHEDULER_CONFIG
    from common.models import load_sdxl_pipeline, read_model

    path = tiny_checkpoint(files, markers=v_pred_markers(), metadata={"modelspec.prediction_type": "epsilon"}, file_name="v.safetensors")
    reading = read_model(str(path))
    assert reading.line() == "model v.safetensors: read as v-prediction with zero-terminal SNR (keys v_pred, ztsnr), fp32 weights"
    scheduler = load_sdxl_pipeline(str(path), torch.float32).scheduler
    expected = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                  timestep_spacing="trailing")
    assert isinstance(scheduler, EulerDiscreteScheduler) and dict(scheduler.config) == dict(expected.config)
    cosxl = tiny_checkpoint(files, markers=MARKER_SETS["cosxl"], file_name="cosxl.safetensors")
    scheduler = load_sdxl_pipeline(str(cosxl), torch.float32).scheduler
    assert isinstance(scheduler, EDMDPMSolverMultistepScheduler)
    assert (scheduler.config.prediction_type, scheduler.config.sigma_max, scheduler.config.sigma_min, scheduler.config.sigma_data) == (
        "v_prediction", 120.0, pytest.approx(0.001), 1.0)


def test_the_options_override_what_the_file_says_and_impossible_flavours_are_refused(files, tiny_edm_path):
    from common.models import FlavourOptions, read_model

    plain = str(tiny_checkpoint(files))
    reading = read_model(plain, FlavourOptions(prediction_type="v_prediction", zero_terminal_snr=True))
    assert (reading.base.flavour.name, reading.flavour.name) == ("epsilon", "v-prediction with zero-terminal SNR")
    assert reading.line().endswith("used as v-prediction with zero-terminal SNR, as the options say")
    edm = read_model(plain, FlavourOptions(base_formulation="edm-native")).flavour
    assert edm.edm and edm.sigma_data == 0.5 and edm.latents_std == pytest.approx((8.4927, 5.9022, 6.5498, 5.2299))
    with pytest.raises(UserError, match=r"zero-terminal SNR needs a v-prediction model \(Lin et al. 2024, Sec. 3.2\)"):
        read_model(plain, FlavourOptions(zero_terminal_snr=True))
    with pytest.raises(UserError, match="this model is EDM \\(Playground v2.5\\), whose sigmas are continuous"):
        read_model(tiny_edm_path, FlavourOptions(zero_terminal_snr=True))
    with pytest.raises(UserError, match="--prediction_type 'sample'; use epsilon or v_prediction"):
        read_model(plain, FlavourOptions(prediction_type="sample"))


def test_a_folder_whose_scheduler_says_v_prediction_and_zero_snr_is_read_the_same_way(tiny_sdxl_path, tmp_path):
    from common.models import load_sdxl_pipeline, read_model

    folder = tmp_path / "vpred-folder"
    shutil.copytree(tiny_sdxl_path, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    reading = read_model(str(folder))
    assert reading.flavour.name == "v-prediction with zero-terminal SNR"
    assert "rescale_betas_zero_snr" in reading.line()
    scheduler = load_sdxl_pipeline(str(folder), torch.float32).scheduler
    assert scheduler.config.timestep_spacing == "trailing", "Lin et al. Sec. 3.3: sampling starts at the last timestep"
    scheduler.set_timesteps(5)
    assert int(scheduler.timesteps[0]) == 999


def test_a_playground_files_own_latent_statistics_are_used_with_a_warning_where_they_differ(files):
    from common.models import load_sdxl_pipeline, read_model

    mean, std = [-1.6, 1.9, -1.4, 2.5], [8.5, 5.9, 6.5, 5.2]
    path = tiny_checkpoint(files, "tiny-edm", markers={"edm_mean": torch.tensor(mean).view(1, 4, 1, 1),
                                                       "edm_std": torch.tensor(std).view(1, 4, 1, 1)}, file_name="pg.safetensors")
    reading = read_model(str(path))
    assert any("differ from Playground v2.5's published ones" in w for w in reading.base.warnings)
    vae = load_sdxl_pipeline(str(path), torch.float32).vae
    assert vae.config.latents_mean == pytest.approx(mean) and vae.config.latents_std == pytest.approx(std)
    assert vae.config.scaling_factor == 0.5


# ---------------------------------------------------------------- --vae


def test_a_single_file_vae_loads_bare_or_prefixed_and_a_wrong_one_is_refused(tiny_sdxl_path, files):
    from common.checkpoints import VAE_PREFIX
    from common.models import load_vae, read_model

    tensors = load_file(str(tiny_checkpoint(files)))
    vae_tensors = {k.removeprefix(VAE_PREFIX): v for k, v in tensors.items() if k.startswith(VAE_PREFIX)}
    save_file(vae_tensors, str(files / "vae.safetensors"))
    save_file({VAE_PREFIX + k: v for k, v in vae_tensors.items()}, str(files / "vae-prefixed.safetensors"))
    reading = read_model(tiny_sdxl_path)
    expected = load_pipe(tiny_sdxl_path).vae.state_dict()
    for name in ("vae.safetensors", "vae-prefixed.safetensors"):
        loaded = load_vae(str(files / name), reading, torch.float32).state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), name
    save_file(load_pipe(tiny_sdxl_path).vae.state_dict(), str(files / "diffusers-vae.safetensors"))
    with pytest.raises(UserError, match="holds diffusers-format VAE weights: pass the folder it is in"):
        load_vae(str(files / "diffusers-vae.safetensors"), reading, torch.float32)
    save_file({**vae_tensors, "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(files / "vae-wrong.safetensors"))
    with pytest.raises(UserError, match=r"is not this model's VAE: it has decoder.conv_in.weight of shape \(8, 4, 3, 3\), where this model's VAE has"):
        load_vae(str(files / "vae-wrong.safetensors"), reading, torch.float32)


# ---------------------------------------------------------------- common/ itself


def test_common_has_no_import_circle():
    """Every `from common.X import` (function-level ones too) between the modules of common/, as a graph: no cycle."""
    import ast

    graph = {}
    for path in (REPO / "common").glob("*.py"):
        imports = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("common."):
                imports.add(node.module.split(".")[1])
        graph[path.stem] = imports - {path.stem}

    def cycle_from(module, trail):
        for imported in graph.get(module, ()):
            if imported in trail:
                return trail[trail.index(imported):] + [imported]
            found = cycle_from(imported, trail + [imported])
            if found:
                return found
        return None

    cycles = [c for module in graph if (c := cycle_from(module, [module]))]
    assert not cycles, " -> ".join(cycles[0])

"""infer.py end to end on the tiny models: schedulers, seeds, metadata, prompt files, and one-line errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import infer
from common.schedulers import SCHEDULERS
from helpers import make_peft_lora, parse_webui_parameters, run_cli

REPO = Path(__file__).resolve().parents[1]


def run_infer(capsys, *argv) -> tuple[int, str, str]:
    return run_cli(infer.app, [str(a) for a in argv], capsys)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def only_png(folder: Path) -> Path:
    (png,) = sorted(folder.glob("*.png"))
    return png


@pytest.mark.parametrize("scheduler", ["default", *SCHEDULERS])
def test_every_scheduler_generates_on_the_model_of_its_kind(scheduler, tiny_sdxl_path, tiny_edm_path, tmp_path, capsys):
    model = tiny_edm_path if scheduler.startswith("edm") else tiny_sdxl_path
    code, _, err = run_infer(capsys, "-m", model, "-p", "a photo of a dog", "--scheduler", scheduler,
                             "--num_inference_steps", 3, "--seed", 1, "-o", tmp_path)
    assert code == 0, err
    png = only_png(tmp_path)
    image = pixels(png)
    assert image.shape == (64, 64, 3) and image.std() > 0, "a blank image means the sampler produced NaNs or zeros"
    recorded = parse_webui_parameters(Image.open(png).text["parameters"])["Scheduler"]
    expected = {"default": "euler"}.get(scheduler, scheduler)
    assert recorded == expected


def test_edm_model_default_scheduler_is_its_own_edm_dpmpp_2m(tiny_edm_path, tmp_path, capsys):
    code, _, err = run_infer(capsys, "-m", tiny_edm_path, "-p", "a cat", "--num_inference_steps", 3, "-o", tmp_path)
    assert code == 0, err
    assert parse_webui_parameters(Image.open(only_png(tmp_path)).text["parameters"])["Scheduler"] == "edm-dpmpp-2m"


def test_same_seed_gives_the_same_image_and_another_seed_another(tiny_sdxl_path, tmp_path, capsys):
    for folder, seed in (("a", 5), ("b", 5), ("c", 6)):
        code, _, err = run_infer(capsys, "-m", tiny_sdxl_path, "-p", "a cat", "--seed", seed,
                                 "--num_inference_steps", 3, "-o", tmp_path / folder)
        assert code == 0, err
    a, b, c = (pixels(only_png(tmp_path / f)) for f in "abc")
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 10


def test_any_image_of_a_batch_is_reproduced_alone_from_its_seed(tiny_sdxl_path, tmp_path, capsys):
    code, _, err = run_infer(capsys, "-m", tiny_sdxl_path, "-p", "a cat", "--seed", 10, "--num_images", 3,
                             "--batch_size", 3, "--num_inference_steps", 3, "-o", tmp_path / "batch")
    assert code == 0, err
    batch = sorted((tmp_path / "batch").glob("*.png"))
    assert [p.name for p in batch] == ["00000-10.png", "00001-11.png", "00002-12.png"]
    code, _, err = run_infer(capsys, "-m", tiny_sdxl_path, "-p", "a cat", "--seed", 12,
                             "--num_inference_steps", 3, "-o", tmp_path / "alone")
    assert code == 0, err
    difference = np.abs(pixels(batch[2]) - pixels(only_png(tmp_path / "alone"))).max()
    assert difference <= 1, f"batched and lone image differ by {difference} levels"


def test_size_steps_guidance_and_seed_land_in_the_png_metadata(tiny_sdxl_path, tmp_path, capsys):
    code, out, err = run_infer(capsys, "-m", tiny_sdxl_path, "-p", "a red house", "--negative_prompt", "blurry",
                               "--width", 72, "--height", 56, "--num_inference_steps", 3, "--guidance_scale", 3.5,
                               "--seed", 99, "--scheduler", "dpmpp-2m-karras", "-o", tmp_path)
    assert code == 0, err
    png = only_png(tmp_path)
    assert Image.open(png).size == (72, 56)
    parsed = parse_webui_parameters(Image.open(png).text["parameters"])
    assert parsed["prompt"] == "a red house" and parsed["negative_prompt"] == "blurry"
    assert (parsed["Size"], parsed["Steps"], parsed["CFG scale"], parsed["Seed"]) == ("72x56", "3", "3.5", "99")
    assert (parsed["Sampler"], parsed["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert "saved 1 image(s)" in out


def test_prompt_file_gives_num_images_per_line_and_new_runs_do_not_overwrite(tiny_sdxl_path, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    for _ in range(2):
        code, _, err = run_infer(capsys, "-m", tiny_sdxl_path, "--prompt_file", prompts, "--num-images", 2,
                                 "--num_inference_steps", 2, "--seed", 0, "-o", tmp_path / "out")
        assert code == 0, err
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name.split("-")[0] for p in pngs] == [f"{i:05d}" for i in range(8)]
    recorded = [parse_webui_parameters(Image.open(p).text["parameters"])["prompt"] for p in pngs[:4]]
    assert recorded == ["a cat", "a cat", "a dog", "a dog"]


def test_lora_and_embedding_options_are_applied_and_recorded(tiny_sdxl_path, tmp_path, capsys):
    lora = make_peft_lora(tiny_sdxl_path, tmp_path / "lora")
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}, tmp_path / "emb.safetensors")
    common = ["-m", tiny_sdxl_path, "-p", "a <s0><s1> dog", "--num_inference_steps", 3, "--seed", 4]
    assert run_infer(capsys, *common, "-o", tmp_path / "plain")[0] == 0
    code, out, err = run_infer(capsys, *common, "--lora", f"{lora.parent}:0.7", "--embedding", tmp_path / "emb.safetensors",
                               "-o", tmp_path / "adapted")
    assert code == 0, err
    assert "<s0><s1>" in out
    png = only_png(tmp_path / "adapted")
    parsed = parse_webui_parameters(Image.open(png).text["parameters"])
    assert parsed["Lora"] == "lora:0.7" and parsed["Embeddings"] == "emb.safetensors"
    assert np.abs(pixels(png) - pixels(only_png(tmp_path / "plain"))).max() > 10


def test_a_lora_at_weight_zero_says_it_is_not_loaded_and_gives_the_base_image(tiny_sdxl_path, tmp_path, capsys):
    lora = make_peft_lora(tiny_sdxl_path, tmp_path / "lora")
    common = ["-m", tiny_sdxl_path, "-p", "a dog", "--num_inference_steps", 3, "--seed", 4]
    assert run_infer(capsys, *common, "-o", tmp_path / "plain")[0] == 0
    code, out, err = run_infer(capsys, *common, "--lora", f"{lora}:0", "-o", tmp_path / "zero")
    assert code == 0, err
    assert "LoRA pytorch_lora_weights.safetensors has weight 0: not loaded, the model is the base model exactly" in out
    assert np.array_equal(pixels(only_png(tmp_path / "zero")), pixels(only_png(tmp_path / "plain")))


def mismatched_lora(tiny_sdxl_path, folder: Path) -> Path:
    """A LoRA whose to_k down-projection expects inputs of another width, as if trained for another base."""
    state = load_file(make_peft_lora(tiny_sdxl_path, folder, text_encoders=False))
    key = next(k for k in state if "attn2.to_k.lora_A" in k)
    state[key] = torch.randn(state[key].shape[0], 2048)
    save_file(state, folder / "other_base.safetensors")
    return folder / "other_base.safetensors"


def narrow_embedding(folder: Path) -> Path:
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, folder / "sdxl_sized.safetensors")
    return folder / "sdxl_sized.safetensors"


BAD_INPUTS = {
    "missing model": (["-m", "/no/such/model"], "model '/no/such/model' not found: it is not a local folder"),
    "folder that is no pipeline": (["-m", "EMPTY_DIR"], "has no model_index.json; pass a diffusers pipeline folder"),
    "hub id without network": (["-m", "someone/sdxl-finetune"], "could not load model 'someone/sdxl-finetune' as an SDXL pipeline"),
    "size not a multiple of 8": (["--width", "60"], "--width 60 is not a multiple of 8 of at least 16"),
    "unknown scheduler": (["--scheduler", "heun"], "unknown scheduler 'heun'; choose one of default"),
    "EDM scheduler on a discrete model": (["--scheduler", "edm-euler"], "'edm-euler' is an EDM sampler"),
    "unknown base formulation": (["--base_formulation", "edm"], "--base_formulation 'edm'; choose one of auto, edm-native, discrete"),
    "EDM-native stated for a discrete config": (["--base_formulation", "edm-native"], "--base_formulation edm-native needs an EDM scheduler config"),
    "LoRA for another base": (["--lora", "MISMATCHED"], "does not match this model"),
    "embedding of the wrong width": (["--embedding", "NARROW"], "rows are 768 wide but this model's text encoder takes 32"),
    "missing LoRA file": (["--lora", "/no/lora.safetensors:0.5"], "LoRA file '/no/lora.safetensors' not found"),
    "fp16 on the CPU": (["--dtype", "fp16"], "--dtype fp16 is not supported on the CPU"),
    "prompt and prompt file": (["--prompt_file", "/no/prompts.txt"], "give exactly one of --prompt TEXT or --prompt_file"),
    "missing prompt file": (["-p", None, "--prompt_file", "/no/prompts.txt"], "prompt file '/no/prompts.txt' not found"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_clear_line_and_a_non_zero_exit(case, tiny_sdxl_path, tmp_path, capsys):
    extra, message = BAD_INPUTS[case]
    options = {"-m": tiny_sdxl_path, "-p": "a cat", "--num_inference_steps": "2", "-o": str(tmp_path / "out")}
    options.update(zip(extra[::2], extra[1::2]))  # a case's options replace the good ones (None drops one)
    files = {
        "MISMATCHED": lambda: mismatched_lora(tiny_sdxl_path, tmp_path),
        "NARROW": lambda: narrow_embedding(tmp_path),
        "EMPTY_DIR": lambda: tmp_path,
    }
    argv = [a for k, v in options.items() if v is not None for a in (k, str(files[v]()) if v in files else v)]
    code, _, err = run_infer(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not list((tmp_path / "out").glob("*.png")), "nothing is generated after an input error"


def test_bad_input_through_the_real_interpreter_prints_no_traceback(tiny_sdxl_path):
    result = subprocess.run(
        [sys.executable, "infer.py", "-m", tiny_sdxl_path, "-p", "a cat", "--scheduler", "euler", "--height", "100"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --height 100 is not a multiple of 8 of at least 16 (the VAE downsamples by 8, and the UNet's smallest latent is 2x2); try 96"
    )


def test_lora_scale_multiplies_each_weight_and_b_lora_options_name_their_blocks(tiny_sdxl_path, tmp_path, capsys):
    content = make_peft_lora(tiny_sdxl_path, tmp_path / "content")
    style = make_peft_lora(tiny_sdxl_path, tmp_path / "style", seed=1)
    code, _, err = run_infer(capsys, "-m", tiny_sdxl_path, "-p", "a cat", "--num_inference_steps", 2, "--seed", 1,
                             "--lora", f"{content}:0.5", "--lora_blocks", "mid_block", "--lora_scale", 0.5,
                             "--content_lora", f"{content}:0.9", "--style_lora", str(style), "-o", tmp_path / "out")
    assert code == 0, err
    recorded = parse_webui_parameters(Image.open(only_png(tmp_path / "out")).text["parameters"])["Lora"]
    assert recorded == (
        "pytorch_lora_weights.safetensors:0.25 [unet.mid_block], "
        "pytorch_lora_weights.safetensors:0.45 [unet.up_blocks.0.attentions.0], "
        "pytorch_lora_weights.safetensors:0.5 [unet.up_blocks.0.attentions.1]"
    )


def test_memory_and_speed_options_switch_on_vae_tiling_slicing_and_compilation(tiny_sdxl_path):
    from helpers import load_pipe

    from common import generation_options

    config = generation_options.GenerationOptions(model=tiny_sdxl_path, num_inference_steps=1, dtype="fp32", device="cpu",
                                                  vae_tiling=True, vae_slicing=True, compile_unet=True)
    pipe = load_pipe(tiny_sdxl_path)
    assert not pipe.vae.use_tiling and not pipe.vae.use_slicing
    generation_options.move_to_device(pipe, torch.device("cpu"), config)
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    assert isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(infer.UserError, match="--cpu_offload .* needs a CUDA GPU"):
        generation_options.resolve_device_and_dtype(dataclasses.replace(config, cpu_offload=True))


def test_vae_slicing_with_a_batch_gives_the_same_images(tiny_sdxl_path, tmp_path, capsys):
    for folder, extra in (("plain", []), ("sliced", ["--vae_slicing"])):
        code, _, err = run_infer(capsys, "-m", tiny_sdxl_path, "-p", "a cat", "--num_images", 2, "--batch_size", 2,
                                 "--seed", 3, "--num_inference_steps", 2, "-o", tmp_path / folder, *extra)
        assert code == 0, err
    for plain, sliced in zip(sorted((tmp_path / "plain").glob("*.png")), sorted((tmp_path / "sliced").glob("*.png"))):
        assert np.abs(pixels(plain) - pixels(sliced)).max() <= 1


def test_tcd_records_its_default_gamma_and_eta_can_be_set(tiny_sdxl_path, tmp_path, capsys):
    for folder, extra in (("default", []), ("set", ["--eta", "0.7"])):
        code, _, err = run_infer(capsys, "-m", tiny_sdxl_path, "-p", "a cat", "--scheduler", "tcd", "--guidance_scale", 1,
                                 "--num_inference_steps", 2, "-o", tmp_path / folder, *extra)
        assert code == 0, err
    etas = [parse_webui_parameters(Image.open(only_png(tmp_path / f)).text["parameters"])["Eta"] for f in ("default", "set")]
    assert etas == ["0.3", "0.7"]

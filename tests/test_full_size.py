"""The full-size tier: every script on SDXL base 1.0's and Playground v2.5's real architectures (random
weights, the real CLIP tokenizer), in bf16 on the CPU, each run as a user runs it, in its own process.

    bash scripts/test_full_size.sh                                  # the whole tier, about 1.5 hours
    bash scripts/test_full_size.sh -k "architectures or plain_training"   # its core, as CI runs it

Images are 64x64 (8x8 latents, the smallest size SDXL's three UNet levels take): on a CPU without AVX-512,
bf16 convolutions have no fast kernel and one UNet forward costs about 13 s even there. With
$FULL_SIZE_REPORT set, each run's wall time, CPU time and peak resident memory are appended to that file (JSON lines)
for bench/RESULTS.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from training_helpers import write_images

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
UNET_LAYERS, TE1_LAYERS, TE2_LAYERS = 560, 48, 128  # SDXL's attention projections: 70 transformer blocks x 2 x 4; 12 x 4; 32 x 4
# --conv_rank adds 49: 17 ResNet blocks' conv1 and conv2 (3x3), 11 conv_shortcut (1x1), 2 downsamplers and 2 upsamplers (3x3)
UNET_CONVOLUTIONS = 49
PROMPT = "a photo of sks dog"
COMMON_TRAINING = ["--resolution", SIZE, "--train_batch_size", 1, "--max_train_steps", 2, "--rank", 4,
                   "--mixed_precision", "bf16", "--seed", 0, "--learning_rate", 1e-4]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    cpu_seconds: float
    peak_rss_gib: float


def run_script(label: str, script: str, *args) -> Run:
    """`python script ARGS` in its own process, as a user runs it; its time and peak resident memory."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.time()
        process = subprocess.Popen([sys.executable, script, *map(str, args)], cwd=REPO, stdout=out, stderr=err,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.time() - started
        out.seek(0), err.seek(0)
        run = Run(os.waitstatus_to_exitcode(status), out.read(), err.read(), seconds,
                  usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20)
    if os.environ.get("FULL_SIZE_REPORT"):
        with open(os.environ["FULL_SIZE_REPORT"], "a") as report:
            report.write(json.dumps({"run": label, "seconds": round(run.seconds, 1), "cpu_seconds": round(run.cpu_seconds, 1),
                                     "peak_rss_gib": round(run.peak_rss_gib, 2), "returncode": run.returncode}) + "\n")
    assert run.returncode == 0, f"{label}: exit {run.returncode}\n{run.stderr[-3000:]}"
    return run


def lora_layers(path: Path, suffix: str = "lora_A.weight") -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as handle:
        return {key.removesuffix("." + suffix): tuple(handle.get_slice(key).get_shape()) for key in handle.keys() if key.endswith(suffix)}


def sdxl_linear_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear of SDXL's UNet and text encoders, component-prefixed, from the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from common.architectures import SDXL_TEXT_ENCODER_CONFIGS, SDXL_UNET_CONFIG

    shapes = {}
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**SDXL_UNET_CONFIG),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIGS[0])),
                  "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIGS[1]))}
    for component, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                shapes[f"{component}.{name}"] = (module.out_features, module.in_features)
    return shapes


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("full-size")
    write_images(folder / "instance", count=2, size=(SIZE, SIZE))
    return folder


@pytest.fixture(scope="module")
def full_models(private_model_cache) -> dict[str, Path]:
    """Both full models, built once into the test cache, in a process of their own: built here, their 7 GiB
    would stay in this process and count in the peak RSS of every script forked from it; building leaves
    torch's global RNG as it was."""
    build = """
import json, torch
from common.builtin_models import builtin_model_path
state = torch.random.get_rng_state()
paths = {name: str(builtin_model_path(name)) for name in ("full-sdxl", "full-edm")}
print(json.dumps({"paths": paths, "rng_untouched": torch.equal(torch.random.get_rng_state(), state)}))
"""
    result = subprocess.run([sys.executable, "-c", build], cwd=REPO, capture_output=True, text=True, check=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    built = json.loads(result.stdout.strip().splitlines()[-1])
    assert built["rng_untouched"], "building a full model moved the global RNG"
    return {name: Path(path) for name, path in built["paths"].items()}


def test_full_models_have_sdxl_and_playground_architectures_and_load_with_diffusers(full_models):
    from diffusers import EDMDPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

    published = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    for name, scheduler_class, scaling in (("full-sdxl", EulerDiscreteScheduler, 0.13025), ("full-edm", EDMDPMSolverMultistepScheduler, 0.5)):
        pipe = StableDiffusionXLPipeline.from_pretrained(full_models[name], dtype=torch.bfloat16)
        counts = {component: sum(p.numel() for p in getattr(pipe, component).parameters()) for component in published}
        assert counts == published, name
        assert isinstance(pipe.scheduler, scheduler_class) and pipe.vae.config.scaling_factor == scaling
        assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == 49408 and pipe.tokenizer_2.pad_token_id == 0
        assert pipe.unet.dtype == torch.bfloat16
    edm = StableDiffusionXLPipeline.from_pretrained(full_models["full-edm"], dtype=torch.bfloat16).scheduler.config
    assert (edm.sigma_data, edm.sigma_min, edm.sigma_max) == (0.5, 0.002, 80.0)
    assert (full_models["full-edm"] / "unet" / "diffusion_pytorch_model.safetensors").stat().st_ino == (
        full_models["full-sdxl"] / "unet" / "diffusion_pytorch_model.safetensors").stat().st_ino, "the twins share their weight files"


@pytest.fixture(scope="module")
def plain_lora(full_models, work) -> Path:
    out = work / "plain"
    run_script("train_lora.py full-sdxl, plain LoRA", "train_lora.py", "--model", "full-sdxl", "--instance_data_dir", work / "instance",
               "--instance_prompt", PROMPT, "--output_dir", out, *COMMON_TRAINING)
    return out


def test_plain_training_covers_every_sdxl_attention_projection_and_exports_cleanly(plain_lora):
    layers = lora_layers(plain_lora / "pytorch_lora_weights.safetensors")
    shapes = sdxl_linear_shapes()
    assert len(layers) == UNET_LAYERS and all(name.startswith("unet.") for name in layers)
    assert all(shape == (4, shapes[name][1]) for name, shape in layers.items()), "each A is rank x the layer's input width"
    parameters = sum(4 * (shapes[name][0] + shapes[name][1]) for name in layers)
    assert parameters == 5_806_080, "the LoRA parameter count diffusers' DreamBooth script reports for SDXL at rank 4"
    kohya = plain_lora / "plain.safetensors"
    assert len(lora_layers(kohya, "lora_down.weight")) == UNET_LAYERS
    check = run_script("convert_for_webui.py --check, plain LoRA", "convert_for_webui.py", kohya, "--check")
    assert "every key maps onto SDXL" in check.stdout, check.stdout


@pytest.mark.parametrize("kind, options", [("locon", ["--conv_rank", 4]), ("lokr", ["--adapter", "lokr", "--conv_rank", 4])])
def test_locon_and_lokr_train_every_projection_and_convolution_and_export_cleanly(kind, options, full_models, work):
    from common.adapters import file_layers

    out = work / kind
    run_script(f"train_lora.py full-sdxl, {kind}", "train_lora.py", "--model", "full-sdxl", "--instance_data_dir",
               work / "instance", "--instance_prompt", PROMPT, "--output_dir", out, *COMMON_TRAINING, *options)
    layers = file_layers(load_file(out / f"{kind}.safetensors"))
    convolutions = [name for name, tensors in layers.items() if any(t.ndim == 4 for t in tensors.values())
                    or name.endswith(("_in_layers_2", "_out_layers_3", "_skip_connection", "_op", "_2_conv"))]
    assert len(layers) == UNET_LAYERS + UNET_CONVOLUTIONS and len(convolutions) == UNET_CONVOLUTIONS, (len(layers), len(convolutions))
    export = work / f"{kind}-export"
    run_script(f"convert_for_webui.py export, {kind}", "convert_for_webui.py", out, "--out", export)
    check = run_script(f"convert_for_webui.py --check, {kind}", "convert_for_webui.py", export / f"{kind}.safetensors", "--check")
    assert "WebUI: every key maps onto SDXL" in check.stdout and "ComfyUI: every key maps onto SDXL" in check.stdout, check.stdout


@pytest.fixture(scope="module")
def class_images(full_models, work) -> Path:
    folder = work / "class"
    run_script("gen_class_images.py full-sdxl, 1 image, 2 steps", "gen_class_images.py", "--model", "full-sdxl",
               "--class_prompt", "a photo of a dog", "--class_data_dir", folder, "--num_class_images", 1,
               "--num_inference_steps", 2, "--width", SIZE, "--height", SIZE, "--dtype", "bf16", "--seed", 0)
    return folder


def test_class_images_are_made_at_the_asked_size(class_images):
    (image,) = class_images.glob("class_*.png")
    assert Image.open(image).size == (SIZE, SIZE)


@pytest.fixture(scope="module")
def pivotal_lora(full_models, work, class_images) -> Path:
    out = work / "pivotal"
    run_script("train_lora.py full-sdxl, pivotal tuning + text-encoder LoRA + prior preservation", "train_lora.py",
               "--model", "full-sdxl", "--instance_data_dir", work / "instance", "--instance_prompt", "a photo of TOK dog",
               # the text parts train in step 1 (bf16 backward through bigG has no fast CPU kernel), step 2 uses the cache
               "--train_text_encoder_ti", "--token_abstraction", "TOK", "--train_text_encoder", "--text_encoder_lr", 1e-4,
               "--train_text_encoder_frac", 0.5, "--train_text_encoder_ti_frac", 0.5,
               "--with_prior_preservation", "--class_data_dir", class_images, "--class_prompt", "a photo of a dog",
               "--num_class_images", 1, "--output_dir", out, *COMMON_TRAINING)
    return out


def test_pivotal_tuning_with_text_encoder_lora_covers_736_layers_and_both_embedding_tables(pivotal_lora, work):
    embedding = load_file(pivotal_lora / "pivotal_emb.safetensors")
    assert embedding["clip_l"].shape == (2, 768) and embedding["clip_g"].shape == (2, 1280)
    layers = lora_layers(pivotal_lora / "pytorch_lora_weights.safetensors")
    components = {c: sum(name.startswith(c + ".") for name in layers) for c in ("unet", "text_encoder", "text_encoder_2")}
    assert components == {"unet": UNET_LAYERS, "text_encoder": TE1_LAYERS, "text_encoder_2": TE2_LAYERS}

    export = work / "export"
    run_script("convert_for_webui.py export, 736 layers + embedding", "convert_for_webui.py", pivotal_lora, "--name", "sksdog", "--out", export)
    kohya = lora_layers(export / "sksdog.safetensors", "lora_down.weight")
    prefixes = {p: sum(name.startswith(p) for name in kohya) for p in ("lora_unet_", "lora_te1_", "lora_te2_")}
    assert prefixes == {"lora_unet_": UNET_LAYERS, "lora_te1_": TE1_LAYERS, "lora_te2_": TE2_LAYERS}
    check = run_script("convert_for_webui.py --check, 736 layers", "convert_for_webui.py", export / "sksdog.safetensors", "--check")
    assert "every key maps onto SDXL" in check.stdout, check.stdout
    exported = load_file(export / "embeddings" / "sksdog.safetensors")
    assert torch.equal(exported["clip_l"], embedding["clip_l"]) and torch.equal(exported["clip_g"], embedding["clip_g"])


def test_inference_with_the_trained_lora_and_embedding(pivotal_lora, work):
    from helpers import parse_webui_parameters

    out = work / "images"
    run_script("infer.py full-sdxl + LoRA + embedding, 2 steps", "infer.py", "--model", "full-sdxl", "--lora", pivotal_lora,
               "--embedding", pivotal_lora / "pivotal_emb.safetensors", "--prompt", "a photo of <s0><s1> dog on the beach",
               "--num_inference_steps", 2, "--width", SIZE, "--height", SIZE, "--dtype", "bf16", "--seed", 1, "--output_dir", out)
    (image,) = out.glob("*.png")
    assert Image.open(image).size == (SIZE, SIZE)
    parameters = parse_webui_parameters(Image.open(image).text["parameters"])
    assert parameters["prompt"] == "a photo of <s0><s1> dog on the beach"
    assert parameters["Lora"].startswith("pivotal:1") and parameters["Embeddings"] == "pivotal_emb.safetensors"


@pytest.fixture(scope="module")
def edm_on_discrete_lora(full_models, work) -> Path:
    out = work / "edm-on-sdxl"
    run_script("train_lora.py full-sdxl --edm", "train_lora.py", "--model", "full-sdxl", "--edm", "--instance_data_dir",
               work / "instance", "--instance_prompt", PROMPT, "--output_dir", out, *COMMON_TRAINING)
    return out


def test_edm_training_on_the_discrete_base_writes_the_same_layers(edm_on_discrete_lora):
    assert len(lora_layers(edm_on_discrete_lora / "pytorch_lora_weights.safetensors")) == UNET_LAYERS


def test_dora_training_stores_a_magnitude_per_output_row_of_every_layer(full_models, work):
    out = work / "dora"
    run_script("train_lora.py full-sdxl --use_dora", "train_lora.py", "--model", "full-sdxl", "--use_dora", "--instance_data_dir",
               work / "instance", "--instance_prompt", PROMPT, "--output_dir", out, *COMMON_TRAINING)
    magnitudes = lora_layers(out / "pytorch_lora_weights.safetensors", "lora_magnitude_vector")
    shapes = sdxl_linear_shapes()
    assert len(magnitudes) == UNET_LAYERS
    assert all(shape == (shapes[name][0],) for name, shape in magnitudes.items())


def test_the_edm_base_trains_with_the_edm_formulation(full_models, work):
    out = work / "edm-native"
    run = run_script("train_lora.py full-edm", "train_lora.py", "--model", "full-edm", "--instance_data_dir", work / "instance",
                     "--instance_prompt", PROMPT, "--output_dir", out, *COMMON_TRAINING)
    assert "EDM base detected" in run.stdout + run.stderr
    assert len(lora_layers(out / "pytorch_lora_weights.safetensors")) == UNET_LAYERS


def test_ties_merge_keeps_every_layer_of_either_input(plain_lora, pivotal_lora, work):
    """TIES re-factorised at the inputs' rank. (Stored at full rank, TIES's default before issue #12 and now
    --rank full, an SDXL merge is 1.2 G factor values: the run was stopped after 17 min at 19 GB of memory.)"""
    out = work / "ties"
    run_script("merge_lora.py ties_svd, full-sdxl", "merge_lora.py", "--model", "full-sdxl", "--lora", plain_lora, "--lora",
               f"{pivotal_lora}:0.8", "--method", "ties_svd", "--density", 0.5, "--kohya", "--out", out)
    layers = lora_layers(out / "pytorch_lora_weights.safetensors")
    assert len(layers) == UNET_LAYERS + TE1_LAYERS + TE2_LAYERS and {shape[0] for shape in layers.values()} == {4}
    report = json.loads((out / "merge_report.json").read_text())["layers"]
    # SDXL conditions on the first encoder's penultimate layer: its last layer gets no gradient, its LoRA stays zero
    never_trained = {name for name in report if name.startswith(f"text_encoder.encoder.layers.{TE1_LAYERS // 4 - 1}.")}
    assert len(never_trained) == 4 and all(report[name]["relative_error"] == 0 for name in never_trained)
    errors = [layer["relative_error"] for name, layer in report.items() if name not in never_trained]
    assert all(0 < error < 1 for error in errors), "each layer's truncation error is measured"
    check = run_script("convert_for_webui.py --check, TIES merge", "convert_for_webui.py", out / "ties.safetensors", "--check")
    assert "every key maps onto SDXL" in check.stdout, check.stdout


def test_ziplora_trains_its_merger_vectors_on_every_shared_layer(plain_lora, edm_on_discrete_lora, work):
    out = work / "zip"
    run_script("merge_lora.py ziplora, 2 steps, full-sdxl", "merge_lora.py", "--model", "full-sdxl", "--lora", plain_lora,
               "--lora", edm_on_discrete_lora, "--method", "ziplora", "--content_prompt", PROMPT, "--style_prompt", PROMPT,
               "--content_data", work / "instance", "--style_data", work / "instance", "--ziplora_steps", 2,
               "--ziplora_resolution", SIZE, "--dtype", "bf16", "--out", out)
    vectors = load_file(out / "ziplora_merger_vectors.safetensors")
    assert len(vectors) == 2 * UNET_LAYERS
    assert len(lora_layers(out / "pytorch_lora_weights.safetensors")) == UNET_LAYERS
    history = json.loads((out / "merge_report.json").read_text())["ziplora"]["history"]
    assert len(history) == 2 and all(math.isfinite(value) for row in history for value in row), history


def test_mjhq_generation_of_two_prompts(full_models, work):
    meta = work / "meta_data.json"
    meta.write_text(json.dumps({"an0": {"category": "animals", "prompt": "a red fox in the snow"},
                                "pe0": {"category": "people", "prompt": "portrait of an old sailor, oil painting"}}))
    gen = work / "mjhq"
    run = run_script("mjhq_fid.py generate full-edm, 2 prompts, 2 steps", "mjhq_fid.py", "generate", "--meta_data", meta,
                     "--gen_dir", gen, "--model", "full-edm", "--num_inference_steps", 2, "--width", SIZE, "--height", SIZE,
                     "--dtype", "bf16", "--batch_size", 2)
    assert "made 2 image(s)" in run.stdout, run.stdout
    assert sorted(p.relative_to(gen).as_posix() for p in gen.rglob("*.png")) == ["animals/an0.png", "people/pe0.png"]


# ---------------------------------------------------------------- single-file checkpoints at SDXL's size

LOAD_AND_COMPARE = """
import json, sys, torch
from safetensors import safe_open
from common.models import load_sdxl_pipeline
folder, file = sys.argv[1], sys.argv[2]
pipe = load_sdxl_pipeline(file, torch.bfloat16)
files = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
         "text_encoder": "text_encoder/model.safetensors", "text_encoder_2": "text_encoder_2/model.safetensors"}
different, compared, dtypes, meta = [], 0, set(), 0
for part, name in files.items():
    state = getattr(pipe, part).state_dict()
    meta += sum(p.is_meta for p in getattr(pipe, part).parameters())
    with safe_open(f"{folder}/{name}", "pt") as handle:
        for key in handle.keys():
            ours = state[key if key in state else key.removeprefix("text_model.")]
            compared += 1
            dtypes.add(str(ours.dtype))
            if not torch.equal(ours, handle.get_tensor(key)):
                different.append(f"{part}.{key}")
print(json.dumps({"compared": compared, "different": different[:5], "dtypes": sorted(dtypes), "meta": meta,
                  "scheduler": type(pipe.scheduler).__name__}))
"""


@pytest.fixture(scope="module")
def full_single_file(full_models, work) -> Path:
    path = work / "full-sdxl.safetensors"
    run_script("python -m common.builtin_models full-sdxl FILE.safetensors (bf16)", "-m", "common.builtin_models", "full-sdxl", path)
    return path


def test_a_full_size_single_file_has_sdxls_keys_loads_back_bit_exact_and_the_uis_read_it_as_sdxl(full_single_file, full_models):
    import hashlib

    from test_single_file import SDXL_BASE_KEYS_SHA256
    from ui_checkpoint_loaders import comfyui_classify, webui_classify

    with safe_open(str(full_single_file), "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        metadata = handle.metadata()
    assert len(shapes) == 2515, "sd_xl_base_1.0.safetensors's tensor count"
    assert hashlib.sha256("\n".join(sorted(shapes)).encode()).hexdigest() == SDXL_BASE_KEYS_SHA256
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base" and metadata["modelspec.resolution"] == "1024x1024"
    on_meta = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    comfyui, webui = comfyui_classify(on_meta), webui_classify(on_meta)
    assert (comfyui["model"], comfyui["model_type"], comfyui["clip_l_found"], comfyui["clip_g_found"]) == ("SDXL", "EPS", True, True)
    assert webui["config"] == "sd_xl_base.yaml"
    compare = run_script("load full-sdxl from its single file and compare every tensor", "-c", LOAD_AND_COMPARE,
                         full_models["full-sdxl"], full_single_file)
    result = json.loads(compare.stdout.strip().splitlines()[-1])
    assert result["compared"] == 1680 + 248 + 196 + 517 and not result["different"] and result["meta"] == 0, result
    assert result["dtypes"] == ["torch.bfloat16"] and result["scheduler"] == "EulerDiscreteScheduler"


def test_two_training_steps_from_the_full_size_single_file(full_single_file, work):
    out = work / "from-single-file"
    run = run_script("train_lora.py, full-sdxl single file", "train_lora.py", "--model", full_single_file, "--instance_data_dir",
                     work / "instance", "--instance_prompt", PROMPT, "--output_dir", out, *COMMON_TRAINING)
    assert "read as epsilon (no flavour keys), bf16 weights" in run.stdout
    assert len(lora_layers(out / "pytorch_lora_weights.safetensors")) == UNET_LAYERS

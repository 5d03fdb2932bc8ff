"""Adapter files arrive whole and sound: every DoRA magnitude reaches every component, a file holding NaN or inf is
refused by every reader, a LoRA weight that overflows the model's dtype is refused, and no file we write names the
machine, its user or their folders."""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert_for_webui
import infer
import merge_lora
from common.cli import UserError
from common.lora_formats import DORA_MAGNITUDE_SUFFIX, LoraSpec, adapter_layers, kohya_module_name, load_loras
from helpers import TEXT_TARGETS, UNET_TARGETS, load_pipe, make_peft_lora, run_cli
from ui_loaders import comfyui_patch, webui_patch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
RANK, ALPHA = 4, 8  # alpha != rank: a scale s = 2 that a wrong alpha rule would show


# ---------------------------------------------------------------- DoRA files and the DoRA formula


def make_text_encoder_dora(model_path: str, folder: Path, seed: int = 0) -> Path:
    """A diffusers-format DoRA on the attention projections of the UNet and both text encoders, written as
    train_lora.py writes one (`save_diffusers_lora`, each component's LoraConfig), with random non-zero factors and
    magnitudes moved off the adapted rows' norms, as training moves them (peft starts them equal)."""
    from peft import LoraConfig, get_peft_model_state_dict

    from common.lora_formats import save_diffusers_lora

    pipe = load_pipe(model_path)
    torch.manual_seed(seed)
    states, configs = {}, {}
    for component, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS)):
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, use_dora=True, init_lora_weights=False)
        model = getattr(pipe, component)
        model.add_adapter(config)
        move_magnitudes(model)
        states[component] = get_peft_model_state_dict(model)
        configs[component] = config.to_dict()
    return save_diffusers_lora(folder, states, configs)


def move_magnitudes(model, spread: float = 0.3) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + spread * torch.randn_like(parameter))


def dora_formula_weights(base, lora: Path, scale: float = ALPHA / RANK) -> dict[tuple[str, str], torch.Tensor]:
    """{(component, module): W'} for each DoRA layer of the file on the pipeline `base`, by the DoRA formula (Liu et al.
    2024, Eq. 5) in float64 from the file's tensors: W' = m (W + s B A) / ||W + s B A||, the norm over each output row."""
    state = load_file(lora)
    merged = {}
    for key in (k for k in state if k.endswith(DORA_MAGNITUDE_SUFFIX)):
        component, module = key.removesuffix(DORA_MAGNITUDE_SUFFIX).split(".", 1)
        down, up = state[f"{component}.{module}.lora_A.weight"].double(), state[f"{component}.{module}.lora_B.weight"].double()
        weight = getattr(base, component).get_submodule(module).weight.detach().double()
        adapted = weight + scale * (up @ down)
        merged[(component, module)] = state[key].double()[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    assert {component for component, _ in merged} == set(COMPONENTS), "the DoRA must reach every component"
    return merged


def save_merged_by_formula(model_path: str, lora: Path, folder: Path, scale: float = ALPHA / RANK) -> Path:
    """The base model with each DoRA layer's weight replaced by the formula's (`dora_formula_weights`), saved as a
    diffusers folder that infer.py reads as a model."""
    pipe = load_pipe(model_path)
    with torch.no_grad():
        for (component, module), weight in dora_formula_weights(pipe, lora, scale).items():
            getattr(pipe, component).get_submodule(module).weight.copy_(weight.float())
    pipe.save_pretrained(folder)
    return folder


def infer_image(capsys, model: str | Path, folder: Path, *lora: str) -> np.ndarray:
    code, _, err = run_cli(infer.app, ["-m", model, "-p", "a photo of sks dog", "--seed", 3, "--num_inference_steps", 2,
                                       "-o", folder, *lora], capsys)
    assert code == 0, err
    (png,) = sorted(folder.glob("*.png"))
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.float64) / 255


@pytest.fixture(scope="module")
def text_encoder_dora(tiny_sdxl_path, tmp_path_factory) -> Path:
    return make_text_encoder_dora(tiny_sdxl_path, tmp_path_factory.mktemp("te_dora"))


def test_a_dora_loads_with_every_components_magnitudes_from_the_file(tiny_sdxl_path, text_encoder_dora):
    """diffusers 0.42.1 + transformers 5.23.0 drop the text encoders' magnitudes on load (they keep peft's initial
    ||W||); `load_loras` puts them back."""
    pipe = load_pipe(tiny_sdxl_path)
    [name] = load_loras(pipe, [LoraSpec(text_encoder_dora)])
    state = load_file(text_encoder_dora)
    for component in COMPONENTS:
        layers = adapter_layers(getattr(pipe, component), name)
        assert layers, component
        for module, layer in layers.items():
            expected = state[f"{component}.{module}{DORA_MAGNITUDE_SUFFIX}"]
            loaded = layer.lora_magnitude_vector[name].weight.detach()
            assert torch.equal(loaded, expected), f"{component}.{module}: off by {float((loaded - expected).abs().max()):.3g}"


def test_a_tensor_that_does_not_arrive_is_refused_naming_its_layer_and_tensor(tiny_sdxl_path, text_encoder_dora, monkeypatch):
    import common.lora_formats as lora_formats

    with monkeypatch.context() as patched:  # the upstream loss, with our repair switched off
        patched.setattr(lora_formats, "_restore_dora_magnitudes", lambda *args: None)
        with pytest.raises(UserError, match=r"text_encoder\.encoder\.layers\.\d\.self_attn\.\w+\.lora_magnitude_vector is up to"):
            load_loras(load_pipe(tiny_sdxl_path), [LoraSpec(text_encoder_dora)])

    pipe = load_pipe(tiny_sdxl_path)
    load_into_unet = pipe.load_lora_into_unet

    def load_then_lose_a_factor(*args, **kwargs):  # a future upstream change that leaves one lora_B at its initial zeros
        load_into_unet(*args, **kwargs)
        layer = next(iter(adapter_layers(pipe.unet, kwargs["adapter_name"]).values()))
        torch.nn.init.zeros_(layer.lora_B[kwargs["adapter_name"]].weight)

    monkeypatch.setattr(pipe, "load_lora_into_unet", load_then_lose_a_factor)
    with pytest.raises(UserError, match=r"did not load as the file holds it: unet\.\S+\.lora_B\.weight is up to"):
        load_loras(pipe, [LoraSpec(text_encoder_dora)])


@pytest.mark.heavy
def test_a_text_encoder_dora_draws_the_image_of_the_base_merged_by_the_dora_formula(tiny_sdxl_path, text_encoder_dora, tmp_path,
                                                                                    capsys):
    merged = save_merged_by_formula(tiny_sdxl_path, text_encoder_dora, tmp_path / "merged_model")
    with_dora = infer_image(capsys, tiny_sdxl_path, tmp_path / "dora", "--lora", text_encoder_dora)
    expected = infer_image(capsys, merged, tmp_path / "merged")
    base = infer_image(capsys, tiny_sdxl_path, tmp_path / "base")
    moved, off = np.abs(expected - base).max(), np.abs(with_dora - expected).max()
    assert moved > 10 / 255, f"the DoRA moves the image by only {moved * 255:.1f}/255: the comparison would mean little"
    assert off <= 2 / 255, f"infer.py's DoRA image is {off * 255:.1f}/255 off the formula's (it moves {moved * 255:.1f}/255)"


def test_a_text_encoder_dora_baked_or_written_for_comfyui_gives_the_formulas_weights_in_the_uis(tiny_sdxl_path, text_encoder_dora,
                                                                                                tmp_path, capsys):
    """The bake (a plain LoRA) through ComfyUI's and WebUI's arithmetic, and the native export's dora_scale through
    ComfyUI's (tests/ui_loaders.py), against the float64 formula, in every component."""
    base = load_pipe(tiny_sdxl_path)
    formula = dora_formula_weights(base, text_encoder_dora)
    layer_names = {kohya_module_name(component, module): (component, module) for component, module in formula}
    for form, options, uis in (("baked", ["--rank", "full"], {"ComfyUI": comfyui_patch, "WebUI": webui_patch}),
                               ("native", ["--dora_native", "comfyui"], {"ComfyUI": comfyui_patch})):
        code, _, err = run_cli(convert_for_webui.app, [text_encoder_dora, "--model", tiny_sdxl_path, "--name", "x", "--save_precision",
                                                       "fp32", "--out", tmp_path / form, *options], capsys)
        assert code == 0, err
        layers: dict[str, dict] = {}
        for key, value in load_file(tmp_path / form / "x.safetensors").items():
            layer, tensor = key.split(".", 1)
            layers.setdefault(layer, {})[tensor] = value
        assert set(layers) == set(layer_names), f"{form}: layers missing or extra"
        for ui, patch in uis.items():
            worst = 0.0
            for layer, tensors in layers.items():
                component, module = layer_names[layer]
                expected = formula[(component, module)]
                patched = patch(getattr(base, component).get_submodule(module).weight.detach(), tensors).double()
                worst = max(worst, float((patched - expected).abs().max() / expected.abs().max()))
            assert worst <= 1e-5, f"{form} in {ui}: largest relative difference from the formula {worst:.2e}"


@pytest.mark.heavy
def test_a_dora_trained_with_its_text_encoders_draws_the_image_of_its_formula(tiny_sdxl_path, tmp_path, capsys):
    """End to end: train_lora.py --use_dora --train_text_encoder, its magnitudes then moved in the file as a longer
    run moves them, infer.py against the base merged by the formula."""
    from training_helpers import train_cli, write_images

    code, _, err = train_cli(capsys, "--model", tiny_sdxl_path, "--instance_data_dir", write_images(tmp_path / "images"),
                             "--instance_prompt", "a photo of sks dog", "--resolution", 64, "--train_batch_size", 2, "--rank", RANK,
                             "--lora_alpha", ALPHA, "--learning_rate", 1e-2, "--max_train_steps", 2, "--use_dora", "--train_text_encoder",
                             "--text_encoder_lr", 1e-2, "--output_dir", tmp_path / "out", "--seed", 0)
    assert code == 0, err
    lora = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora), "pt") as handle:
        metadata = handle.metadata()
    state = load_file(lora)
    generator = torch.Generator().manual_seed(0)
    for key in (k for k in state if k.endswith(DORA_MAGNITUDE_SUFFIX)):
        state[key] = state[key] * (1 + 0.3 * torch.randn(state[key].shape, generator=generator))
    save_file(state, lora, metadata=metadata)
    with_dora = infer_image(capsys, tiny_sdxl_path, tmp_path / "dora", "--lora", tmp_path / "out")
    expected = infer_image(capsys, save_merged_by_formula(tiny_sdxl_path, lora, tmp_path / "merged_model"), tmp_path / "merged")
    base = infer_image(capsys, tiny_sdxl_path, tmp_path / "base")
    moved, off = np.abs(expected - base).max(), np.abs(with_dora - expected).max()
    assert moved > 10 / 255, f"the DoRA moves the image by only {moved * 255:.1f}/255"
    assert off <= 2 / 255, f"infer.py's DoRA image is {off * 255:.1f}/255 off the formula's (it moves {moved * 255:.1f}/255)"


# ---------------------------------------------------------------- files holding NaN or inf


@pytest.fixture(scope="module")
def sound_files(tiny_sdxl_path, tmp_path_factory) -> dict[str, Path]:
    """One file of each kind a reader takes: diffusers/peft LoRA and DoRA, kohya LoRA, LyCORIS LoHa, LoKr and DoRA
    (dora_scale), each with a finite tensor that the tests replace."""
    from adapter_helpers import lycoris_file
    from common.lora_formats import diffusers_lora_to_kohya
    from helpers import make_dora_lora

    folder = tmp_path_factory.mktemp("sound")
    files = {"diffusers LoRA": make_peft_lora(tiny_sdxl_path, folder / "lora", rank=RANK, alpha=ALPHA),
             "diffusers DoRA": make_dora_lora(tiny_sdxl_path, folder / "dora", rank=RANK, alpha=ALPHA)}
    save_file(diffusers_lora_to_kohya(files["diffusers LoRA"])[0], folder / "kohya.safetensors")
    files["kohya LoRA"] = folder / "kohya.safetensors"
    for name in ("loha", "lokr", "dora"):
        files[f"LyCORIS {name}"] = lycoris_file(tiny_sdxl_path, folder, name)
    return files


# (file kind, the tensor to spoil: the first whose name ends so, the value planted)
SPOILED = [("diffusers LoRA", "lora_B.weight", float("nan")), ("diffusers DoRA", "lora_magnitude_vector", float("nan")),
           ("kohya LoRA", "lora_up.weight", float("inf")), ("LyCORIS loha", "hada_w1_a", float("nan")),
           ("LyCORIS lokr", "lokr_w1", float("-inf")), ("LyCORIS dora", "dora_scale", float("nan"))]


def spoil(file: Path, suffix: str, value: float, folder: Path) -> tuple[Path, str]:
    """A copy of `file` (metadata kept) with one element of its first tensor named `*suffix` set to `value`; the copy
    and the tensor's name."""
    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata()
    state = load_file(file)
    key = next(k for k in sorted(state) if k.endswith(suffix))
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / file.name, metadata=metadata)
    return folder / file.name, key


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sdxl_path):
    return load_pipe(tiny_sdxl_path)


@pytest.mark.parametrize("kind, suffix, value", SPOILED, ids=[kind for kind, *_ in SPOILED])
def test_a_non_finite_adapter_file_is_refused_by_every_reader_naming_the_tensor(kind, suffix, value, sound_files, tiny_pipe,
                                                                               tiny_sdxl_path, tmp_path, capsys):
    from common.models import model_modules_on_meta

    file, key = spoil(sound_files[kind], suffix, value, tmp_path / "spoiled")
    what = "nan" if value != value else "inf"
    refusal = re.escape(f"LoRA {str(file)!r} holds non-finite values ({what}) in ") + r"\S*" + re.escape(key.split(".", 1)[-1])
    with pytest.raises(UserError, match=refusal):  # infer.py, gen_class_images.py, mjhq_fid.py, --into_checkpoint
        load_loras(tiny_pipe, [LoraSpec(file, 0.8)])
    assert not tiny_pipe.__dict__.get("_adapter_patch_originals") and not any(tiny_pipe.get_list_adapters().values())
    with pytest.raises(UserError, match=refusal):  # merge_lora.py
        merge_lora.read_input(file, 1.0, model_modules_on_meta(tiny_sdxl_path))
    code, out, err = run_cli(convert_for_webui.app, [file, "--model", tiny_sdxl_path, "--out", tmp_path / "export"], capsys)
    assert code == 2 and re.search(refusal, err), err
    if kind.startswith(("kohya", "LyCORIS")):
        code, out, _ = run_cli(convert_for_webui.app, [file, "--check"], capsys)
        assert code == 1 and f"WebUI breaks: {key} holds non-finite values ({what})" in out, out
        assert "loads as the file means it" not in out


@pytest.mark.parametrize("kind", ["diffusers LoRA", "LyCORIS lokr", "embedding"])
def test_a_non_finite_adapter_given_to_a_sampling_script_is_refused_before_the_model_loads(kind, sound_files, tiny_sdxl_path,
                                                                                          tmp_path, capsys, monkeypatch):
    """infer.py, gen_class_images.py and mjhq_fid.py read their LoRA and embedding files before the model
    (`read_generation_model`): a diverged run's file is refused there, not after the load."""
    import common.models

    monkeypatch.setattr(common.models, "load_sdxl_pipeline", lambda *a, **k: pytest.fail("the model loaded before the refusal"))
    if kind == "embedding":
        file = tmp_path / "spoiled" / "emb.safetensors"
        file.parent.mkdir()
        save_file({"clip_l": torch.full((1, 32), float("nan")), "clip_g": torch.randn(1, 64)}, file)
        option, what, key = "--embedding", "embedding", "clip_l"
    else:
        file, key = spoil(sound_files[kind], "lora_B.weight" if kind == "diffusers LoRA" else "lokr_w1", float("nan"),
                          tmp_path / "spoiled")
        option, what = "--lora", "LoRA"
    code, _, err = run_cli(infer.app, ["-m", tiny_sdxl_path, "--prompt", "a dog", option, file, "--output_dir", tmp_path / "img"],
                           capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{what} {str(file)!r} holds non-finite values (nan) in {key}" in err, err
    assert not (tmp_path / "img").exists()
    if kind != "embedding":  # at weight 0 a LoRA is not applied (`load_loras`): readable is enough, the run goes on
        from common.lora_formats import check_lora_files

        check_lora_files([LoraSpec(file, 0.0)])


def test_a_non_finite_lora_is_refused_before_it_is_baked_into_a_checkpoint(sound_files, tiny_sdxl_path, tmp_path, capsys):
    file, key = spoil(sound_files["kohya LoRA"], "lora_down.weight", float("nan"), tmp_path / "spoiled")
    code, _, err = run_cli(merge_lora.app, ["-m", tiny_sdxl_path, "--lora", file, "--into_checkpoint", tmp_path / "baked.safetensors"],
                           capsys)
    assert code == 2 and f"holds non-finite values (nan) in {key}" in err, err
    assert not (tmp_path / "baked.safetensors").exists()


def test_a_non_finite_embedding_is_refused_by_every_reader_naming_its_table(sound_files, tiny_pipe, tiny_sdxl_path, tmp_path, capsys):
    from common.models import model_modules_on_meta
    from common.tokens import EmbeddingSpec, load_embedding

    folder = tmp_path / "trained"
    folder.mkdir()
    save_file(load_file(sound_files["diffusers LoRA"]), folder / "pytorch_lora_weights.safetensors")
    clip_g = torch.randn(2, 64)
    clip_g[1, 5] = float("inf")
    save_file({"clip_l": torch.randn(2, 32), "clip_g": clip_g}, folder / "trained_emb.safetensors")
    refusal = f"embedding {str(folder / 'trained_emb.safetensors')!r} holds non-finite values (inf) in clip_g: it cannot be applied"
    with pytest.raises(UserError, match=re.escape(refusal)):  # infer.py --embedding
        load_embedding(tiny_pipe, EmbeddingSpec(folder / "trained_emb.safetensors"))
    assert "<s0>" not in tiny_pipe.tokenizer.get_vocab()
    with pytest.raises(UserError, match=re.escape(refusal)):  # merge_lora.py, before any merging
        merge_lora.read_input(folder, 1.0, model_modules_on_meta(tiny_sdxl_path))
    code, out, _ = run_cli(convert_for_webui.app, [folder / "trained_emb.safetensors", "--check"], capsys)
    assert code == 1 and "clip_g holds non-finite values (inf)" in out, out
    code, _, err = run_cli(convert_for_webui.app, [folder, "--out", tmp_path / "export"], capsys)
    assert code == 2 and refusal in err, err


# ---------------------------------------------------------------- LoRA weights that overflow the model's dtype


def test_an_adapted_weight_beyond_float16_but_within_float32_is_refused_in_float16_only():
    from common.adapters import adapted_weight_overflow, fits_dtype, lora_change_bound

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(16, 8, generator=generator)
    up, down = torch.randn(16, 2, generator=generator), torch.randn(2, 8, generator=generator)
    change = up @ down
    assert lora_change_bound(up, down) >= float(change.abs().max())
    weight = 1e5 / float(change.abs().max())  # W + weight ΔW reaches about 1e5: beyond float16's 65504
    assert adapted_weight_overflow(base, change, weight, torch.float32) is None
    limit = adapted_weight_overflow(base, change, weight, torch.float16)
    assert limit is not None and 0.5 * weight < limit < weight, (limit, weight)
    assert fits_dtype(base + limit * change, torch.float16), "the weight named as fitting must fit"
    assert adapted_weight_overflow(base, change, 1e9, torch.float16) == pytest.approx(limit)
    assert adapted_weight_overflow(base, change, -weight, torch.float16) == pytest.approx(limit)
    assert adapted_weight_overflow(base, change, 0.9 * limit, torch.float16) is None


def largest_fitting(message: str) -> float:
    return float(re.search(r"weights up to (\S+) fit", message).group(1))


def test_a_peft_lora_weight_beyond_the_models_dtype_is_refused_and_removed(sound_files, tiny_sdxl_path):
    pipe = load_pipe(tiny_sdxl_path)
    file = sound_files["diffusers LoRA"]
    with pytest.raises(UserError, match=re.escape(f"LoRA {str(file)!r} at weight 1e+39 takes the weight of ") +
                       r"\S+ and \d+ more layer\(s\) beyond the range of float32 \(±3\.40282e\+38\): weights up to \S+ fit") as refused:
        load_loras(pipe, [LoraSpec(file, 1e39)])
    assert not any(pipe.get_list_adapters().values()), "a refused adapter does not stay in the model"
    fitting = largest_fitting(str(refused.value))
    assert 1e36 < fitting < 1e39
    load_loras(pipe, [LoraSpec(file, fitting)])  # the weight the message names loads


def test_a_kohya_lora_weight_beyond_the_models_dtype_is_refused_with_its_patches_undone(sound_files, tiny_sdxl_path):
    from common.adapters import unpatch_weights

    pipe, base = load_pipe(tiny_sdxl_path), load_pipe(tiny_sdxl_path)
    file = sound_files["kohya LoRA"]
    load_loras(pipe, [LoraSpec(file, 1.0)])  # an earlier patch on the same layers, which the refusal must keep
    patched = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(UserError, match=re.escape(f"LoRA {str(file)!r} at weight -1e+39 takes ") + r"\S+'s weight beyond the range "
                       r"of float32 \(±3\.40282e\+38\): weights up to \S+ fit") as refused:
        load_loras(pipe, [LoraSpec(file, -1e39)])
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, patched[k])]
    assert not changed, f"{len(changed)} weights stay changed after the refusal, e.g. {changed[0]}"
    unpatch_weights(pipe)
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items()), "unpatching gives the base"
    fitting = largest_fitting(str(refused.value))
    load_loras(pipe, [LoraSpec(file, -fitting)])


# ---------------------------------------------------------------- no local paths, user or host names in what we write


def local_names() -> tuple[list[str], set[str]]:
    """(strings no metadata may contain: the home folder; words no metadata may hold: the user's and the host's names)."""
    return [os.path.expanduser("~")], {getpass.getuser(), socket.gethostname()}


def metadata_leaks(folder: Path, paths: list[str]) -> list[str]:
    """`file: key` for each metadata value of a .safetensors under `folder` that holds one of `paths`, the home folder,
    or the user's or host's name as a word."""
    strings, words = local_names()
    leaks = []
    files = sorted(folder.rglob("*.safetensors"))
    assert files, f"no .safetensors under {folder}"
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for key, value in (handle.metadata() or {}).items():
                if any(s in value for s in [*paths, *strings]) or words & set(re.split(r"[^A-Za-z0-9_.-]+", value)):
                    leaks.append(f"{file.relative_to(folder)}: {key}")
    return leaks


def test_public_model_names_keep_hub_ids_and_drop_local_folders(tmp_path):
    from common.lora_formats import public_model_name

    assert public_model_name("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert public_model_name("tiny-sdxl") == "tiny-sdxl"
    assert public_model_name(str(tmp_path / "models" / "my_sdxl")) == "my_sdxl"
    assert public_model_name("~/models/sdxl.safetensors") == "sdxl.safetensors"
    assert public_model_name("") == ""


def test_saved_and_exported_files_name_no_local_folder(sound_files, tiny_sdxl_path, tmp_path, capsys):
    """A training folder whose LoraConfigs and training_args.json hold absolute paths (peft's to_dict keeps the path it
    was given), written by save_diffusers_lora and exported both ways: no metadata names those folders, the user or the
    machine."""
    from peft import LoraConfig

    from common.lora_formats import save_diffusers_lora

    trained = tmp_path / "trained"
    state = load_file(sound_files["diffusers LoRA"])
    states = {c: {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == c} for c in COMPONENTS}
    configs = {c: LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_TARGETS if c == "unet" else TEXT_TARGETS,
                             base_model_name_or_path=f"{tiny_sdxl_path}/{c}").to_dict() for c in COMPONENTS}
    save_diffusers_lora(trained, states, configs)
    (trained / "training_args.json").write_text(json.dumps({"pretrained_model_name_or_path": tiny_sdxl_path, "rank": RANK}))
    for argv in ([trained, "--out", tmp_path / "exported"],
                 [tmp_path / "exported" / "trained.safetensors", "--to", "diffusers", "--out", tmp_path / "back"]):
        code, _, err = run_cli(convert_for_webui.app, argv, capsys)
        assert code == 0, err
    assert not metadata_leaks(tmp_path, [tiny_sdxl_path, str(tmp_path)])
    with safe_open(str(trained / "pytorch_lora_weights.safetensors"), "pt") as handle:
        configs = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert configs["unet.lora_alpha"] == ALPHA and configs["unet.r"] == RANK, "the config that loading reads stays"


@pytest.mark.heavy
def test_a_training_run_given_absolute_paths_writes_none_of_them(tiny_sdxl_path, tmp_path, capsys):
    from training_helpers import train_cli, write_images

    model, out = str(Path(tiny_sdxl_path).resolve()), (tmp_path / "run").resolve()
    code, _, err = train_cli(capsys, "--model", model, "--instance_data_dir", write_images(tmp_path / "images"), "--instance_prompt",
                             "a photo of sks dog", "--resolution", 64, "--train_batch_size", 2, "--rank", RANK, "--max_train_steps", 2,
                             "--train_text_encoder", "--output_dir", out, "--seed", 0)
    assert code == 0, err
    runs = [(merge_lora.app, ["-m", model, "--lora", out, "--lora", out, "--kohya", "--out", tmp_path / "merged"]),
            (convert_for_webui.app, [out, "--name", "run", "--out", tmp_path / "exported"])]
    for app, argv in runs:
        code, _, err = run_cli(app, argv, capsys)
        assert code == 0, err
    assert not metadata_leaks(tmp_path, [model, str(out), str(tmp_path)])

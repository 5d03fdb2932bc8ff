"""Single files out: merge_lora.py --into_checkpoint bakes adapters of any type into a checkpoint that draws the image
of the base with the adapters, keeps the base's flavour markers (read by ComfyUI's and WebUI's rules as the base's),
and leaves embeddings beside it; `python -m common.builtin_models NAME FILE.safetensors` writes a built-in model."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from adapter_helpers import lycoris_file
from checkpoint_helpers import sdxl_key_set, tiny_checkpoint, v_pred_markers
from helpers import make_dora_lora, make_peft_lora, run_cli

MARKERS = ("v_pred", "ztsnr", "edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bake")


def bake(capsys, model, out, *loras, extra=()):
    import merge_lora

    argv = ["--model", model, "--into_checkpoint", out]
    for lora in loras:
        argv += ["--lora", lora]
    return run_cli(merge_lora.app, [*argv, *extra], capsys)


def image(capsys, out, *args) -> np.ndarray:
    import infer

    code, _, err = run_cli(infer.app, [*args, "--prompt", "a photo of a dog", "--seed", "5", "--num_inference_steps", "3",
                                       "--output_dir", out], capsys)
    assert code == 0, err
    return np.asarray(Image.open(sorted(out.glob("*.png"))[-1])).astype(int)


@pytest.fixture(scope="module")
def base_image(tiny_sdxl_path, work):
    return image(None, work / "base-image", "--model", tiny_sdxl_path)


def adapter(kind: str, base: str, folder):
    if kind == "lora":
        return make_peft_lora(base, folder / "lora", seed=1)
    if kind == "dora":
        return make_dora_lora(base, folder / "dora", seed=2)
    return lycoris_file(base, folder, "lokr", seed=3)


@pytest.mark.parametrize("kind", ["lora", "lokr", "dora"])
@pytest.mark.heavy
def test_a_baked_checkpoint_draws_the_image_of_the_base_with_the_adapter(kind, tiny_sdxl_path, work, base_image, capsys):
    folder = work / kind
    folder.mkdir()
    file = adapter(kind, tiny_sdxl_path, folder)
    baked = folder / "baked.safetensors"
    code, out, err = bake(capsys, tiny_sdxl_path, baked, f"{file}:0.8", extra=("--save_precision", "fp32"))
    assert code == 0, err
    assert f"writing {baked}: 889 tensors" in out and "GiB in fp32" in out
    with_adapter = image(capsys, folder / "adapter", "--model", tiny_sdxl_path, "--lora", f"{file}:0.8")
    from_checkpoint = image(capsys, folder / "baked", "--model", baked)
    assert np.abs(from_checkpoint - with_adapter).max() <= 2, "within 2/255 of the base with the adapter"
    assert np.abs(with_adapter - base_image).max() > 10, "the adapter moves the image far more than that"


@pytest.mark.parametrize("flavour", ["v-prediction with zero-terminal SNR", "EDM (Playground v2.5)", "EDM v-prediction (CosXL)"])
def test_the_bake_keeps_the_bases_flavour_and_the_uis_read_it_so(flavour, tiny_sdxl_path, work, capsys):
    from common.models import read_model
    from ui_checkpoint_loaders import comfyui_classify, webui_classify

    folder = work / "".join(c for c in flavour if c.isalnum())
    folder.mkdir(exist_ok=True)
    if flavour.startswith("v-"):
        base = tiny_checkpoint(folder, markers=v_pred_markers(), file_name="base.safetensors")
    elif "CosXL" in flavour:
        base = tiny_checkpoint(folder, markers={"edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)},
                               file_name="base.safetensors")
    else:
        base = tiny_checkpoint(folder, "tiny-edm")
    lora = make_peft_lora(tiny_sdxl_path, folder / "lora", text_encoders=False)
    baked = folder / "baked.safetensors"
    code, out, err = bake(capsys, base, baked, lora)
    assert code == 0, err
    assert f"{flavour} (as its base)" in out
    with safe_open(str(base), "pt") as before, safe_open(str(baked), "pt") as after:
        markers = {k: before.get_tensor(k) for k in before.keys() if k in MARKERS}
        assert markers and {k for k in after.keys() if k in MARKERS} == set(markers)
        assert all(torch.equal(after.get_tensor(k), markers[k].to(after.get_tensor(k).dtype)) for k in markers)
        metadata = after.metadata()
    assert read_model(str(baked)).base.flavour == read_model(str(base)).base.flavour
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base" and metadata["modelspec.title"] == "baked"
    v = "v" if "v-pred" in flavour else "epsilon"
    assert metadata["modelspec.prediction_type"] == metadata["modelspec.predict_key"] == v
    assert metadata["modelspec.merged_from"] == f"{base.name}, pytorch_lora_weights.safetensors"
    assert not any(str(folder) in value for value in metadata.values()), "no local path in a shared file"
    # the UIs classify by the UNet's shapes: the baked markers, on SDXL's own key set
    comfyui = comfyui_classify({**sdxl_key_set(), **markers})
    expected = {"v-prediction with zero-terminal SNR": ("V_PREDICTION", True), "EDM (Playground v2.5)": ("EDM", False),
                "EDM v-prediction (CosXL)": ("V_PREDICTION_EDM", False)}[flavour]
    assert (comfyui["model"], comfyui["model_type"], bool(comfyui["zsnr"])) == ("SDXL", *expected)
    if flavour.startswith("v-"):
        webui = webui_classify({**sdxl_key_set(), **markers})
        assert (webui["config"], webui["v_prediction"], webui["ztsnr"]) == ("sd_xl_v.yaml", True, True)


def test_an_embedding_goes_beside_the_checkpoint_and_the_command_says_so(tiny_sdxl_path, work, capsys):
    from common.tokens import read_embedding, save_embedding

    folder = work / "with-embedding"
    make_peft_lora(tiny_sdxl_path, folder, text_encoders=False)
    rows_l, rows_g = torch.randn(2, 32), torch.randn(2, 64)
    save_embedding(folder / "icons_emb.safetensors", rows_l, rows_g, ["<s0>", "<s1>"])
    code, out, err = bake(capsys, tiny_sdxl_path, work / "icons.safetensors", folder)
    assert code == 0, err
    assert "the pivotal-tuning embedding cannot go into a checkpoint: it is written beside it" in out
    beside_l, beside_g = read_embedding(work / "icons_emb.safetensors")
    assert torch.equal(beside_l, rows_l) and torch.equal(beside_g, rows_g)


@pytest.mark.parametrize("case", ["method", "exists", "suffix", "out too", "blora count"])
def test_bake_refusals_are_one_line_and_write_nothing(case, tiny_sdxl_path, work, capsys):
    lora = make_peft_lora(tiny_sdxl_path, work / "refusals", text_encoders=False) if not (work / "refusals").exists() else (
        work / "refusals" / "pytorch_lora_weights.safetensors")
    target = work / f"refused-{case.replace(' ', '-')}.safetensors"
    extra, expected = {
        "method": (["--method", "ties"], "not --method ties: merge with it into --out first"),
        "exists": ([], "exists; pass --force to replace it"),
        "suffix": ([], "a checkpoint is written as .safetensors"),
        "out too": (["--out", work / "merged"], "give one of them"),
        "blora count": (["--method", "blora"], "--blocks names one block per input"),
    }[case]
    if case == "exists":
        target.write_bytes(b"earlier")
    if case == "suffix":
        target = target.with_suffix(".ckpt")
    code, _, err = bake(capsys, tiny_sdxl_path, target, lora, extra=extra)
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert (target.read_bytes() == b"earlier") if case == "exists" else not target.exists()


def test_python_m_common_builtin_models_writes_a_single_file_and_never_overwrites_one(work, tiny_edm_path, monkeypatch, capsys):
    from common import builtin_models
    from common.models import read_model

    target = work / "tiny-edm-cli.safetensors"
    monkeypatch.setattr(sys, "argv", ["builtin_models", "tiny-edm", str(target)])
    builtin_models._main()
    written = target.stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_:
        builtin_models._main()
    assert exit_.value.code == 2 and "exists; pass --force to replace it" in capsys.readouterr().err
    assert target.stat().st_mtime_ns == written
    reading, folder = read_model(str(target)), read_model(tiny_edm_path)
    assert reading.base.flavour.name == folder.base.flavour.name == "EDM (Playground v2.5)"
    assert reading.base.flavour.latents_std == pytest.approx(folder.base.flavour.latents_std)
    assert reading.checkpoint.dtype == "float32" and not reading.base.warnings

"""Pivotal tuning, text-encoder LoRA, prior preservation and gen_class_images.py on the tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from common.tokens import NewTokenRows, abstraction_tokens, expand_abstractions
from helpers import free_port, load_pipe, run_cli
from training_helpers import train_cli, write_images

REPO = Path(__file__).resolve().parents[1]
RECIPE = ["--train_text_encoder_ti", "--train_text_encoder_ti_frac=0.5", "--token_abstraction=TOK",
          "--instance_prompt=3d icon in the style of TOK",
          "--validation_prompt=a TOK icon of an astronaut riding a horse, in the style of TOK",
          "--optimizer=prodigy", "--learning_rate=1.0", "--text_encoder_lr=1.0", "--snr_gamma=5.0", "--rank=8",
          "--repeats=1", "--lr_scheduler=constant", "--lr_warmup_steps=0", "--mixed_precision=no"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("icons"))


def test_abstractions_expand_to_their_own_tokens_longest_first():
    mapping = abstraction_tokens(["TOK", "TOK2"], 2)
    assert mapping == {"TOK": ["<s0>", "<s1>"], "TOK2": ["<s2>", "<s3>"]}
    assert expand_abstractions("TOK meets TOK2", mapping) == "<s0><s1> meets <s2><s3>"


def test_only_new_rows_receive_gradients_and_original_rows_stay_bit_identical():
    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 4)
    table.requires_grad_(False)
    before = table.weight.clone()
    rows = NewTokenRows(table, torch.randn(2, 4))
    ids = torch.tensor([[1, 10, 11, 3]])
    output = rows(ids)
    torch.testing.assert_close(output[0, 1:3], rows.new_rows.detach())
    torch.testing.assert_close(output[0, [0, 3]], before[[1, 3]])
    optimizer = torch.optim.AdamW(rows.parameters(), lr=0.1, weight_decay=0.1)
    output.pow(2).sum().backward()
    optimizer.step()
    assert [n for n, p in rows.named_parameters() if p.requires_grad] == ["new_rows"]
    assert torch.equal(table.weight, before)
    assert rows.weight.shape == (12, 4)


def test_sdxl_caption_encoding_equals_the_pipelines_encode_prompt(tiny_sdxl_path):
    from train_lora import encode_captions

    pipe = load_pipe(tiny_sdxl_path)
    for clip_skip in (None, 1):
        with torch.no_grad():
            ours = encode_captions([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                   ["a photo of a dog", "a cat"], clip_skip, "cpu")
            embeds, _, pooled, _ = pipe.encode_prompt(["a photo of a dog", "a cat"], device="cpu",
                                                      do_classifier_free_guidance=False, clip_skip=clip_skip)
        torch.testing.assert_close(ours[0], embeds)
        torch.testing.assert_close(ours[1], pooled)


def test_pivotal_tuning_writes_an_embedding_that_diffusers_loads_to_the_trained_embeddings(tiny_sdxl_path, images, tmp_path, capsys):
    out = tmp_path / "runs" / "icons"
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--resolution", 64,
                             "--output_dir", out, "--max_train_steps", 4, "--checkpointing_steps", 1, "--seed", 0,
                             "--train_batch_size", 2, "--train_text_encoder_ti", "--train_text_encoder_ti_frac", 0.5,
                             "--instance_prompt", "3d icon in the style of TOK", "--text_encoder_lr", 1e-2)
    assert code == 0, err
    embedding = load_file(out / "icons_emb.safetensors")
    assert embedding["clip_l"].shape == (2, 32) and embedding["clip_g"].shape == (2, 64)
    per_step = [load_file(out / f"checkpoint-{k}" / "icons_emb.safetensors") for k in (1, 2, 3, 4)]
    assert not torch.equal(per_step[0]["clip_l"], per_step[1]["clip_l"]), "rows train before the pivot (step 2)"
    for later in per_step[2:]:
        assert torch.equal(later["clip_l"], per_step[1]["clip_l"]) and torch.equal(later["clip_g"], per_step[1]["clip_g"])
    assert torch.equal(per_step[3]["clip_g"], embedding["clip_g"])
    trained_rows = load_file(out / "checkpoint-4" / "text_encoder_2.safetensors")
    assert torch.equal(next(v for k, v in trained_rows.items() if "new_rows" in k), embedding["clip_g"])

    # the trained text path: frozen tables plus the trained rows
    trained = load_pipe(tiny_sdxl_path)
    for tokenizer, encoder, key in ((trained.tokenizer, trained.text_encoder, "clip_l"), (trained.tokenizer_2, trained.text_encoder_2, "clip_g")):
        tokenizer.add_tokens(["<s0>", "<s1>"])
        encoder.set_input_embeddings(NewTokenRows(encoder.get_input_embeddings(), embedding[key]))
    # a fresh pipeline and diffusers' own loader
    fresh = load_pipe(tiny_sdxl_path)
    fresh.load_textual_inversion(embedding["clip_l"], token=["<s0>", "<s1>"], text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer)
    fresh.load_textual_inversion(embedding["clip_g"], token=["<s0>", "<s1>"], text_encoder=fresh.text_encoder_2, tokenizer=fresh.tokenizer_2)
    prompt = "3d icon in the style of <s0><s1>"
    with torch.no_grad():
        expected = trained.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        loaded = fresh.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    # The rows are bit-identical (above), but the two pipelines reach the encoders through other modules (our row
    # table, diffusers' resized embedding), another code path whose float32 kernels may round the last bits
    # differently on some CPUs: agreement to 1e-5 relative, about a hundred float32 ulps, is the claim.
    torch.testing.assert_close(loaded[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded[2], expected[2], rtol=1e-5, atol=1e-6)
    card = (out / "README.md").read_text()
    assert "`TOK` -> `<s0><s1>`" in card and "load_textual_inversion" in card and "<lora:icons:1>" in card


@pytest.mark.heavy
def test_text_encoder_lora_is_saved_and_loads_with_load_lora_weights(tiny_sdxl_path, images, tmp_path, capsys):
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = tmp_path / "te"
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", "a photo of sks dog",
                             "--resolution", 64, "--output_dir", out, "--max_train_steps", 2, "--train_text_encoder",
                             "--text_encoder_lr", 1e-3, "--rank", 4, "--clip_skip", 1)
    assert code == 0, err
    state = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in state) and any(k.startswith("text_encoder_2.") for k in state)
    kohya = load_file(out / "te.safetensors")
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)
    for file in (out / "pytorch_lora_weights.safetensors", out / "te.safetensors"):
        pipe = load_pipe(tiny_sdxl_path)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            projections = 4 * encoder.config.num_hidden_layers  # q, k, v and out of every attention layer
            assert sum(isinstance(m, BaseTunerLayer) for m in encoder.modules()) == projections, file.name


def test_prior_preservation_loss_is_instance_plus_weighted_class_loss():
    from common.losses import prior_preservation_loss

    instance, classes = torch.tensor([1.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    assert prior_preservation_loss(instance, classes, 0.5).item() == pytest.approx(2.0 + 0.5 * 20.0)


def test_batch_loss_with_prior_preservation_on_a_hand_built_batch(tiny_sdxl_path, images, tmp_path):
    """One forward pass over instance and class rows; the result splits them and weights the class half."""
    import train_lora
    from training_helpers import reset_accelerate

    reset_accelerate()
    from accelerate import Accelerator

    class RowMeans:  # a formulation whose per-sample loss is the mean of each latent
        def loss(self, network, x0, mask=None):
            return x0.flatten(1).mean(1)

    class Text:
        def embed(self, captions, step):
            return torch.zeros(len(captions), 77, 96), torch.zeros(len(captions), 64)

    def fake_batch(values):
        return {"index": torch.arange(len(values)), "time_ids": torch.zeros(len(values), 6), "captions": ["a"] * len(values),
                "latent_mean": torch.stack([torch.full((4, 8, 8), v) for v in values]), "latent_std": torch.zeros(len(values), 4, 8, 8)}

    pipe = load_pipe(tiny_sdxl_path)
    raw_instance, raw_class = [1.0, 2.0], [4.0, 8.0]
    batch_loss = train_lora.BatchLoss(pipe=pipe, unet=pipe.unet, caption_encoder=Text(), formulation=RowMeans(),
                                      accelerator=Accelerator(), prior_loss_weight=0.25)
    loss = batch_loss(fake_batch(raw_instance), fake_batch(raw_class), step=0)
    scale = pipe.vae.config.scaling_factor  # latents are normalised as the base model expects
    expected = scale * (sum(raw_instance) / 2 + 0.25 * sum(raw_class) / 2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("edm", [False, True], ids=["ddpm", "edm"])
@pytest.mark.parametrize("prior", [False, True], ids=["no-prior", "prior"])
def test_the_advanced_recipe_command_runs_as_written(edm, prior, tiny_sdxl_path, images, tmp_path, capsys):
    extra = ["--edm"] if edm else []
    if prior:
        extra += ["--with_prior_preservation", "--class_data_dir", tmp_path / "class", "--class_prompt", "3d icon",
                  "--num_class_images", 2, "--sample_batch_size", 2]
    code, out, err = train_cli(capsys, f"--pretrained_model_name_or_path={tiny_sdxl_path}", f"--instance_data_dir={images}",
                               f"--output_dir={tmp_path / 'out'}", "--resolution=64", "--train_batch_size=2",
                               "--max_train_steps=4", "--checkpointing_steps=100", *RECIPE, *extra)
    assert code == 0, err
    assert (tmp_path / "out" / "out_emb.safetensors").is_file() and (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    if prior:
        assert "made 2 class image(s)" in out and "2 class images" in out
        assert sorted(p.name for p in (tmp_path / "class").iterdir()) == ["class_000000.png", "class_000001.png"]


def run_gen(capsys, *argv):
    import gen_class_images
    from training_helpers import reset_accelerate

    reset_accelerate()
    return run_cli(gen_class_images.app, [str(a) for a in argv], capsys)


def gen_args(model: str, folder: Path, count: int) -> list:
    return ["-m", model, "--class_prompt", "a photo of a dog", "--class_data_dir", folder, "--num_class_images", count,
            "--num_inference_steps", 3, "--sample_batch_size", 2, "--seed", 11]


@pytest.mark.heavy
def test_two_processes_make_the_same_class_images_as_one(tiny_sdxl_path, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # same kernels in both runs
    for processes, folder in ((1, "one"), (2, "two")):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port()),
                   "gen_class_images.py", *map(str, gen_args(tiny_sdxl_path, tmp_path / folder, 5))]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two] == [f"class_{i:06d}.png" for i in range(5)]
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert len({p.read_bytes() for p in one}) == 5, "every image differs"


@pytest.mark.heavy
def test_a_larger_count_adds_images_and_a_truncated_one_is_made_again(tiny_sdxl_path, tmp_path, capsys):
    folder = tmp_path / "class"
    assert run_gen(capsys, *gen_args(tiny_sdxl_path, folder, 3))[0] == 0
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    Image.new("RGB", (8, 8)).save(folder / "my_own_photo.png")  # real class photos count too, in any format we train on
    Image.new("RGB", (8, 8)).save(folder / "scanned_photo.tif")
    code, out, _ = run_gen(capsys, *gen_args(tiny_sdxl_path, folder, 6))
    assert code == 0 and "made 1 image(s)" in out
    assert sorted(p.name for p in folder.iterdir()) == sorted([*first, "class_000003.png", "my_own_photo.png", "scanned_photo.tif"])
    broken = folder / "class_000001.png"
    broken.write_bytes(first["class_000001.png"][: len(first["class_000001.png"]) // 2])
    code, out, _ = run_gen(capsys, *gen_args(tiny_sdxl_path, folder, 6))
    assert code == 0 and "made 1 image(s)" in out
    import io

    import numpy as np

    remade = np.asarray(Image.open(broken), dtype=int)
    original = np.asarray(Image.open(io.BytesIO(first["class_000001.png"])), dtype=int)
    # made alone now, in a batch of two before: the same seed, up to one level of rounding
    assert np.abs(remade - original).max() <= 1


@pytest.mark.heavy
def test_everything_at_once_in_bf16_on_an_edm_base(tiny_edm_path, images, tmp_path, capsys):
    """bf16 autocast with pivotal rows, text LoRA, DoRA, cached latents, class images made by the bf16 UNet
    beside the fp32 VAE, soft Min-SNR under EDM, and validation images."""
    code, out, err = train_cli(capsys, "-m", tiny_edm_path, "--instance_data_dir", images, "--instance_prompt", "3d icon of TOK",
                               "--resolution", 64, "--output_dir", tmp_path / "all", "--max_train_steps", 2, "--mixed_precision", "bf16",
                               "--train_text_encoder_ti", "--train_text_encoder", "--use_dora", "--cache_latents",
                               "--with_prior_preservation", "--class_data_dir", tmp_path / "class", "--class_prompt", "3d icon",
                               "--num_class_images", 2, "--snr_gamma", 5, "--snr_weighting", "soft",
                               "--validation_prompt", "a TOK icon", "--validation_epochs", 1, "--num_validation_images", 1)
    assert code == 0, err
    assert (tmp_path / "all" / "all_emb.safetensors").is_file()
    assert len(list((tmp_path / "all" / "validation").rglob("*.png"))) == 2
    state = load_file(tmp_path / "all" / "pytorch_lora_weights.safetensors")
    assert any("lora_magnitude_vector" in k for k in state), "DoRA magnitudes are saved"

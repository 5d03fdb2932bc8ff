"""Long prompts in 75-token chunks (common/long_prompts.py, --max_token_length) against ComfyUI's own arithmetic,
today's encoding of short prompts, the UNet's reading of repeated conditioning, and infer.py end to end."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from common.generation import ImageJob, SamplingSettings, run_batch
from common.long_prompts import count_cut_tokens, encode_long_prompts, pipeline_prompt_embeds, prompt_chunks
from common.prompt_syntax import Tokens, comfyui_chunks
from helpers import load_pipe, parse_webui_parameters, run_cli

PHRASE = "a photo of a dog on the beach, golden hour, "  # 12 tokens
PROMPT_160 = PHRASE * 13 + "with a red ball"  # 160 tokens: chunks of 75, 75 and 10
PROMPT_100 = PHRASE * 8 + "with a red ball"  # 100 tokens: chunks of 75 and 25


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_path):
    return load_pipe(tiny_sdxl_path)


def text_parts(pipe):
    return [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]


# ---------------------------------------------------------------- ComfyUI's arithmetic, transcribed from its source
# comfyanonymous/ComfyUI, comfy/sd1_clip.py at b55c2247 (SDTokenizer.tokenize_with_weights, SDClipModel.forward,
# ClipTokenWeightEncoder.encode_token_weights), comfy/sdxl_clip.py at 565d6747 (SDXLClipGTokenizer, SDXLClipModel),
# comfy/clip_model.py at 22100a77 (CLIPTextModel_: intermediate output, pooling). Weights are all 1.0 and dropped.

def comfyui_reshape(groups: list[list[int]], start_token: int, end_token: int, pad_token: int) -> list[list[int]]:
    """The "reshape token array to CLIP input size" loop of SDTokenizer.tokenize_with_weights, line by line."""
    max_length, max_word_length = 77, 8
    batched_tokens = []
    batch = [start_token]
    batched_tokens.append(batch)
    for t_group in groups:
        is_large = len(t_group) >= max_word_length
        has_end_token = 1
        while len(t_group) > 0:
            if len(t_group) + len(batch) > max_length - has_end_token:
                remaining_length = max_length - len(batch) - has_end_token
                if is_large:
                    batch.extend(t_group[:remaining_length])
                    batch.append(end_token)
                    t_group = t_group[remaining_length:]
                else:
                    batch.append(end_token)
                    batch.extend([pad_token] * remaining_length)
                batch = [start_token]
                batched_tokens.append(batch)
            else:
                batch.extend(t_group)
                t_group = []
    batch.append(end_token)
    batch.extend([pad_token] * (max_length - len(batch)))
    return batched_tokens


def comfyui_tokenize(clip_tokenizer, text: str, pad_with_end: bool) -> list[list[int]]:
    """SDTokenizer: start and end from tokenizer(''), pad with the end token (clip_l) or 0 (SDXLClipGTokenizer);
    an unweighted prompt without embeddings is one segment, tokenised whole without its start and end."""
    empty = clip_tokenizer("")["input_ids"]
    start_token, end_token = empty[0], empty[1]
    pad_token = end_token if pad_with_end else 0
    return comfyui_reshape([clip_tokenizer(text, verbose=False)["input_ids"][1:-1]], start_token, end_token, pad_token)


def comfyui_encode(encoder, chunks: list[list[int]]):
    """SDClipModel.forward with layer="hidden", layer_idx=-2, layer_norm_hidden_state=False, then
    encode_token_weights: (torch.cat of the chunks' states along the sequence, the first chunk's pooled)."""
    tokens = torch.LongTensor(chunks)
    states = encoder(tokens, output_hidden_states=True).hidden_states
    layer_outputs = states[1:]  # transformers' states[0] is the embedding, ComfyUI counts layers from the first
    intermediate = layer_outputs[len(layer_outputs) - 2]  # CLIPEncoder: intermediate_output -2 -> len(layers) - 2
    final_layer_norm = next(m for name, m in encoder.named_modules() if name.endswith("final_layer_norm"))
    x = final_layer_norm(layer_outputs[-1])
    eos_token_id = 49407
    pooled_output = x[torch.arange(x.shape[0]), (tokens == eos_token_id).int().argmax(dim=-1)]
    projected = encoder.text_projection(pooled_output) if hasattr(encoder, "text_projection") else pooled_output
    output = [intermediate[k : k + 1] for k in range(len(chunks))]
    return torch.cat(output, dim=-2), projected[0:1]


def comfyui_sdxl_conditioning(pipe, text: str):
    """SDXLTokenizer + SDXLClipModel.encode_token_weights: clip_l and clip_g side by side, cut to the shorter, and
    clip_g's pooled. ComfyUI's clip_g tokenizer is CLIP's own (its `!` is an ordinary token), so the first
    tokenizer serves both here; the prompt has no `!`, where diffusers' second tokenizer would differ."""
    l_out, _ = comfyui_encode(pipe.text_encoder, comfyui_tokenize(pipe.tokenizer, text, pad_with_end=True))
    g_out, g_pooled = comfyui_encode(pipe.text_encoder_2, comfyui_tokenize(pipe.tokenizer, text, pad_with_end=False))
    cut_to = min(l_out.shape[1], g_out.shape[1])
    return torch.cat([l_out[:, :cut_to], g_out[:, :cut_to]], dim=-1), g_pooled


# ---------------------------------------------------------------- tests

def test_group_chunking_is_comfyuis_loop_for_groups_of_every_length():
    """Word groups of 1 to 90 tokens, long and short mixed: a group of 8 or more is cut at the chunk's end, a
    shorter one that does not fit moves whole to the next chunk; both layouts agree id for id."""
    rng = random.Random(0)
    for trial in range(300):
        groups = [[rng.randrange(1, 49000) for _ in range(rng.choice([1, 3, 7, 8, 9, 20, 74, 75, 76, 90]))]
                  for _ in range(rng.randrange(0, 12))]
        expected = comfyui_reshape([list(g) for g in groups], 49406, 49407, 0)
        ours = [ids for ids, weights in comfyui_chunks([(g, 1.0) for g in groups], Tokens(start=49406, end=49407, pad=0, comma=267))]
        assert ours == expected, f"trial {trial}: group lengths {[len(g) for g in groups]}"
        assert all(len(chunk) == 77 for chunk in ours)


def test_a_160_token_prompt_is_encoded_as_comfyui_encodes_it(pipe):
    tokenizers, encoders = text_parts(pipe)
    assert len(pipe.tokenizer(PROMPT_160, add_special_tokens=False, verbose=False).input_ids) == 160
    assert prompt_chunks(pipe.tokenizer, PROMPT_160, 225) == comfyui_tokenize(pipe.tokenizer, PROMPT_160, pad_with_end=True)
    assert prompt_chunks(pipe.tokenizer_2, PROMPT_160, 225) == comfyui_tokenize(pipe.tokenizer, PROMPT_160, pad_with_end=False)
    with torch.no_grad():
        expected, expected_pooled = comfyui_sdxl_conditioning(pipe, PROMPT_160)
        ours, pooled = encode_long_prompts(tokenizers, encoders, [PROMPT_160], max_token_length=225, device="cpu")
    assert expected.shape == ours.shape == (1, 3 * 77, 32 + 64)
    # the same encoder calls on the same ids: equal to the bit, clip_l's columns and clip_g's
    assert torch.equal(ours[..., :32], expected[..., :32]), f"clip_l differs by {(ours - expected)[..., :32].abs().max()}"
    assert torch.equal(ours[..., 32:], expected[..., 32:]), f"clip_g differs by {(ours - expected)[..., 32:].abs().max()}"
    assert torch.equal(pooled, expected_pooled), f"pooled differs by {(pooled - expected_pooled).abs().max()}"


def test_max_token_length_keeps_whole_chunks_and_counts_what_it_cuts(pipe):
    all_chunks = prompt_chunks(pipe.tokenizer, PROMPT_160, 300)
    assert len(all_chunks) == 3
    for length, chunks, cut in ((75, 1, 85), (150, 2, 10), (225, 3, 0)):
        assert prompt_chunks(pipe.tokenizer, PROMPT_160, length) == all_chunks[:chunks]
        assert count_cut_tokens(pipe.tokenizer, PROMPT_160, length) == cut, length


def test_prompts_within_75_tokens_are_encoded_bit_for_bit_as_today(pipe):
    tokenizers, encoders = text_parts(pipe)
    exactly_75 = PHRASE * 6 + "in the sand"
    assert len(pipe.tokenizer(exactly_75, add_special_tokens=False).input_ids) == 75
    prompts = ["a photo of a dog", "", exactly_75]
    for clip_skip in (None, 1):
        with torch.no_grad():
            today, _, today_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False,
                                                           clip_skip=clip_skip)
            for max_token_length in (75, 150):
                ours, pooled = encode_long_prompts(tokenizers, encoders, prompts, max_token_length=max_token_length,
                                                   clip_skip=clip_skip, device="cpu")
                assert torch.equal(ours, today), f"clip_skip {clip_skip}, {max_token_length}: {(ours - today).abs().max()}"
                assert torch.equal(pooled, today_pooled), f"clip_skip {clip_skip}, {max_token_length}"
    # and at 75 a long prompt is cut exactly where diffusers cuts it
    with torch.no_grad():
        today, _, today_pooled, _ = pipe.encode_prompt(PROMPT_160, device="cpu", do_classifier_free_guidance=False)
        ours, pooled = encode_long_prompts(tokenizers, encoders, [PROMPT_160], max_token_length=75, device="cpu")
    assert torch.equal(ours, today) and torch.equal(pooled, today_pooled)


@pytest.mark.parametrize("negative_prompt", [None, "blurry"])
def test_short_prompts_sample_the_same_image_at_any_max_token_length(pipe, negative_prompt):
    """Chunked encoding hands the pipeline today's embeddings for short prompts, zeros for an absent negative
    prompt (SDXL's force_zeros_for_empty_prompt), so the images are today's to the bit."""
    batch = [ImageJob(0, "a red house", negative_prompt, 1), ImageJob(1, "a cat", None, 2)]
    images = {}
    for max_token_length in (75, 150):
        settings = SamplingSettings(width=64, height=64, num_inference_steps=2, guidance_scale=5.0, scheduler_name="euler",
                                    webui_sampler="Euler", max_token_length=max_token_length)
        images[max_token_length] = [np.asarray(image) for image in run_batch(pipe, batch, settings)]
    for today, chunked in zip(images[75], images[150]):
        assert np.array_equal(today, chunked), f"differs by {np.abs(today.astype(int) - chunked).max()} levels"


def test_repeating_conditioning_to_a_common_length_leaves_the_unets_output_unchanged(pipe):
    """A 100-token prompt (2 chunks) batched with a 160-token one (3 chunks): both are repeated to 6 chunks, and
    the UNet's prediction for each equals that from its own conditioning alone, to float32 rounding."""
    tokenizers, encoders = text_parts(pipe)
    prompts = [PROMPT_100, PROMPT_160]
    with torch.no_grad():
        batched, batched_pooled = encode_long_prompts(tokenizers, encoders, prompts, max_token_length=225, device="cpu")
        alone = [encode_long_prompts(tokenizers, encoders, [p], max_token_length=225, device="cpu") for p in prompts]
        assert batched.shape[1] == 6 * 77 and [a[0].shape[1] for a in alone] == [2 * 77, 3 * 77]
        for row, (embeds, pooled) in enumerate(alone):  # the encoders ran on 5 chunks, then on 2 and 3: rounding may differ
            torch.testing.assert_close(batched[row : row + 1], embeds.repeat(1, 6 * 77 // embeds.shape[1], 1), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(batched_pooled[row], pooled[0], rtol=1e-5, atol=1e-6)
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(2, 4, 8, 8, generator=generator)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        together = pipe.unet(latents, 500, encoder_hidden_states=batched,
                             added_cond_kwargs={"text_embeds": batched_pooled, "time_ids": time_ids.repeat(2, 1)}).sample
        for row, (embeds, pooled) in enumerate(alone):
            own = pipe.unet(latents[row : row + 1], 500, encoder_hidden_states=embeds,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            torch.testing.assert_close(together[row : row + 1], own, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3), "the two prompts condition the UNet differently"


def test_negative_prompts_of_other_lengths_are_repeated_to_batch_with_the_prompts(pipe):
    with torch.no_grad():
        embeds = pipeline_prompt_embeds(pipe, [PROMPT_100], [PROMPT_160], max_token_length=225)
        zeros = pipeline_prompt_embeds(pipe, [PROMPT_160], None, max_token_length=225)
    assert embeds["prompt_embeds"].shape == embeds["negative_prompt_embeds"].shape == (1, 6 * 77, 96)
    assert zeros["prompt_embeds"].shape == zeros["negative_prompt_embeds"].shape == (1, 3 * 77, 96)
    assert not zeros["negative_prompt_embeds"].any() and not zeros["negative_pooled_prompt_embeds"].any()


def test_infer_with_max_token_length_150_reads_the_tokens_after_75_and_refuses_other_lengths(tiny_sdxl_path, tmp_path, capsys):
    import infer

    arrays = {}
    for max_token_length in (75, 150):
        out = tmp_path / str(max_token_length)
        code, _, err = run_cli(infer.app, ["-m", tiny_sdxl_path, "-p", PROMPT_160, "--max_token_length", max_token_length,
                                           "--num_inference_steps", 2, "--seed", 0, "-o", out], capsys)
        assert code == 0, err
        (png,) = out.glob("*.png")
        arrays[max_token_length] = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
        assert err.count("warning:") == 1, err
        recorded = parse_webui_parameters(Image.open(png).text["parameters"])
        assert recorded.get("Max token length") == (None if max_token_length == 75 else "150"), recorded
    assert "prompt longer than --max_token_length 150 is cut there" in err and "with a red ball" in err, err
    difference = np.abs(arrays[150] - arrays[75]).max()
    assert difference > 0, "tokens 76 to 150 of the prompt changed nothing"

    for bad in (100, 0):
        code, _, err = run_cli(infer.app, ["-m", tiny_sdxl_path, "-p", "a cat", "--max_token_length", bad, "-o", tmp_path], capsys)
        assert code == 2 and err.startswith(f"error: --max_token_length {bad} is not a positive multiple of 75"), err
        assert err.strip().count("\n") == 0 and "150, 225" in err, err


def test_training_with_max_token_length_150_feeds_the_unet_comfyuis_encoding(pipe, tiny_sdxl_path, tmp_path, capsys, monkeypatch):
    """A 100-token caption file trains on ComfyUI's two-chunk encoding of it, and a short caption in the same batch on
    its one chunk repeated to the same length: what ComfyUI and WebUI will feed the UNet when the LoRA is used."""
    import train_lora
    from training_helpers import train_cli, write_images

    seen = []
    original = train_lora.conditioned_unet

    def recording(unet, text_embeddings, time_ids, accelerator):
        seen.append(tuple(t.detach().clone() for t in text_embeddings))
        return original(unet, text_embeddings, time_ids, accelerator)

    monkeypatch.setattr(train_lora, "conditioned_unet", recording)
    folder = write_images(tmp_path / "img", count=2)
    (folder / "image_0.txt").write_text(PROMPT_100)
    (folder / "image_1.txt").write_text("a photo of sks dog")
    code, out, err = train_cli(capsys, "-m", tiny_sdxl_path, "--train_data_dir", folder, "--resolution", 64, "--train_batch_size", 2,
                               "--max_train_steps", 1, "--max_token_length", 150, "--output_dir", tmp_path / "out")
    assert code == 0, err
    assert "cut" not in err, err  # 100 tokens fit in 150
    embeds, pooled = seen[0]
    with torch.no_grad():
        long_embeds, long_pooled = comfyui_sdxl_conditioning(pipe, PROMPT_100)
        short_embeds, short_pooled = comfyui_sdxl_conditioning(pipe, "a photo of sks dog")
    assert embeds.shape == (2, 2 * 77, 96)
    expected = {"long": (long_embeds[0], long_pooled[0]), "short": (short_embeds[0].repeat(2, 1), short_pooled[0])}
    matched = sorted(name for row in range(2) for name, (e, p) in expected.items()
                     if torch.allclose(embeds[row], e, rtol=1e-5, atol=1e-6) and torch.allclose(pooled[row], p, rtol=1e-5, atol=1e-6))
    assert matched == ["long", "short"]
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--train_data_dir", folder, "--max_token_length", 300,
                             "--output_dir", tmp_path / "bad")
    assert code != 0 and "--max_token_length must be 75, 150 or 225, got 300" in err and err.count("\n") == 1, err

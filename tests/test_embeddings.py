"""Pivotal-tuning embeddings (`clip_l`/`clip_g` rows) loaded into both text encoders."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from common.cli import UserError
from common.tokens import EmbeddingSpec, load_embedding, parse_embedding_spec
from helpers import load_pipe


@pytest.fixture()
def embedding_file(tmp_path):
    torch.manual_seed(0)
    rows = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}
    save_file(rows, tmp_path / "subject_emb.safetensors")
    return tmp_path / "subject_emb.safetensors", rows


def encode(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    return embeds, pooled


def test_rows_land_in_both_encoders_under_default_tokens(tiny_sdxl_path, embedding_file):
    path, rows = embedding_file
    pipe = load_pipe(tiny_sdxl_path)
    tokens = load_embedding(pipe, EmbeddingSpec(path))
    assert tokens == ["<s0>", "<s1>"]
    for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        ids = tokenizer.convert_tokens_to_ids(tokens)
        torch.testing.assert_close(encoder.get_input_embeddings().weight[ids].detach(), rows[key])


def test_prompt_with_the_tokens_encodes_differently_than_without(tiny_sdxl_path, embedding_file):
    path, _ = embedding_file
    pipe = load_pipe(tiny_sdxl_path)
    plain_embeds, plain_pooled = encode(pipe, "a photo of a dog")
    load_embedding(pipe, EmbeddingSpec(path))
    same_embeds, _ = encode(pipe, "a photo of a dog")
    token_embeds, token_pooled = encode(pipe, "a photo of <s0><s1> dog")
    torch.testing.assert_close(same_embeds, plain_embeds)
    assert (token_embeds - plain_embeds).abs().max() > 1e-3
    assert (token_pooled - plain_pooled).abs().max() > 1e-3


def test_tokens_can_be_named_in_the_spec(tiny_sdxl_path, embedding_file, tmp_path):
    path, rows = embedding_file
    spec = parse_embedding_spec(f"{path}:<dog1>,<dog2>")
    assert spec == EmbeddingSpec(path, ("<dog1>", "<dog2>"))
    pipe = load_pipe(tiny_sdxl_path)
    load_embedding(pipe, spec)
    row = pipe.text_encoder_2.get_input_embeddings().weight[pipe.tokenizer_2.convert_tokens_to_ids("<dog2>")]
    torch.testing.assert_close(row.detach(), rows["clip_g"][1])


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"clip_l": torch.randn(2, 32)}, "lacks clip_g"),
        ({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(3, 64)}, "the same number of rows"),
        ({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 1280)}, "'clip_g' rows are 1280 wide but this model's text encoder takes 64"),
        ({"clip_l": torch.randn(2, 64), "clip_g": torch.randn(2, 32)}, "'clip_l' rows are 64 wide"),
    ],
)
def test_malformed_embeddings_are_refused(tensors, message, tiny_sdxl_path, tmp_path):
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match=message):
        load_embedding(load_pipe(tiny_sdxl_path), EmbeddingSpec(tmp_path / "bad.safetensors"))


def test_token_count_must_match_rows_and_tokens_must_be_new(tiny_sdxl_path, embedding_file):
    path, _ = embedding_file
    pipe = load_pipe(tiny_sdxl_path)
    with pytest.raises(UserError, match="has 2 rows but 1 tokens were given"):
        load_embedding(pipe, EmbeddingSpec(path, ("<only>",)))
    load_embedding(pipe, EmbeddingSpec(path))
    with pytest.raises(UserError, match="tokens <s0>, <s1> .* are already in the vocabulary"):
        load_embedding(pipe, EmbeddingSpec(path))


def test_missing_embedding_file_is_refused():
    with pytest.raises(UserError, match="embedding file 'nowhere.safetensors' not found"):
        parse_embedding_spec("nowhere.safetensors")

"""OpenAI CLIP's real tokenizer in the built-in models, and what the text side does with it: published token
ids, SDXL's second tokenizer, pooling with added tokens, prompts past 77 tokens, an embedding round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers import load_pipe, run_cli
from training_helpers import train_cli, write_images

# Token ids of OpenAI's CLIP tokenizer as published with other implementations checked against it (Apple's
# ml-stable-diffusion tests, CLIP's own examples): none of them come from this project's files.
PUBLISHED_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of an astronaut riding a horse on mars": [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407],
    "Apple CoreML developer tools on a Macbook Air are fast":
        [49406, 3055, 19622, 5780, 10929, 5771, 525, 320, 20617, 1922, 631, 1953, 49407],
    "Hello, World! 123": [49406, 3306, 267, 1002, 256, 272, 273, 274, 49407],
    "the black dog": [49406, 518, 1449, 1929, 49407],
}
LONG_PROMPT = "a photo of a dog on the beach, golden hour, " * 10  # 110 tokens


def test_the_first_tokenizer_gives_openai_clips_published_ids(tiny_sdxl_path):
    tokenizer = load_pipe(tiny_sdxl_path).tokenizer
    assert len(tokenizer) == 49408
    for text, ids in PUBLISHED_IDS.items():
        assert tokenizer(text).input_ids == ids, text
    assert tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids[7:] == [49407] * 70


def test_sdxls_second_tokenizer_is_the_same_vocabulary_padding_with_the_exclamation_mark(tiny_sdxl_path):
    tokenizer_2 = load_pipe(tiny_sdxl_path).tokenizer_2
    assert tokenizer_2.pad_token == "!" and tokenizer_2.pad_token_id == 0
    padded = tokenizer_2("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert padded == PUBLISHED_IDS["a photo of a cat"] + [0] * 70
    # "!" is a special token there, so SDXL's tokenizer_2 reads a "!" in a prompt as id 0, not as "!</w>" (256)
    assert tokenizer_2("Hello, World! 123").input_ids == [49406, 3306, 267, 1002, 0, 272, 273, 274, 49407]


def test_with_added_tokens_sdxls_pooled_conditioning_comes_from_the_end_of_text(tiny_sdxl_path, tmp_path):
    """SDXL's text-encoder configs say eos_token_id 2, with which transformers pools at the highest token id:
    the new <s1> once pivotal tokens are added. Our loader pools at <|endoftext|>, as the base model was
    trained and as ComfyUI and WebUI do."""
    import json
    from pathlib import Path

    from common.tokens import EmbeddingSpec, load_embedding

    assert json.loads((Path(tiny_sdxl_path) / "text_encoder_2" / "config.json").read_text())["eos_token_id"] == 2
    pipe = load_pipe(tiny_sdxl_path)
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}, tmp_path / "emb.safetensors")
    load_embedding(pipe, EmbeddingSpec(tmp_path / "emb.safetensors"))
    encoder, tokenizer = pipe.text_encoder_2, pipe.tokenizer_2
    ids = tokenizer("a photo of <s0><s1> dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    end, new_token = ids[0].tolist().index(49407), ids[0].tolist().index(49409)
    with torch.no_grad():
        output = encoder(ids, output_hidden_states=True)
        final = encoder.text_model.final_layer_norm(output.hidden_states[-1])
        at = {position: encoder.text_projection(final[0, position]) for position in (end, new_token)}
        torch.testing.assert_close(output.text_embeds[0], at[end])
        for module in encoder.modules():  # transformers' reading of SDXL's published config
            if hasattr(module, "eos_token_id"):
                module.eos_token_id = 2
        legacy = encoder(ids).text_embeds[0]
    torch.testing.assert_close(legacy, at[new_token])
    assert not torch.allclose(legacy, at[end]), "the two poolings differ, so the fix matters"


def test_a_prompt_longer_than_77_tokens_is_cut_there_and_the_cut_part_is_named(tiny_sdxl_path, tmp_path, capsys):
    import infer

    pipe = load_pipe(tiny_sdxl_path)
    ids = pipe.tokenizer(LONG_PROMPT, add_special_tokens=False).input_ids
    assert len(ids) > 100
    kept = pipe.tokenizer.decode(ids[:75])
    with torch.no_grad():
        long = pipe.encode_prompt(LONG_PROMPT, device="cpu", do_classifier_free_guidance=False)
        short = pipe.encode_prompt(kept, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(long[0], short[0])
    torch.testing.assert_close(long[2], short[2])

    code, _, err = run_cli(infer.app, ["-m", tiny_sdxl_path, "--prompt", LONG_PROMPT, "--num_inference_steps", 2,
                                       "--seed", 0, "--output_dir", tmp_path], capsys)
    assert code == 0, err
    dropped = pipe.tokenizer.decode(ids[75:], clean_up_tokenization_spaces=True)
    assert "warning: prompt longer than CLIP's 75 tokens is cut there" in err and dropped in err, err
    assert err.count("warning:") == 1, err
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_a_long_training_caption_is_reported(tiny_sdxl_path, tmp_path, capsys, caplog):
    images = write_images(tmp_path / "images", count=2)
    code, out, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", LONG_PROMPT,
                               "--resolution", 64, "--train_batch_size", 2, "--max_train_steps", 1, "--output_dir", tmp_path / "out")
    assert code == 0, err
    assert "caption longer than CLIP's 75 tokens is cut there" in caplog.text, caplog.text


def test_trained_embedding_round_trips_through_the_webui_export_with_the_real_vocabulary(tiny_sdxl_path, tmp_path, capsys):
    import convert_for_webui
    from common.tokens import EmbeddingSpec, load_embedding

    images = write_images(tmp_path / "images", count=2)
    out = tmp_path / "sksdog"
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", "a photo of TOK dog",
                             "--train_text_encoder_ti", "--resolution", 64, "--train_batch_size", 2, "--max_train_steps", 2,
                             "--learning_rate", 1e-2, "--output_dir", out)
    assert code == 0, err
    trained = load_file(out / "sksdog_emb.safetensors")
    code, printed, err = run_cli(convert_for_webui.app, [out, "--out", tmp_path / "export"], capsys)
    assert code == 0, err
    assert "WebUI prompt: a photo of sksdog dog <lora:sksdog:1>" in printed, printed

    pipe = load_pipe(tiny_sdxl_path)
    tokens = load_embedding(pipe, EmbeddingSpec(tmp_path / "export" / "embeddings" / "sksdog.safetensors"))
    assert tokens == ["<s0>", "<s1>"]
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"), (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        ids = tokenizer("a photo of <s0><s1> dog").input_ids
        assert ids[4:6] == [49408, 49409] and ids[6] == 1929, "<s0><s1> are single tokens beside the real word 'dog'"
        rows = encoder.get_input_embeddings().weight[49408:49410]
        torch.testing.assert_close(rows, trained[key])


@pytest.mark.parametrize("name", ["sksdog", "my_dog-v2"])
def test_webui_finds_an_embedding_name_in_a_prompt_as_its_own_token_sequence(tiny_sdxl_path, name):
    """WebUI's EmbeddingDatabase looks an embedding up by the token ids of its name inside the prompt's ids
    (modules/textual_inversion/textual_inversion.py, find_embedding_at_position): with the real BPE, the
    name must tokenize the same alone and in the prompts the export prints."""
    tokenizer = load_pipe(tiny_sdxl_path).tokenizer
    name_ids = tokenizer(name, add_special_tokens=False).input_ids
    for prompt in (f"a photo of {name} dog", f"{name}, a photo"):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert any(ids[k : k + len(name_ids)] == name_ids for k in range(len(ids))), (prompt, ids, name_ids)


def test_initializer_token_starts_the_new_rows_from_that_words_rows_and_must_be_one_token(tiny_sdxl_path):
    import train_lora
    from common.cli import UserError

    pipe = load_pipe(tiny_sdxl_path)
    tables = [e.get_input_embeddings().weight.detach().clone() for e in (pipe.text_encoder, pipe.text_encoder_2)]
    config = train_lora.TrainConfig(pretrained_model_name_or_path=tiny_sdxl_path, output_dir="-", train_text_encoder_ti=True,
                                    initializer_token="dog")
    assert train_lora.add_pivotal_tokens(pipe, config) == {"TOK": ["<s0>", "<s1>"]}
    for encoder, table in zip((pipe.text_encoder, pipe.text_encoder_2), tables):
        rows = encoder.get_input_embeddings().new_rows
        assert torch.equal(rows, table[1929].float().expand(2, -1)), "1929 is 'dog</w>' in CLIP's vocabulary"

    config.initializer_token = "photorealistic"
    with pytest.raises(UserError, match=r"'photorealistic' is \d CLIP tokens \(photo"):
        train_lora.add_pivotal_tokens(load_pipe(tiny_sdxl_path), config)

"""--prompt_syntax plain|webui|comfyui end to end: weights of 1 give the plain image bit for bit, weights change it
and the two UIs differently, the empty negative prompt is what each UI makes of it, embeddings are named as each UI
names them, the records round-trip through --prompt_file, and what cannot be read is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.long_prompts import pipeline_prompt_embeds
from helpers import load_pipe, parse_webui_parameters, run_cli
from training_helpers import PROMPT, train_cli, write_images


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_path):
    return load_pipe(tiny_sdxl_path)


def image(capsys, out, *args) -> tuple[np.ndarray, dict]:
    import infer

    code, _, err = run_cli(infer.app, ["--model", "tiny-sdxl", "--seed", "3", "--num_inference_steps", "3", "--output_dir", out,
                                       *args], capsys)
    assert code == 0, err
    png = Image.open(sorted(out.glob("*.png"))[-1])
    return np.asarray(png).astype(int), parse_webui_parameters(png.text["parameters"])


@pytest.mark.parametrize("syntax", ["webui", "comfyui"])
def test_a_prompt_without_weights_gives_the_plain_image_bit_for_bit(syntax, tmp_path, capsys):
    plain, _ = image(capsys, tmp_path / "plain", "--prompt", "a photo of a dog, sitting", "--negative_prompt", "blurry")
    same, parameters = image(capsys, tmp_path / syntax, "--prompt", "a photo of a dog, sitting", "--negative_prompt", "blurry",
                             "--prompt_syntax", syntax)
    assert np.array_equal(plain, same)
    assert parameters["Prompt syntax"] == syntax


@pytest.mark.heavy
def test_weights_change_the_image_and_the_two_uis_read_nesting_differently(tmp_path, capsys):
    common = ("--negative_prompt", "blurry")
    plain, _ = image(capsys, tmp_path / "plain", "--prompt", "a photo of a dog", *common)
    webui, _ = image(capsys, tmp_path / "webui", "--prompt", "a photo of a ((dog:1.3))", *common, "--prompt_syntax", "webui")
    comfyui, _ = image(capsys, tmp_path / "comfyui", "--prompt", "a photo of a ((dog:1.3))", *common, "--prompt_syntax", "comfyui")
    no_norm, parameters = image(capsys, tmp_path / "no_norm", "--prompt", "a photo of a ((dog:1.3))", *common, "--prompt_syntax",
                                "webui", "--emphasis", "no_norm")
    assert np.abs(webui - plain).max() > 0 and np.abs(comfyui - plain).max() > 0
    assert np.abs(webui - comfyui).max() > 0, "1.43 in WebUI, 1.3 in ComfyUI, and different arithmetic"
    assert np.abs(no_norm - webui).max() > 0 and parameters["Emphasis"] == "No norm"


def test_weights_never_touch_the_pooled_vector_and_each_ui_reads_an_empty_negative_its_way(pipe):
    with torch.no_grad():
        plain = pipeline_prompt_embeds(pipe, ["a cat"], ["blurry"], max_token_length=75)
        for syntax in ("webui", "comfyui"):
            weighted = pipeline_prompt_embeds(pipe, ["a (cat:1.5)"], ["blurry"], max_token_length=75, syntax=syntax)
            assert torch.equal(weighted["pooled_prompt_embeds"], plain["pooled_prompt_embeds"]), syntax
            assert not torch.equal(weighted["prompt_embeds"], plain["prompt_embeds"]), syntax
        webui = pipeline_prompt_embeds(pipe, ["a cat"], [""], max_token_length=75, syntax="webui")
        comfyui = pipeline_prompt_embeds(pipe, ["a cat"], [""], max_token_length=75, syntax="comfyui")
        empty = pipeline_prompt_embeds(pipe, [""], None, max_token_length=75, syntax="comfyui")
    assert not webui["negative_prompt_embeds"].any() and not webui["negative_pooled_prompt_embeds"].any(), "WebUI zeros it"
    assert torch.equal(comfyui["negative_prompt_embeds"], empty["prompt_embeds"]), "ComfyUI encodes the empty prompt"
    assert comfyui["negative_pooled_prompt_embeds"].abs().max() > 0


LONG_WEIGHTED = ("(masterpiece:1.2), best quality, [blurry], ((detailed face)), a photo of a dog on the beach, golden hour, "
                 * 6 + "BREAK (red hat:0.7), [[soft light]]")


def ui_conditioning(pipe, prompt: str, syntax: str, emphasis: str = "original"):
    """SDXL's conditioning as the UI itself assembles it, from the UI code in tests/ui_prompts.py on our encoders (the
    penultimate hidden state, the pooled projection): per encoder, ComfyUI's tokenize_with_weights and
    encode_token_weights, or WebUI's tokenize_line, process_tokens' ids and emphasis chunk by chunk laid end to end
    (torch.hstack) with the first chunk's pooled; then clip_l and clip_g side by side, cut to the shorter
    (ComfyUI's SDXLClipModel.encode_token_weights; WebUI's conditioner concatenates the same way), clip_g's pooled."""
    import ui_prompts as ui

    per_encoder = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

        def ids(text):
            return tokenizer(text, add_special_tokens=False, verbose=False).input_ids

        def encode(id_lists):
            output = encoder(torch.tensor(id_lists), output_hidden_states=True)
            return output.hidden_states[-2].float(), output[0]

        if syntax == "comfyui":
            chunks = ui.SDTokenizer(ids, start_token=start, end_token=end, pad_with_end=pad == end).tokenize_with_weights(prompt)
            pairs = [[(token, weight) for token, weight, *_ in chunk] for chunk in chunks]
            per_encoder.append(ui.ClipTokenWeightEncoder(encode, {"start": start, "end": end, "pad": pad}).encode_token_weights(pairs))
        else:
            model = ui.TextConditionalModel(ids, comma_token=tokenizer.convert_tokens_to_ids(",</w>"), id_start=start,
                                            id_end=end, id_pad=pad)
            chunks, _ = model.tokenize_line(prompt)
            weighed = ui.EmphasisOriginal if emphasis == "original" else ui.EmphasisOriginalNoNorm
            states, pooled = [], []
            for tokens, chunk in zip(model.process_tokens_ids([chunk.tokens for chunk in chunks]), chunks):
                hidden, chunk_pooled = encode([tokens])
                states.append(ui.webui_emphasis(weighed, hidden, [chunk.multipliers]))
                pooled.append(chunk_pooled)
            per_encoder.append((torch.hstack(states), pooled[0]))
    (clip_l, _), (clip_g, pooled) = per_encoder
    length = min(clip_l.shape[1], clip_g.shape[1])
    return torch.cat([clip_l[:, :length], clip_g[:, :length]], dim=-1), pooled


@pytest.mark.parametrize(("syntax", "emphasis"), [("webui", "original"), ("webui", "no_norm"), ("comfyui", "original")])
def test_the_whole_sdxl_conditioning_is_the_uis_own_assembly(pipe, syntax, emphasis):
    """Several chunks (a BREAK for WebUI), nested and explicit weights, both encoders and the pooled vector, ours
    against the UI's code end to end."""
    from common.long_prompts import encode_long_prompts

    with torch.no_grad():
        ours, ours_pooled = encode_long_prompts([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                                [LONG_WEIGHTED], max_token_length=750, syntax=syntax, emphasis=emphasis)
        theirs, their_pooled = ui_conditioning(pipe, LONG_WEIGHTED, syntax, emphasis)
    assert ours.shape == theirs.shape and ours.shape[1] >= 3 * 77, ours.shape
    # to float rounding: we encode every chunk in one batch, WebUI one chunk at a time
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_pooled, their_pooled, rtol=1e-6, atol=1e-6)


@pytest.mark.heavy
def test_the_parameters_round_trip_through_prompt_file(tmp_path, capsys):
    first, parameters = image(capsys, tmp_path / "first", "--prompt", "a (photo:0.8) of a [dog], sunny", "--negative_prompt",
                              "(blurry:1.2)", "--prompt_syntax", "webui", "--emphasis", "no_norm", "--clip_skip", "1")
    assert (parameters["Prompt syntax"], parameters["Emphasis"], parameters["Clip skip"]) == ("webui", "No norm", "3")
    text = Image.open(sorted((tmp_path / "first").glob("*.png"))[-1]).text["parameters"]
    (tmp_path / "parameters.txt").write_text(text)
    again, again_parameters = image(capsys, tmp_path / "again", "--prompt_file", tmp_path / "parameters.txt")
    assert np.array_equal(first, again)
    assert again_parameters == parameters
    plain, _ = image(capsys, tmp_path / "plain", "--prompt_file", tmp_path / "parameters.txt", "--prompt_syntax", "plain")
    assert np.abs(plain - first).max() > 0, "the command line's own --prompt_syntax wins over the file's"


def test_a_plain_prompt_with_weighting_syntax_gets_one_warning_naming_the_option(tmp_path, capsys):
    import infer

    code, out, err = run_cli(infer.app, ["--model", "tiny-sdxl", "--prompt", "a photo of (dog:1.5), [cat]", "--num_inference_steps",
                                         "1", "--output_dir", tmp_path], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "--prompt_syntax webui or comfyui" in warnings[0], err


@pytest.mark.parametrize("prompt, construct", [("a [cat:dog:10] in a field", "[cat:dog:10]"), ("a [cat|dog]", "[cat|dog]"),
                                                ("a cat AND a dog", "AND"), ("a [cat::0.5]", "[cat::0.5]")])
def test_webuis_per_step_constructs_are_refused_before_any_model_loads(prompt, construct, tmp_path, capsys, monkeypatch):
    import diffusers

    import infer

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("a model was loaded before the refusal")))
    code, _, err = run_cli(infer.app, ["--model", "tiny-sdxl", "--prompt", prompt, "--prompt_syntax", "webui", "--output_dir",
                                       tmp_path / "o"], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{construct!r} is WebUI's per-step prompt editing" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.heavy
def test_embeddings_are_named_as_each_ui_names_them(tmp_path, capsys, monkeypatch):
    from common.tokens import save_embedding

    save_embedding(tmp_path / "y2k.safetensors", torch.randn(2, 32), torch.randn(2, 64), ["<s0>", "<s1>"])
    common = ("--embedding", tmp_path / "y2k.safetensors", "--negative_prompt", "blurry")
    tokens, _ = image(capsys, tmp_path / "tokens", "--prompt", "a (<s0><s1>:1.2) style dog", *common, "--prompt_syntax", "comfyui")
    comfyui, _ = image(capsys, tmp_path / "comfyui", "--prompt", "a (embedding:y2k:1.2) style dog", *common, "--prompt_syntax", "comfyui")
    webui_tokens, _ = image(capsys, tmp_path / "webui-tokens", "--prompt", "a (<s0><s1>:1.2) style dog", *common, "--prompt_syntax", "webui")
    webui, _ = image(capsys, tmp_path / "webui", "--prompt", "a (y2k:1.2) style dog", *common, "--prompt_syntax", "webui")
    assert np.array_equal(tokens, comfyui) and np.array_equal(webui_tokens, webui)
    import diffusers

    import infer

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("a model was loaded before the refusal")))
    code, _, err = run_cli(infer.app, ["--model", "tiny-sdxl", "--prompt", "a embedding:nope dog", *map(str, common),
                                       "--prompt_syntax", "comfyui", "--output_dir", tmp_path / "never"], capsys)
    assert code == 2 and err.count("\n") == 1 and "embedding:nope, which no --embedding is (loaded: y2k)" in err, err
    assert not (tmp_path / "never").exists()


def test_a_trained_embedding_file_is_called_by_its_file_stem_or_by_its_run_name_alike(tmp_path, capsys):
    """train_lora.py writes NAME_emb.safetensors, which the UIs call by its stem and convert_for_webui.py exports as NAME:
    both names reach the same tokens, in the check before the model loads and in the prompt."""
    from common.tokens import embedding_names, save_embedding

    assert embedding_names(tmp_path / "y2k_emb.safetensors") == ("y2k_emb", "y2k")
    assert embedding_names(tmp_path / "y2k.safetensors") == ("y2k",) and embedding_names(tmp_path / "_emb.safetensors") == ("_emb",)
    save_embedding(tmp_path / "y2k_emb.safetensors", torch.randn(2, 32), torch.randn(2, 64), ["<s0>", "<s1>"])
    common = ("--embedding", tmp_path / "y2k_emb.safetensors", "--prompt_syntax", "comfyui")
    tokens, _ = image(capsys, tmp_path / "tokens", "--prompt", "a (<s0><s1>:1.2) style dog", *common)
    by_stem, _ = image(capsys, tmp_path / "stem", "--prompt", "a (embedding:y2k_emb:1.2) style dog", *common)
    by_run, _ = image(capsys, tmp_path / "run", "--prompt", "a (embedding:y2k:1.2) style dog", *common)
    assert np.array_equal(tokens, by_stem) and np.array_equal(tokens, by_run)


def test_the_training_gallery_samples_as_the_syntax_says_and_weighted_captions_are_refused(tiny_sdxl_path, tmp_path, capsys):
    images = write_images(tmp_path / "img", count=1)
    common = ["-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", PROMPT, "--resolution", 64,
              "--max_train_steps", 1, "--seed", 0]
    code, _, err = train_cli(capsys, *common, "--output_dir", tmp_path / "out", "--validation_prompt", "a ((dog)), [cat]",
                             "--validation_steps", 1, "--num_validation_images", 1, "--prompt_syntax", "webui")
    assert code == 0, err
    assert parse_webui_parameters(Image.open(tmp_path / "out" / "samples" / "step-1.png").text["parameters"])["Prompt syntax"] == "webui"
    code, _, err = train_cli(capsys, *common, "--output_dir", tmp_path / "refused", "--weighted_captions")
    assert code == 2 and "--weighted_captions is kohya's option" in err and "captions are plain text here" in err, err


@pytest.mark.parametrize(("field", "message"), [
    ("Prompt syntax: klingon", "'Prompt syntax: klingon' cannot be reproduced here; accepted: plain, webui, comfyui"),
    ("Emphasis: Ignore", "'Emphasis: Ignore' cannot be reproduced here; accepted: Original or No norm"),
    ("Clip skip: x", "'Clip skip: x' cannot be reproduced here; accepted: a whole number from 1"),
    ("Clip skip: 40", "--clip_skip 38 (WebUI's Clip skip 40): the text encoders of 'tiny-sdxl' have 3 and 3 layers, so at "
                      "most 2 can be skipped"),
])
def test_parameters_that_cannot_be_reproduced_are_refused_before_any_model_loads(field, message, tmp_path, capsys, monkeypatch):
    import diffusers

    import infer

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("a model was loaded before the refusal")))
    (tmp_path / "parameters.txt").write_text(f"a cat\nNegative prompt: x\nSteps: 3, {field}\n", encoding="utf-16")
    code, _, err = run_cli(infer.app, ["--model", "tiny-sdxl", "--prompt_file", tmp_path / "parameters.txt", "--output_dir",
                                       tmp_path / "o"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_a_clip_skip_deeper_than_the_text_encoders_is_refused_before_any_model_loads(tiny_sdxl_path, tmp_path, capsys, monkeypatch):
    """Deeper, diffusers and the UIs fail with an index error; the tiny encoders have 3 layers, so 2 is the deepest."""
    import diffusers

    import infer

    code, _, err = run_cli(infer.app, ["--model", "tiny-sdxl", "--prompt", "a cat", "--clip_skip", "2", "--num_inference_steps",
                                       "1", "--output_dir", tmp_path / "deepest"], capsys)
    assert code == 0, err
    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("a model was loaded before the refusal")))
    code, _, err = run_cli(infer.app, ["--model", "tiny-sdxl", "--prompt", "a cat", "--clip_skip", "3", "--output_dir",
                                       tmp_path / "o"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--clip_skip 3 (WebUI's Clip skip 5)" in err, err
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", write_images(tmp_path / "img", count=1),
                             "--instance_prompt", PROMPT, "--clip_skip", 3, "--output_dir", tmp_path / "t")
    assert code == 2 and err.count("\n") == 1 and "--clip_skip 3 (WebUI's Clip skip 5)" in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists()


def test_gen_class_images_and_mjhq_generate_sample_as_the_syntax_says(tiny_sdxl_path, tmp_path, capsys, monkeypatch):
    import json

    import diffusers

    import gen_class_images
    import mjhq_fid

    common = ["-m", tiny_sdxl_path, "--num_inference_steps", "1", "--prompt_syntax", "webui", "--emphasis", "no_norm"]
    code, _, err = run_cli(gen_class_images.app, [*common, "--class_prompt", "a (dog:1.4)", "--class_data_dir", tmp_path / "class",
                                                  "--num_class_images", "1"], capsys)
    assert code == 0, err
    parameters = parse_webui_parameters(Image.open(next((tmp_path / "class").glob("*.png"))).text["parameters"])
    assert (parameters["Prompt syntax"], parameters["Emphasis"]) == ("webui", "No norm")
    (tmp_path / "meta_data.json").write_text(json.dumps({"a1": {"prompt": "a (fox:1.3)", "category": "animals"}}))
    code, _, err = run_cli(mjhq_fid.app, ["generate", "--meta_data", tmp_path / "meta_data.json", "--gen_dir", tmp_path / "gen",
                                          *common], capsys)
    assert code == 0, err
    parameters = parse_webui_parameters(Image.open(next((tmp_path / "gen").rglob("*.png"))).text["parameters"])
    assert parameters["Prompt syntax"] == "webui"
    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("a model was loaded before the refusal")))
    (tmp_path / "meta_data.json").write_text(json.dumps({"b1": {"prompt": "a [fox:cat:5]", "category": "animals"}}))
    code, _, err = run_cli(mjhq_fid.app, ["generate", "--meta_data", tmp_path / "meta_data.json", "--gen_dir", tmp_path / "gen2",
                                          *common], capsys)
    assert code == 2 and "'[fox:cat:5]' is WebUI's per-step" in err, err
    code, _, err = run_cli(gen_class_images.app, [*common, "--class_prompt", "a [dog|cat]", "--class_data_dir", tmp_path / "class2"],
                           capsys)
    assert code == 2 and "'[dog|cat]' is WebUI's per-step" in err and not (tmp_path / "class2").exists(), err

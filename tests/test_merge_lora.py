"""merge_lora.py: every method against float64 references on the inputs' full delta weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import merge_lora
from common.lora_formats import BLORA_CONTENT_BLOCK, BLORA_STYLE_BLOCK, LoraSpec, load_loras
from helpers import generate_array, load_pipe, make_peft_lora, run_cli


def run_merge(capsys, *argv):
    return run_cli(merge_lora.app, [str(a) for a in argv], capsys)


@pytest.fixture(scope="module")
def two_loras(tiny_sdxl_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    first = make_peft_lora(tiny_sdxl_path, folder / "first", rank=4, alpha=8, seed=1)
    second = make_peft_lora(tiny_sdxl_path, folder / "second", rank=2, alpha=2, seed=2, text_encoders=False)
    return first, second


def full_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each layer's dW = (alpha / r) B A in float64, from the file and its metadata alone."""
    import json

    from safetensors import safe_open

    state = load_file(path)
    with safe_open(str(path), "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    deltas = {}
    for key in state:
        if key.endswith("lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            component = module.split(".")[0]
            alpha = metadata[f"{component}.lora_alpha"]
            rank = state[key].shape[0]
            deltas[module] = (alpha / rank) * state[f"{module}.lora_B.weight"].double() @ state[key].double()
    return deltas


def merged_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """dW of the merged file: every layer is stored at scale 1 (alpha = rank)."""
    state = load_file(folder / "pytorch_lora_weights.safetensors")
    return {k.removesuffix(".lora_A.weight"): state[k.replace("lora_A", "lora_B")].double().flatten(1) @ state[k].double().flatten(1)
            for k in state if k.endswith("lora_A.weight")}


def references(first: Path, second: Path):
    a, b = full_deltas(first), full_deltas(second)
    names = sorted(set(a) | set(b))
    zero = lambda name: torch.zeros_like(a.get(name, b.get(name)))  # noqa: E731
    return names, {n: a.get(n, zero(n)) for n in names}, {n: b.get(n, zero(n)) for n in names}


def top_k_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * tensor.numel())
    threshold = tensor.abs().flatten().sort(descending=True).values[k - 1]
    return tensor.abs() >= threshold


def ties_reference(a: torch.Tensor, b: torch.Tensor, wa: float, wb: float, density: float) -> torch.Tensor:
    """TIES by hand: trim to top-k magnitudes, elect the sign of the summed trimmed values, mean of agreeing weighted entries."""
    ta, tb = a * top_k_mask(a, density), b * top_k_mask(b, density)
    elected = torch.where(ta + tb >= 0, 1.0, -1.0)
    agree_a, agree_b = (torch.sign(ta) == elected).double(), (torch.sign(tb) == elected).double()
    total = wa * ta * agree_a + wb * tb * agree_b
    return total / (agree_a + agree_b).clamp(min=1)


# method, its --rank (None: the default), and the rank it truncates each layer to (None: exact), from the ranks
# of the inputs that have the layer
METHOD_CASES = {
    "linear": ("linear", None, None), "cat": ("cat", None, None), "svd": ("svd", None, max),
    "ties": ("ties", None, sum), "ties --rank full": ("ties", "full", None), "ties_svd": ("ties_svd", None, max),
    "magnitude_prune --rank full": ("magnitude_prune", "full", None), "dare_linear --rank full": ("dare_linear", "full", None),
    "dare_ties --rank full": ("dare_ties", "full", None), "dare_linear --rank 3": ("dare_linear", "3", lambda ranks: 3),
}


@pytest.mark.parametrize("case", METHOD_CASES)
def test_every_method_equals_its_float64_reference_on_delta_weights(case, two_loras, tiny_sdxl_path, tmp_path, capsys):
    method, rank, truncation = METHOD_CASES[case]
    first, second = two_loras
    wa, wb = 0.7, 0.4
    code, _, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", f"{first}:{wa}", "--lora", f"{second}:{wb}",
                             "--method", method, "--density", 0.5, "--seed", 3, *(["--rank", rank] if rank else []),
                             "--save_precision", "fp32", "--out", tmp_path / "merged")
    assert code == 0, err
    names, a, b = references(first, second)
    got = merged_deltas(tmp_path / "merged")
    assert sorted(got) == names
    in_second = set(full_deltas(second))
    torch.manual_seed(3)  # the same random drops as the merge, layer by layer in sorted order
    worst = 0.0
    for name in names:
        if method in ("linear", "cat", "svd"):
            expected = wa * a[name] + wb * b[name]
        elif method in ("ties", "ties_svd"):
            expected = ties_reference(a[name], b[name], wa, wb, 0.5)
        elif method == "magnitude_prune":
            expected = wa * a[name] * top_k_mask(a[name], 0.5) + wb * b[name] * top_k_mask(b[name], 0.5)
        else:
            keep_a = torch.bernoulli(torch.full_like(a[name], 0.5))
            keep_b = torch.bernoulli(torch.full_like(b[name], 0.5))
            da, db = a[name] * keep_a / 0.5, b[name] * keep_b / 0.5
            expected = wa * da + wb * db if method == "dare_linear" else ties_reference(da, db, wa, wb, 1.0)
        if truncation is not None:  # the truncated SVD's optimum at the layer's rank
            r = truncation([4, 2] if name in in_second else [4])
            u, s, vh = torch.linalg.svd(expected, full_matrices=False)
            expected = (u[:, :r] * s[:r]) @ vh[:r]
        worst = max(worst, float((got[name] - expected).abs().max() / expected.abs().max().clamp_min(1e-12)))
    assert worst < 1e-5, f"{case}: largest relative difference {worst}"


def test_linear_with_weights_one_and_zero_reproduces_the_first_lora(two_loras, tiny_sdxl_path, tmp_path, capsys):
    first, second = two_loras
    code, _, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", f"{first}:1", "--lora", f"{second}:0", "--save_precision", "fp32",
                             "--out", tmp_path)
    assert code == 0, err
    names, a, _ = references(first, second)
    got = merged_deltas(tmp_path)
    for name in names:
        torch.testing.assert_close(got[name], a[name], rtol=1e-6, atol=1e-9)


def test_peft_linear_adds_cross_terms_that_ours_does_not():
    """peft's add_weighted_adapter('linear') merges A and B separately with its own task_arithmetic at weights
    sqrt(w): (sqrt(w1) B1 + sqrt(w2) B2)(sqrt(w1) A1 + sqrt(w2) A2) != w1 dW1 + w2 dW2, which is peft's
    task_arithmetic on the delta weights (its `svd` route) and what our linear merge stores."""
    from peft.utils.merge_utils import task_arithmetic

    generator = torch.Generator().manual_seed(0)
    a1, a2 = (torch.randn(4, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    b1, b2 = (torch.randn(8, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    peft_linear = task_arithmetic([b1, b2], weights.sqrt()) @ task_arithmetic([a1, a2], weights.sqrt())
    peft_on_deltas = task_arithmetic([b1 @ a1, b2 @ a2], weights)
    layer = merge_lora.linear_merge_factors([merge_lora.LayerLoRA((b1.shape[0], a1.shape[1]), a1, b1, 1.0), merge_lora.LayerLoRA((b2.shape[0], a2.shape[1]), a2, b2, 1.0)], weights.tolist())
    ours = layer.up.double() @ layer.down.double()
    torch.testing.assert_close(ours, peft_on_deltas, rtol=1e-6, atol=1e-6)
    cross_terms = float((peft_linear - peft_on_deltas).abs().max())
    assert cross_terms > 0.1, f"peft's linear merge differs from the weighted sum of dW by only {cross_terms}"


def test_merged_lora_loads_with_load_lora_weights_and_kohya_gives_the_same_image(two_loras, tiny_sdxl_path, tmp_path, capsys):
    first, second = two_loras
    code, _, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", first, "--lora", second, "--kohya", "--out", tmp_path / "both")
    assert code == 0, err
    images = []
    for name in ("pytorch_lora_weights.safetensors", "both.safetensors"):
        pipe = load_pipe(tiny_sdxl_path)
        pipe.load_lora_weights(str(tmp_path / "both"), weight_name=name)
        images.append(generate_array(pipe))
    assert np.abs(images[0] - images[1]).max() <= 1e-5
    assert (tmp_path / "both" / "merge_report.json").is_file()


def test_blora_keeps_only_the_named_blocks_scaled_linearly(two_loras, tiny_sdxl_path, tmp_path, capsys):
    first, second = two_loras
    code, _, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", first, "--lora", second, "--method", "blora",
                             "--content_alpha", 0.5, "--style_alpha", 2.0, "--save_precision", "fp32", "--out", tmp_path)
    assert code == 0, err
    _, a, b = references(first, second)
    got = merged_deltas(tmp_path)
    assert got and all(n.startswith((BLORA_CONTENT_BLOCK + ".", BLORA_STYLE_BLOCK + ".")) for n in got)
    for name, delta in got.items():
        expected = 0.5 * a[name] if name.startswith(BLORA_CONTENT_BLOCK + ".") else 2.0 * b[name]
        torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-9)


def test_ziplora_export_is_exactly_the_column_scaled_sum():
    content = merge_lora.LayerLoRA((8, 16), torch.randn(4, 16), torch.randn(8, 4), 2.0)
    style = merge_lora.LayerLoRA((8, 16), torch.randn(2, 16), torch.randn(8, 2), 0.5)
    m_c, m_s = torch.rand(16), torch.rand(16)
    layer = merge_lora.zip_lora_factors(content, style, m_c, m_s)
    assert layer.down.shape == (6, 16) and layer.up.shape == (8, 6)
    expected = content.delta() * m_c.double() + style.delta() * m_s.double()
    torch.testing.assert_close(layer.up.double() @ layer.down.double(), expected, rtol=1e-5, atol=1e-6)


def test_colliding_embedding_tokens_are_renamed_and_load(two_loras, tiny_sdxl_path, tmp_path, capsys):
    first, second = two_loras
    rows = [{"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)} for _ in range(2)]
    save_file(rows[0], first.parent / "first_emb.safetensors")
    save_file(rows[1], second.parent / "second_emb.safetensors")
    code, out, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", first, "--lora", second, "--out", tmp_path / "merged")
    (first.parent / "first_emb.safetensors").unlink()
    (second.parent / "second_emb.safetensors").unlink()
    assert code == 0, err
    assert "its tokens are now <s0><s1>" in out and "its tokens are now <s2><s3>" in out
    from common.tokens import EmbeddingSpec, load_embedding

    merged_pipe, own_pipe = load_pipe(tiny_sdxl_path), load_pipe(tiny_sdxl_path)
    load_embedding(merged_pipe, EmbeddingSpec(tmp_path / "merged" / "merged_emb.safetensors"))
    save_file(rows[1], tmp_path / "own.safetensors")
    load_embedding(own_pipe, EmbeddingSpec(tmp_path / "own.safetensors"))
    with torch.no_grad():
        merged = merged_pipe.encode_prompt("a <s2><s3> style", device="cpu", do_classifier_free_guidance=False)
        own = own_pipe.encode_prompt("a <s0><s1> style", device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(merged[0], own[0])


BAD = {
    "one LoRA": (["--method", "linear"], "merging needs two or more --lora, got 1", 1),
    "weight that does not parse": (["--lora", "SECOND:heavy"], "weight 'heavy' in ", 1),
    "weight that is not finite": (["--lora", "SECOND:nan"], "is not a finite number", 1),
    "density out of range": (["--density", "1.5"], "--density must be in (0, 1], got 1.5", 2),
    "rank larger than the layer": (["--method", "svd", "--rank", "4096"], "is larger than layer", 2),
    "rank that is no rule": (["--method", "ties", "--rank", "half"], "--rank 'half': give one of N, P% (an error target, e.g. 1%), sum, max, full", 2),
    "error target out of range": (["--method", "ties", "--rank", "150%"], "--rank '150%': an error target is a percentage between 0 and 100", 2),
    "rank for an exact method": (["--method", "linear", "--rank", "4"], "--rank applies to svd, ties", 2),
    "unknown precision": (["--save_precision", "fp8"], "--save_precision must be fp32, fp16, bf16, got 'fp8'", 2),
    "unknown method": (["--method", "average"], "unknown --method 'average'", 2),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_merge_input_gives_one_clear_line(case, two_loras, tiny_sdxl_path, tmp_path, capsys):
    first, second = two_loras
    extra, message, count = BAD[case]
    loras = ["--lora", first] + (["--lora", second] if count == 2 else [])
    extra = [f"{second}{a[len('SECOND'):]}" if a.startswith("SECOND") else a for a in extra]
    code, _, err = run_merge(capsys, "-m", tiny_sdxl_path, *loras, *extra, "--out", tmp_path)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


@pytest.mark.heavy
def test_ziplora_learns_vectors_that_keep_each_lora_closer_than_a_linear_merge(tiny_sdxl_path, tmp_path, capsys):
    from training_helpers import train_cli, write_images

    loras = {}
    for concept, seed in (("content", 1), ("style", 2)):
        images = write_images(tmp_path / f"{concept}_images", count=2 + seed)
        code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt",
                                 f"a photo of sks {concept}", "--resolution", 64, "--max_train_steps", 40, "--rank", 4,
                                 "--learning_rate", 1e-2, "--seed", seed, "--output_dir", tmp_path / concept)
        assert code == 0, err
        loras[concept] = tmp_path / concept
    # lambda 1e-4, not the paper's 0.01: the penalty sums |cos| over the tiny UNet's 136 layers (136 at the
    # start) while its reconstruction errors are 1e-3..1e-1, so 0.01 would let the penalty alone drive the vectors
    code, out, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", loras["content"], "--lora", loras["style"],
                               "--method", "ziplora", "--content_prompt", "a photo of sks content",
                               "--style_prompt", "a photo of sks style", "--ziplora_steps", 60, "--ziplora_lr", 0.05, "--ziplora_lambda", 1e-4,
                               "--out", tmp_path / "zipped")
    assert code == 0, err
    report = __import__("json").loads((tmp_path / "zipped" / "merge_report.json").read_text())
    history = np.array(report["ziplora"]["history"])
    first, last = history[:5, :2].sum(1).mean(), history[-5:, :2].sum(1).mean()
    assert last < first, f"reconstruction loss {first:.5f} -> {last:.5f}"
    vectors = load_file(tmp_path / "zipped" / "ziplora_merger_vectors.safetensors")
    assert vectors and any(not torch.allclose(v, torch.ones_like(v)) for v in vectors.values())

    # the merged UNet against each LoRA alone, with the learned vectors and with all-ones (= linear merge)
    from common.losses import formulation_for_scheduler

    from common.models import model_modules_on_meta

    pipe = merge_lora.load_base(tiny_sdxl_path)
    modules = model_modules_on_meta(tiny_sdxl_path)
    inputs = [merge_lora.read_input(loras[c], 1.0, modules) for c in ("content", "style")]
    zipped = merge_lora.install_zip_layers(pipe.unet, *inputs)
    generator = torch.Generator().manual_seed(7)
    examples = [example for mode in ("content", "style")
                for example in merge_lora.zip_examples(pipe, zipped, mode=mode, folder=None, prompt=f"a photo of sks {mode}", size=64,
                                                       generator=generator)]
    formulation, _ = formulation_for_scheduler(pipe.scheduler.config)
    drawn = [(example, formulation.noised_input(example["latents"], generator)) for example in examples for _ in range(4)]
    probes = [(example, noised.model_input, noised.time) for example, noised in drawn]

    def distance(learned: bool) -> list[float]:
        for name, layer in zipped.items():
            layer.m_content.data = vectors[f"{name}.m_content"] if learned else torch.ones_like(layer.m_content)
            layer.m_style.data = vectors[f"{name}.m_style"] if learned else torch.ones_like(layer.m_style)
        totals = {"content": 0.0, "style": 0.0}
        with torch.no_grad():
            for example, model_input, timestep in probes:
                merge_lora.set_mode(zipped, example["mode"])
                target = merge_lora.unet_output(pipe, model_input, timestep, example)
                merge_lora.set_mode(zipped, "merged")
                totals[example["mode"]] += float((merge_lora.unet_output(pipe, model_input, timestep, example) - target).pow(2).mean())
        return [totals["content"], totals["style"]]

    zip_distance, linear_distance = distance(True), distance(False)
    message = f"MSE to each LoRA (content, style): ZipLoRA {zip_distance}, linear {linear_distance}"
    assert zip_distance[0] < linear_distance[0] and zip_distance[1] < linear_distance[1], message


@pytest.mark.heavy
def test_fused_pipeline_equals_the_merged_lora_loaded_on_the_base(two_loras, tiny_sdxl_path, tmp_path, capsys):
    first, second = two_loras
    code, _, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", first, "--lora", second, "--out", tmp_path / "merged",
                             "--fuse_into", tiny_sdxl_path, "--save_pipeline", tmp_path / "fused")
    assert code == 0, err
    with_lora = load_pipe(tiny_sdxl_path)
    with_lora.load_lora_weights(str(tmp_path / "merged"))
    fused = load_pipe(str(tmp_path / "fused"))
    difference = np.abs(generate_array(with_lora) - generate_array(fused)).max()
    assert difference < 1e-4, f"fused and loaded differ by {difference}"


def test_dora_inputs_and_disjoint_loras_are_refused(two_loras, tiny_sdxl_path, tmp_path, capsys):
    from helpers import make_dora_lora

    first, second = two_loras
    make_dora_lora(tiny_sdxl_path, tmp_path / "dora", rank=2, alpha=2)
    code, _, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", tmp_path / "dora", "--lora", second, "--out", tmp_path / "o")
    assert code == 2 and "is a DoRA: merging DoRA magnitudes is not supported yet" in err, err

    state = load_file(first)
    save_file({k: v for k, v in state.items() if ".down_blocks." in k}, tmp_path / "down_only.safetensors")
    save_file({k: v for k, v in state.items() if ".up_blocks." in k}, tmp_path / "up_only.safetensors")
    code, _, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", tmp_path / "down_only.safetensors",
                             "--lora", tmp_path / "up_only.safetensors", "--out", tmp_path / "o")
    assert code == 2 and "the LoRAs share no layer" in err and "unet.down_blocks" in err and "unet.up_blocks" in err, err


@pytest.mark.heavy
def test_ziplora_takes_example_images_from_folders(two_loras, tiny_sdxl_path, tmp_path, capsys):
    """The merge is trained on every image of the folders, one per step in turn: the same images give the same
    merger vectors, another first or another second content image gives other vectors (everything else, seed
    included, unchanged)."""
    import shutil

    from PIL import Image
    from training_helpers import write_images

    first, second = two_loras
    content, style = write_images(tmp_path / "content", 2), write_images(tmp_path / "style", 1)
    other_first, other_second = (shutil.copytree(content, tmp_path / name) for name in ("other_first", "other_second"))
    Image.new("RGB", (64, 64), (30, 30, 200)).save(other_first / "image_0.png")
    Image.new("RGB", (64, 64), (30, 30, 200)).save(other_second / "image_1.png")

    def merger_vectors(content_folder: Path, out: Path) -> dict[str, torch.Tensor]:
        code, _, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", first, "--lora", second, "--method", "ziplora",
                                 "--content_data", content_folder, "--content_prompt", "a dog", "--style_data", style,
                                 "--style_prompt", "a painting", "--ziplora_steps", 3, "--ziplora_penalty", "product",
                                 "--out", out)
        assert code == 0, err
        return load_file(out / "ziplora_merger_vectors.safetensors")

    vectors, again, first_changed, second_changed = (
        merger_vectors(folder, tmp_path / name)
        for folder, name in ((content, "zipped"), (content, "again"), (other_first, "first"), (other_second, "second")))
    assert all(torch.equal(vectors[k], again[k]) for k in vectors), "the same images and seed must give the same merge"
    for which, other in (("first", first_changed), ("second", second_changed)):
        moved = max(float((vectors[k] - other[k]).abs().max()) for k in vectors)
        assert moved > 1e-4, f"another {which} content image changed the merger vectors by only {moved}"
    report = __import__("json").loads((tmp_path / "zipped" / "merge_report.json").read_text())
    assert report["ziplora"]["examples"] == {"content": 2, "style": 1}, report["ziplora"]["examples"]
    state = load_file(tmp_path / "zipped" / "pytorch_lora_weights.safetensors")
    ranks = {v.shape[0] for k, v in state.items() if k.startswith("unet.") and k.endswith("lora_A.weight")}
    assert ranks == {4 + 2}, "ZipLoRA layers have rank r_content + r_style"
    code, _, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", first, "--lora", second, "--method", "ziplora",
                             "--content_data", tmp_path / "nothing_here", "--content_prompt", "a dog",
                             "--style_prompt", "a painting", "--out", tmp_path / "z2")
    assert code == 2 and "--content_data" in err and "is not a folder of images" in err, err


def test_svd_factors_of_a_large_layer_reach_the_truncated_svds_error_without_a_full_svd():
    """At SDXL's sizes a small rank is found by randomized subspace iteration: its error must be the optimal
    (Eckart-Young) error of the exact truncated SVD, and it must not touch the global RNG."""
    from common.lora_formats import svd_factors

    generator = torch.Generator().manual_seed(0)
    gaussian = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    left, right = torch.linalg.qr(gaussian(1280, 12))[0], torch.linalg.qr(gaussian(2048, 12))[0]
    # a merged LoRA's dW: a few strong directions with decaying strength, plus a flat tail (TIES's trimming)
    delta = left @ torch.diag(torch.logspace(0, -2, 12, dtype=torch.float64)) @ right.T + 1e-4 * gaussian(1280, 2048)
    singular = torch.linalg.svdvals(delta)
    state = torch.random.get_rng_state()
    for rank in (4, 8, 16):
        up, down, error = svd_factors(delta, rank)
        optimal = float(singular[rank:].square().sum().sqrt() / singular.square().sum().sqrt())
        measured = float(torch.linalg.norm(delta - up.double() @ down.double()) / torch.linalg.norm(delta))
        assert up.shape == (1280, rank) and down.shape == (rank, 2048)
        assert error == pytest.approx(measured, rel=1e-4), "the reported error is the factors' error"
        assert optimal * (1 - 1e-9) <= error <= 1.001 * optimal, (rank, error, optimal)
    assert torch.equal(torch.random.get_rng_state(), state)


def report_of(folder: Path) -> dict:
    import json

    return json.loads((folder / "merge_report.json").read_text())


@pytest.mark.parametrize("method", ["ties", "dare_ties", "magnitude_prune"])
def test_a_default_merge_that_changes_entries_stores_the_inputs_ranks_added_with_each_layers_error(method, two_loras, tiny_sdxl_path,
                                                                                                   tmp_path, capsys):
    """TIES, DARE and magnitude pruning make a full-rank dW; by default it is stored at the inputs' ranks added
    (rank 4 + 2 where both inputs have the layer, 4 where only the first does), in fp16, and the report and the
    last line carry the relative error of the factors as written, against a float64 evaluation of the method."""
    first, second = two_loras
    code, out, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", f"{first}:0.7", "--lora", f"{second}:0.4", "--method", method,
                               "--out", tmp_path)
    assert code == 0, err
    state = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    in_second = set(full_deltas(second))
    ranks = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    assert ranks == {name: 6 if name in in_second else 4 for name in ranks}
    assert {v.dtype for v in state.values()} == {torch.float16}
    report = report_of(tmp_path)
    assert report["rank"] == "sum" and report["save_precision"] == "fp16"
    errors = {name: layer["relative_error"] for name, layer in report["layers"].items()}
    assert set(errors) == set(ranks) and all(0 < e < 1 for e in errors.values()), errors
    assert 0 < report["relative_error"] <= max(errors.values())
    assert f"relative error {report['relative_error']:.2e} overall" in out, out
    if method == "ties":  # the reported error is the written factors' error against TIES's dW, measured independently
        names, a, b = references(first, second)
        got = merged_deltas(tmp_path)
        for name in names:
            expected = ties_reference(a[name], b[name], 0.7, 0.4, 0.5)
            measured = float(torch.linalg.norm(got[name] - expected) / torch.linalg.norm(expected))
            assert errors[name] == pytest.approx(measured, rel=1e-6, abs=1e-9), name


@pytest.mark.heavy
def test_fp16_output_loads_with_diffusers_and_equals_the_fp32_merge_within_fp16_rounding(two_loras, tiny_sdxl_path, tmp_path, capsys):
    first, second = two_loras
    for precision in ("fp16", "fp32"):
        code, _, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", first, "--lora", second, "--method", "ties",
                                 "--save_precision", precision, "--kohya", "--out", tmp_path / precision)
        assert code == 0, err
    assert {v.dtype for v in load_file(tmp_path / "fp16" / "fp16.safetensors").values() if v.dim() == 2} == {torch.float16}
    half, full = merged_deltas(tmp_path / "fp16"), merged_deltas(tmp_path / "fp32")
    rounding = max(float(torch.linalg.norm(half[n] - full[n]) / torch.linalg.norm(full[n])) for n in full)
    assert rounding < 2e-3, f"fp16 factors differ from fp32's by {rounding} (relative, worst layer)"
    errors = [report_of(tmp_path / p)["relative_error"] for p in ("fp16", "fp32")]
    assert abs(errors[0] - errors[1]) < 2e-3, f"overall error fp16 {errors[0]}, fp32 {errors[1]}"
    images = []
    for precision, name in (("fp16", "pytorch_lora_weights.safetensors"), ("fp16", "fp16.safetensors"), ("fp32", "pytorch_lora_weights.safetensors")):
        pipe = load_pipe(tiny_sdxl_path)
        pipe.load_lora_weights(str(tmp_path / precision), weight_name=name)
        images.append(generate_array(pipe))
    assert np.abs(images[0] - images[1]).max() <= 1e-5, "the diffusers and kohya fp16 files give the same image"
    difference = np.abs(images[0] - images[2]).max()
    assert difference < 1e-2, f"the fp16 and fp32 merges' images differ by {difference}"


def test_stored_factors_are_balanced_so_fp16_keeps_weak_directions_and_their_error_is_measured():
    """An SVD puts all of s_k in up (U S, V^T): at a LoRA's singular values of 1e-4 and below, up's entries
    s_k u_ik fall under fp16's normal range (6e-5). Balanced (||up_k|| = ||down_k||) they do not, and rounding
    loses 10x less. The error stored() reports equals a direct float64 evaluation."""
    generator = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(64, 8, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(96, 8, generator=generator, dtype=torch.float64))[0]
    strengths = torch.logspace(-4, -6, 8, dtype=torch.float64)
    layer = merge_lora.MergedLayer(v.T, u * strengths)
    delta = layer.up @ layer.down
    unbalanced = float(torch.linalg.norm(delta - layer.up.half().double() @ layer.down.half().double()) / torch.linalg.norm(delta))
    for reference in (None, delta):
        kept = merge_lora.stored(layer, torch.float16, reference)
        direct = float(torch.linalg.norm(delta - kept.up.double() @ kept.down.double()) / torch.linalg.norm(delta))
        assert kept.relative_error == pytest.approx(direct, rel=1e-6), (kept.relative_error, direct)
        assert kept.relative_error < 1e-3 < unbalanced, f"fp16 error balanced {kept.relative_error}, unbalanced {unbalanced}"
        torch.testing.assert_close(kept.up.double().norm(dim=0), kept.down.double().norm(dim=1), rtol=2e-3, atol=0)


def safetensors_data_bytes(path: Path) -> int:
    """A safetensors file's tensor bytes: its size less the 8-byte header length and the JSON header."""
    with open(path, "rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
    return path.stat().st_size - 8 - header


def test_the_size_announced_before_writing_is_what_the_files_hold(two_loras, tiny_sdxl_path, tmp_path, capsys, monkeypatch):
    first, second = two_loras
    monkeypatch.setattr(merge_lora, "LARGE_FILE_BYTES", 1)  # every output counts as large
    code, out, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", first, "--lora", second, "--method", "ties",
                               "--save_precision", "fp32", "--kohya", "--out", tmp_path / "merged")
    assert code == 0, err
    layers = len(report_of(tmp_path / "merged")["layers"])
    diffusers_bytes = safetensors_data_bytes(tmp_path / "merged" / "pytorch_lora_weights.safetensors")
    kohya_bytes = safetensors_data_bytes(tmp_path / "merged" / "merged.safetensors") - 4 * layers  # an fp32 alpha per layer
    announced = f"note: the merged LoRA takes {(diffusers_bytes + kohya_bytes) / 2**30:.2f} GiB of fp32 factors; a lower --rank"
    assert diffusers_bytes == kohya_bytes and announced in out and "--save_precision fp16" in out, out
    assert out.index("note: the merged LoRA takes") < out.index("merged 2 LoRAs"), out


def test_a_default_ties_merge_of_sdxl_shaped_loras_is_as_large_as_the_inputs_with_its_error_reported():
    """SDXL's own layer shapes, without its weights. Two rank-32 LoRAs on every attention projection: the default
    (rank sum, fp16) output is the two inputs' size together, where full rank would be GBs; and a TIES merge of one
    layer of each distinct shape stores rank 64 with its measured error."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from common.architectures import SDXL_TEXT_ENCODER_CONFIGS, SDXL_UNET_CONFIG
    from helpers import TEXT_TARGETS, UNET_TARGETS

    with torch.device("meta"):
        models = {"unet": (UNet2DConditionModel(**SDXL_UNET_CONFIG), UNET_TARGETS),
                  "text_encoder": (CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIGS[0])), TEXT_TARGETS),
                  "text_encoder_2": (CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIGS[1])), TEXT_TARGETS)}
    shapes = {f"{component}.{name}": (module.out_features, module.in_features)
              for component, (model, targets) in models.items() for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name.endswith(tuple("." + t for t in targets))}
    input_bytes = sum(2 * 32 * (out_f + in_f) for out_f, in_f in shapes.values())  # one rank-32 fp16 LoRA
    rank_32 = merge_lora.LayerLoRA((1, 1), torch.zeros(32, 1), torch.zeros(1, 32))
    rank = lambda rule, shape: merge_lora.layer_rule(rule, [rank_32, rank_32], shape, 128).rank  # noqa: E731
    default_bytes = sum(2 * rank("sum", s) * sum(s) for s in shapes.values())
    full_bytes = sum(4 * rank("full", s) * sum(s) for s in shapes.values())
    assert default_bytes == 2 * input_bytes < merge_lora.LARGE_FILE_BYTES < full_bytes, (len(shapes), input_bytes, full_bytes)

    generator = torch.Generator().manual_seed(0)
    one_per_shape = {shape: name for name, shape in sorted(shapes.items())}
    inputs = [merge_lora.InputLoRA(Path(f"lora_{k}"), 1.0, {
        name: merge_lora.LayerLoRA((out_f, in_f), torch.randn(32, in_f, generator=generator) / in_f**0.5,
                                   torch.randn(out_f, 32, generator=generator) * 1e-2, 1.0)
        for (out_f, in_f), name in one_per_shape.items()}) for k in range(2)]
    merged, _ = merge_lora.merge_layers(inputs, "ties", density=0.5, sign="total", rank=merge_lora.parse_rank(None, "ties"), seed=0,
                                        precision=torch.float16)
    assert merge_lora.stored_bytes(merged, kohya=False) == sum(2 * 64 * sum(shape) for shape in one_per_shape)
    report = merge_lora.error_report(merged)
    assert all(layer["rank"] == 64 and 0 < layer["relative_error"] < 1 for layer in report["layers"].values()), report["layers"]
    assert 0 < report["relative_error"] <= report["largest_relative_error"]["value"]


# ---------------------------------------------------------------- inputs of every type, ranks sized by error

def file_delta_by_module(path: Path, pipe) -> dict[str, torch.Tensor]:
    """{component.module: dW} of a kohya/LyCORIS file, by ComfyUI's arithmetic reproduced (tests/ui_loaders.py), in
    float64, flattened to (out, in kh kw)."""
    from common.adapters import file_layers
    from common.lora_formats import file_layer_names
    from ui_loaders import comfyui_patch

    targets = file_layer_names(pipe)
    deltas = {}
    for name, tensors in file_layers(load_file(path)).items():
        component, module = targets[name]
        shape = getattr(pipe, component).get_submodule(module).weight.shape
        zero = torch.zeros(shape, dtype=torch.float64)
        deltas[f"{component}.{module}"] = comfyui_patch(zero, {k: v.double() for k, v in tensors.items()}).double().reshape(shape[0], -1)
    return deltas


@pytest.mark.heavy
def test_a_loha_and_a_lokr_merge_with_a_lora_within_the_error_target(two_loras, tiny_sdxl_path, tmp_path, capsys):
    from adapter_helpers import lycoris_file

    loha, lokr = (lycoris_file(tiny_sdxl_path, tmp_path, name, seed=k) for k, name in enumerate(("loha", "lokr")))
    lora = two_loras[0]
    code, out, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", f"{loha}:0.5", "--lora", f"{lokr}:0.3", "--lora", lora,
                               "--method", "linear", "--kohya", "--save_precision", "fp32", "--out", tmp_path / "merged")
    assert code == 0, err
    pipe = load_pipe(tiny_sdxl_path)
    expected = {}
    for path, weight in ((loha, 0.5), (lokr, 0.3)):
        for name, delta in file_delta_by_module(path, pipe).items():
            expected[name] = expected.get(name, 0) + weight * delta
    for name, delta in full_deltas(lora).items():
        expected[name] = expected.get(name, 0) + delta
    merged = merged_deltas(tmp_path / "merged")
    assert merged.keys() == expected.keys()
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    for name in expected:
        error = float(torch.linalg.norm(merged[name] - expected[name]) / torch.linalg.norm(expected[name]))
        assert error <= 0.01 + 1e-6 and abs(error - report["layers"][name]["relative_error"]) < 1e-4, (name, error)
    only_lora = [n for n in expected if n.startswith("text_encoder")]
    assert only_lora and all(report["layers"][n]["relative_error"] < 1e-6 for n in only_lora), "LoRA-only layers stay exact"
    weights = load_pipe(tiny_sdxl_path)
    load_loras(weights, [LoraSpec(tmp_path / "merged" / "merged.safetensors")])
    conv = next(n for n in expected if n.endswith("conv1"))
    patched = weights.unet.get_submodule(conv.removeprefix("unet.")).weight - pipe.unet.get_submodule(conv.removeprefix("unet.")).weight
    torch.testing.assert_close(patched.double().reshape(patched.shape[0], -1), merged[conv], rtol=1e-4, atol=1e-6)


def test_an_error_target_meets_itself_on_every_layer_and_a_cap_is_said_in_one_line(two_loras, tiny_sdxl_path, tmp_path, capsys):
    first, second = two_loras
    code, out, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", first, "--lora", second, "--method", "ties", "--rank", "1%",
                               "--out", tmp_path / "target", "--save_precision", "fp32")
    assert code == 0, err
    report = json.loads((tmp_path / "target" / "merge_report.json").read_text())
    layers = report["layers"]
    assert report["rank"] == "1% (at most 128)" and all(layer["relative_error"] <= 0.01 for layer in layers.values()), layers
    ranks = {layer["rank"] for layer in layers.values()}
    assert len(ranks) > 1, "each layer gets the rank its own spectrum needs"
    names, a, b = references(first, second)
    for name in names:  # one rank less would miss the target: the smallest rank that meets it
        delta = ties_reference(a[name], b[name], 1.0, 1.0, 0.5)
        singular = torch.linalg.svdvals(delta)
        rank = layers[name]["rank"]
        below = float(singular[rank - 1:].square().sum().sqrt() / singular.square().sum().sqrt())
        assert below > 0.01 - 1e-9, (name, rank, below)
    code, out, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", first, "--lora", second, "--method", "ties", "--rank", "0.01%",
                               "--max_rank", 2, "--out", tmp_path / "capped")
    assert code == 0, err
    note = [line for line in out.splitlines() if line.startswith("note:") and "--max_rank 2" in line]
    assert len(note) == 1 and "above their error target" in note[0], out
    capped = json.loads((tmp_path / "capped" / "merge_report.json").read_text())["layers"]
    assert max(layer["rank"] for layer in capped.values()) == 2


def test_ziplora_and_blora_refuse_inputs_without_lora_factors(two_loras, tiny_sdxl_path, tmp_path, capsys):
    from adapter_helpers import lycoris_file

    loha = lycoris_file(tiny_sdxl_path, tmp_path, "loha")
    code, _, err = run_merge(capsys, "-m", tiny_sdxl_path, "--lora", two_loras[0], "--lora", loha, "--method", "blora",
                             "--out", tmp_path / "out")
    assert code == 2 and "--method blora merges LoRA factors" in err and "is a LoHa, LoKr or Tucker LoCon" in err, err

#!/usr/bin/env python
"""Merge SDXL LoRAs (and LoCons, LoHas, LoKrs): linear/cat/SVD, TIES, DARE, magnitude pruning, ZipLoRA and B-LoRA,
on delta weights.

    python merge_lora.py --model stabilityai/stable-diffusion-xl-base-1.0 \\
        --lora subject/ --lora style.safetensors:0.8 --method ties --density 0.5 --out merged/

Every method is defined on each layer's delta weight dW (scale * B @ A for a LoRA, its type's formula for a
LoHa or LoKr), which is what users mean by merging LoRAs (peft's `linear` instead mixes the A and B factors
separately, which adds cross terms B_1 A_2; only its `cat` is exact). linear, cat, ZipLoRA and B-LoRA store
LoRA factors exactly; the methods that change dW entry by entry (TIES, DARE, magnitude pruning), `svd`, and
layers with a LoHa or LoKr input are re-factorised by SVD at a practical --rank (by default the inputs' ranks
added, so the file is as large as `linear`'s; or sized by an error target, P%), with each layer's relative
error in merge_report.json; full rank only on request. Factors are written in --save_precision
(fp16 by default, as the UIs load LoRAs) and load with diffusers' load_lora_weights (and, with --kohya, in
WebUI and ComfyUI). Both files carry the metadata the UIs read (`merged_metadata`: kohya's merges' keys, the
inputs' dataset tags, fresh hashes; --no_metadata: kohya's minimum). The inputs are read from their files in
fp32; the base model's weights are read only for ZipLoRA's training (on --device, bf16 on a GPU) and --fuse_into.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

if TYPE_CHECKING:  # imported where used: the scripts parse options and answer --help without torch
    import torch

import typer

from common.cli import UserError, flags, run_app
from common.files import IMAGE_SUFFIXES, LARGE_FILE_BYTES

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")

EXACT_METHODS = ("linear", "cat")
DELTA_METHODS = ("svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # a new dW per layer, re-factorised at --rank
# The names of earlier versions for the compact results: the method at --rank max
SVD_ALIASES = {f"{name}_svd": name for name in DELTA_METHODS if name != "svd"}
METHODS = (*EXACT_METHODS, *DELTA_METHODS, *SVD_ALIASES, "ziplora", "blora")
RANK_CHOICES = ("sum", "max", "full")
# Layers without LoRA factors (LoHa, LoKr inputs) are stored at the smallest rank within this relative error, at most
# DEFAULT_MAX_RANK; see bench/RESULTS.md for the sizes and errors behind the choice.
DEFAULT_ERROR_TARGET = 0.01
DEFAULT_MAX_RANK = 128


@dataclass
class LayerLoRA:
    """One layer of one input, of weight `shape` (out, in[, kh, kw]): dW = scale * up @ down from a LoRA's factors
    (up (out, r), down (r, in kh kw)), or, for a LoHa, LoKr or Tucker LoCon layer, which have no such factors, dW of
    its file tensors by its type's formula (`common.adapters`), made when asked for."""

    shape: tuple[int, ...]
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    scale: float = 1.0
    tensors: dict | None = None  # a layer without LoRA factors: its file tensors, with `adapter` its type
    adapter: object = None

    @property
    def factored(self) -> bool:
        return self.tensors is None

    def delta(self) -> torch.Tensor:
        """dW as a float64 (out, in kh kw) matrix."""
        if self.factored:
            return self.scale * self.up.double() @ self.down.double()
        return self.adapter.delta({k: v.double() for k, v in self.tensors.items()}, self.shape).reshape(self.shape[0], -1)


@dataclass
class InputLoRA:
    path: Path
    weight: float
    layers: dict[str, LayerLoRA]  # "unet.<module>" / "text_encoder.<module>" -> factors
    embedding: Path | None = None


@dataclass
class MergedLayer:
    down: torch.Tensor  # (r, in kh kw)
    up: torch.Tensor  # (out, r)
    relative_error: float = 0.0  # ||dW - up @ down|| / ||dW|| of the factors as written, against the method's dW
    norm: float = 0.0  # ||dW||: weighs the layer in the overall error
    capped: bool = False  # its rank stopped at --max_rank above the error target


# ---------------------------------------------------------------- the merge methods, on delta weights


def linear_merge_factors(layers: list[LayerLoRA | None], weights: list[float]) -> MergedLayer:
    """sum_i w_i dW_i stored exactly: up = [w_1 s_1 B_1 | w_2 s_2 B_2 ...], down = [A_1; A_2; ...] (scale 1)."""
    import torch

    present = [(layer, w) for layer, w in zip(layers, weights) if layer is not None]
    up = torch.cat([w * layer.scale * layer.up.float() for layer, w in present], dim=1)
    down = torch.cat([layer.down.float() for layer, _ in present], dim=0)
    return MergedLayer(down, up)


def layer_rule(rank, layers: list[LayerLoRA], shape: tuple[int, int], max_rank: int):
    """The `RankRule` of a re-factorised layer: --rank's rule as it is, or for the named rules min(out, in) ("full",
    exact), the ranks of the inputs that have the layer added ("sum"), or the largest of them ("max"). A layer with
    an input that has no LoRA factors (LoHa, LoKr) has no rank to add: "sum", "max" and the exact methods take the
    default error target there, capped at `max_rank`."""
    from common.lora_formats import RankRule

    if rank is not None and not isinstance(rank, str):
        return rank
    if rank == "full":
        return RankRule(rank=min(shape))
    if rank is None or not all(layer.factored for layer in layers):
        return RankRule(error=DEFAULT_ERROR_TARGET, cap=max_rank)
    ranks = [layer.down.shape[0] for layer in layers]
    return RankRule(rank=min(sum(ranks) if rank == "sum" else max(ranks), min(shape)))


def factorise(delta: torch.Tensor, rule) -> MergedLayer:
    """dW = up @ down by the rule (`low_rank_factors`: the truncated SVD, the best rank-r approximation); a fixed
    rank of min(out, in) or more is dW itself against the identity on its smaller side, exact without an SVD (one
    float64 SVD per SDXL layer takes most of an hour for a LoRA)."""
    import torch

    from common.lora_formats import low_rank_factors

    out_features, in_features = delta.shape
    if rule.rank is None or rule.rank < min(out_features, in_features):
        factors = low_rank_factors(delta, rule)
        return MergedLayer(factors.down, factors.up, capped=factors.capped)
    if out_features <= in_features:
        return MergedLayer(delta, torch.eye(out_features, dtype=delta.dtype))
    return MergedLayer(torch.eye(in_features, dtype=delta.dtype), delta)


def product_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """||up @ down||_F from the r x r Gram matrices, tr((up^T up)(down down^T)), in float64 and without forming
    the out x in product."""
    up, down = up.double(), down.double()
    return float(((up.T @ up) * (down @ down.T)).sum().clamp_min(0).sqrt())


def stored(layer: MergedLayer, dtype: torch.dtype, delta: torch.Tensor | None = None) -> MergedLayer:
    """The layer as written: factors rounded to `dtype` (balanced first for fp16, the one format whose range is
    narrow; fp32 keeps exact factors bit for bit), with their relative Frobenius error in float64 against the
    method's dW, `delta` (None: the layer's own factors are dW exactly, as in linear merges)."""
    import torch

    from common.adapters import balanced_factors

    up, down = balanced_factors(layer.up, layer.down) if dtype == torch.float16 else (layer.up.double(), layer.down.double())
    up_out, down_out = up.to(dtype).contiguous(), down.to(dtype).contiguous()
    if delta is None:  # the residual up down - up' down' is itself a product: [up | up'] [down; -down']
        norm = product_norm(up, down)
        residual = product_norm(torch.cat([up, up_out.double()], dim=1), torch.cat([down, -down_out.double()], dim=0))
    else:
        norm = float(torch.linalg.norm(delta))
        residual = float(torch.linalg.norm(delta.double() - up_out.double() @ down_out.double()))
    return MergedLayer(down_out, up_out, residual / norm if norm > 0 else 0.0, norm, layer.capped)


def overall_error(merged: dict[str, MergedLayer]) -> float:
    """The relative Frobenius error of all layers' dW together: sqrt(sum ||R_l||^2 / sum ||dW_l||^2)."""
    total = sum(layer.norm**2 for layer in merged.values())
    return (sum((layer.relative_error * layer.norm) ** 2 for layer in merged.values()) / total) ** 0.5 if total > 0 else 0.0


def stored_bytes(merged: dict[str, MergedLayer], *, kohya: bool) -> int:
    """The bytes of factors the output holds (headers and kohya's alphas aside): every layer's two factors as
    stored, twice with --kohya."""
    values = sum(t.numel() * t.element_size() for layer in merged.values() for t in (layer.up, layer.down))
    return values * (2 if kohya else 1)


def ties_delta(deltas: list[torch.Tensor], weights: list[float], density: float, majority_sign_method: str) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023, Alg. 1) on dW: trim each to its top-`density` magnitudes, elect the
    sign of largest total mass per entry, average the weighted entries that agree with it."""
    import torch
    from peft.utils.merge_utils import ties

    return ties(deltas, torch.tensor(weights, dtype=deltas[0].dtype), density, majority_sign_method)


def dare_delta(deltas: list[torch.Tensor], weights: list[float], density: float, majority_sign_method: str | None) -> torch.Tensor:
    """DARE (Yu et al. 2024, Eq. 3): drop each entry with probability 1 - density, rescale the rest by
    1/density, then add (dare_linear) or TIES-merge (dare_ties) the weighted results."""
    import torch
    from peft.utils.merge_utils import dare_linear, dare_ties

    weights_tensor = torch.tensor(weights, dtype=deltas[0].dtype)
    if majority_sign_method is None:
        return dare_linear(deltas, weights_tensor, density)
    return dare_ties(deltas, weights_tensor, density, majority_sign_method)


def magnitude_prune_delta(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """Keep each dW's top-`density` entries by magnitude, then add them with their weights."""
    import torch
    from peft.utils.merge_utils import magnitude_prune

    return magnitude_prune(deltas, torch.tensor(weights, dtype=deltas[0].dtype), density)


def merged_delta(method: str, deltas: list[torch.Tensor], weights: list[float], density: float, sign: str) -> torch.Tensor:
    if method == "svd":
        return sum(w * d for w, d in zip(weights, deltas))
    if method == "ties":
        return ties_delta(deltas, weights, density, sign)
    if method == "dare_linear":
        return dare_delta(deltas, weights, density, None)
    if method == "dare_ties":
        return dare_delta(deltas, weights, density, sign)
    if method == "magnitude_prune":
        return magnitude_prune_delta(deltas, weights, density)
    raise ValueError(method)


def zip_lora_factors(content: LayerLoRA, style: LayerLoRA, m_content: torch.Tensor, m_style: torch.Tensor) -> MergedLayer:
    """ZipLoRA's merged layer (Shah et al. 2023, Eq. 3) as an ordinary LoRA of rank r_c + r_s: scaling the
    columns of dW = s B A by m equals s B (A diag(m)), so up = [s_c B_c | s_s B_s] and
    down = [A_c diag(m_c); A_s diag(m_s)]."""
    import torch

    up = torch.cat([content.scale * content.up.float(), style.scale * style.up.float()], dim=1)
    down = torch.cat([content.down.float() * m_content.float(), style.down.float() * m_style.float()], dim=0)
    return MergedLayer(down, up)


def cosine_penalty(m_content: torch.Tensor, m_style: torch.Tensor) -> torch.Tensor:
    """|cos(m_c, m_s)|, ZipLoRA's orthogonality term (Shah et al. 2023, Eq. 5)."""
    import torch

    return torch.nn.functional.cosine_similarity(m_content, m_style, dim=0).abs()


def product_penalty(m_content: torch.Tensor, m_style: torch.Tensor) -> torch.Tensor:
    """mean |m_c * m_s|, the term of the public ZipLoRA implementation (instead of the paper's cosine)."""
    return (m_content * m_style).abs().mean()


# ---------------------------------------------------------------- the script


@app.command()
def main(
    lora: Annotated[list[str], typer.Option(*flags("lora"), help="PATH[:WEIGHT], two or more (one or more with --into_checkpoint); diffusers or kohya files or training folders")],
    out: Annotated[Optional[Path], typer.Option(*flags("out", "--output_dir", "-o"), help="folder for the merged LoRA")] = None,
    model: Annotated[str, typer.Option(*flags("pretrained_model_name_or_path", "--model", "-m"), help="the base the LoRAs were trained on: a built-in name, a diffusers folder, a single-file checkpoint or a hub id")] = "tiny-sdxl",
    into_checkpoint: Annotated[Optional[Path], typer.Option(*flags("into_checkpoint"), help="instead of a merged LoRA: bake every --lora (LoRA, LoCon, LoHa, LoKr, DoRA) at its weight into --model and write a single-file checkpoint (.safetensors) for WebUI and ComfyUI, keeping the base's flavour; --method blora bakes each input's B-LoRA block only")] = None,
    title: Annotated[Optional[str], typer.Option(*flags("title"), help="--into_checkpoint: the checkpoint's modelspec.title (default: its file name)")] = None,
    prediction_type: Annotated[Optional[str], typer.Option(*flags("prediction_type"), help="epsilon or v_prediction, where the base does not say it (a v-prediction file without its v_pred key)")] = None,
    zero_terminal_snr: Annotated[bool, typer.Option(*flags("zero_terminal_snr", "--rescale_betas_zero_snr"), help="the base was trained with zero-terminal SNR, where it does not say so (a ztsnr key)")] = False,
    method: Annotated[str, typer.Option(*flags("method"), help=", ".join(METHODS))] = "linear",
    density: Annotated[float, typer.Option(*flags("density"), help="fraction kept by TIES, DARE and magnitude pruning")] = 0.5,
    majority_sign_method: Annotated[str, typer.Option(*flags("majority_sign_method"), help="total or frequency")] = "total",
    rank: Annotated[Optional[str], typer.Option(*flags("rank"), help="stored rank of svd, ties, dare_*, magnitude_prune: N, P% (per layer the smallest rank within P% relative error, e.g. 1%), sum (the inputs' ranks added), max (the largest) or full (exact; large); default sum, max for svd and the *_svd names")] = None,
    max_rank: Annotated[int, typer.Option(*flags("max_rank"), help="the most an error target (P%, and LoHa/LoKr inputs' default) may store")] = DEFAULT_MAX_RANK,
    save_precision: Annotated[Optional[str], typer.Option(*flags("save_precision"), help="fp16, bf16 or fp32 (default: fp16 for LoRA factors, as the UIs load them; a checkpoint in its base's precision)")] = None,
    seed: Annotated[int, typer.Option(*flags("seed"), help="DARE's random drops; ZipLoRA's noise")] = 0,
    kohya: Annotated[bool, typer.Option(*flags("kohya"), help="also write the WebUI/ComfyUI (kohya) file")] = False,
    content_alpha: Annotated[float, typer.Option(*flags("content_alpha"), help="B-LoRA: scales the content block's dW")] = 1.0,
    style_alpha: Annotated[float, typer.Option(*flags("style_alpha"), help="B-LoRA: scales the style block's dW")] = 1.0,
    blocks: Annotated[Optional[str], typer.Option(*flags("blocks"), help="B-LoRA: block per input, comma-separated (default content,style)")] = None,
    content_data: Annotated[Optional[Path], typer.Option(*flags("content_data"), help="ZipLoRA: folder of content images, one per step in turn (default: one made by the content LoRA)")] = None,
    content_prompt: Annotated[Optional[str], typer.Option(*flags("content_prompt"), help="ZipLoRA: the content LoRA's prompt")] = None,
    style_data: Annotated[Optional[Path], typer.Option(*flags("style_data"), help="ZipLoRA: folder of style images, one per step in turn (default: one made by the style LoRA)")] = None,
    style_prompt: Annotated[Optional[str], typer.Option(*flags("style_prompt"), help="ZipLoRA: the style LoRA's prompt")] = None,
    ziplora_steps: Annotated[int, typer.Option(*flags("ziplora_steps"))] = 100,
    ziplora_lr: Annotated[float, typer.Option(*flags("ziplora_lr"))] = 0.01,
    ziplora_lambda: Annotated[float, typer.Option(*flags("ziplora_lambda", "--similarity_lambda"))] = 0.01,
    ziplora_penalty: Annotated[str, typer.Option(*flags("ziplora_penalty"), help="cosine (paper) or product (public code)")] = "cosine",
    ziplora_resolution: Annotated[Optional[int], typer.Option(*flags("ziplora_resolution"), help="default: the model's native size")] = None,
    device: Annotated[str, typer.Option(*flags("device"), help="ZipLoRA's device: auto (cuda if present), cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(*flags("dtype"), help="ZipLoRA's base-model dtype: auto (bf16 on a GPU, fp32 on the CPU), fp32, fp16, bf16")] = "auto",
    fuse_into: Annotated[Optional[str], typer.Option(*flags("fuse_into"), help="a model to fuse the merge into (needs --save_pipeline)")] = None,
    save_pipeline: Annotated[Optional[Path], typer.Option(*flags("save_pipeline"), help="where the fused pipeline goes")] = None,
    force: Annotated[bool, typer.Option(*flags("force"), help="replace a merge or LoRA already in --out (never an input)")] = False,
    no_metadata: Annotated[bool, typer.Option(*flags("no_metadata"), help="write only kohya's minimum metadata (network, rank, alpha, SDXL) and ModelSpec's required keys, not the inputs' titles, datasets and tags")] = False,
) -> None:
    """Merge two or more SDXL LoRAs into one file that loads anywhere, or bake LoRAs into a single-file checkpoint."""
    from common.cli import parse_dtype
    from common.lora_formats import parse_weighted_path
    from common.models import FlavourOptions, device_and_dtype, model_modules_on_meta

    specs = [parse_weighted_path(spec) for spec in lora]
    flavour = FlavourOptions.of_flags(prediction_type, zero_terminal_snr)
    if into_checkpoint is not None:
        if no_metadata:
            raise UserError("--no_metadata applies to merged LoRA files (--out); a checkpoint (--into_checkpoint) carries "
                            "ModelSpec's keys only: its title, resolution and what it was merged from")
        if out is not None:
            raise UserError("--into_checkpoint writes a checkpoint and --out a merged LoRA: give one of them")
        bake(model, specs, into_checkpoint, method=method, blocks=blocks, content_alpha=content_alpha, style_alpha=style_alpha,
             save_precision=save_precision, title=title, flavour=flavour, force=force)
        return
    if out is None:
        raise UserError("give --out FOLDER for the merged LoRA (or --into_checkpoint FILE to bake the LoRAs into the base)")
    save_precision = save_precision or "fp16"
    validate(method, specs, density=density, sign=majority_sign_method, save_precision=save_precision, penalty=ziplora_penalty,
             fuse_into=fuse_into, save_pipeline=save_pipeline, steps=ziplora_steps)
    if max_rank < 1:
        raise UserError(f"--max_rank must be at least 1, got {max_rank}")
    rank_choice = parse_rank(rank, method, max_rank)
    check_outputs(out, save_pipeline, [path for path, _ in specs], force=force)
    precision = parse_dtype(save_precision)
    modules = model_modules_on_meta(model)
    inputs = [read_input(path, weight, modules) for path, weight in specs]
    for lora_input in inputs:
        check_fits(lora_input, modules, model)
    check_compatible(inputs)
    if method in ("ziplora", "blora"):
        unfactored = next((i.path for i in inputs if not all(layer.factored for layer in i.layers.values())), None)
        if unfactored is not None:
            raise UserError(f"--method {method} merges LoRA factors; {str(unfactored)!r} is a LoHa, LoKr or Tucker LoCon: "
                            "use linear, svd, ties, dare_linear, dare_ties or magnitude_prune")
    if method == "ziplora":
        pipe = load_base(model, *device_and_dtype(device, dtype), flavour=flavour)
        merged, report = zip_merge(pipe, inputs, content_data=content_data, content_prompt=content_prompt, style_data=style_data,
                                   style_prompt=style_prompt, steps=ziplora_steps, lr=ziplora_lr, similarity_weight=ziplora_lambda,
                                   penalty_name=ziplora_penalty, resolution=ziplora_resolution, seed=seed, out=out, precision=precision)
    elif method == "blora":
        merged, report = block_merge(inputs, blocks=blocks, content_alpha=content_alpha, style_alpha=style_alpha, precision=precision)
    else:
        merged, report = merge_layers(inputs, SVD_ALIASES.get(method, method), density=density, sign=majority_sign_method,
                                      rank=rank_choice, seed=seed, precision=precision, max_rank=max_rank)
    capped = [name for name, layer in merged.items() if layer.capped]
    if capped:
        worst = max(capped, key=lambda name: merged[name].relative_error)
        typer.echo(f"note: {len(capped)} layer(s) stopped at --max_rank {max_rank} above their error target; the largest "
                   f"error is {merged[worst].relative_error:.2%} in {worst} (a larger --max_rank lowers it)")
    size = stored_bytes(merged, kohya=kohya)
    if size > LARGE_FILE_BYTES:
        typer.echo(large_file_notice(size, save_precision, method))
    shapes = {name: layer.shape for lora_input in inputs for name, layer in lora_input.layers.items()}
    token_lines = write_outputs(merged, inputs, out, kohya=kohya, layers_per_block=modules["unet"].config.layers_per_block, shapes=shapes,
                                metadata=merged_metadata(inputs, merged, out=out, model=model, minimal=no_metadata),
                                report={"method": method, "model": model, "density": density, "rank": describe_rank(rank_choice),
                                        "save_precision": save_precision, "seed": seed, **report, **error_report(merged)})
    for line in token_lines:
        typer.echo(line)
    if fuse_into:
        fuse(fuse_into, out, save_pipeline)
    typer.echo(f"merged {len(inputs)} LoRAs with {method} into {out}/: {size / 2**20:.1f} MiB of {save_precision} factors"
               f"{f' at rank {describe_rank(rank_choice)}' if rank_choice else ''}, {error_summary(merged)}")


def check_outputs(out: Path, save_pipeline: Path | None, inputs: list[Path], *, force: bool) -> None:
    """Before any work: --out is a writable folder that is no input's, and holds no LoRA or merge unless --force."""
    from common.files import writable_folder
    from common.lora_formats import DIFFUSERS_LORA_FILE, lora_file

    for path in inputs:
        if lora_file(path).resolve().parent == out.resolve():
            raise UserError(f"--out {str(out)!r} holds the input {str(path)!r}; write the merge to another folder")
    writable_folder(out, "--out")
    taken = [out / name for name in (DIFFUSERS_LORA_FILE, "merge_report.json") if (out / name).exists()]
    if taken and not force:
        raise UserError(f"{str(taken[0])!r} exists; pass --force to replace it, or choose another --out")
    if save_pipeline is not None and save_pipeline.exists() and any(save_pipeline.iterdir()) and not force:
        raise UserError(f"--save_pipeline {str(save_pipeline)!r} is not empty; pass --force to replace it")


def validate(method, specs, *, density, sign, save_precision, penalty, fuse_into, save_pipeline, steps) -> None:
    from common.cli import DTYPES

    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if save_precision not in DTYPES:
        raise UserError(f"--save_precision must be {', '.join(DTYPES)}, got {save_precision!r}")
    if len(specs) < 2:
        raise UserError(f"merging needs two or more --lora, got {len(specs)}")
    if method in ("ziplora", "blora") and len(specs) != 2:
        raise UserError(f"--method {method} merges exactly two LoRAs (content, then style), got {len(specs)}")
    if not 0 < density <= 1:
        raise UserError(f"--density must be in (0, 1], got {density}")
    if sign not in ("total", "frequency"):
        raise UserError(f"--majority_sign_method must be total or frequency, got {sign!r}")
    if penalty not in ("cosine", "product"):
        raise UserError(f"--ziplora_penalty must be cosine or product, got {penalty!r}")
    if steps < 1:
        raise UserError(f"--ziplora_steps must be >= 1, got {steps}")
    if bool(fuse_into) != bool(save_pipeline):
        raise UserError("--fuse_into MODEL and --save_pipeline DIR go together")


def parse_rank(text: str | None, method: str, max_rank: int = 0):
    """--rank for the re-factorising methods: a rule (sum, max, full) or a `RankRule` (a number, or an error target
    P% capped at --max_rank); None for the exact ones, which store LoRA inputs exactly. Default: sum, as large as
    the inputs together (what linear stores exactly, and exact wherever the method leaves dW inside the inputs'
    span, as DARE and magnitude pruning do at density 1); max for svd and the *_svd names, whose point is a small
    file."""
    from common.lora_formats import parse_rank_rule

    if method not in DELTA_METHODS and method not in SVD_ALIASES:
        if text is not None:
            raise UserError(f"--rank applies to {', '.join(DELTA_METHODS)} and the *_svd names; {method} stores LoRA inputs exactly "
                            f"(and LoHa/LoKr inputs at the default error target)")
        return None
    if text is None:
        return "max" if method == "svd" or method in SVD_ALIASES else "sum"
    return parse_rank_rule(text, "--rank", named=RANK_CHOICES, cap=max_rank or None)


def describe_rank(rank) -> str:
    """--rank as given: a rule's name, a number, an error target (1%, at most 128), or exact (None)."""
    if rank is None or isinstance(rank, str):
        return rank or "exact"
    if rank.error is None:
        return str(rank.rank)
    return f"{100 * rank.error:g}%" + (f" (at most {rank.cap})" if rank.cap else "")


def load_base(model: str, device: torch.device | None = None, dtype: torch.dtype | None = None, flavour=None):
    """The base pipeline, for what needs its weights: ZipLoRA's training, --fuse_into and --into_checkpoint (fp32 unless
    `dtype`), its flavour read (and overridden by `flavour`, the FlavourOptions) as every script reads it."""
    import torch

    from common.models import load_sdxl_pipeline

    pipe = load_sdxl_pipeline(model, dtype or torch.float32, flavour=flavour, say=typer.echo)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_input(path: Path, weight: float, modules: dict) -> InputLoRA:
    """One input in any format as its layers, read from its file in fp32 (loading it into a bf16 model would round
    its factors to bf16): a diffusers/peft LoRA through diffusers' converters, a kohya/LyCORIS file (LoRA, LoCon,
    LoHa, LoKr) by its layer names on the base model's `modules` (meta-device models, for names and shapes)."""
    from common.lora_formats import is_dora, is_kohya_format, lora_file, read_peft_lora, safetensors_keys
    from common.tokens import read_embedding

    file = lora_file(path)
    embeddings = sorted(file.parent.glob("*_emb.safetensors"))
    embedding = embeddings[0] if embeddings else None
    if embedding is not None:
        read_embedding(embedding)  # refused now (a non-finite row, a bad shape), not after the merge's work
    if is_kohya_format(safetensors_keys(file, "LoRA")):
        return InputLoRA(path, weight, kohya_input_layers(file, modules, path), embedding)
    try:
        states, alphas = read_peft_lora(file)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"could not read LoRA {str(path)!r}: {error}") from None
    layers = {}
    for component, state in states.items():
        if is_dora(state):
            raise UserError(f"{str(path)!r} is a DoRA: merging DoRA magnitudes is not supported yet; "
                            "bake it into a plain LoRA first (convert_for_webui.py)")
        for module, alpha in alphas[component].items():
            down, up = state[f"{module}.lora_A.weight"].float(), state[f"{module}.lora_B.weight"].float()
            layers[f"{component}.{module}"] = LayerLoRA((up.shape[0], *down.shape[1:]), down.flatten(1), up.flatten(1),
                                                        float(alpha) / down.shape[0])
    return InputLoRA(path, weight, layers, embedding)


def kohya_input_layers(file: Path, modules: dict, path: Path) -> dict[str, LayerLoRA]:
    """A kohya/LyCORIS file's layers: LoRA factors where the layer has them (LoRA, LoCon), its file tensors where it
    has none (LoHa, LoKr, Tucker LoCon); a layer naming no module of the base, or a DoRA layer, refused in one line."""
    from types import SimpleNamespace

    from common.adapters import adapter_of_layer, alpha_scale, file_layers
    from common.lora_formats import file_layer_names, read_finite_safetensors

    targets = file_layer_names(SimpleNamespace(**modules))
    layers = {}
    for name, tensors in file_layers(read_finite_safetensors(file, "LoRA")).items():
        if name not in targets:
            raise UserError(f"LoRA {str(path)!r} does not match the base model: its layer {name!r} names no layer of it; "
                            "was it trained for another base?")
        component, module = targets[name]
        adapter = adapter_of_layer(tensors, f"layer {name} of {str(path)!r}")
        if "dora_scale" in tensors:
            raise UserError(f"{str(path)!r} is a DoRA: merging DoRA magnitudes is not supported yet; "
                            "bake it into a plain LoRA first (convert_for_webui.py)")
        shape = tuple(modules[component].get_submodule(module).weight.shape)
        if adapter.name == "lora" and "lora_mid.weight" not in tensors:
            down, up = tensors["lora_down.weight"].float(), tensors["lora_up.weight"].float()
            layer = LayerLoRA(shape, down.flatten(1), up.flatten(1), alpha_scale(tensors, down.shape[0]))
        else:
            layer = LayerLoRA(shape, tensors={k: v.float() for k, v in tensors.items()}, adapter=adapter)
        layers[f"{component}.{module}"] = layer
    return layers


def check_fits(lora: InputLoRA, modules: dict, model: str) -> None:
    """Every layer of the input is a Linear or Conv2d of the base model with the input's shapes (and a LoHa or
    LoKr layer's tensors make a dW of that shape): an input for another base is refused with the first layer that
    does not fit, never merged partially."""
    import torch

    named = {component: dict(model.named_modules()) for component, model in modules.items()}
    for name, layer in lora.layers.items():
        component, module_name = name.split(".", 1)
        module = named.get(component, {}).get(module_name)
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and tuple(module.weight.shape) == layer.shape:
            shapes = {k: v.to("meta") if k != "alpha" else v for k, v in (layer.tensors or {}).items()}
            try:
                if shapes:
                    layer.adapter.delta(shapes, layer.shape)
                elif layer.up.shape[0] * layer.down.shape[1] != math.prod(layer.shape):
                    raise RuntimeError("factors of another shape")
                continue
            except RuntimeError:
                pass
        found = f"a {tuple(module.weight.shape)} {type(module).__name__}" if hasattr(module, "weight") else "no such layer"
        raise UserError(f"LoRA {str(lora.path)!r} does not match model {model!r}: its layer {name} is {layer.shape}, "
                        f"the model has {found}; was it trained for another base?")


def check_compatible(inputs: list[InputLoRA]) -> None:
    names = [set(i.layers) for i in inputs]
    if not set.intersection(*names):
        raise UserError(f"the LoRAs share no layer: {inputs[0].path} has e.g. {sorted(names[0])[:2]}, "
                        f"{inputs[1].path} has e.g. {sorted(names[1])[:2]}")


def merge_layers(inputs: list[InputLoRA], method: str, *, density: float, sign: str, rank, seed: int, precision: torch.dtype,
                 max_rank: int = 0):
    """Every layer any input has, merged by `method` on dW (absent inputs count as dW = 0): linear and cat of LoRA
    factors stored exactly; the rest, and a linear or cat layer with a LoHa or LoKr input, re-factorised by
    `layer_rule(rank)` with their error against dW."""
    import torch

    torch.manual_seed(seed)  # DARE's random drops
    weights = [i.weight for i in inputs]
    merged = {}
    for name in sorted(set().union(*[i.layers for i in inputs])):
        layers = [i.layers.get(name) for i in inputs]
        present = [layer for layer in layers if layer is not None]
        if method in EXACT_METHODS and all(layer.factored for layer in present):
            merged[name] = stored(linear_merge_factors(layers, weights), precision)
            continue
        shape = (present[0].shape[0], math.prod(present[0].shape[1:]))
        rule = layer_rule(rank, present, shape, max_rank or DEFAULT_MAX_RANK)
        if rule.rank is not None and rule.rank > min(shape):
            raise UserError(f"--rank {rule.rank} is larger than layer {name} allows ({min(shape)})")
        deltas = [layer.delta() if layer is not None else torch.zeros(shape, dtype=torch.float64) for layer in layers]
        delta = merged_delta("svd" if method in EXACT_METHODS else method, deltas, weights, density, sign)
        merged[name] = stored(factorise(delta, rule), precision, delta)
    return merged, {}


def error_report(merged: dict[str, MergedLayer]) -> dict:
    """merge_report.json's account of the stored factors: each layer's rank and relative error, and overall."""
    worst = max(merged, key=lambda name: merged[name].relative_error)
    return {"relative_error": overall_error(merged), "largest_relative_error": {"layer": worst, "value": merged[worst].relative_error},
            "layers": {name: {"rank": layer.down.shape[0], "relative_error": layer.relative_error} for name, layer in merged.items()}}


def error_summary(merged: dict[str, MergedLayer]) -> str:
    worst = max(merged, key=lambda name: merged[name].relative_error)
    return f"relative error {overall_error(merged):.2e} overall, largest {merged[worst].relative_error:.2e} in {worst}"


def large_file_notice(size: int, precision: str, method: str) -> str:
    smaller = "a lower --rank (sum, max or a number)" if method in DELTA_METHODS or method in SVD_ALIASES else "fewer or lower-rank inputs"
    if precision == "fp32":
        smaller += " or --save_precision fp16"
    return f"note: the merged LoRA takes {size / 2**30:.2f} GiB of {precision} factors; {smaller} makes it smaller"


def block_merge(inputs: list[InputLoRA], *, blocks: str | None, content_alpha: float, style_alpha: float, precision: torch.dtype):
    """B-LoRA (Frenkel et al. 2024): the content block of the first LoRA and the style block of the second,
    each dW scaled by its alpha (linearly: alpha times the up factor, not times both factors)."""
    chosen = blora_blocks(blocks, 2)
    merged = {}
    for lora, block, alpha in zip(inputs, chosen, (content_alpha, style_alpha)):
        layers = {n: l for n, l in lora.layers.items() if n.startswith(block + ".")}
        if not layers:
            raise UserError(f"{str(lora.path)!r} has no layers under {block!r}")
        for name, layer in layers.items():
            merged[name] = stored(MergedLayer(layer.down.float(), alpha * layer.scale * layer.up.float()), precision)
    return merged, {"blocks": chosen, "alphas": [content_alpha, style_alpha]}


# ---------------------------------------------------------------- ZipLoRA


class ZipLayer:
    """A content and a style LoRA on one frozen Linear, whose dW columns are scaled by trainable vectors; their
    output is added to the Linear's by a forward hook, so the UNet's own modules stay in place.

    mode "merged": W x + s_c B_c A_c (m_c * x) + s_s B_s A_s (m_s * x); "content"/"style": that LoRA alone.
    """

    def __init__(self, base, content: LayerLoRA, style: LayerLoRA):
        import torch

        device = base.weight.device
        self.content, self.style = (LayerLoRA(l.shape, l.down.to(device), l.up.to(device), l.scale) for l in (content, style))
        self.m_content = torch.nn.Parameter(torch.ones(base.in_features, device=device))
        self.m_style = torch.nn.Parameter(torch.ones(base.in_features, device=device))
        self.mode = "merged"
        base.register_forward_hook(self._add_loras)

    @staticmethod
    def _apply(layer: LayerLoRA, x: torch.Tensor) -> torch.Tensor:
        return layer.scale * ((x.float() @ layer.down.T) @ layer.up.T)  # fp32 over a bf16 base: this is what trains

    def _add_loras(self, module, inputs, y: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if self.mode == "content":
            return y + self._apply(self.content, x).to(y.dtype)
        if self.mode == "style":
            return y + self._apply(self.style, x).to(y.dtype)
        return y + (self._apply(self.content, x * self.m_content) + self._apply(self.style, x * self.m_style)).to(y.dtype)


def install_zip_layers(unet, content: InputLoRA, style: InputLoRA) -> dict[str, ZipLayer]:
    import torch

    layers = {}
    for name in sorted(set(content.layers) & set(style.layers)):
        if not name.startswith("unet."):
            continue
        base = unet.get_submodule(name.removeprefix("unet."))
        if not isinstance(base, torch.nn.Linear):
            raise UserError(f"ZipLoRA merges Linear layers; {name} is a {type(base).__name__}")
        layers[name] = ZipLayer(base, content.layers[name], style.layers[name])
    return layers


def zip_merge(pipe, inputs: list[InputLoRA], *, content_data: Path | None, content_prompt: str | None, style_data: Path | None,
              style_prompt: str | None, steps: int, lr: float, similarity_weight: float, penalty_name: str, resolution: int | None, seed: int,
              out: Path, precision: torch.dtype):
    """ZipLoRA (Shah et al. 2023, Sec. 3.3): learn per-column merger vectors so that the merged UNet
    reproduces the content LoRA on content examples and the style LoRA on style examples, while the two
    vectors of each layer stay near-orthogonal. Only the vectors train. Each step takes one example of each
    LoRA, going through each folder's images in turn (step k: image k mod n)."""
    import torch
    from tqdm.auto import tqdm

    from common.losses import formulation_for_scheduler

    content, style = inputs
    torch.set_flush_denormal(True)  # tiny products of two near-zero LoRA paths otherwise crawl on CPUs
    if not content_prompt or not style_prompt:
        raise UserError("--method ziplora needs --content_prompt and --style_prompt (the prompts each LoRA was trained with)")
    pipe.unet.requires_grad_(False)
    zipped = install_zip_layers(pipe.unet, content, style)
    if not zipped:
        raise UserError("the two LoRAs share no UNet layer to merge")
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(seed)
    examples = [zip_examples(pipe, zipped, mode="content", folder=content_data, prompt=content_prompt, size=size, generator=generator),
                zip_examples(pipe, zipped, mode="style", folder=style_data, prompt=style_prompt, size=size, generator=generator)]
    formulation, _ = formulation_for_scheduler(pipe.scheduler.config)  # the base's own: EDM or DDPM, with paper defaults
    penalty = cosine_penalty if penalty_name == "cosine" else product_penalty
    parameters = [p for layer in zipped.values() for p in (layer.m_content, layer.m_style)]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    history = []
    with tqdm(range(steps), desc="ziplora", unit="step") as bar:
        for step in bar:
            terms = []
            for example in (own[step % len(own)] for own in examples):
                # ZipLoRA compares two UNets' outputs at the same input, drawn as training draws it
                noised = formulation.noised_input(example["latents"], generator)
                model_input, timestep = noised.model_input, noised.time
                set_mode(zipped, example["mode"])
                with torch.no_grad():
                    target = unet_output(pipe, model_input, timestep, example)
                set_mode(zipped, "merged")
                terms.append(torch.nn.functional.mse_loss(unet_output(pipe, model_input, timestep, example), target))
            similarity = sum(penalty(layer.m_content, layer.m_style) for layer in zipped.values())
            loss = terms[0] + terms[1] + similarity_weight * similarity
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append([float(terms[0].detach()), float(terms[1].detach()), float(similarity.detach())])
            bar.set_postfix(content=f"{history[-1][0]:.4g}", style=f"{history[-1][1]:.4g}", similarity=f"{history[-1][2]:.4g}")
    merged = {name: zip_lora_factors(content.layers[name], style.layers[name], layer.m_content.detach().cpu(), layer.m_style.detach().cpu())
              for name, layer in zipped.items()}
    for name in sorted((set(content.layers) | set(style.layers)) - set(merged)):  # text-encoder layers: summed
        merged[name] = linear_merge_factors([content.layers.get(name), style.layers.get(name)], [1.0, 1.0])
    save_merger_vectors(zipped, out)
    return {name: stored(layer, precision) for name, layer in merged.items()}, {
        "ziplora": {"steps": steps, "lr": lr, "lambda": similarity_weight, "penalty": penalty_name,
                    "examples": {"content": len(examples[0]), "style": len(examples[1])}, "history": history}}


def set_mode(zipped: dict, mode: str) -> None:
    for layer in zipped.values():
        layer.mode = mode


def zip_examples(pipe, zipped, *, mode: str, folder: Path | None, prompt: str, size: int, generator) -> list[dict]:
    """One LoRA's examples, each (latents, prompt embeddings, SDXL size conditioning): every image of `folder`,
    found and captioned as training finds an --instance_data_dir (sorted; a caption file beside an image, else
    `prompt`) and centre-cropped to size x size as training crops, or, without a folder, one image the LoRA makes
    from its prompt."""
    import random

    import torch

    from common.data import Augment, Example, find_examples, open_rgb, place_image
    from common.generation_options import default_guidance_rescale
    from common.models import normalise_latents

    if folder is None:
        set_mode(zipped, mode)
        with torch.no_grad():
            image = pipe(prompt, num_inference_steps=20, width=size, height=size,
                         guidance_rescale=default_guidance_rescale(pipe.scheduler.config),
                         generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))).images[0]
        found = [Example(image, prompt, f"made by the {mode} LoRA")]
    else:
        try:
            found = find_examples(instance_data_dir=folder, instance_prompt=prompt)
        except UserError:
            raise UserError(f"--{mode}_data {str(folder)!r} is not a folder of images ({', '.join(sorted(IMAGE_SUFFIXES))})") from None
    augment = Augment(resolution=size, center_crop=True)
    device = pipe.unet.device
    prompts, examples = {}, []
    for example in found:
        pixels, placement = place_image(open_rgb(example), augment, random.Random(0))  # centre crop, no flip: nothing random
        with torch.no_grad():
            latents = pipe.vae.encode(pixels[None].to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mean.float().cpu()
            if example.caption not in prompts:
                embeds, _, pooled, _ = pipe.encode_prompt(example.caption, device=device, do_classifier_free_guidance=False)
                prompts[example.caption] = (embeds, pooled)
        embeds, pooled = prompts[example.caption]
        examples.append({"mode": mode, "latents": normalise_latents(latents, pipe.vae.config), "embeds": embeds, "pooled": pooled,
                         "time_ids": placement.time_ids()[None].to(device, pipe.unet.dtype)})
    return examples


def unet_output(pipe, model_input, timestep, example) -> torch.Tensor:
    """The UNet's output in fp32 for a (CPU) noisy input, run on the UNet's device in its dtype."""
    unet = pipe.unet
    return unet(model_input.to(unet.device, unet.dtype), timestep.to(unet.device), encoder_hidden_states=example["embeds"],
                added_cond_kwargs={"text_embeds": example["pooled"], "time_ids": example["time_ids"]}).sample.float().cpu()


def save_merger_vectors(zipped: dict, out: Path) -> None:
    from safetensors.torch import save_file

    from common.files import atomic_path

    vectors = {}
    for name, layer in zipped.items():
        vectors[f"{name}.m_content"] = layer.m_content.detach().cpu().contiguous()
        vectors[f"{name}.m_style"] = layer.m_style.detach().cpu().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "ziplora_merger_vectors.safetensors") as partial:
        save_file(vectors, str(partial))


# ---------------------------------------------------------------- outputs


def merged_embeddings(inputs: list[InputLoRA]):
    """One embedding for all inputs: colliding tokens renamed (<s0><s1> and <s2><s3>), rows concatenated."""
    import torch

    from common.tokens import default_tokens, read_embedding

    clip_l, clip_g, tokens, lines, start = [], [], [], [], 0
    for lora in inputs:
        if lora.embedding is None:
            continue
        rows_l, rows_g = read_embedding(lora.embedding)
        new = default_tokens(rows_l.shape[0], start=start)
        start += rows_l.shape[0]
        clip_l.append(rows_l)
        clip_g.append(rows_g)
        tokens += new
        lines.append(f"{lora.path}: its tokens are now {''.join(new)}")
    if not tokens:
        return None, []
    return (torch.cat(clip_l), torch.cat(clip_g), tokens), lines


def write_outputs(merged: dict, inputs: list[InputLoRA], out: Path, *, kohya: bool, layers_per_block: int, report: dict,
                  metadata: dict[str, str], shapes: dict | None = None) -> list[str]:
    """diffusers LoRA (scale 1 per layer: alpha = rank), optional kohya copy, both with `metadata` and their hashes,
    merged embedding, JSON report. A convolution's factors take LoCon's shapes: down (r, in, kh, kw), up (out, r, 1, 1)."""
    from common.files import atomic_path
    from common.lora_formats import DIFFUSERS_LORA_FILE, peft_lora_to_kohya, save_diffusers_lora
    from common.lora_metadata import add_file_metadata, save_lora_file
    from common.tokens import save_embedding

    out.mkdir(parents=True, exist_ok=True)
    states: dict[str, dict] = {}
    for name, layer in merged.items():
        component, module = name.split(".", 1)
        shape = (shapes or {}).get(name, ())
        down, up = (layer.down.reshape(-1, *shape[1:]), layer.up.reshape(*layer.up.shape, 1, 1)) if len(shape) == 4 else (layer.down, layer.up)
        states.setdefault(component, {})[f"{module}.lora_A.weight"] = down.contiguous()
        states[component][f"{module}.lora_B.weight"] = up.contiguous()
    save_diffusers_lora(out, states)
    add_file_metadata(out / DIFFUSERS_LORA_FILE, metadata)
    if kohya:
        save_lora_file(out / f"{out.resolve().name}.safetensors", peft_lora_to_kohya(states, layers_per_block=layers_per_block), metadata)
    embedding, lines = merged_embeddings(inputs)
    if embedding is not None:
        save_embedding(out / f"{out.resolve().name}_emb.safetensors", *embedding)
    report = {**report, "inputs": [{"path": str(i.path), "weight": i.weight, "layers": len(i.layers)} for i in inputs]}
    with atomic_path(out / "merge_report.json") as partial:
        partial.write_text(json.dumps(report, indent=2, default=str))
    return lines


def merged_metadata(inputs: list[InputLoRA], merged: dict, *, out: Path, model: str, minimal: bool) -> dict[str, str]:
    """The metadata of a merged LoRA (before its hashes), as kohya's merge scripts write it (networks/sdxl_merge_lora.py,
    svd_merge_lora.py: the minimum keys with the rank and alpha, "Dynamic" where layers differ, here alpha = rank as
    every layer is at scale 1; ModelSpec with the output's name as title and the inputs' titles as merged_from) and
    what they drop that still holds for the merge: the inputs' dataset folders and tags (the UIs' dataset size and tag
    list), the base model's name, and the resolution and prediction type the inputs agree on. Inputs' values naming a
    local path are not used."""
    import time

    from common.lora_formats import lora_file
    from common.lora_metadata import (
        MODELSPEC_PREDICTIONS, LoraFacts, carried_metadata, folders_from_metadata, lora_metadata, shareable_metadata,
    )

    carried = [shareable_metadata(carried_metadata(lora_file(i.path)))[0] for i in inputs]
    ranks = {layer.down.shape[0] for layer in merged.values()}
    rank = ranks.pop() if len(ranks) == 1 else "Dynamic"
    resolutions = {parse_modelspec_resolution(c["modelspec.resolution"]) for c in carried if "modelspec.resolution" in c} - {None}
    predictions = {c.get("modelspec.prediction_type") for c in carried} - {None}
    prediction = {v: k for k, v in MODELSPEC_PREDICTIONS.items()}.get(predictions.pop()) if len(predictions) == 1 else None
    facts = LoraFacts("networks.lora", rank, rank, out.resolve().name, base_model=model, made_at=time.time(),
                      folders=tuple(folder for c in carried for folder in folders_from_metadata(c)),
                      resolution=resolutions.pop() if len(resolutions) == 1 else None, prediction_type=prediction,
                      merged_from=tuple(input_title(lora_input.path, c) for lora_input, c in zip(inputs, carried)))
    return lora_metadata(facts, minimal=minimal)


def input_title(path: Path, metadata: dict[str, str]) -> str:
    """An input as merged_from names it: its ModelSpec title, else its kohya output name, else its file's name without
    the suffix (kohya's `build_merged_from`), the training folder's for a diffusers file."""
    from common.lora_formats import DIFFUSERS_LORA_FILE, lora_file

    file = lora_file(path)
    named = file.parent.resolve().name if file.name == DIFFUSERS_LORA_FILE else file.stem
    return metadata.get("modelspec.title") or metadata.get("ss_output_name") or named


def parse_modelspec_resolution(text: str) -> tuple[int, int] | None:
    """ModelSpec's "WxH" as (width, height); None where it is not two positive whole numbers."""
    import re

    found = re.fullmatch(r"([0-9]+)x([0-9]+)", text)
    return (int(found[1]), int(found[2])) if found and int(found[1]) and int(found[2]) else None


def bake(model: str, specs: list[tuple[Path, float]], target: Path, *, method: str, blocks: str | None, content_alpha: float,
         style_alpha: float, save_precision: str | None, title: str | None, flavour, force: bool) -> None:
    """Adapters baked into the base (each at its weight, summed as infer.py applies them; with --method blora only each
    input's block), written as a single-file checkpoint in the SGM layout with the base's flavour markers and ModelSpec
    metadata; the inputs' pivotal-tuning embeddings, which no checkpoint holds, written beside it."""
    from common.checkpoints import checkpoint_tensors, modelspec_metadata, save_checkpoint_file, stored_size
    from common.cli import DTYPE_NAMES, DTYPES, parse_dtype
    from common.files import writable_folder
    from common.lora_formats import LoraSpec, load_loras, lora_file
    from common.models import pipeline_flavour, read_model
    from common.tokens import save_embedding

    if method not in ("linear", "blora"):
        raise UserError(f"--into_checkpoint bakes the adapters as they are (--method linear) or their B-LoRA blocks (--method "
                        f"blora), not --method {method}: merge with it into --out first, then bake the merged LoRA")
    if save_precision is not None and save_precision not in DTYPES:
        raise UserError(f"--save_precision must be {', '.join(DTYPES)}, got {save_precision!r}")
    if target.suffix.lower() != ".safetensors":
        raise UserError(f"--into_checkpoint {str(target)!r}: a checkpoint is written as .safetensors (name it NAME.safetensors)")
    if target.exists() and not force:
        raise UserError(f"{str(target)!r} exists; pass --force to replace it, or choose another --into_checkpoint")
    for path, _ in specs:
        if lora_file(path).resolve() == target.resolve():
            raise UserError(f"--into_checkpoint {str(target)!r} is the input {str(path)!r}; write the checkpoint elsewhere")
    writable_folder(target.parent if str(target.parent) else Path("."), "--into_checkpoint's folder")
    lora_specs = [LoraSpec(path, weight) for path, weight in specs]
    if method == "blora":
        lora_specs = [LoraSpec(spec.path, spec.weight * alpha, (block,)) for spec, alpha, block in
                      zip(lora_specs, (content_alpha, style_alpha), blora_blocks(blocks, len(specs)))]
    reading = read_model(model, flavour)
    base_dtype = reading.weights_dtype if reading is not None else None  # a hub model: fp16, as SDXL is published
    precision = save_precision or DTYPE_NAMES.get(base_dtype, "fp16")
    pipe = load_base(model, flavour=reading or flavour)
    names = load_loras(pipe, lora_specs)  # kohya/LyCORIS files are added to the weights here, as the UIs add them
    if names:  # diffusers/peft adapters (LoRA, DoRA) merged into the weights by peft's own merge
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()
    flavour_made = pipeline_flavour(pipe)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    tensors = checkpoint_tensors(pipe, flavour_made, parse_dtype(precision))
    typer.echo(f"writing {target}: {len(tensors)} tensors, {stored_size(tensors) / 2**30:.2f} GiB in {precision}, "
               f"{flavour_made.name} (as its base)")
    metadata = modelspec_metadata(flavour_made, title=title or target.stem, resolution=native,
                                  merged_from=[Path(model).name or model] + [lora_file(path).name for path, _ in specs])
    save_checkpoint_file(target, tensors, metadata)
    inputs = [InputLoRA(path, weight, {}, next(iter(sorted(lora_file(path).parent.glob("*_emb.safetensors"))), None))
              for path, weight in specs]
    embedding, lines = merged_embeddings(inputs)
    if embedding is not None:
        beside = target.with_name(f"{target.stem}_emb.safetensors")
        save_embedding(beside, *embedding)
        typer.echo(f"the pivotal-tuning embedding cannot go into a checkpoint: it is written beside it as {beside} (put it in "
                   f"WebUI's embeddings/ or ComfyUI's models/embeddings/); write {''.join(embedding[2])} in prompts")
        for line in lines:
            typer.echo(line)


def blora_blocks(blocks: str | None, count: int) -> list[str]:
    """B-LoRA's block per input: --blocks as given, or the content block for the first and the style block for the second."""
    from common.lora_formats import BLORA_BLOCKS, parse_blocks

    chosen = list(parse_blocks(blocks) or BLORA_BLOCKS)
    if len(chosen) != count:
        raise UserError(f"--blocks names one block per input (content,style): {count} input(s), got {chosen}")
    return chosen


def fuse(model: str, merged_dir: Path, save_to: Path) -> None:
    """A full pipeline with the merged LoRA fused into its base weights (in fp32, as the base is read)."""
    from common.files import atomic_folder
    from common.lora_formats import DIFFUSERS_LORA_FILE

    pipe = load_base(model)
    pipe.load_lora_weights(str(merged_dir), weight_name=DIFFUSERS_LORA_FILE, adapter_name="merged")
    pipe.fuse_lora(adapter_names=["merged"])
    pipe.unload_lora_weights()
    with atomic_folder(save_to) as staging:
        pipe.save_pretrained(staging)


if __name__ == "__main__":
    run_app(app)

#!/usr/bin/env python
"""Export a trained SDXL LoRA and its pivotal-tuning embedding for Stable Diffusion WebUI and ComfyUI.

    python convert_for_webui.py out/my_dog --name my_dog --webui_dir ~/stable-diffusion-webui
    python convert_for_webui.py out/my_dog --name my_dog --comfyui_dir ~/ComfyUI
    python convert_for_webui.py out/my_dog/pytorch_lora_weights.safetensors --name my_dog --out exported/

The LoRA becomes one kohya-format file (`lora_unet_*`, `lora_te1_*`, `lora_te2_*` with the trained
alpha per layer, so alpha / rank reproduces the trained strength) with kohya's, ModelSpec's and the hash
metadata the UIs read (`common.lora_metadata`): the training facts the source carries go with it, its name,
title and hashes are the new file's; --no_metadata writes kohya's minimum only. The embedding becomes
NAME.safetensors with `clip_l` and `clip_g`. The prompts to use in each UI are printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from common.cli import UserError, flags, run_app
from common.files import writable_file

if TYPE_CHECKING:
    from common.lora_metadata import LoraFacts

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")

WEBUI_FOLDERS = ("models/Lora", "embeddings")
COMFYUI_FOLDERS = ("models/loras", "models/embeddings")
# By default a DoRA is baked at the smallest rank per layer within this relative error, at most twice the DoRA's rank
# (the measured sizes and errors behind the choice: bench/RESULTS.md, "Ranks sized by error").
DEFAULT_ERROR_TARGET = 0.01


@app.command()
def main(
    lora: Annotated[Path, typer.Argument(help="a training output folder or a diffusers LoRA file")],
    name: Annotated[Optional[str], typer.Option(*flags("name"), help="the name in the UI (default: the folder's name)")] = None,
    webui_dir: Annotated[Optional[Path], typer.Option(*flags("webui_dir"), help="a stable-diffusion-webui installation")] = None,
    comfyui_dir: Annotated[Optional[Path], typer.Option(*flags("comfyui_dir"), help="a ComfyUI installation")] = None,
    out: Annotated[Optional[Path], typer.Option(*flags("out", "-o"), help="a plain output folder")] = None,
    force: Annotated[bool, typer.Option(*flags("force"), help="replace files that already exist")] = False,
    model: Annotated[Optional[str], typer.Option(*flags("pretrained_model_name_or_path", "--model", "-m"), help="the base model: needed for a DoRA (baked, or native for ComfyUI)")] = None,
    rank: Annotated[Optional[str], typer.Option(*flags("rank"), help="rank of a baked DoRA: N, P% (per layer the smallest rank within P% relative error, e.g. 1%) or full; default 1%, at most twice the DoRA's rank")] = None,
    max_rank: Annotated[Optional[int], typer.Option(*flags("max_rank"), help="the most an error target may store (default: twice the DoRA's rank)")] = None,
    save_precision: Annotated[str, typer.Option(*flags("save_precision"), help="fp16 (as UI LoRAs are shared), bf16 or fp32 for the LoRA factors")] = "fp16",
    to: Annotated[str, typer.Option(*flags("to"), help="kohya (for the UIs) or diffusers (a kohya file back, for merge_lora/train)")] = "kohya",
    check: Annotated[bool, typer.Option(*flags("check"), help="only report what WebUI and ComfyUI do with a kohya LoRA or an embedding file")] = False,
    dora_native: Annotated[Optional[str], typer.Option(*flags("dora_native"), help="comfyui: write a DoRA's dora_scale for ComfyUI's loader instead of baking it (needs --model)")] = None,
    no_metadata: Annotated[bool, typer.Option(*flags("no_metadata"), help="write only kohya's minimum metadata (network, rank, alpha, SDXL) and ModelSpec's required keys, not the training facts (dataset, tags, dates, seed, learning rates)")] = False,
) -> None:
    """Write the LoRA (kohya format) and the embedding where WebUI or ComfyUI look for them."""
    from common.lora_formats import lora_file, safetensors_keys

    if check:
        raise typer.Exit(check_file(lora))
    if to not in ("kohya", "diffusers"):
        raise UserError(f"--to {to!r}; use kohya or diffusers")
    dtype = parse_save_precision(save_precision)
    if dora_native not in (None, "comfyui"):
        raise UserError(f"--dora_native {dora_native!r}: only comfyui; WebUI's dora_scale normalises input columns, "
                        "which no peft DoRA (output rows) maps onto exactly, so for WebUI the DoRA is baked (give --model)")
    if dora_native and webui_dir is not None:
        raise UserError("--dora_native comfyui writes dora_scale for ComfyUI's formula; WebUI would apply it to the other "
                        "axis without an error. For --webui_dir, bake the DoRA (drop --dora_native, give --model)")
    if dora_native and not model:
        raise UserError("--dora_native comfyui needs the base model (--model MODEL): ComfyUI's dora_scale depends on the base weights")
    if to == "diffusers":
        if out is None:
            raise UserError("--to diffusers writes into --out DIR")
        to_diffusers(lora, out, force, model=model, minimal=no_metadata)
        return
    if sum(x is not None for x in (webui_dir, comfyui_dir, out)) != 1:
        raise UserError("give exactly one of --webui_dir DIR, --comfyui_dir DIR or --out DIR")
    if not lora.exists():
        raise UserError(f"LoRA {str(lora)!r} not found; give a training output folder or its pytorch_lora_weights.safetensors")
    source = lora_file(lora)
    safetensors_keys(source, "LoRA")  # an unreadable input is refused before anything is made
    name = name or (lora if lora.is_dir() else lora.parent).resolve().name
    lora_target, embedding_target = destinations(name, webui_dir, comfyui_dir, out)
    embedding = next(iter(sorted(source.parent.glob("*_emb.safetensors"))), None)
    for target in [lora_target] + ([embedding_target] if embedding else []):
        if target.exists() and not force:
            raise UserError(f"{str(target)!r} exists; pass --force to replace it")
        writable_file(target, "the output")
    if embedding:
        warn_if_ordinary_word(name)
    training_args = read_training_args(source.parent)
    export_lora(source, lora_target, name=name, training_args=training_args, model=model, rank=parse_rank(rank, max_rank),
                dora_native=dora_native, dtype=dtype, minimal=no_metadata)
    typer.echo(f"LoRA: {lora_target}")
    if embedding:
        export_embedding(embedding, embedding_target)
        typer.echo(f"embedding: {embedding_target}")
    for line in usage_lines(name, training_args, has_embedding=embedding is not None):
        typer.echo(line)


FULL_RANK = "full"


def parse_rank(text: str | None, max_rank: int | None):
    """--rank of a baked DoRA: `full`, or a `RankRule` (a number, or an error target P% capped at --max_rank, whose
    default, cap None, is twice each layer's DoRA rank); default the error target DEFAULT_ERROR_TARGET."""
    from common.lora_formats import RankRule, parse_rank_rule

    if max_rank is not None and max_rank < 1:
        raise UserError(f"--max_rank must be at least 1, got {max_rank}")
    if text is None:
        return RankRule(error=DEFAULT_ERROR_TARGET, cap=max_rank)
    return parse_rank_rule(text, "--rank", named=(FULL_RANK,), cap=max_rank)


def parse_save_precision(text: str):
    from common.cli import DTYPES, parse_dtype

    if text not in DTYPES:
        raise UserError(f"--save_precision {text!r}; choose one of {', '.join(DTYPES)}")
    return parse_dtype(text)


def warn_if_ordinary_word(name: str) -> None:
    """WebUI triggers an embedding wherever its name's tokens appear in a prompt: named like a word, it
    replaces every use of that word."""
    from common.tokens import is_clip_word

    if is_clip_word(name):
        typer.echo(f"warning: the embedding is named {name!r}, an ordinary word of CLIP's vocabulary: in WebUI every "
                   f"{name!r} in a prompt would call it. Give a distinctive --name, e.g. --name {name}_emb", err=True)


def destinations(name: str, webui_dir: Path | None, comfyui_dir: Path | None, out: Path | None) -> tuple[Path, Path]:
    """(LoRA path, embedding path) in the chosen installation's folders, or both in --out."""
    if out is not None:
        return out / f"{name}.safetensors", out / "embeddings" / f"{name}.safetensors"
    root, folders, program, marker = (
        (webui_dir, WEBUI_FOLDERS, "stable-diffusion-webui", "models/Stable-diffusion")
        if webui_dir is not None
        else (comfyui_dir, COMFYUI_FOLDERS, "ComfyUI", "models/checkpoints")
    )
    if not (root / marker).is_dir():
        raise UserError(f"{str(root)!r} does not look like a {program} installation (no {marker}/ folder)")
    return root / folders[0] / f"{name}.safetensors", root / folders[1] / f"{name}.safetensors"


def read_training_args(folder: Path) -> dict:
    path = folder / "training_args.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def export_lora(source: Path, target: Path, *, name: str, training_args: dict, model: str | None, rank,
                dora_native: str | None = None, dtype=None, minimal: bool = False) -> None:
    """The kohya/LyCORIS file with kohya's `ss_*`, Stability's `modelspec.*` and the hash metadata (`exported_metadata`),
    written atomically in `dtype` (factors; alphas and dora_scale stay fp32). A diffusers LoRA or LoCon is renamed; a
    kohya/LyCORIS file (LoCon, LoHa, LoKr: what train_lora.py writes for them) is checked layer by layer and written
    again; a DoRA is baked into a plain LoRA first (every UI loads that; their DoRA conventions differ), or written for
    ComfyUI's loader (`dora_native`)."""
    from common.lora_formats import diffusers_lora_to_kohya, is_dora, is_kohya_format, safetensors_keys
    from common.lora_metadata import LoraFacts, save_lora_file

    keys = safetensors_keys(source, "LoRA")
    dora = is_dora(keys)
    extra_metadata, network = {}, {"network_module": "networks.lora"}
    if is_kohya_format(keys):
        kohya, summary, network = kohya_file_layers(source)
    elif dora and not dora_native:
        if not model:
            raise UserError(f"{str(source)!r} is a DoRA: baking it into a plain LoRA needs the base model, --model MODEL")
        kohya, summary, extra_metadata = bake_dora(source, model, rank)
    else:
        kohya, summary = diffusers_lora_to_kohya(source, base_weight=lazy_base_weights(model) if dora else None)
    kohya = cast_factors(kohya, dtype)
    rank, alpha = summary.get("unet", next(iter(summary.values())))
    facts = LoraFacts(network["network_module"], rank, alpha, name, network_args={"parts": sorted(summary)} | network.get("args", {}),
                      trigger_phrase=trigger_prompt(training_args, name, "webui"), **training_args_facts(training_args))
    metadata = exported_metadata(source, facts, minimal=minimal) | ({} if minimal else extra_metadata)
    announce_size(target, kohya)
    save_lora_file(target, kohya, metadata)


# Keys an exported file states anew: what its own tensors are (network, rank, alpha), the SDXL marks, its name and the
# trigger phrase, which names it. Every other training fact the source carries goes over as it is.
REFRESHED_KEYS = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_v2", "ss_base_model_version",
    "ss_output_name", "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.trigger_phrase",
)


def exported_metadata(source: Path, facts: LoraFacts, *, minimal: bool) -> dict[str, str]:
    """The metadata of a file made from `source` (before its hashes): `lora_metadata` of the facts known here, with the
    training facts the source carries (`carried_metadata`: its ss_* and modelspec.* keys, or its training folder's
    kohya file's) where they are not `REFRESHED_KEYS`; a carried value naming a local path is left out, and said so.
    `minimal` (--no_metadata): kohya's minimum only, nothing carried."""
    import time
    from dataclasses import replace

    from common.lora_metadata import carried_metadata, lora_metadata, shareable_metadata

    fresh = lora_metadata(replace(facts, made_at=time.time()), minimal=minimal)
    if minimal:
        return fresh
    carried, dropped = shareable_metadata(carried_metadata(source))
    if dropped:
        typer.echo(f"note: not carried over from {source.name}, as they name local paths: {', '.join(dropped)}", err=True)
    return fresh | {key: value for key, value in carried.items() if key not in REFRESHED_KEYS or key not in fresh}


def training_args_facts(training_args: dict) -> dict:
    """The `LoraFacts` fields a training folder's training_args.json gives (train_lora.py's options): the base model, the
    resolution, seed and learning rates, the prediction type where it was set, and a short comment of the run; each
    only where it holds a value of its kind (the file may come from an older run, or be edited)."""
    import math

    def number(key: str, kind: type):
        value = training_args.get(key)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        return kind(value) if numeric and (kind is float or float(value).is_integer()) else None

    size = number("resolution", int)
    facts = {
        "base_model": training_args.get("pretrained_model_name_or_path") if isinstance(training_args.get("pretrained_model_name_or_path"), str) else None,
        "resolution": (size, size) if size else None, "seed": number("seed", int),
        "learning_rate": number("learning_rate", float), "text_encoder_lr": number("text_encoder_lr", float),
        "clip_skip": number("clip_skip", int), "steps": number("max_train_steps", int),
        "prediction_type": training_args.get("prediction_type") if training_args.get("prediction_type") in ("epsilon", "v_prediction") else None,
    }
    if training_args:  # JSON for every reader: a non-finite number (a diverged run's NaN) is written as null
        comment = {k: training_args.get(k) for k in ("adapter", "rank", "learning_rate", "max_train_steps", "edm")}
        facts["training_comment"] = json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in comment.items()})
    return facts


def kohya_file_layers(source: Path):
    """A kohya/LyCORIS file as it is, each layer checked to be a LoRA, LoCon, LoHa or LoKr layer (`adapter_of_layer`),
    with (rank, alpha) of its first layer per part and its network module and algorithm for the metadata."""
    from common.adapters import adapter_of_layer, file_layers
    from common.lora_formats import kohya_part, read_finite_safetensors

    state = read_finite_safetensors(source, "LoRA")
    summary, algorithms = {}, set()
    for layer, tensors in file_layers(state).items():
        adapter = adapter_of_layer(tensors, f"layer {layer} of {str(source)!r}")
        algorithms.add(adapter.name)
        part = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}.get(kohya_part(layer) or "unet", "unet")
        factors = [tensors[right] for _, right in adapter.factor_pairs if right in tensors]
        rank = factors[-1].shape[0] if factors else None
        summary.setdefault(part, (rank, float(tensors["alpha"]) if "alpha" in tensors else rank))
    module = "networks.lora" if algorithms == {"lora"} else "lycoris.kohya"
    return state, summary, {"network_module": module, "args": {"algo": "+".join(sorted(algorithms))}}


def cast_factors(kohya: dict, dtype) -> dict:
    """Every layer's tensors in `dtype` (`common.adapters.cast_layer`: for fp16 each low-rank pair balanced first, the
    same product with no factor below fp16's normal range); refused in one line where a value does not fit it."""
    import torch

    from common.adapters import adapter_of_layer, cast_layer, file_layers

    if dtype is None or dtype == torch.float32:
        return kohya
    cast = {}
    for layer, tensors in file_layers(kohya).items():
        adapter = adapter_of_layer(tensors, f"layer {layer}")
        cast |= {f"{layer}.{name}": value for name, value in cast_layer(adapter, tensors, dtype, layer).items()}
    return cast


def announce_size(target: Path, tensors: dict) -> None:
    """Say how large a file will be before writing one over 1 GiB (a full-rank SDXL bake is several GiB)."""
    from common.files import LARGE_FILE_BYTES

    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > LARGE_FILE_BYTES:
        typer.echo(f"writing {size / 2**30:.1f} GiB to {target}; a smaller --rank makes a smaller file", err=True)


def lazy_base_weights(model: str | None):
    """The base model's weights by (component, module), loading the model on the first read (None without a model)."""
    import functools

    import torch

    from common.lora_formats import base_weight_reader
    from common.models import load_sdxl_pipeline

    if model is None:
        return None
    reader = functools.cache(lambda: base_weight_reader(load_sdxl_pipeline(model, torch.float32)))
    return lambda component, module: reader()(component, module)


def bake_dora(source: Path, model: str, rank):
    """Each DoRA layer's adapted weight W' = m * (W + dW) / ||W + dW|| (Liu et al. 2024, Eq. 5, computed by
    peft's own merge) minus W, factorised by SVD into a plain LoRA of scale 1 (a convolution's into LoCon shapes):
    by the rank rule (`low_rank_factors`: by default the smallest rank within 1% relative error, at most --max_rank),
    or exact with "full". Returns the kohya state, its summary and metadata holding each layer's relative truncation
    error."""
    import torch

    from common.lora_formats import (
        COMPONENT_PREFIXES, LoraSpec, RankRule, adapter_layers, load_loras, low_rank_factors, peft_lora_to_kohya,
    )
    from common.models import load_sdxl_pipeline

    pipe = load_sdxl_pipeline(model, torch.float32)
    [adapter] = load_loras(pipe, [LoraSpec(source)])
    states, summary, errors, squared_norms, ranks, capped = {}, {}, {}, {}, {}, []
    for component in COMPONENT_PREFIXES:
        state = {}
        for module_name, module in adapter_layers(getattr(pipe, component), adapter).items():
            before = module.get_base_layer().weight.detach().clone()
            module.merge(adapter_names=[adapter])
            delta = module.get_base_layer().weight.detach().double() - before.double()
            module.unmerge()
            if rank == FULL_RANK:
                rule = RankRule(rank=min(delta.shape[0], delta[0].numel()))
            else:  # an error target without --max_rank stops at twice the layer's DoRA rank
                rule = rank if rank.error is None or rank.cap else RankRule(error=rank.error, cap=2 * module.r[adapter])
            factors = low_rank_factors(delta.reshape(delta.shape[0], -1), rule)
            name = f"{component}.{module_name}"
            errors[name], squared_norms[name], ranks[name] = factors.error, float(delta.pow(2).sum()), factors.down.shape[0]
            if factors.capped:
                capped.append(name)
            down, up = factors.down, factors.up
            if delta.ndim == 4:  # LoCon's shapes: down (r, in, kh, kw), up (out, r, 1, 1)
                down, up = down.reshape(-1, *delta.shape[1:]), up.reshape(*up.shape, 1, 1)
            state[f"{module_name}.lora_A.weight"], state[f"{module_name}.lora_B.weight"] = down, up
        if state:
            states[component] = state
            some_rank = next(r for n, r in ranks.items() if n.startswith(component + "."))
            summary[component] = (some_rank, some_rank)  # scale 1: alpha = rank, layer by layer
    kohya = peft_lora_to_kohya(states, layers_per_block=pipe.unet.config.layers_per_block)
    overall = overall_relative_error(errors, squared_norms)
    worst = max(errors, key=errors.get)
    typer.echo(f"DoRA baked into a plain LoRA (rank {describe_rank(rank)}: {min(ranks.values())} to {max(ranks.values())} by layer): "
               f"relative truncation error {overall:.2e} overall, largest {errors[worst]:.2e} ({worst}); "
               "per layer in the file's metadata (bake_truncation_errors)")
    if capped:
        cap = f"--max_rank {rank.cap}" if rank.cap else "twice the DoRA's rank"
        typer.echo(f"note: {len(capped)} of {len(errors)} layers stopped at {cap} above the {rank.error:.2%} target "
                   f"(a larger --max_rank lowers their error, and grows the file)")
    return kohya, summary, {"bake_truncation_errors": json.dumps({k: round(v, 6) for k, v in errors.items()})}


def describe_rank(rank) -> str:
    """--rank as given: full, a number, or an error target (1%, at most 128)."""
    if rank == FULL_RANK:
        return FULL_RANK
    if rank.error is None:
        return str(rank.rank)
    return f"{100 * rank.error:g}%, at most " + (str(rank.cap) if rank.cap else "twice the DoRA's rank")


def overall_relative_error(errors: dict[str, float], squared_norms: dict[str, float]) -> float:
    """||dW - dW_r|| / ||dW|| over all layers together, from each layer's relative error and squared norm."""
    total = sum(squared_norms.values())
    return (sum(errors[k] ** 2 * squared_norms[k] for k in errors) / total) ** 0.5 if total else 0.0


def check_file(path: Path) -> int:
    """What WebUI and ComfyUI do with a kohya LoRA file or an SDXL embedding file, one verdict per UI;
    1 when either would refuse, skip or misapply anything."""
    from common.lora_formats import kohya_part, read_safetensors, ui_findings
    from common.tokens import CLIP_G_KEY, CLIP_L_KEY

    if not path.is_file():
        raise UserError(f"--check takes a kohya LoRA or an embedding .safetensors file; {str(path)!r} is not a file")
    state = read_safetensors(path, "--check file")
    if state and set(state) <= {CLIP_L_KEY, CLIP_G_KEY}:
        return check_embedding(state)
    findings = ui_findings(state)
    parts = sorted({kohya_part(key) for key in state} - {None})
    ranks = sorted({v.shape[0] for k, v in state.items() if k.endswith(("lora_down.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"))})
    alphas = sorted({float(v) for k, v in state.items() if k.endswith(".alpha")})
    kinds = layer_kinds(state)
    typer.echo(f"parts: {', '.join(parts) or 'none'}; layers: {', '.join(f'{n} {k}' for k, n in kinds.items()) or 'none'}; "
               f"ranks: {ranks}; alphas: {alphas}; DoRA: {any(k.endswith('dora_scale') for k in state)}")
    for ui, found in findings.items():
        for finding in found:
            typer.echo(f"{ui} {finding.effect}: {finding.what}")
    for ui, found in findings.items():
        if any(f.effect == "refuses" for f in found):
            typer.echo(f"{ui}: refuses the whole file")
        elif found:
            typer.echo(f"{ui}: loads it with {len(found)} problem(s) above")
        else:
            typer.echo(f"{ui}: every key maps onto SDXL and loads as the file means it")
    return 1 if any(findings.values()) else 0


def layer_kinds(state: dict) -> dict[str, int]:
    """How many layers of each kind a kohya/LyCORIS file holds: LoRA (Linear), LoCon (convolutions), LoHa, LoKr."""
    from collections import Counter

    from common.adapters import file_layers

    kinds = Counter()
    for tensors in file_layers(state).values():
        if "lora_down.weight" in tensors:
            kinds["LoCon" if tensors["lora_down.weight"].ndim == 4 else "LoRA"] += 1
        elif any(name.startswith("hada_") for name in tensors):
            kinds["LoHa"] += 1
        elif any(name.startswith("lokr_") for name in tensors):
            kinds["LoKr"] += 1
    return dict(kinds)


def check_embedding(state: dict) -> int:
    """An SDXL embedding: one row per token in `clip_l` (768 wide) and `clip_g` (1280 wide), as WebUI and
    ComfyUI read it (each text encoder takes its own key)."""
    from common.architectures import SDXL_TEXT_ENCODER_CONFIGS
    from common.lora_formats import non_finite_values
    from common.tokens import CLIP_G_KEY, CLIP_L_KEY

    widths = {CLIP_L_KEY: SDXL_TEXT_ENCODER_CONFIGS[0]["hidden_size"], CLIP_G_KEY: SDXL_TEXT_ENCODER_CONFIGS[1]["hidden_size"]}
    problems = [f"no {key} table: that text encoder gets no embedding" for key in widths if key not in state]
    problems += [f"{key} holds non-finite values ({kinds}): a prompt using it gives a black image (a training run that diverged?)"
                 for key, kinds in non_finite_values(state).items()]
    for key, width in widths.items():
        table = state.get(key)
        if table is not None and (table.ndim != 2 or table.shape[1] != width):
            problems.append(f"{key} is {tuple(table.shape)}; SDXL's {'first' if key == CLIP_L_KEY else 'second'} "
                            f"text encoder takes (tokens, {width}): the UIs ignore it")
    rows = {tuple(t.shape[:1]) for t in state.values()}
    if len(rows) > 1:
        problems.append(f"{CLIP_L_KEY} and {CLIP_G_KEY} hold different numbers of tokens")
    typer.echo(f"embedding: {', '.join(f'{k} {tuple(v.shape)}' for k, v in sorted(state.items()))}")
    for problem in problems:
        typer.echo(f"WebUI and ComfyUI: {problem}")
    typer.echo("WebUI and ComfyUI: an SDXL embedding with both tables" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def to_diffusers(source: Path, out: Path, force: bool, *, model: str | None = None, minimal: bool = False) -> None:
    """A kohya-format LoRA as a diffusers/peft file: factors unchanged, each layer's alpha in the metadata;
    ComfyUI dora_scales become the peft magnitudes giving the same weights (needs the base model). The source's
    training facts go with it (`exported_metadata`), under its own name and title."""
    from collections import Counter

    from peft import LoraConfig

    from common.lora_formats import DIFFUSERS_LORA_FILE, is_dora, kohya_to_peft, lora_ranks, read_finite_safetensors, save_diffusers_lora
    from common.lora_metadata import LoraFacts, add_file_metadata, carried_metadata

    if not source.is_file():
        raise UserError(f"--to diffusers takes a kohya .safetensors file; {str(source)!r} is not a file")
    kinds = layer_kinds(read_finite_safetensors(source, "LoRA"))
    if set(kinds) - {"LoRA", "LoCon"}:
        raise UserError(f"{str(source)!r} holds {', '.join(f'{n} {k}' for k, n in kinds.items())} layers: diffusers' SDXL loader "
                        "reads LoRA and LoCon only; merge_lora.py and infer.py read this file as it is")
    target = out / DIFFUSERS_LORA_FILE
    if target.exists() and not force:
        raise UserError(f"{str(target)!r} exists; pass --force to replace it")
    writable_file(target, "--out")
    states, alphas = kohya_to_peft(source, lazy_base_weights(model))
    configs = {}
    for component, state in states.items():
        ranks = lora_ranks(state)
        configs[component] = LoraConfig(
            r=Counter(ranks.values()).most_common(1)[0][0], lora_alpha=Counter(alphas[component].values()).most_common(1)[0][0],
            target_modules=sorted(ranks), rank_pattern=ranks, alpha_pattern=alphas[component], use_dora=is_dora(state),
        ).to_dict()
    save_diffusers_lora(out, states, configs)
    all_ranks = {r for state in states.values() for r in lora_ranks(state).values()}
    all_alphas = {a for component in alphas.values() for a in component.values()}
    carried = carried_metadata(source)
    name = carried.get("ss_output_name") or source.stem
    facts = LoraFacts("networks.lora", all_ranks.pop() if len(all_ranks) == 1 else "Dynamic",  # kohya's merges' word
                      all_alphas.pop() if len(all_alphas) == 1 else "Dynamic", name,
                      title=carried.get("modelspec.title") or name, trigger_phrase=carried.get("modelspec.trigger_phrase"))
    add_file_metadata(target, exported_metadata(source, facts, minimal=minimal))
    typer.echo(f"diffusers LoRA: {target}")


def export_embedding(source: Path, target: Path) -> None:
    """`clip_l`/`clip_g` rows as WebUI and ComfyUI read SDXL embeddings (checked on the way)."""
    from safetensors.torch import save_file

    from common.files import atomic_path
    from common.tokens import CLIP_G_KEY, CLIP_L_KEY, read_embedding

    clip_l, clip_g = read_embedding(source)
    with atomic_path(target) as partial:
        save_file({CLIP_L_KEY: clip_l.contiguous(), CLIP_G_KEY: clip_g.contiguous()}, str(partial))


def trigger_prompt(training_args: dict, name: str, ui: str) -> str | None:
    """The instance prompt with each abstraction replaced by what the UI expects in its place."""
    from common.tokens import expand_abstractions

    prompt = training_args.get("instance_prompt")
    if not prompt:
        return None
    word = name if ui == "webui" else f"embedding:{name}"
    return expand_abstractions(prompt, {a: [word] for a in training_args.get("token_map") or {}})


def usage_lines(name: str, training_args: dict, has_embedding: bool) -> list[str]:
    webui = trigger_prompt(training_args, name, "webui") or "your prompt"
    comfyui = trigger_prompt(training_args, name, "comfyui") or "your prompt"
    lines = [f"WebUI prompt: {webui} <lora:{name}:1>", f"ComfyUI: LoraLoader with {name}.safetensors; prompt: {comfyui}"]
    if has_embedding and not training_args.get("token_map"):
        lines.append(f"the embedding's tokens are written as {name} (WebUI) or embedding:{name} (ComfyUI)")
    return lines


if __name__ == "__main__":
    run_app(app)

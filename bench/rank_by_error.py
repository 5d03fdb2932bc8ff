#!/usr/bin/env python
"""File size against error for the rank rules of a DoRA bake and a TIES merge, at SDXL's real shapes: the table behind
the defaults of convert_for_webui.py and merge_lora.py.

    python bench/rank_by_error.py dora out/full_dora --model full-sdxl   # a trained DoRA baked into a plain LoRA
    python bench/rank_by_error.py ties --model full-sdxl                  # TIES of two rank-32 LoRAs on every projection

Each layer's dW is computed once (the DoRA's adapted weight minus the base, by peft's merge; the TIES result of the
two inputs, by peft's `ties`), then its singular values, from which every rule's rank per layer and relative error
follow (Eckart & Young: the truncated SVD's error is the norm of the dropped singular values). Sizes are fp16 factors,
(out + in) x rank x 2 bytes per layer; errors are the relative Frobenius error over all layers together and the
largest layer's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
TARGETS = (0.01, 0.05)
CAPS = (64, 128)
FIXED = (64, 128, 256, 512)


def spectra_table(spectra: dict[str, tuple[torch.Tensor, tuple[int, int]]], fixed: dict[str, int]) -> str:
    """Markdown rows, one per rule: fixed ranks (`fixed`: name -> rank per layer) and error targets with caps."""
    rows = ["| rule | fp16 file, MiB | overall error | largest layer error | layers at the cap |", "| --- | --- | --- | --- | --- |"]
    norms = {name: float(s.square().sum()) for name, (s, _) in spectra.items()}
    total = sum(norms.values())

    def tail(s: torch.Tensor, rank: int) -> float:
        return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt().clamp_min(1e-30))

    def row(label: str, ranks: dict[str, int], capped: int | str = "") -> str:
        size = sum(ranks[name] * sum(shape) * 2 for name, (_, shape) in spectra.items())
        errors = {name: tail(s, ranks[name]) for name, (s, _) in spectra.items()}
        overall = (sum(errors[n] ** 2 * norms[n] for n in errors) / total) ** 0.5
        return f"| {label} | {size / 2**20:.1f} | {overall:.2%} | {max(errors.values()):.2%} | {capped} |"

    fixed = fixed | {f"rank {rank}": rank for rank in FIXED} | {"full (exact)": 10**9}
    for label, rank in fixed.items():
        rows.append(row(label, {name: min(rank, len(s)) for name, (s, _) in spectra.items()}))
    for target in TARGETS:
        for cap in CAPS:
            ranks, at_cap = {}, 0
            for name, (s, _) in spectra.items():
                errors = (s.square().sum() - torch.cumsum(s.square(), 0)).clamp_min(0).sqrt() / s.square().sum().sqrt().clamp_min(1e-30)
                meets = (errors <= target).nonzero()
                rank = int(meets[0]) + 1 if len(meets) else len(s)
                ranks[name] = min(rank, cap)
                at_cap += rank > cap
            rows.append(row(f"{target:.1%}, at most {cap}", ranks, at_cap))
    return "\n".join(rows)


@app.command()
def dora(dora_folder: Path, model: str = typer.Option("full-sdxl", "--model")) -> None:
    """The bake of a trained DoRA (a train_lora.py --use_dora output folder) on its base model."""
    from common.lora_formats import COMPONENT_PREFIXES, LoraSpec, adapter_layers, load_loras
    from common.models import load_sdxl_pipeline

    pipe = load_sdxl_pipeline(model, torch.float32)
    [adapter] = load_loras(pipe, [LoraSpec(dora_folder)])
    spectra, rank = {}, None
    for component in COMPONENT_PREFIXES:
        for name, module in adapter_layers(getattr(pipe, component), adapter).items():
            before = module.get_base_layer().weight.detach().clone()
            module.merge(adapter_names=[adapter])
            delta = (module.get_base_layer().weight.detach().double() - before.double()).reshape(before.shape[0], -1)
            module.unmerge()
            spectra[f"{component}.{name}"] = (torch.linalg.svdvals(delta.float()).double(), tuple(delta.shape))
            rank = module.r[adapter]
    print(f"{len(spectra)} layers of a rank-{rank} DoRA from {dora_folder}, baked on {model}")
    print(spectra_table(spectra, {f"2 x the DoRA's rank ({2 * rank}, the old default)": 2 * rank, f"the DoRA's rank ({rank})": rank}))


@app.command()
def ties(model: str = typer.Option("full-sdxl", "--model"), rank: int = typer.Option(32, "--rank"),
         density: float = typer.Option(0.5, "--density")) -> None:
    """TIES (density 0.5) of two LoRAs of `rank` on every attention projection of the model's UNet and text encoders:
    random factors as a LoRA starts (A ~ N(0, 1/in), B of 1% of A's scale), one layer of each distinct shape computed
    and counted as often as the shape occurs."""
    from peft.utils.merge_utils import ties as peft_ties

    from common.models import model_modules_on_meta

    modules = model_modules_on_meta(model)
    counts: dict[tuple[int, int], int] = {}
    for component, network in modules.items():
        targets = ("to_q", "to_k", "to_v", "to_out.0") if component == "unet" else ("q_proj", "k_proj", "v_proj", "out_proj")
        for name, module in network.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(targets):
                shape = (module.out_features, module.in_features)
                counts[shape] = counts.get(shape, 0) + 1
    generator = torch.Generator().manual_seed(0)
    spectra = {}
    for (out_features, in_features), count in counts.items():
        deltas = [(torch.randn(out_features, rank, generator=generator) * 1e-2) @ (torch.randn(rank, in_features, generator=generator)
                                                                                  / in_features**0.5) for _ in range(2)]
        merged = peft_ties([d.double() for d in deltas], torch.tensor([1.0, 1.0], dtype=torch.float64), density, "total")
        singular = torch.linalg.svdvals(merged)
        for k in range(count):
            spectra[f"{out_features}x{in_features}#{k}"] = (singular, (out_features, in_features))
    print(f"TIES of two rank-{rank} LoRAs, density {density}: {sum(counts.values())} layers of {len(counts)} shapes on {model}")
    print(spectra_table(spectra, {f"sum of the inputs' ranks ({2 * rank}, the default)": 2 * rank, f"max ({rank})": rank}))


if __name__ == "__main__":
    app()

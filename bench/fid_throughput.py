#!/usr/bin/env python
"""MJHQ-style FID report: common/fid.py's one pass (what `mjhq_fid.py score` runs) against clean-fid run
once per category plus once overall.

    python bench/fid_throughput.py --per_category 10 --size 1024
    python bench/fid_throughput.py --per_category 100 --inception_weights inception-2015-12-05.pt --device cuda

Builds a synthetic MJHQ-like set (10 categories; generated PNGs and reference JPEGs at SIZE²) and times
1. `score` on a cold cache (features of every image once, 11 FIDs),
2. `score` again on the warm cache (no image read),
3. clean-fid's `compute_fid` for each category folder and for the whole folder (11 runs, each reading
   both sides), given the same network as `custom_feat_extractor` so that it does not reload it.
Without --inception_weights the network is a random-weight Inception-v3 of the same architecture and
cost, saved in clean-fid's TorchScript interface (the real file needs the internet).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import fid  # noqa: E402
from common.cli import flags, run_app  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
CATEGORIES = ("animals", "art", "fashion", "food", "indoor", "landscape", "logo", "people", "plants", "vehicles")


class InceptionLayers(torch.nn.Module):
    """torchvision's Inception-v3 up to its 2048-d average pool: the network clean-fid uses, random weights.

    Its batch-norm statistics are measured on smooth random images first; with the defaults (mean 0, variance
    1) the activations of a random network vanish or explode with depth and every image gets the same
    features."""

    def __init__(self):
        super().__init__()
        import torchvision

        torch.manual_seed(0)
        network = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        network.fc = torch.nn.Identity()
        network.dropout = torch.nn.Identity()
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # a plain average over the calibration batches
                module.reset_running_stats()
        network.train()
        with torch.no_grad():
            for _ in range(2):  # smooth random images, like photographs more than white noise is
                network(torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8) * 2 - 1, size=(299, 299), mode="bicubic"))
        self.network = network.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).view(-1, 2048, 1, 1)


class RandomInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = InceptionLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear") / 128 - 1)


def write_image_set(root: Path, per_category: int, size: int) -> None:
    """Smooth random images (low-resolution noise upsampled), so that PNG and JPEG sizes are realistic."""
    from PIL import Image

    rng = np.random.default_rng(0)
    meta = {}
    for category in CATEGORIES:
        for k in range(per_category):
            image_id = f"{category}{k:05d}"
            meta[image_id] = {"category": category, "prompt": f"{category} {k}"}
            for side, suffix in (("gen", "png"), ("ref", "jpg")):
                small = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
                path = root / side / category / f"{image_id}.{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                small.resize((size, size), Image.BICUBIC).save(path, **({"quality": 90} if suffix == "jpg" else {}))
    (root / "meta_data.json").write_text(json.dumps(meta))


@app.command()
def main(
    per_category: Annotated[int, typer.Option(*flags("per_category"), help="images per category on each side")] = 10,
    size: Annotated[int, typer.Option(*flags("size"), help="image side in pixels")] = 1024,
    inception_weights: Annotated[Optional[Path], typer.Option(*flags("inception_weights"), help="the real inception-2015-12-05.pt")] = None,
    device: Annotated[str, typer.Option(*flags("device"))] = "auto",
    batch_size: Annotated[int, typer.Option(*flags("batch_size"))] = 32,
    num_workers: Annotated[int, typer.Option(*flags("num_workers"))] = fid.DEFAULT_WORKERS,
    workdir: Annotated[Optional[Path], typer.Option(*flags("workdir"), help="keep the image set here (default: a temporary folder)")] = None,
) -> None:
    from cleanfid.fid import compute_fid

    with tempfile.TemporaryDirectory() as temporary:
        root = workdir or Path(temporary)
        if not (root / "meta_data.json").is_file():
            write_image_set(root, per_category, size)
        if inception_weights is None:
            inception_weights = root / "random-inception.pt"
            with torch.no_grad():  # traced: scripting torchvision's Inception returns its named-tuple outputs
                torch.jit.trace(RandomInception().eval(), torch.rand(1, 3, 299, 299) * 255).save(str(inception_weights))
        extractor = fid.inception_extractor("clean", inception_weights, device)
        config = fid.ScoreConfig(meta_data=root / "meta_data.json", gen_dir=root / "gen", ref=root / "ref",
                                 report_dir=root / "report", cache_dir=root / f"cache-{time.time_ns()}", device=device,
                                 batch_size=batch_size, num_workers=num_workers)
        images = 2 * per_category * len(CATEGORIES)

        started = time.perf_counter()
        fid.score(config, extractor)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        fid.score(config, extractor)
        warm = time.perf_counter() - started

        started, failures = time.perf_counter(), []
        for sub in [*CATEGORIES, ""]:
            try:
                compute_fid(str(root / "gen" / sub), str(root / "ref" / sub), mode="clean", num_workers=num_workers,
                            batch_size=batch_size, device=extractor.device, custom_feat_extractor=extractor.model,
                            verbose=False)
            except ValueError as error:  # clean-fid's sqrtm on singular covariances: timed all the same
                failures.append(f"{sub or 'overall'}: {error}")
        separate = time.perf_counter() - started

    print(f"device {extractor.device}, {torch.get_num_threads()} threads, {num_workers} workers, batch {batch_size}")
    print(f"{per_category} images per category per side at {size}x{size}: {images} images")
    print(f"mjhq_fid score, cold cache: {cold:.1f} s ({images / cold:.1f} images/s including the 11 FIDs)")
    print(f"mjhq_fid score, warm cache: {warm:.1f} s")
    print(f"clean-fid compute_fid x 11: {separate:.1f} s ({2 * images / separate:.1f} image reads/s)")
    print(f"ratio cold {cold / separate:.3f} (target <= 0.55), warm {warm / separate:.3f} (target <= 0.05)")
    if failures:
        print(f"clean-fid raised in {len(failures)} of 11 runs: {failures[0]}")


if __name__ == "__main__":
    run_app(app)

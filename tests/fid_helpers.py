"""An MJHQ-like fixture (meta_data.json, generated and reference folders) and small stand-ins for the Inception network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CATEGORIES = ("animals", "food", "people")


def write_mjhq_fixture(root: Path, generated_per_category: int = 9, reference_per_category: int = 11, size: int = 40) -> dict:
    """meta_data.json for the reference ids, GEN/<category>/<id>.png for the first ids of each category and
    REF/<category>/<id>.jpg (MJHQ's layout); each category has its own colour cast, the generated ones a shifted one."""
    rng = np.random.default_rng(0)
    meta = {}
    for c, category in enumerate(CATEGORIES):
        for k in range(reference_per_category):
            image_id = f"{category[:2]}{k:03d}"
            meta[image_id] = {"category": category, "prompt": f"a photo of {category} number {k}"}
            cast = np.array([60 + 60 * c, 120, 180 - 50 * c])
            reference = np.clip(rng.normal(cast, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            save(Image.fromarray(reference), root / "ref" / category / f"{image_id}.jpg")
            if k < generated_per_category:
                generated = np.clip(rng.normal(cast + 25, 50, (size, size, 3)), 0, 255).astype(np.uint8)
                save(Image.fromarray(generated), root / "gen" / category / f"{image_id}.png")
    (root / "meta_data.json").write_text(json.dumps(meta))
    return meta


def save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95) if path.suffix == ".jpg" else image.save(path)


def small_features(images: torch.Tensor) -> torch.Tensor:
    """A deterministic 6-dimensional feature (the means of each channel, of the whole image and of its top
    half), in clean-fid's extractor interface: [B, 3, 299, 299] in [0, 255] -> [B, 6]. With more images than
    features per category, every covariance has full rank, as clean-fid's sqrtm needs."""
    whole = images.mean(dim=(2, 3))
    top = images[:, :, : images.shape[2] // 2].mean(dim=(2, 3))
    return torch.cat([whole, top**1.5 / 16], dim=1)


class _Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.projection = torch.nn.Parameter(torch.randn(3 * 4 * 4, 2048, generator=generator) / 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, (4, 4)).flatten(1)
        return torch.tanh(pooled @ self.projection).view(-1, 2048, 1, 1)


class _FakeInception(torch.nn.Module):
    """clean-fid's TorchScript Inception interface (`layers` on normalised 299 x 299 input, or the whole
    network on any size with return_features=True), 2048 features from pooled colours."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        resized = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((resized - 128) / 128)


def write_fake_inception(path: Path) -> Path:
    torch.jit.script(_FakeInception()).save(str(path))
    return path

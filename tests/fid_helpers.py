"""An MJHQ-like fixture (meta_data.json, generated and reference folders) and small stand-ins for the Inception
and CLIP networks."""

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


def images_in(folder: Path) -> int:
    """How many images (.png, .jpg) a fixture writer put under `folder`."""
    return sum(1 for path in folder.rglob("*") if path.suffix in (".png", ".jpg"))


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
    def __init__(self, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.projection = torch.nn.Parameter(torch.randn(3 * 4 * 4, 2048, generator=generator) / 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, (4, 4)).flatten(1)
        return torch.tanh(pooled @ self.projection).view(-1, 2048, 1, 1)


class _FakeInception(torch.nn.Module):
    """clean-fid's TorchScript Inception interface (`layers` on normalised 299 x 299 input, or the whole
    network on any size with return_features=True), 2048 features from pooled colours."""

    def __init__(self, seed: int):
        super().__init__()
        self.layers = _Layers(seed)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        resized = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((resized - 128) / 128)


def write_fake_inception(path: Path, seed: int = 0) -> Path:
    """The stand-in Inception as a TorchScript file; another seed gives other weights (and other features)."""
    torch.jit.script(_FakeInception(seed)).save(str(path))
    return path


def write_tiny_clip(folder: Path, tokenizer_folder: Path):
    """A random-weight CLIP of 2 layers a side (32-pixel images, CLIP's 77 tokens) saved as a model folder
    that CLIPModel and CLIPProcessor load; returns its processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer)
    processor.save_pretrained(folder)
    return processor

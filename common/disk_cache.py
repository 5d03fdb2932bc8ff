"""Content-keyed caches on disk for training: VAE posteriors of images and text-encoder outputs of captions.

An entry's name is the SHA-256 of everything its value depends on (the image's bytes and how it is placed, or the
caption; and the exact weights of the model that computed it), so a later run, a resume or another output folder
reuses it, and a changed image, caption or model can never find a stale one. Entries are written atomically, one
safetensors file each, so a killed run leaves only whole entries behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from common.files import atomic_path, cache_root


def default_cache_folder() -> Path:
    """Where training caches go unless --disk_cache_dir says: the toolkit's cache folder (cache_root)."""
    return cache_root() / "train_cache"


def content_key(**parts) -> str:
    """SHA-256 of the parts (JSON-serialisable), order-independent: an entry's name."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def source_digest(source) -> str:
    """SHA-256 of an image's (or mask's) bytes: a path or the bytes themselves."""
    digest = hashlib.sha256()
    if isinstance(source, (bytes, bytearray)):
        digest.update(source)
        return digest.hexdigest()
    with open(source, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def module_digest(*modules) -> str:
    """SHA-256 of the modules' parameters and buffers (names, dtypes, shapes, values): the model an entry came from."""
    import torch

    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class TensorFiles:
    """A folder of entries, each a dict of tensors in `<folder>/<key[:2]>/<key>.safetensors`. An entry that cannot be
    read whole (a disk fault, a file cut short, a tensor missing or not finite) counts as missing and is computed
    again: `whole` tells, and the caches count what they healed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.reads = self.writes = 0

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> dict | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            entry = load_file(self.path(key))
        except (OSError, SafetensorError):
            return None
        self.reads += 1
        return entry

    def whole(self, key: str, names: set[str]) -> bool:
        """Whether entry `key` exists and reads back with every tensor of `names`, each finite (a NaN latent would train
        a NaN LoRA)."""
        import torch

        if key not in self:
            return False
        entry = self.get(key)
        return entry is not None and names <= entry.keys() and all(
            bool(torch.isfinite(value).all()) for value in entry.values() if value.is_floating_point())

    def put(self, key: str, tensors: dict) -> None:
        from safetensors.torch import save_file

        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        with atomic_path(path) as partial:
            save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(partial))
        self.writes += 1

"""The FID engine: features of image sets computed once and cached, then FID, KID and CLIP score per
category and overall.

It owns
- the image sets: a folder or a zip of images named `<id>.<suffix>` after the ids of a meta_data.json
  ({id: {category, prompt}}, MJHQ-30K's layout), the files clean-fid reads (CLEANFID_IMAGE_SUFFIXES), each read as
  a viewer shows it (common.images: the same pixels as clean-fid's reading for 8-bit RGB, right where it clips
  16-bit samples or ignores transparency and EXIF orientation), then resized as clean-fid resizes;
- the feature extractor: clean-fid's Inception for each resizing mode, loaded from a local file
  (`inception_file(mode)` names it) on one device;
- the caches, under $SDXL_PERSONALIZE_CACHE/fid by extractor: each image's features by (name, size,
  mtime; a zip member's size and CRC), each category's statistics, each pair of statistics' distance;
- the metrics: the Fréchet distance, KID and CLIP score, as small functions of arrays;
- `score`, which ties them together from a ScoreConfig and writes scores.json.

What is MJHQ's alone (choosing ids, generating images, the report, the command line) is mjhq_fid.py's.
torch, clean-fid and transformers are imported inside the functions that use them, so that importing
this module (and a script's --help) stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from common.cli import UserError

OVERALL = "overall"
MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
# clean-fid's EXTENSIONS, less its .npy arrays: FID is computed on what clean-fid itself would read
CLEANFID_IMAGE_SUFFIXES = frozenset({".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"})
INCEPTION_WEIGHTS_ENV = "SDXL_PERSONALIZE_INCEPTION_WEIGHTS"
# (file name, where clean-fid downloads it from): its TorchScript Inception (clean, legacy_tensorflow)
# and pytorch-fid's port (legacy_pytorch)
TORCHSCRIPT_INCEPTION = ("inception-2015-12-05.pt", "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt")
PYTORCH_INCEPTION = ("pt_inception-2015-12-05-6726825d.pth", "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth")
CACHE_FLUSH_IMAGES = 1024  # features are written to the cache at least this often, so an interrupted pass keeps them
DEFAULT_WORKERS = min(16, os.cpu_count() or 1)


# ---------------------------------------------------------------- meta data

@dataclass(frozen=True)
class Entry:
    """One id of meta_data.json: its images are scored in `category` and, for CLIP score, against `prompt`."""

    image_id: str
    category: str
    prompt: str


def read_meta_data(path: Path) -> dict[str, Entry]:
    """MJHQ-30K's meta_data.json, {"<id>": {"category": ..., "prompt": ...}, ...}, checked entry by entry."""
    from common.files import read_text_file

    expected = 'expected {"<image id>": {"category": "...", "prompt": "..."}, ...} as in MJHQ-30K'
    if not path.is_file():
        raise UserError(f"--meta_data {path} not found; {expected}")
    try:
        raw = json.loads(read_text_file(path, "--meta_data"))
    except json.JSONDecodeError as error:
        raise UserError(f"--meta_data {path} is not valid JSON ({error}); {expected}") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"--meta_data {path} holds no entries; {expected}")
    entries = {}
    for image_id, item in raw.items():
        if not (isinstance(item, dict) and isinstance(item.get("category"), str) and isinstance(item.get("prompt"), str)):
            raise UserError(f"--meta_data {path}: entry {image_id!r} is {json.dumps(item)[:80]}; {expected}")
        for kind, name in (("id", image_id), ("category", item["category"])):
            if not name or name in (".", "..") or "/" in name or "\\" in name:
                raise UserError(f"--meta_data {path}: {kind} {name!r} cannot be a file name; {expected}")
        entries[image_id] = Entry(image_id, item["category"], item["prompt"])
    return entries


# ---------------------------------------------------------------- image sets and their features

@dataclass(frozen=True)
class ImageFile:
    entry: Entry
    name: str  # relative to the set's folder, or the member's name in its zip
    stamp: str  # size and modification time (a zip member: size and CRC), which change when the file does

    @property
    def key(self) -> str:
        return f"{self.name}\t{self.stamp}"


class ImageSet:
    """The images of a folder or a zip whose file names (without suffix) are meta_data ids.

    Only ids in meta_data count; the others, and files in a folder that is not their category, are
    listed for the report.
    """

    def __init__(self, location: Path, meta: dict[str, Entry], option_name: str):
        self.location = location
        self.option_name = option_name  # how error messages and progress bars name the set, e.g. --gen_dir
        self.is_zip = location.is_file()
        if self.is_zip and location.suffix != ".zip":
            raise UserError(f"{option_name} {location} is a file but not a .zip; give a folder of images or a .zip of them")
        if not location.exists():
            raise UserError(f"{option_name} {location} not found; give a folder of images or a .zip of them")
        self.files: dict[str, ImageFile] = {}
        self.not_in_meta_data: list[str] = []
        self.in_wrong_folder: list[str] = []
        for name, stamp in self._listing():
            path = Path(name)
            if path.suffix.lower() not in CLEANFID_IMAGE_SUFFIXES:
                continue
            entry = meta.get(path.stem)
            if entry is None:
                self.not_in_meta_data.append(name)
                continue
            if path.stem in self.files:
                raise UserError(f"{option_name} {location} holds id {path.stem!r} twice: {self.files[path.stem].name} and {name}; keep one")
            if path.parent.name != entry.category:
                self.in_wrong_folder.append(name)
            self.files[path.stem] = ImageFile(entry, name, stamp)

    def _listing(self):
        if self.is_zip:
            try:
                with zipfile.ZipFile(self.location) as archive:
                    return [(info.filename, f"{info.file_size}:{info.CRC:08x}") for info in archive.infolist() if not info.is_dir()]
            except zipfile.BadZipFile:
                raise UserError(f"{self.option_name} {self.location} is not a readable zip file") from None
        listing = []
        for path in self.location.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                status = path.stat()
                listing.append((path.relative_to(self.location).as_posix(), f"{status.st_size}:{status.st_mtime_ns}"))
        return listing

    def by_category(self) -> dict[str, list[ImageFile]]:
        """Each category's files and, under "overall", all of them; sorted by name as clean-fid sorts a folder."""
        every_file = sorted(self.files.values(), key=lambda f: f.name)
        groups: dict[str, list[ImageFile]] = {}
        for file in every_file:
            groups.setdefault(file.entry.category, []).append(file)
        return {**dict(sorted(groups.items())), OVERALL: every_file}

    def rgb_images(self, files: list[ImageFile]) -> Iterator:
        """The files as 8-bit RGB PIL images, as a viewer shows them (common.images), in order: the folder's files
        or the zip's members (the zip is opened once for them all)."""
        from common.images import read_image

        with (zipfile.ZipFile(self.location) if self.is_zip else contextlib.nullcontext()) as archive:
            for file in files:
                yield read_image(archive.read(file.name) if self.is_zip else self.location / file.name)

    def cleanfid_inputs(self, files: list[ImageFile]) -> tuple[list[str], str | None]:
        """(files, fdir) as clean-fid's ResizeDataset takes them: member names and the zip, or full paths."""
        if self.is_zip:
            return [f.name for f in files], str(self.location)
        return [str(self.location / f.name) for f in files], None


@dataclass(frozen=True)
class FeatureExtractor:
    """clean-fid's interface: `model` maps images [B, 3, H, W] in [0, 255], already resized as `mode`
    says, to features [B, D]. `identity` names the cached features: it changes with weights or mode."""

    identity: str
    mode: str
    model: Callable
    device: object


class FeatureCache:
    """The features of one image set under one extractor, by image key, kept in append-only part files:
    an interrupted pass keeps every part it finished, and new images only add a part."""

    MAX_PARTS = 16

    def __init__(self, folder: Path):
        self.folder = folder
        self.rows: dict[str, np.ndarray] = {}
        parts = sorted(folder.glob("part-*.npz"))
        for part in parts:
            with np.load(part) as data:
                self.rows.update(zip(map(str, data["keys"]), data["features"]))
        if len(parts) > self.MAX_PARTS:
            self.add(list(self.rows), np.stack(list(self.rows.values())))
            for part in parts:
                part.unlink()

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def add(self, keys: list[str], features: np.ndarray) -> None:
        if not keys:
            return
        write_arrays(self.folder / f"part-{time.time_ns()}-{os.getpid()}.npz", keys=np.array(keys), features=features)
        self.rows.update(zip(keys, features))

    def stack(self, files: list[ImageFile]) -> np.ndarray:
        return np.stack([self.rows[f.key] for f in files])


def extract_missing_features(image_set: ImageSet, files: list[ImageFile], extractor: FeatureExtractor, cache: FeatureCache,
                             batch_size: int, num_workers: int, show_progress: bool = True) -> int:
    """Features of the files not in the cache, read and resized by clean-fid's ResizeDataset and passed
    through the extractor exactly as clean-fid's get_folder_features does; returns how many it computed."""
    import torch
    from cleanfid.fid import get_batch_features
    from cleanfid.utils import ResizeDataset
    from PIL import UnidentifiedImageError
    from tqdm.auto import tqdm

    todo = [f for f in files if f.key not in cache]
    if not todo:
        return 0
    names, fdir = image_set.cleanfid_inputs(todo)
    loader = torch.utils.data.DataLoader(ViewedResizeDataset(ResizeDataset(names, mode=extractor.mode, fdir=fdir)),
                                         batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers)
    done, pending = 0, []
    try:
        with tqdm(total=len(todo), unit="img", desc=f"features of {image_set.option_name}", disable=not show_progress) as bar:
            for batch in loader:
                pending.append(get_batch_features(batch, extractor.model, extractor.device))
                done += len(batch)
                bar.update(len(batch))
                if sum(map(len, pending)) >= CACHE_FLUSH_IMAGES:
                    _flush(cache, todo, done, pending)
    except (OSError, UnidentifiedImageError) as error:
        # a DataLoader worker's error carries the worker's traceback; its last line names the file
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise UserError(f"an image of {image_set.option_name} {image_set.location} could not be read ({reason[:300]}); "
                        f"replace or remove it and run again (the features computed so far are cached)") from None
    finally:
        _flush(cache, todo, done, pending)
    return len(todo)


class ViewedResizeDataset:
    """clean-fid's ResizeDataset reading each file as a viewer shows it (common.images) where clean-fid's own
    `Image.open(f).convert("RGB")` clips 16-bit images to white and shows transparent pixels' hidden colours;
    resizing and the tensor it returns are clean-fid's (ResizeDataset.__getitem__). An 8-bit RGB file gives the
    same pixels either way."""

    def __init__(self, cleanfid_dataset):
        self.inner = cleanfid_dataset

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        import numpy as np

        from common.images import read_image

        name = str(self.inner.files[index])
        zipped = self.inner.fdir is not None and ".zip" in self.inner.fdir
        pixels = np.array(read_image(self.inner._get_zipfile().read(name) if zipped else name))
        resized = self.inner.fn_resize(self.inner.custom_image_tranform(pixels))
        if resized.dtype == "uint8":  # ToTensor scales uint8 to [0, 1]; clean-fid wants [0, 255]
            return self.inner.transforms(np.array(resized)) * 255
        return self.inner.transforms(resized)


def _flush(cache: FeatureCache, todo: list[ImageFile], done: int, pending: list[np.ndarray]) -> None:
    if pending:
        features = np.concatenate(pending)
        cache.add([f.key for f in todo[done - len(features) : done]], features)
        pending.clear()


# ---------------------------------------------------------------- the metrics

def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the features, computed as clean-fid computes them."""
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), the FID of Heusel et al. 2017 (eq. 6):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    (sigma1 sigma2)^(1/2) has the eigenvalues of the symmetric S^(1/2) sigma2 S^(1/2), S = sigma1, which
    are real and non-negative, so the trace is a sum of square roots of symmetric eigenvalues, in
    float64. clean-fid takes a general matrix square root (scipy's sqrtm) of the non-symmetric product
    instead; with fewer images than features that fails with "Imaginary component" in clean-fid 0.1.35,
    and it is several times slower on 2048 x 2048.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _psd_sqrt(sigma1)
    product_eigenvalues = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = np.sqrt(np.clip(product_eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def kernel_inception_distance(generated: np.ndarray, reference: np.ndarray, seed: int = 0) -> float | None:
    """KID (Bińkowski et al. 2018, the unbiased MMD^2 of the cubic polynomial kernel) as clean-fid
    computes it, 100 subsets of at most 1,000, with the subsets drawn from `seed` rather than from
    NumPy's global state (so a report is reproducible). None with fewer than 2 images a side."""
    from cleanfid.fid import kernel_distance

    if min(len(generated), len(reference)) < 2:
        return None
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        return kernel_distance(generated, reference)
    finally:
        np.random.set_state(saved)


def clip_score(image_embeds, text_embeds):
    """CLIP score of each image against its prompt, 100 max(cos(E_image, E_text), 0): Hessel et al. 2021's
    CLIPScore (eq. 1) with the weight 100 that torchmetrics and the text-to-image papers report."""
    import torch

    cosine = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return 100 * cosine.clamp(min=0)


# ---------------------------------------------------------------- scoring

@dataclass(frozen=True, kw_only=True)  # by keyword only: two swapped paths or flags would pass silently
class ScoreConfig:
    meta_data: Path
    gen_dir: Path
    ref: Path
    report_dir: Path
    mode: str = "clean"
    inception_weights: Path | None = None
    kid: bool = False
    clip_model: str | None = None
    label: str | None = None
    cache_dir: Path | None = None
    device: str = "auto"
    batch_size: int = 32
    num_workers: int = DEFAULT_WORKERS


def check_score_config(config: ScoreConfig) -> None:
    if config.mode not in MODES:
        raise UserError(f"--mode {config.mode!r} is not one of {', '.join(MODES)}")
    if config.batch_size < 1 or config.num_workers < 0:
        raise UserError(f"--score_batch_size must be at least 1 and --num_workers at least 0, got {config.batch_size} and {config.num_workers}")
    if config.inception_weights is not None and not config.inception_weights.is_file():
        raise UserError(f"--inception_weights {config.inception_weights} not found")
    if not config.ref.exists():
        raise UserError(f"--ref {config.ref} not found; give the mjhq30k_imgs folder or mjhq30k_imgs.zip")


def score(config: ScoreConfig, extractor: FeatureExtractor | None = None) -> dict:
    """FID (and KID, CLIP score) of the generated images against the reference, per category and overall;
    writes REPORT_DIR/scores.json and returns what it wrote."""
    from common.files import cache_root

    started = time.time()
    check_score_config(config)
    meta = read_meta_data(config.meta_data)
    generated = ImageSet(config.gen_dir, meta, "--gen_dir")
    reference = ImageSet(config.ref, meta, "--ref")
    if not generated.files:
        raise UserError(f"--gen_dir {config.gen_dir} holds no image named after a meta_data id (expected <category>/<id>.png)")
    if not reference.files:
        raise UserError(f"--ref {config.ref} holds no image named after a meta_data id (expected <category>/<id>.jpg)")
    extractor = extractor or inception_extractor(config.mode, config.inception_weights, config.device)
    cache_dir = (config.cache_dir or cache_root() / "fid") / extractor.identity
    sides = {
        "generated": SideStatistics(generated, extractor, cache_dir, config, keep_features=config.kid),
        "reference": SideStatistics(reference, extractor, cache_dir, config, keep_features=config.kid),
    }
    clip = clip_scores_by_id(generated, config) if config.clip_model else {}
    results = []
    categories = sorted({e.category for e in meta.values()}) + [OVERALL]
    for category in categories:
        results.append(category_result(category, sides["generated"], sides["reference"], clip, cache_dir / "distances"))
    scores = {
        "label": config.label or config.gen_dir.resolve().name,
        "mode": config.mode,
        "feature_extractor": extractor.identity,
        "meta_data": str(config.meta_data),
        "gen_dir": str(config.gen_dir),
        "ref": str(config.ref),
        "results": results,
        "ids": id_report(meta, generated, reference),
        "features": {side: {"computed": s.computed, "cached": s.cached} for side, s in sides.items()},
        "seconds": round(time.time() - started, 2),
    }
    write_json(config.report_dir / "scores.json", scores)
    return scores


class SideStatistics:
    """One side's (generated or reference) per-category statistics, from the statistics cache when the
    category's images are unchanged; otherwise from features, computed for the whole set in one pass."""

    def __init__(self, image_set: ImageSet, extractor: FeatureExtractor, cache_dir: Path, config: ScoreConfig,
                 keep_features: bool):
        self.groups = image_set.by_category()
        self.computed, self.cached = 0, len(image_set.files)
        self.statistics: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.features: dict[str, np.ndarray] = {}
        self.fingerprints = {category: fingerprint(files) for category, files in self.groups.items()}
        cache = None
        for category, files in self.groups.items():
            stats_file = cache_dir / "statistics" / f"{self.fingerprints[category]}.npz"
            if stats_file.is_file() and not keep_features:
                with np.load(stats_file) as data:
                    self.statistics[category] = (data["mu"], data["sigma"])
                continue
            if cache is None:  # the first category that needs features: one pass over the whole set
                cache = FeatureCache(cache_dir / "features" / hashlib.sha256(str(image_set.location.resolve()).encode()).hexdigest()[:16])
                self.computed = extract_missing_features(image_set, self.groups[OVERALL], extractor, cache,
                                                         config.batch_size, config.num_workers)
                self.cached = len(image_set.files) - self.computed
            features = cache.stack(files)
            if keep_features:
                self.features[category] = features
            self.statistics[category] = gaussian_statistics(features)
            if not stats_file.is_file():
                mu, sigma = self.statistics[category]
                write_arrays(stats_file, mu=mu, sigma=sigma)


def fingerprint(files: list[ImageFile]) -> str:
    """Names the statistics of exactly these images (names, sizes, modification times)."""
    return hashlib.sha256("\n".join(f.key for f in files).encode()).hexdigest()[:32]


def write_arrays(path: Path, **arrays: np.ndarray) -> None:
    """An .npz file, written atomically (np.savez given a name would append .npz to the temporary one)."""
    from common.files import atomic_path

    with atomic_path(path) as partial:
        with open(partial, "wb") as file:
            np.savez(file, **arrays)


def category_result(category: str, generated: SideStatistics, reference: SideStatistics, clip: dict[str, float],
                    distances: Path) -> dict:
    gen_files, ref_files = generated.groups.get(category, []), reference.groups.get(category, [])
    result = {"category": category, "n_generated": len(gen_files), "n_reference": len(ref_files),
              "fid": None, "kid": None, "clip_score": None, "note": ""}
    if len(gen_files) < 2 or len(ref_files) < 2:
        result["note"] = "FID needs at least 2 images on each side"
    else:
        (mu1, sigma1), (mu2, sigma2) = generated.statistics[category], reference.statistics[category]
        result["fid"] = cached_frechet_distance(distances / f"{generated.fingerprints[category]}-{reference.fingerprints[category]}.json",
                                                mu1, sigma1, mu2, sigma2)
        dimensions = len(mu1)
        if min(len(gen_files), len(ref_files)) <= dimensions:
            result["note"] = (f"fewer images than the {dimensions} features: the covariance is singular and FID is "
                              f"biased upward; compare only runs with the same n (clean-fid's sqrtm may fail here)")
        if generated.features:
            result["kid"] = kernel_inception_distance(generated.features[category], reference.features[category])
    if clip:
        values = [clip[f.entry.image_id] for f in gen_files]
        result["clip_score"] = float(np.mean(values)) if values else None
    return result


def cached_frechet_distance(path: Path, mu1, sigma1, mu2, sigma2) -> float:
    """The distance between two image sets that are unchanged since it was last computed is read back:
    on 2048 features each distance is two symmetric eigendecompositions, most of a warm run's time."""
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["fid"]
    distance = frechet_distance(mu1, sigma1, mu2, sigma2)
    write_json(path, {"fid": distance})
    return distance


def id_report(meta: dict[str, Entry], generated: ImageSet, reference: ImageSet) -> dict:
    """How the generated and reference ids line up; a long list is cut to its first 20 entries."""
    generated_ids, reference_ids = set(generated.files), set(reference.files)
    head = lambda items: sorted(items)[:20]  # noqa: E731
    return {
        "meta_data": len(meta),
        "generated": len(generated_ids),
        "reference": len(reference_ids),
        "generated_without_reference": head(generated_ids - reference_ids),
        "reference_without_generated": len(reference_ids - generated_ids),
        "meta_data_without_reference": len(set(meta) - reference_ids),
        "generated_not_in_meta_data": head(generated.not_in_meta_data),
        "reference_not_in_meta_data": len(reference.not_in_meta_data),
        "generated_in_wrong_category_folder": head(generated.in_wrong_folder),
    }


def inception_file(mode: str) -> tuple[str, str]:
    """(file name, download URL) of the Inception network clean-fid uses in `mode`."""
    return PYTORCH_INCEPTION if mode == "legacy_pytorch" else TORCHSCRIPT_INCEPTION


def inception_weights_file(mode: str, given: Path | None) -> Path:
    """The local Inception file for `mode`: --inception_weights, $SDXL_PERSONALIZE_INCEPTION_WEIGHTS,
    our cache, or where clean-fid and torch keep their downloads; downloaded into our cache as a last
    resort, with a clear error when that is not possible (offline machines)."""
    import tempfile
    import urllib.request

    import torch

    from common.files import atomic_path, cache_root

    name, url = inception_file(mode)
    if given is not None:
        return given
    if os.environ.get(INCEPTION_WEIGHTS_ENV):
        path = Path(os.environ[INCEPTION_WEIGHTS_ENV])
        if not path.is_file():
            raise UserError(f"${INCEPTION_WEIGHTS_ENV} is {path}, which does not exist; it should be {name} from {url}")
        return path
    ours = cache_root() / "fid" / name
    for candidate in (ours, Path(tempfile.gettempdir()) / name, Path(torch.hub.get_dir()) / "checkpoints" / name):
        if candidate.is_file():
            return candidate
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(ours) as partial:
            partial.write_bytes(response.read())
    except OSError as error:
        raise UserError(f"the Inception weights {name} are not on this machine and could not be downloaded ({error}); "
                        f"download {url} and pass --inception_weights PATH, set ${INCEPTION_WEIGHTS_ENV}, or save it as {ours}") from None
    return ours


def inception_extractor(mode: str, weights: Path | None, device_name: str = "auto") -> FeatureExtractor:
    """clean-fid's Inception for `mode` from a local file, on one device: clean-fid's own builder wraps it
    in DataParallel (which moves work off each process's GPU under a distributed launch) and downloads
    into /tmp and site-packages."""
    import tempfile
    import warnings

    import torch

    from common.models import pick_device

    device = pick_device(device_name)
    weights = inception_weights_file(mode, weights)
    name, _ = inception_file(mode)
    with tempfile.TemporaryDirectory() as folder:
        # clean-fid's loaders look for the file under its published name
        (Path(folder) / "checkpoints").mkdir()
        (Path(folder) / "checkpoints" / name).symlink_to(weights.resolve())
        (Path(folder) / name).symlink_to(weights.resolve())
        try:
            with warnings.catch_warnings():
                # clean-fid's own calls: TorchScript, which torch now calls deprecated, and torchvision's
                # `pretrained=False`; a wrong file still fails below
                warnings.filterwarnings("ignore", message=".*torch.jit.load. is deprecated")
                warnings.filterwarnings("ignore", message=".*'torch.load' received a zip file that looks like a TorchScript")
                warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated")
                warnings.filterwarnings("ignore", message="Arguments other than a weight enum")
                if mode == "legacy_pytorch":
                    from cleanfid.inception_pytorch import InceptionV3

                    hub_dir = torch.hub.get_dir()
                    torch.hub.set_dir(folder)
                    try:
                        network = InceptionV3(output_blocks=[3], resize_input=False)
                    finally:
                        torch.hub.set_dir(hub_dir)
                else:
                    from cleanfid.inception_torchscript import InceptionV3W

                    network = InceptionV3W(folder, download=False, resize_inside=mode == "legacy_tensorflow")
        except Exception as error:  # torch.jit and load_state_dict raise many types for a wrong file
            raise UserError(f"--inception_weights {weights} could not be loaded as {name} "
                            f"({type(error).__name__}: {' '.join(str(error).split())[:200]})") from None
    network = network.to(device).eval()
    if mode == "legacy_pytorch":
        def model(images):  # clean-fid's pytorch_inception: inputs in [0, 1], pooled 2048 features
            return network(images / 255)[0].squeeze(-1).squeeze(-1)
    else:
        model = network
    return FeatureExtractor(f"{mode}-{file_digest(weights)[:16]}", mode, model, device)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clip_scores_by_id(image_set: ImageSet, config: ScoreConfig) -> dict[str, float]:
    """Each generated image's CLIP score against its own prompt (prompts cut to CLIP's 77 tokens), the
    images read through the set, so from a folder or a zip alike."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from common.models import pick_device, quiet_libraries

    device = pick_device(config.device)
    try:
        with quiet_libraries():
            model = CLIPModel.from_pretrained(config.clip_model).to(device).eval()
            processor = CLIPProcessor.from_pretrained(config.clip_model)
    except (OSError, ValueError) as error:
        raise UserError(f"--clip_score {config.clip_model} is not a loadable CLIP model folder or hub id "
                        f"({' '.join(str(error).split())[:200]})") from None
    files = sorted(image_set.files.values(), key=lambda f: f.name)
    images = image_set.rgb_images(files)
    scores = {}
    for start in range(0, len(files), config.batch_size):
        batch = files[start : start + config.batch_size]
        inputs = processor(text=[f.entry.prompt for f in batch], images=list(itertools.islice(images, len(batch))),
                           return_tensors="pt", padding=True, truncation=True,
                           max_length=model.config.text_config.max_position_embeddings).to(device)
        with torch.inference_mode():
            output = model(**inputs)
        scores.update(zip((f.entry.image_id for f in batch), clip_score(output.image_embeds, output.text_embeds).tolist()))
    return scores


def write_json(path: Path, document) -> None:
    from common.files import atomic_path

    with atomic_path(path) as partial:
        partial.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")



#!/usr/bin/env python
"""MJHQ-30K evaluation: generate an image per prompt, then FID overall and per category from one pass.

    python mjhq_fid.py generate --meta_data meta_data.json --gen_dir gen/ --model stabilityai/stable-diffusion-xl-base-1.0
    accelerate launch mjhq_fid.py generate ...   # the same files, shared out over every GPU and node; resumes
    python mjhq_fid.py score --meta_data meta_data.json --gen_dir gen/ --ref mjhq30k_imgs.zip --report_dir report/
    python mjhq_fid.py report report/scores.json lora/scores.json --report_dir compare/
    python mjhq_fid.py all ...                   # generate, score, report

MJHQ-30K (Li et al. 2024, Playground v2.5) is 30,000 Midjourney images in 10 categories; its FID is
clean-fid's (Parmar et al. 2022): clean-fid's Inception and resizing, read through clean-fid's own
dataset class. Every image's features are computed once and cached by (name, size, mtime), so the
eleven FIDs cost one pass over each image set, and a later run only reads images it has not seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional

import numpy as np
import typer

from common.cli import UserError, flags, run_app
from common.generation_options import (
    BatchSizeOption, CompileOption, ContentLoraOption, CpuOffloadOption, DeviceOption, DtypeOption, EmbeddingOption,
    EtaOption, GuidanceOption, HeightOption, LoraBlocksOption, LoraOption, LoraScaleOption, ModelOption,
    NegativePromptOption, PipelineConfig, SchedulerOption, StepsOption, StyleLoraOption, VaeSlicingOption,
    VaeTilingOption, WidthOption, describe_model, pipeline_config,
)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich", no_args_is_help=True)

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

DATA, SCORING, OUTPUT = "MJHQ data", "Scoring", "Output"
MetaDataOption = Annotated[Path, typer.Option(*flags("meta_data"), help="MJHQ-30K's meta_data.json: {id: {category, prompt}}", rich_help_panel=DATA)]
GenDirOption = Annotated[Path, typer.Option(*flags("gen_dir"), help="generated images, GEN_DIR/<category>/<id>.png", rich_help_panel=DATA)]
RefOption = Annotated[Path, typer.Option(*flags("ref"), help="the reference images: the mjhq30k_imgs folder or mjhq30k_imgs.zip", rich_help_panel=DATA)]
PerCategoryOption = Annotated[Optional[int], typer.Option(*flags("per_category"), help="only N ids per category, the same N every run (quick checks)", rich_help_panel=DATA)]
SeedOption = Annotated[int, typer.Option(*flags("seed"), help="base seed; each image's seed is derived from it and the image id", rich_help_panel=DATA)]
ReportDirOption = Annotated[Path, typer.Option(*flags("report_dir"), help="where scores.json and the report go", rich_help_panel=OUTPUT)]
ModeOption = Annotated[str, typer.Option(*flags("mode"), help=f"clean-fid's resizing: {', '.join(MODES)}", rich_help_panel=SCORING)]
InceptionOption = Annotated[Optional[Path], typer.Option(*flags("inception_weights"), help=f"local Inception file (offline use); also ${INCEPTION_WEIGHTS_ENV}", rich_help_panel=SCORING)]
KidOption = Annotated[bool, typer.Option(*flags("kid"), help="also KID (clean-fid's, 100 subsets of at most 1000, fixed seed)", rich_help_panel=SCORING)]
ClipOption = Annotated[Optional[str], typer.Option(*flags("clip_score"), help="also CLIP score, with this CLIP model (local folder or hub id)", rich_help_panel=SCORING)]
LabelOption = Annotated[Optional[str], typer.Option(*flags("label"), help="the name of this run in reports (default: the generated folder's name)", rich_help_panel=OUTPUT)]
CacheDirOption = Annotated[Optional[Path], typer.Option(*flags("cache_dir"), help="feature and statistics cache (default: $SDXL_PERSONALIZE_CACHE/fid)", rich_help_panel=SCORING)]
ScoreDeviceOption = Annotated[str, typer.Option(*flags("score_device"), help="device for the Inception and CLIP models: auto, cpu, cuda, cuda:N", rich_help_panel=SCORING)]
ScoreBatchOption = Annotated[int, typer.Option(*flags("score_batch_size"), help="images per Inception forward pass", rich_help_panel=SCORING)]
WorkersOption = Annotated[int, typer.Option(*flags("num_workers"), help="processes decoding and resizing images (default: one per CPU core, up to 16)", rich_help_panel=SCORING)]
DEFAULT_WORKERS = min(16, os.cpu_count() or 1)


# ---------------------------------------------------------------- meta data

@dataclass(frozen=True)
class Entry:
    image_id: str
    category: str
    prompt: str


def read_meta_data(path: Path) -> dict[str, Entry]:
    """MJHQ-30K's meta_data.json, {"<id>": {"category": ..., "prompt": ...}, ...}, checked entry by entry."""
    expected = 'expected {"<image id>": {"category": "...", "prompt": "..."}, ...} as in MJHQ-30K'
    if not path.is_file():
        raise UserError(f"--meta_data {path} not found; {expected}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"--meta_data {path} is not valid JSON ({error}); {expected}") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"--meta_data {path} holds no entries; {expected}")
    entries = {}
    for image_id, item in raw.items():
        if not (isinstance(item, dict) and isinstance(item.get("category"), str) and isinstance(item.get("prompt"), str)):
            raise UserError(f"--meta_data {path}: entry {image_id!r} is {json.dumps(item)[:80]}; {expected}")
        for what, name in (("id", image_id), ("category", item["category"])):
            if not name or name in (".", "..") or "/" in name or "\\" in name:
                raise UserError(f"--meta_data {path}: {what} {name!r} cannot be a file name; {expected}")
        entries[image_id] = Entry(image_id, item["category"], item["prompt"])
    return entries


def select_entries(meta: dict[str, Entry], per_category: int | None) -> list[Entry]:
    """All entries, or the same `per_category` ids of each category every time: the first ones in the
    order of their ids' SHA-256 (a fixed shuffle, whatever order the file lists them in). Sorted by
    category, then id."""
    by_category: dict[str, list[Entry]] = {}
    for entry in meta.values():
        by_category.setdefault(entry.category, []).append(entry)
    chosen = []
    for entries in by_category.values():
        if per_category is not None:
            entries = sorted(entries, key=lambda e: hashlib.sha256(e.image_id.encode()).hexdigest())[:per_category]
        chosen += entries
    return sorted(chosen, key=lambda e: (e.category, e.image_id))


# ---------------------------------------------------------------- generation

@dataclass(frozen=True)
class GenerateConfig:
    entries: list[Entry]  # the selected meta_data entries, sorted by category, then id
    gen_dir: Path
    seed: int
    pipeline: PipelineConfig


def image_seed(image_id: str, base_seed: int) -> int:
    """The image's seed, from its id alone: an image is the same whatever the order, batch or process."""
    return (base_seed + int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")) % 2**64


def generated_path(gen_dir: Path, entry: Entry) -> Path:
    return gen_dir / entry.category / f"{entry.image_id}.png"


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk with its CRC, the last 12 bytes of every PNG


def is_complete_png(path: Path) -> bool:
    """Whether the file is a PNG that was written to its end. It reads 20 bytes, so 30,000 files are
    checked in a second; a full decode would take minutes."""
    try:
        with open(path, "rb") as file:
            if file.read(8) != PNG_SIGNATURE:
                return False
            file.seek(-len(PNG_END), os.SEEK_END)
            return file.read() == PNG_END
    except OSError:  # missing, or shorter than the 12 bytes of the end chunk
        return False


def missing_jobs(entries: list[Entry], config: GenerateConfig):
    """(jobs, path of each job) for the selected images not yet complete in GEN_DIR."""
    from common.generation import ImageJob

    jobs, paths = [], {}
    for index, entry in enumerate(entries):
        path = generated_path(config.gen_dir, entry)
        if not is_complete_png(path):
            jobs.append(ImageJob(index, entry.prompt, config.pipeline.negative_prompt, image_seed(entry.image_id, config.seed)))
            paths[index] = path
    return jobs, paths


def check_same_settings(entries: list[Entry], missing: dict[int, Path], config: GenerateConfig, settings) -> None:
    """A resumed run must make its images as the images already there were made (model, LoRAs, sampler,
    steps, guidance, size, seed), or one FID would mix two runs. Every image of a run shares them, so one
    existing image's PNG parameters are compared with what this run would write for it."""
    from PIL import Image

    from common.generation import ImageJob, webui_parameters

    index = next((i for i in range(len(entries)) if i not in missing), None)
    if index is None:
        return
    entry, path = entries[index], generated_path(config.gen_dir, entries[index])
    job = ImageJob(index, entry.prompt, config.pipeline.negative_prompt, image_seed(entry.image_id, config.seed))
    expected = webui_parameters(job, settings)
    with Image.open(path) as image:
        found = image.text.get("parameters", "")
    if found != expected:
        differences = [(old, new) for old, new in zip(found.split(", "), expected.split(", ")) if old != new] or [(found[:60], expected[:60])]
        raise UserError(f"{path} was made with other settings ({differences[0][0]!r} there, {differences[0][1]!r} now); "
                        f"resume with the same options, or use another --gen_dir")


def generate_missing(config: GenerateConfig) -> int:
    """Every process lists what is missing, then makes its share of it in whole batches; returns how
    many images this process made."""
    from accelerate import PartialState

    from common.files import remove_leftover_partials
    from common.generation import deal_batches, generate_images
    from common.generation_options import prepare_pipeline
    from common.models import cpu_processes_requested

    state = PartialState(cpu=cpu_processes_requested())
    entries = config.entries
    if state.is_main_process:  # before the first barrier, no process of this run writes yet
        remove_leftover_partials(config.gen_dir, "*")  # GEN_DIR/<category>/
    jobs, paths = missing_jobs(entries, config)
    batches = deal_batches(jobs, config.pipeline.batch_size, state.process_index, state.num_processes)
    state.wait_for_everyone()  # nobody writes before everybody has listed the folder
    if state.is_main_process:
        typer.echo(f"{len(entries)} images wanted, {len(entries) - len(jobs)} already in {config.gen_dir}/, "
                   f"{len(jobs)} to make on {state.num_processes} process(es)")
    made = 0
    if batches:
        pipe, settings = prepare_pipeline(config.pipeline, str(state.device) if state.num_processes > 1 else None)
        check_same_settings(entries, paths, config, settings)
        saved = generate_images(pipe, [], settings, config.gen_dir, config.pipeline.batch_size,
                                path_for=lambda _, job: paths[job.index], batches=batches,
                                show_progress=state.is_local_main_process)
        made = len(saved)
        del pipe
    state.wait_for_everyone()
    return made


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

    def __init__(self, location: Path, meta: dict[str, Entry], what: str):
        self.location = location
        self.what = what
        self.is_zip = location.is_file()
        if self.is_zip and location.suffix != ".zip":
            raise UserError(f"{what} {location} is a file but not a .zip; give a folder of images or a .zip of them")
        if not location.exists():
            raise UserError(f"{what} {location} not found; give a folder of images or a .zip of them")
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
                raise UserError(f"{what} {location} holds id {path.stem!r} twice: {self.files[path.stem].name} and {name}; keep one")
            if path.parent.name != entry.category:
                self.in_wrong_folder.append(name)
            self.files[path.stem] = ImageFile(entry, name, stamp)

    def _listing(self):
        if self.is_zip:
            import zipfile

            try:
                with zipfile.ZipFile(self.location) as archive:
                    return [(info.filename, f"{info.file_size}:{info.CRC:08x}") for info in archive.infolist() if not info.is_dir()]
            except zipfile.BadZipFile:
                raise UserError(f"{self.what} {self.location} is not a readable zip file") from None
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
    loader = torch.utils.data.DataLoader(ResizeDataset(names, mode=extractor.mode, fdir=fdir), batch_size=batch_size,
                                         shuffle=False, drop_last=False, num_workers=num_workers)
    done, pending = 0, []
    try:
        with tqdm(total=len(todo), unit="img", desc=f"features of {image_set.what}", disable=not show_progress) as bar:
            for batch in loader:
                pending.append(get_batch_features(batch, extractor.model, extractor.device))
                done += len(batch)
                bar.update(len(batch))
                if sum(map(len, pending)) >= CACHE_FLUSH_IMAGES:
                    _flush(cache, todo, done, pending)
    except (OSError, UnidentifiedImageError) as error:
        # a DataLoader worker's error carries the worker's traceback; its last line names the file
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise UserError(f"an image of {image_set.what} {image_set.location} could not be read ({reason[:300]}); "
                        f"replace or remove it and run again (the features computed so far are cached)") from None
    finally:
        _flush(cache, todo, done, pending)
    return len(todo)


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

@dataclass(frozen=True)
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
    """Each generated image's CLIP score against its own prompt (prompts cut to CLIP's 77 tokens)."""
    import torch
    from PIL import Image
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
    scores = {}
    for start in range(0, len(files), config.batch_size):
        batch = files[start : start + config.batch_size]
        images = [Image.open(image_set.location / f.name).convert("RGB") for f in batch]
        inputs = processor(text=[f.entry.prompt for f in batch], images=images, return_tensors="pt", padding=True,
                           truncation=True, max_length=model.config.text_config.max_position_embeddings).to(device)
        with torch.inference_mode():
            output = model(**inputs)
        scores.update(zip((f.entry.image_id for f in batch), clip_score(output.image_embeds, output.text_embeds).tolist()))
    return scores


def write_json(path: Path, document) -> None:
    from common.files import atomic_path

    with atomic_path(path) as partial:
        partial.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- reports

def read_scores(paths: list[Path], labels: list[str] | None) -> list[dict]:
    if labels and len(labels) != len(paths):
        raise UserError(f"got {len(labels)} --label for {len(paths)} score files; give one per file or none")
    runs = []
    for index, path in enumerate(paths):
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"score file {path} could not be read ({error}); pass the scores.json that `score` wrote") from None
        if not isinstance(run, dict) or not isinstance(run.get("results"), list):
            raise UserError(f"score file {path} has no 'results'; pass the scores.json that `score` wrote")
        if labels:
            run["label"] = labels[index]
        runs.append(run)
    return runs


def write_report(runs: list[dict], report_dir: Path) -> list[Path]:
    """fid_report.json (the runs), fid_report.md (a table, side by side for several runs) and
    fid_report.png (FID per category, bars grouped by category)."""
    from common.files import atomic_path

    report_dir.mkdir(parents=True, exist_ok=True)
    written = [report_dir / "fid_report.json", report_dir / "fid_report.md", report_dir / "fid_report.png"]
    write_json(written[0], {"runs": runs})
    with atomic_path(written[1]) as partial:
        partial.write_text(markdown_table(runs), encoding="utf-8")
    with atomic_path(written[2]) as partial:
        bar_chart(runs).save(partial, format="PNG")
    return written


def number(value, digits: int = 2) -> str:
    """`digits` decimals, or 3 significant digits for values below 1 (KID; FIDs of near-identical sets)."""
    if value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"


def markdown_table(runs: list[dict]) -> str:
    metrics = [("n", "n_generated", 0), ("FID", "fid", 2)]
    if any(r.get("kid") is not None for run in runs for r in run["results"]):
        metrics.append(("KID", "kid", 4))
    if any(r.get("clip_score") is not None for run in runs for r in run["results"]):
        metrics.append(("CLIP", "clip_score", 2))
    several = len(runs) > 1
    header = ["category"] + [f"{title} {run['label']}" if several else title for title, _, _ in metrics for run in runs]
    lines = [
        "# MJHQ-30K FID" + ("" if several else f": {runs[0]['label']}"),
        "",
        *(f"- **{run['label']}**: mode {run.get('mode', '?')}, features {run.get('feature_extractor', '?')}, "
          f"generated images {run.get('gen_dir', '?')}" for run in runs),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" + "---:|" * (len(header) - 1),
    ]
    for category in _categories(runs):
        cells = [f"**{category}**" if category == OVERALL else category]
        for _, key, digits in metrics:
            for run in runs:
                row = _row(run, category)
                cells.append(number(row.get(key) if row else None, digits))
        lines.append("| " + " | ".join(cells) + " |")
    notes = {row["note"] for run in runs for row in run["results"] if row.get("note")}
    lines += [""] + [f"Note: {note}." for note in sorted(notes)]
    return "\n".join(lines) + "\n"


def _categories(runs: list[dict]) -> list[str]:
    seen = []
    for run in runs:
        for row in run["results"]:
            if row["category"] not in seen:
                seen.append(row["category"])
    return [c for c in seen if c != OVERALL] + ([OVERALL] if OVERALL in seen else [])


def _row(run: dict, category: str) -> dict | None:
    return next((row for row in run["results"] if row["category"] == category), None)


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def bar_chart(runs: list[dict]):
    """FID per category as a bar chart (PIL, to add no plotting dependency); one bar per run in each group."""
    from PIL import Image, ImageDraw, ImageFont

    categories = _categories(runs)
    values = [[(_row(run, c) or {}).get("fid") for run in runs] for c in categories]
    top = max([v for group in values for v in group if v is not None], default=1.0) or 1.0
    bar, gap, left, bottom, plot_height = 16, 24, 64, 40, 300
    group_width = max(bar * len(runs) + gap, 72)  # room for a category's name under its bars
    legend_height = 18 * len(runs) + 10
    width = max(left + group_width * len(categories) + 20, 420)
    height = plot_height + bottom + legend_height + 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    origin_y = legend_height + 20 + plot_height
    draw.text((left, 4), "MJHQ-30K FID per category (lower is better)", fill="black", font=font)
    for k, run in enumerate(runs):
        y = 22 + 18 * k
        draw.rectangle([left, y, left + 12, y + 12], fill=PALETTE[k % len(PALETTE)])
        draw.text((left + 18, y), str(run["label"]), fill="black", font=font)
    for tick in range(5):
        value = top * tick / 4
        y = origin_y - plot_height * tick / 4
        draw.line([left - 4, y, width - 10, y], fill=(220, 220, 220))
        draw.text((4, y - 6), number(value, 1), fill="black", font=font)
    for g, (category, group) in enumerate(zip(categories, values)):
        x0 = left + g * group_width + (group_width - bar * len(group)) // 2
        for k, value in enumerate(group):
            if value is not None:
                x = x0 + k * bar
                draw.rectangle([x, origin_y - plot_height * value / top, x + bar - 2, origin_y], fill=PALETTE[k % len(PALETTE)])
        label_width = draw.textlength(category, font=font)
        draw.text((left + g * group_width + (group_width - label_width) / 2, origin_y + 6), category, fill="black", font=font)
    draw.line([left, origin_y, width - 10, origin_y], fill="black")
    return image


# ---------------------------------------------------------------- the commands

def generate_config(meta_data, gen_dir, per_category, seed, pipeline: PipelineConfig) -> GenerateConfig:
    if per_category is not None and per_category < 1:
        raise UserError(f"--per_category must be at least 1, got {per_category}")
    if not 0 <= seed < 2**64:
        raise UserError(f"--seed must be in [0, 2^64), got {seed}")
    return GenerateConfig(select_entries(read_meta_data(meta_data), per_category), gen_dir, seed, pipeline)


@app.command("generate")
def generate_command(
    meta_data: MetaDataOption,
    gen_dir: GenDirOption,
    model: ModelOption,
    per_category: PerCategoryOption = None,
    seed: SeedOption = 0,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    negative_prompt: NegativePromptOption = None,
    num_inference_steps: StepsOption = 25,
    guidance_scale: GuidanceOption = 5.0,
    width: WidthOption = None,
    height: HeightOption = None,
    scheduler: SchedulerOption = "default",
    eta: EtaOption = None,
    lora: LoraOption = None,
    lora_scale: LoraScaleOption = 1.0,
    lora_blocks: LoraBlocksOption = None,
    content_lora: ContentLoraOption = None,
    style_lora: StyleLoraOption = None,
    embedding: EmbeddingOption = None,
    batch_size: BatchSizeOption = 4,
    cpu_offload: CpuOffloadOption = False,
    vae_tiling: VaeTilingOption = False,
    vae_slicing: VaeSlicingOption = False,
    compile_unet: CompileOption = False,
) -> None:
    """Make GEN_DIR/<category>/<id>.png for every meta_data entry still missing (all processes share the work)."""
    pipeline = pipeline_config(model, negative_prompt, num_inference_steps, guidance_scale, width, height, scheduler, eta,
                               lora, lora_scale, lora_blocks, content_lora, style_lora, embedding, dtype, device,
                               batch_size, cpu_offload, vae_tiling, vae_slicing, compile_unet)
    made = generate_missing(generate_config(meta_data, gen_dir, per_category, seed, pipeline))
    typer.echo(f"made {made} image(s) in this process")


@app.command("score")
def score_command(
    meta_data: MetaDataOption,
    gen_dir: GenDirOption,
    ref: RefOption,
    report_dir: ReportDirOption = Path("mjhq_report"),
    mode: ModeOption = "clean",
    inception_weights: InceptionOption = None,
    kid: KidOption = False,
    clip_score: ClipOption = None,
    label: LabelOption = None,
    cache_dir: CacheDirOption = None,
    score_device: ScoreDeviceOption = "auto",
    score_batch_size: ScoreBatchOption = 32,
    num_workers: WorkersOption = DEFAULT_WORKERS,
) -> None:
    """FID of GEN_DIR against the reference images, per category and overall, into REPORT_DIR/scores.json."""
    from accelerate import PartialState

    from common.models import cpu_processes_requested

    if not PartialState(cpu=cpu_processes_requested()).is_main_process:
        return  # one pass on one device; the other processes of a launch would only race for the cache
    config = ScoreConfig(meta_data, gen_dir, ref, report_dir, mode, inception_weights, kid, clip_score, label,
                         cache_dir, score_device, score_batch_size, num_workers)
    print_scores(score(config))
    typer.echo(f"wrote {report_dir / 'scores.json'}")


@app.command("report")
def report_command(
    scores: Annotated[list[Path], typer.Argument(help="scores.json files written by `score`; several give a side-by-side comparison")],
    report_dir: ReportDirOption = Path("mjhq_report"),
    label: Annotated[Optional[list[str]], typer.Option(*flags("label"), help="a name per score file (default: the names they carry)")] = None,
) -> None:
    """fid_report.json, a Markdown table and a bar chart, for one run or several side by side."""
    for path in write_report(read_scores(scores, label), report_dir):
        typer.echo(f"wrote {path}")


@app.command("all")
def all_command(
    meta_data: MetaDataOption,
    gen_dir: GenDirOption,
    ref: RefOption,
    model: ModelOption,
    report_dir: ReportDirOption = Path("mjhq_report"),
    per_category: PerCategoryOption = None,
    seed: SeedOption = 0,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    negative_prompt: NegativePromptOption = None,
    num_inference_steps: StepsOption = 25,
    guidance_scale: GuidanceOption = 5.0,
    width: WidthOption = None,
    height: HeightOption = None,
    scheduler: SchedulerOption = "default",
    eta: EtaOption = None,
    lora: LoraOption = None,
    lora_scale: LoraScaleOption = 1.0,
    lora_blocks: LoraBlocksOption = None,
    content_lora: ContentLoraOption = None,
    style_lora: StyleLoraOption = None,
    embedding: EmbeddingOption = None,
    batch_size: BatchSizeOption = 4,
    cpu_offload: CpuOffloadOption = False,
    vae_tiling: VaeTilingOption = False,
    vae_slicing: VaeSlicingOption = False,
    compile_unet: CompileOption = False,
    mode: ModeOption = "clean",
    inception_weights: InceptionOption = None,
    kid: KidOption = False,
    clip_score: ClipOption = None,
    label: LabelOption = None,
    cache_dir: CacheDirOption = None,
    score_device: ScoreDeviceOption = "auto",
    score_batch_size: ScoreBatchOption = 32,
    num_workers: WorkersOption = DEFAULT_WORKERS,
) -> None:
    """generate, then score and report (on the main process)."""
    from accelerate import PartialState

    pipeline = pipeline_config(model, negative_prompt, num_inference_steps, guidance_scale, width, height, scheduler, eta,
                               lora, lora_scale, lora_blocks, content_lora, style_lora, embedding, dtype, device,
                               batch_size, cpu_offload, vae_tiling, vae_slicing, compile_unet)
    scoring = ScoreConfig(meta_data, gen_dir, ref, report_dir, mode, inception_weights, kid, clip_score,
                          label or describe_model(pipeline), cache_dir, score_device, score_batch_size, num_workers)
    check_score_config(scoring)  # before hours of generation
    made = generate_missing(generate_config(meta_data, gen_dir, per_category, seed, pipeline))
    typer.echo(f"made {made} image(s) in this process")
    if PartialState().is_main_process:
        scores = score(scoring)
        print_scores(scores)
        for path in write_report([scores], report_dir):
            typer.echo(f"wrote {path}")


def print_scores(scores: dict) -> None:
    features = ", ".join(f"{side} {n['computed']} computed, {n['cached']} cached" for side, n in scores["features"].items())
    typer.echo(f"features: {features}")
    for row in scores["results"]:
        fid = number(row["fid"], 3)
        extra = "".join(f"  {key} {number(row[key], 4)}" for key in ("kid", "clip_score") if row.get(key) is not None)
        typer.echo(f"{row['category']:>12}  n={row['n_generated']:<6} FID {fid}{extra}")
    ids = scores["ids"]
    if ids["generated_without_reference"] or ids["generated_not_in_meta_data"]:
        typer.echo(f"warning: {len(ids['generated_without_reference'])} generated id(s) have no reference image and "
                   f"{len(ids['generated_not_in_meta_data'])} generated file(s) are not in meta_data; see scores.json", err=True)


if __name__ == "__main__":
    run_app(app)

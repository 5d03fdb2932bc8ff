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

This script holds what is MJHQ's: choosing ids, generating their images, the report and the commands.
The scoring engine (image sets, Inception features and their cache, FID, KID, CLIP score) is common/fid.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from common.cli import REQUIRED, UserError, config_from_options, flags, option, options_command, run_app
from common.fid import (
    DEFAULT_WORKERS, INCEPTION_WEIGHTS_ENV, MODES, OVERALL, Entry, ScoreConfig, check_score_config, read_meta_data, score,
    write_json,
)
from common.files import remove_leftover_partials, writable_folder
from common.generation_options import GenerationOptions, describe_model

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich", no_args_is_help=True)

DATA, SCORING, OUTPUT = "MJHQ data", "Scoring", "Output"
GENERATION_DEFAULTS = {"num_inference_steps": 25, "batch_size": 4}


@dataclass(frozen=True)
class MjhqData:
    """Where the prompts and the generated images are."""

    meta_data: Path = option(REQUIRED, panel=DATA, help="MJHQ-30K's meta_data.json: {id: {category, prompt}}")
    gen_dir: Path = option(REQUIRED, panel=DATA, help="generated images, GEN_DIR/<category>/<id>.png")


@dataclass(frozen=True)
class MjhqSelection:
    """Which ids are generated, and their seeds."""

    per_category: Optional[int] = option(None, panel=DATA, help="only N ids per category, the same N every run (quick checks)")
    seed: int = option(0, panel=DATA, help="base seed; each image's seed is derived from it and the image id")

    def __post_init__(self):
        if self.per_category is not None and self.per_category < 1:
            raise UserError(f"--per_category must be at least 1, got {self.per_category}")
        if not 0 <= self.seed < 2**64:
            raise UserError(f"--seed must be in [0, 2^64), got {self.seed}")


@dataclass(frozen=True)
class ScoringOptions:
    """The reference images and how the generated ones are scored against them."""

    ref: Path = option(REQUIRED, panel=DATA, help="the reference images: the mjhq30k_imgs folder or mjhq30k_imgs.zip")
    report_dir: Path = option(Path("mjhq_report"), panel=OUTPUT, help="where scores.json and the report go")
    mode: str = option("clean", panel=SCORING, help=f"clean-fid's resizing: {', '.join(MODES)}")
    inception_weights: Optional[Path] = option(None, panel=SCORING,
                                               help=f"local Inception file (offline use); also ${INCEPTION_WEIGHTS_ENV}")
    kid: bool = option(False, panel=SCORING, help="also KID (clean-fid's, 100 subsets of at most 1000, fixed seed)")
    clip_score: Optional[str] = option(None, panel=SCORING, help="also CLIP score, with this CLIP model (local folder or hub id)")
    label: Optional[str] = option(None, panel=OUTPUT, help="the name of this run in reports (default: the generated folder's name)")
    cache_dir: Optional[Path] = option(None, panel=SCORING, help="feature and statistics cache (default: $SDXL_PERSONALIZE_CACHE/fid)")
    score_device: str = option("auto", panel=SCORING, help="device for the Inception and CLIP models: auto, cpu, cuda, cuda:N")
    score_batch_size: int = option(32, panel=SCORING, help="images per Inception forward pass")
    num_workers: int = option(DEFAULT_WORKERS, panel=SCORING,
                              help="processes decoding and resizing images (default: one per CPU core, up to 16)")

    def score_config(self, data: MjhqData, label: str | None = None) -> ScoreConfig:
        return ScoreConfig(meta_data=data.meta_data, gen_dir=data.gen_dir, ref=self.ref, report_dir=self.report_dir,
                           mode=self.mode, inception_weights=self.inception_weights, kid=self.kid, clip_model=self.clip_score,
                           label=self.label or label, cache_dir=self.cache_dir, device=self.score_device,
                           batch_size=self.score_batch_size, num_workers=self.num_workers)


# ---------------------------------------------------------------- meta data

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
    generation: GenerationOptions


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
            jobs.append(ImageJob(index, entry.prompt, config.generation.negative_prompt, image_seed(entry.image_id, config.seed)))
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
    job = ImageJob(index, entry.prompt, config.generation.negative_prompt, image_seed(entry.image_id, config.seed))
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

    from common.generation import deal_batches, generate_images
    from common.generation_options import check_generation_prompts, prepare_pipeline, read_generation_model
    from common.models import cpu_processes_requested, warn_about_lost_processes

    check_generation_prompts(config.generation, [entry.prompt for entry in config.entries])
    reading = read_generation_model(config.generation)
    state = PartialState(cpu=cpu_processes_requested())
    if state.is_main_process:
        warn_about_lost_processes(state.num_processes)
    entries = config.entries
    writable_folder(config.gen_dir, "--gen_dir")
    if state.is_main_process:  # before the first barrier, no process of this run writes yet
        remove_leftover_partials(config.gen_dir, "*")  # GEN_DIR/<category>/
    jobs, paths = missing_jobs(entries, config)
    batches = deal_batches(jobs, config.generation.batch_size, state.process_index, state.num_processes)
    state.wait_for_everyone()  # nobody writes before everybody has listed the folder
    if state.is_main_process:
        typer.echo(f"{len(entries)} images wanted, {len(entries) - len(jobs)} already in {config.gen_dir}/, "
                   f"{len(jobs)} to make on {state.num_processes} process(es)")
    made = 0
    # images already there must have been made with this run's settings, even when none is missing
    if batches or (state.is_main_process and len(jobs) < len(entries)):
        pipe, settings = prepare_pipeline(config.generation, str(state.device) if state.num_processes > 1 else None, reading)
        check_same_settings(entries, paths, config, settings)
    if batches:
        saved = generate_images(pipe, [], settings, output_dir=config.gen_dir, batch_size=config.generation.batch_size,
                                path_for=lambda _, job: paths[job.index], batches=batches,
                                show_progress=state.is_local_main_process)
        made = len(saved)
    state.wait_for_everyone()
    return made


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

def generate_config(data: MjhqData, selection: MjhqSelection, generation: GenerationOptions) -> GenerateConfig:
    entries = select_entries(read_meta_data(data.meta_data), selection.per_category)
    return GenerateConfig(entries=entries, gen_dir=data.gen_dir, seed=selection.seed, generation=generation)


@options_command(app, MjhqData, MjhqSelection, GenerationOptions, name="generate", defaults=GENERATION_DEFAULTS)
def generate_command(**options) -> None:
    """Make GEN_DIR/<category>/<id>.png for every meta_data entry still missing (all processes share the work)."""
    config = generate_config(*(config_from_options(kind, options) for kind in (MjhqData, MjhqSelection, GenerationOptions)))
    made = generate_missing(config)
    typer.echo(f"made {made} image(s) in this process")


@options_command(app, MjhqData, ScoringOptions, name="score")
def score_command(**options) -> None:
    """FID of GEN_DIR against the reference images, per category and overall, into REPORT_DIR/scores.json."""
    from accelerate import PartialState

    from common.models import cpu_processes_requested

    if not PartialState(cpu=cpu_processes_requested()).is_main_process:
        return  # one pass on one device; the other processes of a launch would only race for the cache
    scoring = config_from_options(ScoringOptions, options)
    writable_folder(scoring.report_dir, "--report_dir")
    print_scores(score(scoring.score_config(config_from_options(MjhqData, options))))
    typer.echo(f"wrote {scoring.report_dir / 'scores.json'}")


@app.command("report")
def report_command(
    scores: Annotated[list[Path], typer.Argument(help="scores.json files written by `score`; several give a side-by-side comparison")],
    report_dir: Annotated[Path, typer.Option(*flags("report_dir"), help="where the report goes", rich_help_panel=OUTPUT)] = Path("mjhq_report"),
    label: Annotated[Optional[list[str]], typer.Option(*flags("label"), help="a name per score file (default: the names they carry)")] = None,
) -> None:
    """fid_report.json, a Markdown table and a bar chart, for one run or several side by side."""
    writable_folder(report_dir, "--report_dir")
    for path in write_report(read_scores(scores, label), report_dir):
        typer.echo(f"wrote {path}")


@options_command(app, MjhqData, ScoringOptions, MjhqSelection, GenerationOptions, name="all", defaults=GENERATION_DEFAULTS)
def all_command(**options) -> None:
    """generate, then score and report (on the main process)."""
    from accelerate import PartialState

    data, selection = config_from_options(MjhqData, options), config_from_options(MjhqSelection, options)
    generation, scoring = config_from_options(GenerationOptions, options), config_from_options(ScoringOptions, options)
    score_config = scoring.score_config(data, label=describe_model(generation))
    check_score_config(score_config)  # before hours of generation
    writable_folder(scoring.report_dir, "--report_dir")
    made = generate_missing(generate_config(data, selection, generation))
    typer.echo(f"made {made} image(s) in this process")
    if PartialState().is_main_process:
        scores = score(score_config)
        print_scores(scores)
        for path in write_report([scores], scoring.report_dir):
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

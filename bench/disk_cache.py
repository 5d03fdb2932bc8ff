#!/usr/bin/env python
"""Peak memory of train_lora.py with the latent cache in memory (--cache_latents) against on disk
(--cache_latents_to_disk), as the dataset grows: the disk cache should keep the peak flat in the number of images,
the in-memory cache should grow with it.

    python bench/disk_cache.py                                   # the table of bench/RESULTS.md (about 12 min on 2 idle cores)
    python bench/disk_cache.py --counts 20,200 --resolution 128  # a quick check

For each image count, synthetic PNGs (SOURCE_SIZE² seeded random noise, every image distinct; train_lora.py resizes
them to --resolution) are written to a temporary folder, and train_lora.py runs on the built-in tiny model
(`-m tiny-sdxl`, built locally on first use) for one step, batch 1, each run in its own process:
1. `--cache_latents`: every posterior (mean and std, 4 x (res/8)² float32 each, both flips with --random_flip) in memory;
2. `--cache_latents_to_disk --disk_cache_dir DIR`, DIR a fresh temporary folder per image count: entries written there;
3. the same again: every entry read back from DIR, none encoded (train_lora.py's `latents: N encoded, M read from the
   disk cache` line gives N and M).
Two memory figures per run. Peak RSS is the child's ru_maxrss from wait4 (its own peak resident set, not the maximum
over all children that RUSAGE_CHILDREN would give; this script never imports torch and stays at tens of MiB, so the
pages the child holds between fork and exec set no floor). It is reached while the VAE encodes (train_lora.py encodes
about 1 Mpx per call: some 0.5 GiB of activations on the tiny model), so a run that encodes nothing peaks lower. RSS
after caching is the child's VmRSS read from /proc when it prints `N process(es), ... batches each per epoch`, after
the data is cached and just before the first step: what it holds for the whole training loop. Wall and CPU (user +
system, from the same wait4) seconds are the child's, start-up and model loading included. Other work on the machine
inflates wall seconds, and CPU seconds less so; the load average before and after is printed with the table. One
unreported warm-up run on one image builds the tiny model if the cache lacks it, so that no timed run pays for that.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import flags, run_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LATENTS_LINE = re.compile(r"latents: (\d+) encoded, (\d+) read from the disk cache")
TRAINING_LINE = re.compile(r"\d+ process\(es\), \d+ batches each per epoch")
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def write_images(folder: Path, count: int, size: int, seed: int) -> None:
    """`count` PNGs of uniform RGB noise from one seeded generator: distinct content, so distinct cache entries."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index:05d}.png")


def resident_mib(pid: int) -> float | None:
    """A process's resident set now (VmRSS), in MiB; None once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), None)


def run_training(images: Path, output_dir: Path, resolution: int, random_flip: bool, cache_options: list[str]) -> dict:
    """One train_lora.py run in its own process: its peak RSS and its RSS once the data is cached (MiB), wall seconds
    and its latents line."""
    command = [sys.executable, "train_lora.py", "-m", "tiny-sdxl", "--instance_data_dir", str(images),
               "--instance_prompt", "a photo", "--output_dir", str(output_dir), "--max_train_steps", "1",
               "--train_batch_size", "1", "--resolution", str(resolution), *(["--random_flip"] if random_flip else []),
               *cache_options]
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=os.environ | {"PYTHONUNBUFFERED": "1"})
    output, cached_rss = [], None
    for line in child.stdout:
        output.append(line)
        if cached_rss is None and TRAINING_LINE.search(line):  # printed after caching, just before the first step
            cached_rss = resident_mib(child.pid)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage: ru_maxrss in KiB on Linux
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    child.stdout.close()
    output = "".join(output)
    if child.returncode != 0:
        raise SystemExit(f"train_lora.py failed ({child.returncode}): {' '.join(command)}\n{output[-3000:]}")
    found = LATENTS_LINE.search(output)
    return {"rss_mib": usage.ru_maxrss / 1024, "cached_rss_mib": cached_rss, "seconds": seconds,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "encoded": int(found[1]) if found else None, "read": int(found[2]) if found else None}


@app.command()
def main(
    counts: Annotated[str, typer.Option(*flags("counts"), help="image counts, comma-separated")] = "100,2000",
    resolution: Annotated[int, typer.Option(*flags("resolution"), help="train_lora.py's --resolution")] = 224,
    random_flip: Annotated[bool, typer.Option("--random_flip/--no_random_flip", help="cache both flips of each image")] = True,
    source_size: Annotated[int, typer.Option(*flags("source_size"), help="side of the PNGs written")] = 64,
) -> None:
    """Peak RSS and wall time of train_lora.py, latent cache in memory and on disk, per image count."""
    sizes = [int(c) for c in counts.split(",") if c.strip()]
    flips = 2 if random_flip else 1
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_disk_cache_") as temporary:
        root = Path(temporary)
        write_images(root / "warmup", 1, source_size, seed=0)
        run_training(root / "warmup", root / "out_warmup", resolution, random_flip, ["--cache_latents"])
        for count in sizes:
            images = root / f"images_{count}"
            write_images(images, count, source_size, seed=count)
            cache_dir = root / f"disk_cache_{count}"  # fresh for each image count
            disk = ["--cache_latents_to_disk", "--disk_cache_dir", str(cache_dir)]
            runs = (("memory", ["--cache_latents"]), ("disk, first run", disk), ("disk, again", disk))
            first_disk = None  # (wall, CPU) seconds of the run that wrote the cache
            for label, options in runs:
                result = run_training(images, root / f"out_{count}_{len(rows)}", resolution, random_flip, options)
                if label == "disk, first run":
                    first_disk = (result["seconds"], result["cpu_seconds"])
                result |= {"images": count, "cache": label, "entries": count * flips,
                           "vs_first": (result["seconds"] / first_disk[0], result["cpu_seconds"] / first_disk[1])
                           if label == "disk, again" else None}
                rows.append(result)
                typer.echo(f"{count} images, {label}: peak {result['rss_mib']:.0f} MiB, after caching "
                           f"{result['cached_rss_mib'] or 0:.0f} MiB, {result['seconds']:.1f} s wall, "
                           f"{result['cpu_seconds']:.1f} s CPU", err=True)

    entry_kib = 2 * 4 * (resolution // 8) ** 2 * 4 / 1024
    typer.echo(f"\ntiny-sdxl, --resolution {resolution}{' --random_flip' if random_flip else ''}, {source_size}² PNGs; "
               f"{flips} cache entr{'ies' if flips == 2 else 'y'} per image, {entry_kib:g} KiB each (mean + std, float32); "
               f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)\n")
    typer.echo("| images | cache | encoded / read | peak RSS (MiB) | RSS after caching (MiB) | wall s | CPU s "
               "| wall, CPU vs the first disk run |")
    typer.echo("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        counted = f"{row['encoded']} / {row['read']}" if row["encoded"] is not None else f"{row['entries']} / – (in memory)"
        ratio = f"{row['vs_first'][0]:.2f}, {row['vs_first'][1]:.2f}" if row["vs_first"] is not None else ""
        cached = f"{row['cached_rss_mib']:.0f}" if row["cached_rss_mib"] is not None else "?"
        typer.echo(f"| {row['images']:,} | {row['cache']} | {counted} | {row['rss_mib']:.0f} | {cached} | {row['seconds']:.1f} | "
                   f"{row['cpu_seconds']:.1f} | {ratio} |")
    if len(sizes) >= 2:
        by_cache: dict[str, list[dict]] = {}
        for row in rows:
            by_cache.setdefault(row["cache"], []).append(row)
        typer.echo("")
        for label, group in by_cache.items():
            low, high = group[0], group[-1]
            after = (f", after caching {high['cached_rss_mib'] - low['cached_rss_mib']:+.0f} MiB"
                     if high["cached_rss_mib"] is not None and low["cached_rss_mib"] is not None else "")
            typer.echo(f"{label}, {low['images']:,} -> {high['images']:,} images: peak {high['rss_mib'] - low['rss_mib']:+.0f} MiB"
                       f"{after} (posteriors: {(high['entries'] - low['entries']) * entry_kib / 1024:.1f} MiB more)")


if __name__ == "__main__":
    run_app(app)

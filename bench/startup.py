"""How long each script takes to answer --help: what a user waits for before any option is checked. Each run is a
fresh interpreter, as from a shell; the median of --runs is reported, with the modules the script had imported.

    python bench/startup.py --runs 7
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("infer", "train_lora", "gen_class_images", "merge_lora", "mjhq_fid", "convert_for_webui")
HEAVY = ("torch", "diffusers", "transformers", "numpy")


def main(runs: int = typer.Option(7, help="runs per script")) -> None:
    print("| script | `--help`, median s | heavy modules imported by `import script` |")
    print("| --- | --- | --- |")
    for script in SCRIPTS:
        seconds = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run([sys.executable, f"{script}.py", "--help"], cwd=REPO, capture_output=True, check=True)
            seconds.append(time.perf_counter() - started)
        probe = f"import sys, {script}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules) or 'none')"
        imported = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        print(f"| {script}.py | {statistics.median(seconds):.2f} | {imported} |")


if __name__ == "__main__":
    typer.run(main)

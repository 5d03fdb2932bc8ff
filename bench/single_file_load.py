"""Loading SDXL from a single file against loading it from a diffusers folder: wall time and peak resident memory of a
fresh process that loads the pipeline in bf16 (what train_lora.py and infer.py do first) and exits.

    python bench/single_file_load.py [--model full-sdxl] [--file /tmp/full-sdxl.safetensors] [--repeat 2]

The single file is written from the built-in model first when it is not there (`python -m common.builtin_models`).
Each load runs in its own process, the folder's and the file's alternately, and the page cache is warm after the first
(run it twice to see a cold first load). Both read their weights memory-mapped, so a bare load's resident size counts only
the pages touched; the second pair of columns reads every weight once after loading, as a first forward pass would.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOAD = """
import sys, torch
from common.models import load_sdxl_pipeline
pipe = load_sdxl_pipeline(sys.argv[1], torch.bfloat16)
assert pipe.unet.dtype == torch.bfloat16
if sys.argv[2] == "touch":  # read every weight once, as a first forward pass does: memory-mapped pages come in
    with torch.no_grad():
        sum(float(p.float().sum()) for part in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2) for p in part.parameters())
"""


def timed(*command) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of a child process."""
    started = time.time()
    process = subprocess.Popen([sys.executable, *command], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command} failed")
    return time.time() - started, usage.ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="full-sdxl")
    parser.add_argument("--file", type=Path, default=Path("/tmp/full-sdxl.safetensors"))
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from common.builtin_models import builtin_model_path

    folder = builtin_model_path(args.model)
    if not args.file.exists():
        seconds, rss = timed("-m", "common.builtin_models", args.model, str(args.file))
        print(f"wrote {args.file} ({args.file.stat().st_size / 2**30:.2f} GiB) in {seconds:.0f} s, peak {rss:.1f} GiB")
    print("| source | load (s) | peak RSS (GiB) | load and read every weight (s) | peak RSS (GiB) |")
    print("| --- | --- | --- | --- | --- |")
    for _ in range(args.repeat):
        for label, source in (("diffusers folder", folder), ("single file", args.file)):
            seconds, rss = timed("-c", LOAD, str(source), "load")
            touched_seconds, touched_rss = timed("-c", LOAD, str(source), "touch")
            print(f"| {label} | {seconds:.1f} | {rss:.2f} | {touched_seconds:.1f} | {touched_rss:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Re-run the 106 hostile-input probes of /work/shared/research/probes-2026-12.md and print their verdicts.

    python bench/probes.py [--only 1,2,5-9] [--workdir DIR] [--keep]

Each probe is one record of the PROBES table below: its number and short description as the research table words
them, a setup that builds its inputs in a scratch folder of its own (WORKDIR/pNNN), the command (the research's `T`,
`I` and convert_for_webui.py command lines, with every path pointing into the scratch folder), and a check that reads
the finished run. Commands run one at a time in fresh interpreters (`sys.executable`) from the repository root, with
HF_HUB_OFFLINE=1 and SDXL_PERSONALIZE_CACHE=WORKDIR/cache: the built-in tiny models are built there once, and runs that
several probes need (a LoHa, a LoKr, an all-NaN LoRA, a base image) are made once under WORKDIR/fixtures and copied.
Without --workdir everything goes into a temporary folder that is removed at the end (--keep leaves it).

The table on stdout has a row per probe: its number, the probe, the exit status (several, for the few probes of two
command variants), the verdict and what the run said (its `error:` line, its traceback's last line, or what it did),
with the scratch folder's path left out of paths; then the number of probes of each verdict. Progress goes to stderr.

Verdicts, as the research file uses them:

- CLEAN: refused (non-zero exit) in one `error:` line with no traceback, before any work: nothing in the output shows a
  model loaded (the loader's start-up line `model NAME: read as ...`, `EDM base detected`, `EDM training:`), class images
  made, latents encoded, a training or generation progress bar, or an earlier run removed (`--force: starting over`),
  and no file or folder in the scratch folder created, changed or removed (sizes and mtimes compared before and after).
- OK: ran and did the right thing, as the probe's check reads its outputs; or, for the few probes whose right result
  comes only after work (a diverged run, a NaN image), refused naming the cause and leaving no wrong file.
- LATE: refused after such work when the check could have come first, or a refusal that left files or folders behind.
- SILENT-WRONG: ran (exit 0) but did something wrong without saying so, or a refusal that changed or removed files
  that were there before it.
- TRACEBACK: "Traceback" in the output.
- ERROR: the harness could not judge: the setup failed, the command timed out, or it failed without an `error:` line.

A refusal where the right result was a run keeps its generic verdict, its note saying so; a refusal whose line does not
name what the probe says it should keeps its verdict too, the note starting "does not name ...". This is a
benchmark-style report, not a test: it never fails, it says what it saw.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
NOTE_CHARS = 160
COMMAND_TIMEOUT_S = 900
VERDICTS = ("CLEAN", "OK", "LATE", "SILENT-WRONG", "TRACEBACK", "ERROR")
SEVERITY = ("OK", "CLEAN", "ERROR", "LATE", "SILENT-WRONG", "TRACEBACK")  # combining variants: the worst wins

# The research file's shorthands, exactly
T = ["train_lora.py", "--model", "tiny-sdxl", "--instance_prompt", "a photo of sks dog", "--resolution", "64",
     "--train_batch_size", "1", "--rank", "4", "--learning_rate", "1e-2", "--max_train_steps", "2", "--seed", "0",
     "--mixed_precision", "no"]
I = ["infer.py", "--model", "tiny-sdxl", "--num_inference_steps", "2", "--width", "64", "--height", "64", "--seed", "1"]

# Output lines that show work done before a refusal: (pattern, what it shows)
WORK_SIGNS = (
    (r"^model .*: read as ", "the model loaded"),
    (r"EDM base detected", "the model loaded (EDM base detected)"),
    (r"EDM training:", "the model loaded (EDM training line)"),
    (r"made \d+ class image", "class images were made"),
    (r"^latents:", "latents were encoded"),
    (r"^training:\s*\d+%", "training started"),
    (r"^generating:\s*\d+%", "images were generated"),
    (r"--force: starting over", "the earlier run was removed"),
)
PROGRESS_BAR = re.compile(r"\d+%\|")
TEXT_CAPTION = "a photo of sks dog"
LONG_TEXT = " ".join(["dog", "red"] * 150)  # 300 tokens
SUMMARY = re.compile(r"^\d+ images?, |^saved \d+ image|^done: |WebUI|^layers")


# ---------------------------------------------------------------------------------------------------------------------
# Command lines


def with_options(base: list[str], more: tuple[str, ...]) -> list[str]:
    """`base` with the options of `more` (each `--flag` and the values after it): a flag `base` has gets the new values,
    any other is appended."""
    args = list(base)
    groups, current = [], None
    for token in more:
        if token.startswith("--"):
            current = [token]
            groups.append(current)
        else:
            current.append(token)
    for flag, *values in groups:
        if flag in args:
            start = args.index(flag) + 1
            end = start
            while end < len(args) and not args[end].startswith("--"):
                end += 1
            args[start:end] = values
        else:
            args += [flag, *values]
    return args


def train(*more: str, data: str = "data/rgb", out: str = "out/run") -> list[str]:
    """`T` on a data folder into an output folder of the scratch folder, with `more` options."""
    return with_options(T, ("--instance_data_dir", "{w}/" + data, "--output_dir", "{w}/" + out, *more))


def infer(*more: str, out: str = "out/img", prompt: Optional[str] = "a dog") -> list[str]:
    """`I` into an output folder of the scratch folder, with a prompt unless `more` gives --prompt or --prompt_file."""
    prompted = "--prompt" in more or "--prompt_file" in more or prompt is None
    return with_options(I, ("--output_dir", "{w}/" + out, *(() if prompted else ("--prompt", prompt)), *more))


def convert(*args: str) -> list[str]:
    return ["convert_for_webui.py", *args]


def expand(args: list[str], places: dict[str, str]) -> list[str]:
    """Placeholders ({w}: the scratch folder, {tiny-sdxl}: the built-in model's folder) replaced in every argument."""
    out = []
    for arg in args:
        for key, value in places.items():
            arg = arg.replace("{" + key + "}", value)
        out.append(arg)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Runs


class SetupError(Exception):
    """A probe's inputs could not be built (a prerequisite run failed): the probe is reported as ERROR."""


@dataclass
class Changes:
    """What a command did to the scratch folder: relative paths created, modified (size or mtime) and removed."""

    created: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.created or self.modified or self.removed)


def snapshot(root: Path) -> dict[str, Optional[tuple[int, int]]]:
    """Every file (size, mtime) and folder (None: its own mtime is ignored) under `root`, by relative path."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        base = Path(folder)
        for name in dirs:
            entries[(base / name).relative_to(root).as_posix() + "/"] = None
        for name in files:
            path = base / name
            try:
                stat = path.lstat()
            except OSError:
                continue
            entries[path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return entries


def compare(before: dict, after: dict, exempt: Optional[str]) -> Changes:
    def counted(path: str) -> bool:  # not the exempt folder, nothing in it, nor a folder made on the way to it
        return exempt is None or not (path.startswith(exempt + "/") or (path.endswith("/") and (exempt + "/").startswith(path)))

    return Changes(
        created=sorted(p for p in after if p not in before and counted(p)),
        modified=sorted(p for p in after if p in before and before[p] != after[p] and counted(p)),
        removed=sorted(p for p in before if p not in after and counted(p)),
    )


@dataclass
class Run:
    """One finished command: its arguments, exit status (None: timed out), stdout and stderr interleaved, and what it
    changed in the scratch folder."""

    args: list[str]
    rc: Optional[int]
    output: str
    seconds: float
    changes: Changes
    scratch: "Scratch"

    def segments(self) -> list[str]:
        """The output's lines, split at carriage returns too (tqdm's redraws), stripped, empty ones dropped."""
        return [s.strip() for s in re.split(r"[\r\n]", self.output) if s.strip()]

    def lines(self) -> list[str]:
        """The output's lines without progress-bar redraws."""
        return [s for s in self.segments() if not PROGRESS_BAR.search(s)]

    def errors(self) -> list[str]:
        return [line for line in self.lines() if line.startswith("error:")]

    def error(self) -> str:
        errors = self.errors()
        return errors[-1] if errors else (self.lines() or [""])[-1]

    def line(self, pattern: str) -> Optional[str]:
        return next((line for line in self.lines() if re.search(pattern, line)), None)

    def work_done(self) -> Optional[str]:
        """What the output shows was done before the refusal, or None."""
        for segment in self.segments():
            for pattern, what in WORK_SIGNS:
                if re.search(pattern, segment):
                    return what
        return None

    def summary(self) -> str:
        """What a successful run said: its summary line (images and captions, saved images, --check's verdict)."""
        lines = self.lines()
        return next((line for line in lines if SUMMARY.search(line)), lines[-1] if lines else "(no output)")

    def path(self, rel: str) -> Path:
        return self.scratch.path(rel)


# ---------------------------------------------------------------------------------------------------------------------
# Scratch folders and shared fixtures


class Context:
    """What all probes share: the work folder, the model cache, the environment, the fixtures already built."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.cache = workdir / "cache"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "SDXL_PERSONALIZE_CACHE": str(self.cache),
                    "PYTHONUNBUFFERED": "1"}
        self.places = {"tiny-sdxl": ""}

    def warm_up(self) -> None:
        """Build the tiny models into the shared cache now, so that no probe's output holds the build's line."""
        code = ("from common.builtin_models import builtin_model_path; "
                "print(builtin_model_path('tiny-sdxl')); builtin_model_path('tiny-edm')")
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"could not build the tiny models:\n{done.stderr}")
        self.places["tiny-sdxl"] = done.stdout.strip().splitlines()[-1]


class Scratch:
    """A probe's scratch folder: helpers that build its inputs and run its commands."""

    def __init__(self, root: Path, context: Context):
        self.root, self.context = root, context
        self.cleanups: list[Callable[[], None]] = []

    def path(self, rel: str) -> Path:
        return self.root / rel

    def places(self) -> dict[str, str]:
        return {"w": str(self.root), **self.context.places}

    # inputs

    def images(self, rel: str, count: int = 2, size: tuple[int, int] = (64, 64), alpha: bool = False) -> None:
        """`count` random RGB (or RGBA, half transparent) PNGs 0000.png, 0001.png, ... in folder `rel`."""
        import numpy as np
        from PIL import Image

        folder = self.path(rel)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            if alpha:
                mask = np.zeros((size[1], size[0]), dtype=np.uint8)
                mask[:, : size[0] // 2] = 255
                image.putalpha(Image.fromarray(mask))
            image.save(folder / f"{i:04d}.png")

    def write(self, rel: str, content: str | bytes) -> Path:
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return path

    def mask(self, rel: str, size: tuple[int, int] = (64, 64), value: int = 255, sixteen_bit: bool = False,
             half: bool = False) -> None:
        """A grey mask PNG: `value` everywhere (or in its left half, black elsewhere), 8 or 16 bits."""
        import numpy as np
        from PIL import Image

        top = 65535 if sixteen_bit else 255
        pixels = np.zeros((size[1], size[0]), dtype=np.uint16 if sixteen_bit else np.uint8)
        pixels[:, : size[0] // 2 if half else size[0]] = value * top // 255
        self.path(rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(self.path(rel))

    def immutable(self, rel: str) -> None:
        """Make folder `rel` immutable (chattr +i: even root cannot write into it); undone after the probe."""
        path = self.path(rel)
        path.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            raise SetupError(f"chattr +i {rel} failed (needs root and a file system that has the attribute)")
        self.cleanups.append(lambda: subprocess.run(["chattr", "-i", str(path)], capture_output=True))

    # commands

    def execute(self, args: list[str], exempt: Optional[str] = None) -> Run:
        """Run one command from the repository root and record what it printed and changed here."""
        before = snapshot(self.root)
        started = time.time()
        try:
            done = subprocess.run([sys.executable, *expand(args, self.places())], cwd=REPO, env=self.context.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=COMMAND_TIMEOUT_S)
            rc, output = done.returncode, done.stdout.decode("utf-8", "replace")
        except subprocess.TimeoutExpired as expired:
            rc, output = None, (expired.stdout or b"").decode("utf-8", "replace")
        return Run(args, rc, output, time.time() - started, compare(before, snapshot(self.root), exempt), self)

    def run_ok(self, args: list[str]) -> Run:
        """A prerequisite command, which must succeed."""
        run = self.execute(args)
        if run.rc != 0:
            raise SetupError(f"setup command failed (rc {run.rc}): {clean(run.error(), self)}")
        return run

    def fixture(self, name: str) -> None:
        """Copy shared fixture `name` (built once per work folder, see FIXTURES) into this scratch folder's out/."""
        folder = self.context.workdir / "fixtures" / name
        if not (folder / "built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            builder = Scratch(folder, self.context)
            builder.images("data/rgb")
            FIXTURES[name](builder)
            (folder / "built").write_text("")
        for item in (folder / "out").iterdir():
            shutil.copytree(item, self.path("out") / item.name, dirs_exist_ok=True)

    def cleanup(self) -> None:
        for undo in self.cleanups:
            undo()
        self.cleanups.clear()


# ---------------------------------------------------------------------------------------------------------------------
# Safetensors edits (numpy: the probes' files are float32)


def read_tensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, (handle.metadata() or {})


def write_tensors(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)


def fill_nan(path: Path, keep: Callable[[str], bool] = lambda key: False) -> None:
    """Every floating-point tensor of a safetensors file set to NaN (keys for which `keep` is true left alone)."""
    import numpy as np

    tensors, metadata = read_tensors(path)
    for key, value in tensors.items():
        if np.issubdtype(value.dtype, np.floating) and not keep(key):
            tensors[key] = np.full_like(value, np.nan)
    write_tensors(path, tensors, metadata)


def all_finite(path: Path) -> tuple[int, int]:
    """(tensors with a non-finite value, tensors) of a safetensors file."""
    import numpy as np

    tensors, _ = read_tensors(path)
    bad = sum(not np.isfinite(v).all() for v in tensors.values() if np.issubdtype(v.dtype, np.floating))
    return bad, len(tensors)


def same_tensors(a: Path, b: Path) -> float:
    """The largest absolute difference between two safetensors files of the same keys (inf when the keys differ)."""
    import numpy as np

    first, _ = read_tensors(a)
    second, _ = read_tensors(b)
    if first.keys() != second.keys():
        return float("inf")
    return max((float(np.abs(first[k].astype(np.float64) - second[k]).max()) for k in first), default=0.0)


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png")) if folder.is_dir() else []


def pixel_difference(a: Path, b: Path) -> int:
    import numpy as np
    from PIL import Image

    return int(np.abs(np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16)).max())


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: runs several probes read (never change), made once per work folder under WORKDIR/fixtures/NAME/out/


def nan_lora(s: Scratch) -> None:
    """A finished run in out/nan whose every LoRA tensor is NaN (as #106's diverged run wrote it): the diffusers file
    all NaN, the WebUI copy all NaN but its alphas."""
    s.run_ok(train(out="out/nan"))
    fill_nan(s.path("out/nan/pytorch_lora_weights.safetensors"))
    fill_nan(s.path("out/nan/nan.safetensors"), keep=lambda key: key.endswith(".alpha"))


FIXTURES: dict[str, Callable[[Scratch], None]] = {
    "base": lambda s: s.run_ok(train(out="out/base")),
    "loha": lambda s: s.run_ok(train("--adapter", "loha", out="out/loha")),
    "lokr": lambda s: s.run_ok(train("--adapter", "lokr", out="out/lokr")),
    "base_png": lambda s: s.run_ok(infer(out="out/base_png")),
    "nan": nan_lora,
}


# ---------------------------------------------------------------------------------------------------------------------
# Setups: each builds one probe's inputs (data/rgb is always there)


def dataset(name: str, files: Optional[dict[str, str | bytes]] = None, folders: Optional[dict[str, int]] = None,
            loose: int = 2, alpha: bool = False) -> Callable[[Scratch], None]:
    """data/NAME: `loose` random PNGs (0000.png, ...), `folders` {subfolder: number of PNGs} and `files` {name: content}."""
    def setup(s: Scratch) -> None:
        s.path(f"data/{name}").mkdir(parents=True, exist_ok=True)
        if loose:
            s.images(f"data/{name}", loose, alpha=alpha)
        for sub, count in (folders or {}).items():
            s.images(f"data/{name}/{sub}", count)
        for rel, content in (files or {}).items():
            s.write(f"data/{name}/{rel}", content)
    return setup


def steps(*setups: Callable[[Scratch], None]) -> Callable[[Scratch], None]:
    def setup(s: Scratch) -> None:
        for one in setups:
            one(s)
    return setup


def fixture(name: str) -> Callable[[Scratch], None]:
    return lambda s: s.fixture(name)


def files(contents: dict[str, str | bytes]) -> Callable[[Scratch], None]:
    """Files {relative path: content} in the scratch folder."""
    def setup(s: Scratch) -> None:
        for rel, content in contents.items():
            s.write(rel, content)
    return setup


def caption_dir(s: Scratch) -> None:
    dataset("capdir")(s)
    s.path("data/capdir/0000.txt").mkdir()


def masks(name: str, *, value: int = 255, sixteen_bit: bool = False, half: bool = False,
          sizes: tuple = ((64, 64), (64, 64))) -> Callable[[Scratch], None]:
    """masks_NAME/0000.png, 0001.png: one mask per image of data/rgb, of the given sizes."""
    def setup(s: Scratch) -> None:
        for i, size in enumerate(sizes):
            s.mask(f"masks_{name}/{i:04d}.png", size, value=value, sixteen_bit=sixteen_bit, half=half)
    return setup


def masks_not_image(s: Scratch) -> None:
    s.mask("masks_notimg/0001.png")
    s.write("masks_notimg/0000.png", "this is not a PNG\n")


def trained_8bit_mask_run(s: Scratch) -> None:
    """#30: the same half-white mask in 8 bits and in 16 bits; the 8-bit run trained first, into out/m8."""
    masks("8", half=True)(s)
    masks("16", half=True, sixteen_bit=True)(s)
    s.run_ok(train("--masked_loss", "--mask_dir", "{w}/masks_8", out="out/m8"))


def earlier_run(out: str, *more: str) -> Callable[[Scratch], None]:
    """A finished run (data/rgb) in `out`, with `more` options."""
    return lambda s: s.run_ok(train(*more, out=out))


def filled_cache(cache: str, *more: str, model: str = "tiny-sdxl") -> Callable[[Scratch], None]:
    """A run that fills disk cache `cache` (its latents, and whatever `more` adds)."""
    return lambda s: s.run_ok(train("--model", model, "--cache_latents_to_disk", "--disk_cache_dir", "{w}/" + cache,
                                    *more, out="out/filler"))


def cache_entries(s: Scratch, cache: str, kind: str) -> list[Path]:
    return sorted(s.path(f"{cache}/{kind}").glob("*/*.safetensors"))


def truncate_entry(s: Scratch) -> None:
    """#50: one latents entry cut to 100 bytes."""
    filled_cache("cache2")(s)
    entry = cache_entries(s, "cache2", "latents")[0]
    entry.write_bytes(entry.read_bytes()[:100])


def entries_without_mean(s: Scratch) -> None:
    """#51: every latents entry replaced by a text entry (valid safetensors without `mean`)."""
    filled_cache("cache", "--cache_text_encoder_outputs_to_disk")(s)
    text = cache_entries(s, "cache", "text")[0]
    for entry in cache_entries(s, "cache", "latents"):
        shutil.copyfile(text, entry)


def nan_entries(s: Scratch) -> None:
    """#52: every latents entry's tensors set to NaN."""
    filled_cache("cacheN")(s)
    for entry in cache_entries(s, "cacheN", "latents"):
        fill_nan(entry)


def wrong_key_lora(s: Scratch) -> None:
    """#98: the WebUI copy of a LoRA with one key's suffix misspelt and one layer of a block 99 added."""
    s.fixture("base")
    tensors, metadata = read_tensors(s.path("out/base/base.safetensors"))
    down = next(k for k in tensors if k.endswith(".lora_down.weight"))
    tensors[down.replace("lora_down.weight", "lora_dwn.weight")] = tensors.pop(down)
    stem = [k for k in tensors if k.endswith(".lora_up.weight")][-1].rsplit(".", 2)[0]  # another layer than `down`'s
    bogus = re.sub(r"(input|output|middle)_blocks?_\d+", "output_blocks_99", stem, count=1)
    for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
        tensors[f"{bogus}.{suffix}"] = tensors[f"{stem}.{suffix}"].copy()
    write_tensors(s.path("wrongkey.safetensors"), tensors, metadata)


def truncated_lora(s: Scratch) -> None:
    """#100: the first 100 kB (at most half) of a LoRA file."""
    s.fixture("base")
    data = s.path("out/base/base.safetensors").read_bytes()
    s.write("trunc.safetensors", data[: min(100_000, len(data) // 2)])


def sample_prompts_59(s: Scratch) -> None:
    s.write("prompts/p59.txt", "\n".join([
        "", "# a comment line", "a dog on grass --n blurry --w 64 --h 64 --d 7 --l 4 --s 2", "",
        ("a photo of a dog " * 118).strip() + " --w 64 --h 64 --s 2", "",
    ]))


# ---------------------------------------------------------------------------------------------------------------------
# Checks: (Run) -> (verdict, note)


Check = Callable[[Run], tuple[str, str]]


def clean(text: str, scratch: Optional[Scratch] = None) -> str:
    """One note: the scratch folder's and the cache's paths left out, on one line, trimmed."""
    if scratch is not None:
        text = text.replace(str(scratch.root) + "/", "").replace(str(scratch.root), ".")
        text = text.replace(str(scratch.context.cache), "$CACHE")
    text = " ".join(text.split())
    return text if len(text) <= NOTE_CHARS else text[: NOTE_CHARS - 1] + "…"


def traceback_line(run: Run) -> Optional[str]:
    """The exception line of a traceback in the output, or None when there is none."""
    if "Traceback" not in run.output:
        return None
    after = run.output[run.output.rindex("Traceback"):].splitlines()
    raised = [line for line in after[1:] if line and not line.startswith((" ", "\t")) and not PROGRESS_BAR.search(line)]
    return raised[-1] if raised else "Traceback"


def judge_refusal(run: Run) -> tuple[str, str]:
    """The generic verdict of a non-zero exit: LATE after work, CLEAN for one `error:` line, ERROR otherwise."""
    errors = run.errors()
    if not errors:
        return "ERROR", f"exit {run.rc} without an error: line: {run.error()}"
    work = run.work_done()
    if work:
        return "LATE", f"{errors[-1]} (after: {work})"
    if len(errors) > 1:
        return "ERROR", f"{len(errors)} error: lines: {' / '.join(errors)}"
    return "CLEAN", errors[0]


def refused(naming: Optional[str] = None) -> Check:
    """The right result is a refusal before any work (naming `naming`, a regex, when given)."""
    def check(run: Run) -> tuple[str, str]:
        if run.rc == 0:
            return "SILENT-WRONG", f"accepted (exit 0), expected a refusal: {run.summary()}"
        verdict, note = judge_refusal(run)
        if naming and not re.search(naming, run.error(), re.IGNORECASE):
            note = f"does not name {naming!r}: {note}"
        return verdict, note
    return check


def ran(needs: Optional[str] = None, show: Optional[str] = None, absent: Optional[str] = None) -> Check:
    """The right result is a run (exit 0) whose output has a line matching `needs` (and none matching `absent`);
    the note is the line matching `needs` or `show`, else the run's summary line."""
    def check(run: Run) -> tuple[str, str]:
        if run.rc != 0:
            verdict, note = judge_refusal(run)
            return verdict, f"refused, expected a run: {note}"
        if needs and not run.line(needs):
            return "SILENT-WRONG", f"no line matches /{needs}/: {run.summary()}"
        if absent and run.line(absent):
            return "SILENT-WRONG", run.line(absent)
        said = run.line(needs) if needs else (run.line(show) if show else None)
        return "OK", said or run.summary()
    return check


def either(show: Optional[str] = None) -> Check:
    """Both are right: a run (exit 0) or a clean refusal."""
    def check(run: Run) -> tuple[str, str]:
        if run.rc == 0:
            return "OK", f"ran: {(run.line(show) if show else None) or run.summary()}"
        return judge_refusal(run)
    return check


def caption_of_bom(run: Run) -> tuple[str, str]:
    """#5: the BOM must not reach the caption: the caption file's text equals the instance prompt, so 1 distinct."""
    verdict, note = ran(show=r"captions")(run)
    if verdict == "OK" and "(1 distinct)" not in run.summary():
        return "SILENT-WRONG", f"the BOM caption counts as another text: {run.summary()}"
    return verdict, note


def metadata_captions(run: Run) -> tuple[str, str]:
    """#20: with --instance_prompt given, metadata.jsonl's text column still captions its images."""
    return ran(needs=r"from metadata\.jsonl")(run)


def checked(base: Check, *more: Callable[[Run], Optional[tuple[str, str]]]) -> Check:
    """`base`'s verdict unless one of `more` returns a worse (verdict, note) for the same run."""
    def check(run: Run) -> tuple[str, str]:
        verdict, note = base(run)
        for extra in more:
            found = extra(run)
            if found and SEVERITY.index(found[0]) > SEVERITY.index(verdict):
                verdict, note = found[0], f"{found[1]}; {note}"
        return verdict, note
    return check


def no_events_in(rel: str) -> Callable[[Run], Optional[tuple[str, str]]]:
    """#63: the refused run wrote no TensorBoard files into the earlier run's folder."""
    def extra(run: Run) -> Optional[tuple[str, str]]:
        written = [p.name for p in run.path(rel).rglob("*") if p.is_file() and ("tfevents" in p.name or p.name == "hparams.yml")]
        return ("SILENT-WRONG", f"wrote {', '.join(written)} into the earlier run") if written else None
    return extra


def checkpoints_kept(rel: str, names: tuple[str, ...]) -> Callable[[Run], Optional[tuple[str, str]]]:
    """#103: the earlier run's checkpoints are still there."""
    def extra(run: Run) -> Optional[tuple[str, str]]:
        gone = [name for name in names if not run.path(f"{rel}/{name}").is_dir()]
        return ("SILENT-WRONG", f"the earlier run's {', '.join(gone)} removed") if gone else None
    return extra


def no_class_images(rel: str) -> Callable[[Run], Optional[tuple[str, str]]]:
    """#104: no class image was made before the refusal."""
    def extra(run: Run) -> Optional[tuple[str, str]]:
        made = pngs(run.path(rel))
        return ("LATE", f"{len(made)} class image(s) made first") if made else None
    return extra


def refused_naming_cause(cause: str, images: str, after_work_ok: bool) -> Check:
    """#97 (and #88 where it overflows): a non-zero exit naming `cause` and no PNG in `images` (a black PNG with exit 0 is
    SILENT-WRONG).
    `after_work_ok`: the cause shows only once images are made (#88), so a refusal after the load is right."""
    def check(run: Run) -> tuple[str, str]:
        written = pngs(run.path(images))
        if run.rc == 0:
            return "SILENT-WRONG", f"exit 0 and {len(written)} PNG(s) written: {run.summary()}"
        verdict, note = judge_refusal(run)
        if not re.search(cause, run.error(), re.IGNORECASE):
            return ("SILENT-WRONG" if written else verdict), f"does not name {cause!r}: {note}"
        if written:
            return "SILENT-WRONG", f"refused but wrote {len(written)} PNG(s): {note}"
        if after_work_ok and verdict == "LATE":
            return "OK", run.error()
        return verdict, note
    return check


def image_or_refusal(cause: str, images: str) -> Check:
    """#88: a LoRA at a huge weight. Where the adapted weights fit the model's dtype (float32 on the CPU) the image is
    what the arithmetic gives, and right if it holds no NaN (a NaN decodes to an all-black PNG); where they overflow it
    (fp16) the run refuses naming the cause, as `refused_naming_cause` judges."""
    def check(run: Run) -> tuple[str, str]:
        import numpy as np
        from PIL import Image

        if run.rc != 0:
            return refused_naming_cause(cause, images, after_work_ok=True)(run)
        written = pngs(run.path(images))
        if not written:
            return "SILENT-WRONG", f"exit 0 and no PNG: {run.summary()}"
        black = [p.name for p in written if not np.asarray(Image.open(p)).any()]
        if black:
            return "SILENT-WRONG", f"exit 0 and all-black PNG(s) {', '.join(black)}"
        return "OK", f"ran: the weight fits float32 here, {len(written)} finite image(s) (fp16 refuses it: test_adapter_integrity)"
    return check


def safetensors_dtypes(path: Path) -> set[str]:
    """The dtypes of a safetensors file's tensors, read from its header."""
    import json
    import struct

    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


def stored_as(dtype: str, *files: str) -> Check:
    """#79: the run finishes and every tensor of each adapter file it wrote is stored as `dtype` (safetensors' name)."""
    def check(run: Run) -> tuple[str, str]:
        verdict, note = ran()(run)
        if verdict != "OK":
            return verdict, note
        for rel in files:
            if not run.path(rel).is_file():
                return "SILENT-WRONG", f"no {rel}: {note}"
            found = safetensors_dtypes(run.path(rel))
            if found != {dtype}:
                return "SILENT-WRONG", f"{rel} holds {', '.join(sorted(found))}, not {dtype} only"
        return "OK", f"every tensor of {', '.join(files)} is {dtype}"
    return check


def epoch_files(present: tuple[str, ...], absent: tuple[str, ...]) -> Check:
    """#80: the run finishes with kohya's epoch files: each of `present`, and none of `absent` (the last epoch is the
    final file, as kohya saves it)."""
    def check(run: Run) -> tuple[str, str]:
        verdict, note = ran()(run)
        if verdict != "OK":
            return verdict, note
        missing = [rel for rel in present if not run.path(rel).is_file()]
        extra = [rel for rel in absent if run.path(rel).exists()]
        if missing or extra:
            return "SILENT-WRONG", f"missing {missing}, unexpected {extra}"
        return "OK", f"wrote {', '.join(Path(rel).name for rel in present)}; the last epoch is the final file"
    return check


def healed_cache(run: Run) -> tuple[str, str]:
    """#50, #51: a broken cache entry is encoded again (the latents line says so) and the run finishes."""
    return ran(needs=r"^latents: [1-9]\d* encoded")(run)


def finite_lora(rel: str) -> Check:
    """#52: the run finishes and its LoRA holds no NaN (the NaN cache entries were healed)."""
    def check(run: Run) -> tuple[str, str]:
        verdict, note = ran(show=r"^latents:")(run)
        if verdict != "OK":
            return verdict, note
        path = run.path(f"{rel}/pytorch_lora_weights.safetensors")
        if not path.is_file():
            return "SILENT-WRONG", f"exit 0 but no {path.name}"
        bad, total = all_finite(path)
        return ("SILENT-WRONG", f"exit 0 with {bad}/{total} non-finite tensors: {note}") if bad else ("OK", f"finite LoRA; {note}")
    return check


def same_lora_as(rel: str, other: str) -> Check:
    """#30: the LoRA equals (bit for bit) the one of the 8-bit run."""
    def check(run: Run) -> tuple[str, str]:
        verdict, note = ran(show=r"mask")(run)
        if verdict != "OK":
            return verdict, note
        diff = same_tensors(run.path(f"{rel}/pytorch_lora_weights.safetensors"), run.path(f"{other}/pytorch_lora_weights.safetensors"))
        return ("OK", f"bit-identical to the 8-bit run; {note}") if diff == 0 else ("SILENT-WRONG", f"differs from the 8-bit run by {diff:.3g}")
    return check


def ema_files(rel: str) -> Check:
    """#46: NAME.safetensors and NAME_ema.safetensors, different, and no stray ema/ folder."""
    def check(run: Run) -> tuple[str, str]:
        verdict, note = ran()(run)
        if verdict != "OK":
            return verdict, note
        folder = run.path(rel)
        raw, ema = folder / f"{folder.name}.safetensors", folder / f"{folder.name}_ema.safetensors"
        if not (raw.is_file() and ema.is_file()):
            return "SILENT-WRONG", f"missing {raw.name if not raw.is_file() else ema.name}"
        if (folder / "ema").exists():
            return "SILENT-WRONG", "a stray ema/ folder"
        diff = same_tensors(raw, ema)
        return ("OK", f"{raw.name} and {ema.name} differ by {diff:.3g}") if diff > 0 else ("SILENT-WRONG", "the EMA file equals the raw one")
    return check


def samples_59(rel: str) -> Check:
    """#59: the two prompt lines sampled (2 PNGs) and their grid, the long line warned."""
    def check(run: Run) -> tuple[str, str]:
        verdict, note = ran(show=r"longer than")(run)
        if verdict != "OK":
            return verdict, note
        images = [p for p in pngs(run.path(rel)) if "samples" not in p.parts]
        grids = pngs(run.path(f"{rel}/samples"))
        if len(images) != 2 or not grids:
            return "SILENT-WRONG", f"{len(images)} sample PNG(s), {len(grids)} grid(s): {note}"
        return "OK", f"2 PNGs and a grid; {note}"
    return check


def tensorboard_events(rel: str) -> Check:
    """#67: the event file holds the loss and the samples image."""
    def check(run: Run) -> tuple[str, str]:
        verdict, note = ran()(run)
        if verdict != "OK":
            return verdict, note
        events = sorted(run.path(rel).rglob("events.out.tfevents.*"))
        if not events:
            return "SILENT-WRONG", "no TensorBoard event file"
        try:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        except ImportError:
            return "OK", f"{len(events)} event file(s) (tensorboard not importable: not read)"
        tags = {}
        for path in events:
            accumulator = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
            accumulator.Reload()
            for kind, names in accumulator.Tags().items():
                if isinstance(names, list):
                    tags.setdefault(kind, set()).update(names)
        scalars, images = tags.get("scalars", set()), tags.get("images", set())
        if not any("loss" in t for t in scalars) or not any("samples" in t for t in images):
            return "SILENT-WRONG", f"event tags: scalars {sorted(scalars)}, images {sorted(images)}"
        return "OK", f"scalars {sorted(scalars)}, images {sorted(images)}"
    return check


def compared_to_base(same: bool) -> Check:
    """#85-87: the image equals (weight 0) or differs from (weight 1, -1) the base model's image of the same seed."""
    def check(run: Run) -> tuple[str, str]:
        verdict, note = ran(show=r"LoRA|weight")(run)
        if verdict != "OK":
            return verdict, note
        image, base = pngs(run.path("out/img")), pngs(run.path("out/base_png"))
        if not image or not base:
            return "ERROR", "no image to compare"
        diff = pixel_difference(image[0], base[0])
        if same:
            return ("OK", f"pixel-identical to the base; {note}") if diff == 0 else ("SILENT-WRONG", f"differs from the base by {diff} levels")
        return ("OK", f"differs from the base (max {diff} levels)") if diff else ("SILENT-WRONG", "pixel-identical to the base")
    return check


def weighting_note(run: Run) -> tuple[str, str]:
    """#89: the prompt's (word:1.5) weights are not parsed; a line must say so (weighting syntax, --prompt_syntax)."""
    verdict, note = ran(needs=r"weight(ing|s)? syntax|--prompt_syntax|\(word:|not parsed")(run)
    if verdict == "SILENT-WRONG":
        note = f"encoded as literal text, no line mentions weighting syntax or --prompt_syntax: {run.summary()}"
    return verdict, note


def nonfinite_check(run: Run) -> tuple[str, str]:
    """#101: --check exits non-zero naming a non-finite tensor."""
    said = run.line(r"non-finite|not finite|NaN")
    if run.rc != 0 and said:
        return "OK", said
    if run.rc == 0:
        return "SILENT-WRONG", f"exit 0: {run.summary()}"
    return "SILENT-WRONG", f"exit {run.rc} without naming a non-finite tensor: {run.error()}"


def wrong_keys_named(run: Run) -> tuple[str, str]:
    """#98: --check exits non-zero naming the misspelt suffix and the block-99 layer."""
    if run.rc != 0 and run.line(r"lora_dwn") and run.line(r"_99"):
        return "OK", f"{run.line(r'lora_dwn')} / {run.line(r'^WebUI: ') or run.error()}"
    return "SILENT-WRONG", f"exit {run.rc}, the bad keys not both named: {run.summary()}"


def diverged(rel: str) -> Check:
    """#106: the run stops non-zero saying it diverged, and writes no LoRA file of NaN."""
    def check(run: Run) -> tuple[str, str]:
        nan = [p.name for p in sorted(run.path(rel).glob("*.safetensors")) if all_finite(p)[0]]
        if run.rc == 0:
            return "SILENT-WRONG", f"exit 0{' with NaN LoRA ' + ', '.join(nan) if nan else ''}: {run.summary()}"
        if nan:
            return "SILENT-WRONG", f"wrote NaN LoRA {', '.join(nan)}: {run.error()}"
        if "diverged" not in run.error():
            verdict, note = judge_refusal(run)
            return verdict, f"does not say it diverged: {note}"
        return "OK", run.error()
    return check


# ---------------------------------------------------------------------------------------------------------------------
# The probes


@dataclass(frozen=True)
class Probe:
    """One row of the research table: inputs built by `setup` in the scratch folder, `command` run (or each of several
    variants), `check` reading the result. `output`: the run's own folder, where a refusal that comes only after work
    (a diverged run, a NaN image) may leave things."""

    number: int
    what: str
    command: list[str] | tuple[list[str], ...]
    check: Check = field(default_factory=refused)
    setup: Callable[[Scratch], None] = lambda s: None
    output: Optional[str] = None

    def commands(self) -> tuple[list[str], ...]:
        return self.command if isinstance(self.command, tuple) else (self.command,)


TAGS = dataset("tags", {"0000.txt": "sks dog, red collar, grass", "0001.txt": "sks dog, blue collar, sand"})
TAG_OPTIONS = ("--shuffle_caption", "--keep_tokens", "10")
LONG = dataset("long", {"0000.txt": LONG_TEXT, "0001.txt": LONG_TEXT})
CAPTION_FILES = dataset("cx", {"0000.caption": "zebra", "0001.caption": "a striped horse"})
EMPTY = dataset("empty", {"0000.txt": ""})
EDM = ("--model", "tiny-edm")
P16 = files({"p16.txt": "a dog --s 2\n".encode("utf-16")})

PROBES: list[Probe] = [
    # captions
    Probe(1, "`T` on `data/empty` (`0000.txt` is empty)", train(data="data/empty"), setup=EMPTY),
    Probe(2, "`T` on `data/ws` (caption is whitespace)", train(data="data/ws"), setup=dataset("ws", {"0000.txt": "   \n\t \n"})),
    Probe(3, "`T` on `data/utf16` (UTF-16 caption with BOM)", train(data="data/utf16"), either(r"captions"),
          dataset("utf16", {"0000.txt": TEXT_CAPTION.encode("utf-16")})),
    Probe(4, "`T` on `data/latin1` (`caf\\xe9` in latin-1)", train(data="data/latin1"),
          setup=dataset("latin1", {"0000.txt": "a dog in a caf\xe9".encode("latin-1")})),
    Probe(5, "`T` on `data/bom` (UTF-8 BOM caption = the prompt)", train(data="data/bom"), caption_of_bom,
          dataset("bom", {"0000.txt": TEXT_CAPTION.encode("utf-8-sig")})),
    Probe(6, "`T` with `9999.txt` and no `9999.png`", train(data="data/stray"), ran(show=r"captions"),
          dataset("stray", {"9999.txt": "a stray caption"})),
    Probe(7, "`T` on `.caption` files, default `--caption_extension`", train(data="data/cx"),
          ran(show=r"\.caption|captions"), CAPTION_FILES),
    Probe(8, "… `--caption_extension .caption`", train("--caption_extension", ".caption", data="data/cx"),
          ran(needs=r"from caption files"), CAPTION_FILES),
    Probe(9, "… `--caption_extension caption` (no dot)", train("--caption_extension", "caption", data="data/cx"),
          either(r"captions"), CAPTION_FILES),
    Probe(10, "`T`, caption file `0000.txt` is a directory", train(data="data/capdir"), ran(show=r"captions"), caption_dir),
    Probe(11, "`T`, 300-token captions, default 75", train(data="data/long"), ran(needs=r"longer than"), LONG),
    Probe(12, "… `--max_token_length 150`", train("--max_token_length", "150", data="data/long"), ran(needs=r"longer than"), LONG),
    Probe(13, "… `--max_token_length 225`", train("--max_token_length", "225", data="data/long"), ran(needs=r"longer than"), LONG),
    Probe(14, "… `--max_token_length 100`", train("--max_token_length", "100", data="data/long"), setup=LONG),
    # kohya folders, metadata, tags
    Probe(15, "`T` on `data/k_zero` (`0_dog/` 2 imgs, `2_cat/` 1)", train(data="data/k_zero"), ran(needs=r"0_dog"),
          dataset("k_zero", folders={"0_dog": 2, "2_cat": 1}, loose=0)),
    Probe(16, "`T` on `data/k_abc` (`abc_dog/` 2, `2_cat/` 1)", train(data="data/k_abc"), ran(needs=r"abc_dog"),
          dataset("k_abc", folders={"abc_dog": 2, "2_cat": 1}, loose=0)),
    Probe(17, "`T` on `data/k_empty` (`3_/` holds 2 imgs)", train(data="data/k_empty"), either(r"captions"),
          dataset("k_empty", folders={"3_": 2}, loose=0)),
    Probe(18, "`T` on `data/k_nested` (`2_dog/` 1, `2_dog/3_cat/` 2)", train(data="data/k_nested"), ran(needs=r"3_cat"),
          dataset("k_nested", folders={"2_dog": 1, "2_dog/3_cat": 2}, loose=0)),
    Probe(19, "`T` on `data/k_mix` (2 loose images plus `4_cat/`)", train(data="data/k_mix"), ran(show=r"repeats"),
          dataset("k_mix", folders={"4_cat": 1})),
    Probe(20, "`T` on `data/meta` (`metadata.jsonl` with `text`)", train(data="data/meta"), metadata_captions,
          dataset("meta", {"metadata.jsonl": '{"file_name":"0000.png","text":"meta 0"}\n{"file_name":"0001.png","text":"meta 1"}\n'})),
    Probe(21, "`T` on `data/tags` `--shuffle_caption --keep_tokens 10`", train(*TAG_OPTIONS, data="data/tags"), ran(), TAGS),
    Probe(22, "… `--caption_dropout_rate 1.5`", train(*TAG_OPTIONS, "--caption_dropout_rate", "1.5", data="data/tags"), setup=TAGS),
    Probe(23, "… `--caption_dropout_rate -0.1`", train(*TAG_OPTIONS, "--caption_dropout_rate", "-0.1", data="data/tags"), setup=TAGS),
    Probe(24, "… `--caption_tag_dropout_rate 1.0`", train(*TAG_OPTIONS, "--caption_tag_dropout_rate", "1.0", data="data/tags"), setup=TAGS),
    # masks
    Probe(25, "`T` on `data/rgb` `--masked_loss` (no alpha)", train("--masked_loss"), ran(show=r"mask")),
    Probe(26, "`T --masked_loss --mask_dir masks_size` (48×32 mask)", train("--masked_loss", "--mask_dir", "{w}/masks_size"),
          setup=masks("size", sizes=((48, 32), (64, 64)))),
    Probe(27, "`T --masked_loss --mask_dir masks_notimg` (text file)", train("--masked_loss", "--mask_dir", "{w}/masks_notimg"),
          setup=masks_not_image),
    Probe(28, "`T --masked_loss --mask_dir masks_missing` (1 of 2)", train("--masked_loss", "--mask_dir", "{w}/masks_missing"),
          setup=masks("missing", sizes=((64, 64),))),
    Probe(29, "`T --masked_loss --mask_dir masks_black` (all black)", train("--masked_loss", "--mask_dir", "{w}/masks_black"),
          setup=masks("black", value=0)),
    Probe(30, "`T --masked_loss --mask_dir masks_16` (16-bit, half white)", train("--masked_loss", "--mask_dir", "{w}/masks_16"),
          same_lora_as("out/run", "out/m8"), trained_8bit_mask_run),
    Probe(31, "`T --mask_dir masks_8` without `--masked_loss`", train("--mask_dir", "{w}/masks_8"), setup=masks("8", half=True)),
    Probe(32, "`T` on `data/rgba` `--alpha_mask --cache_latents --random_flip`",
          train("--alpha_mask", "--cache_latents", "--random_flip", data="data/rgba"), ran(show=r"mask"), dataset("rgba", alpha=True)),
    # losses and noise
    Probe(33, "`T --loss_type huber --huber_c 0`", train("--loss_type", "huber", "--huber_c", "0")),
    Probe(34, "`T --loss_type huber --huber_c -0.5`", train("--loss_type", "huber", "--huber_c", "-0.5")),
    Probe(35, "`T --loss_type l3`", train("--loss_type", "l3")),
    Probe(36, "`T --model tiny-edm --loss_type huber --huber_schedule exponential`",
          train(*EDM, "--loss_type", "huber", "--huber_schedule", "exponential")),
    Probe(37, "`T --model tiny-edm --loss_type huber --huber_schedule snr`",
          train(*EDM, "--loss_type", "huber", "--huber_schedule", "snr"), ran()),
    Probe(38, "`T --min_timestep 900 --max_timestep 100` (also 500/500)",
          (train("--min_timestep", "900", "--max_timestep", "100"), train("--min_timestep", "500", "--max_timestep", "500"))),
    Probe(39, "`T --ip_noise_gamma -0.1`", train("--ip_noise_gamma", "-0.1")),
    Probe(40, "`T --multires_noise_iterations 6 --multires_noise_discount 1.5`",
          train("--multires_noise_iterations", "6", "--multires_noise_discount", "1.5")),
    Probe(41, "`T --model tiny-edm --min_sigma 5 --max_sigma 1`", train(*EDM, "--min_sigma", "5", "--max_sigma", "1")),
    Probe(42, "`T --model tiny-edm --debiased_estimation_loss`", train(*EDM, "--debiased_estimation_loss")),
    # EMA
    Probe(43, "`T --use_ema --ema_decay 1.5`", train("--use_ema", "--ema_decay", "1.5")),
    Probe(44, "run without EMA, resume with `--use_ema`",
          train("--use_ema", "--max_train_steps", "4", "--resume_from_checkpoint", "latest", "--checkpointing_steps", "1", out="out/ema"),
          refused(naming=r"--use_ema"), earlier_run("out/ema", "--checkpointing_steps", "1")),
    Probe(45, "run with `--use_ema`, resume without it",
          train("--max_train_steps", "4", "--resume_from_checkpoint", "latest", "--checkpointing_steps", "1", out="out/ema"),
          refused(naming=r"--use_ema"), earlier_run("out/ema", "--use_ema", "--checkpointing_steps", "1")),
    Probe(46, "`T --adapter lokr --use_ema --ema_decay 0.5`", train("--adapter", "lokr", "--use_ema", "--ema_decay", "0.5", out="out/lokr"),
          ema_files("out/lokr")),
    # disk caches
    Probe(47, "`T --cache_latents_to_disk --disk_cache_dir ro_cache` (immutable)",
          train("--cache_latents_to_disk", "--disk_cache_dir", "{w}/ro_cache"), setup=lambda s: s.immutable("ro_cache")),
    Probe(48, "same, only `ro_cache2/latents/` immutable", train("--cache_latents_to_disk", "--disk_cache_dir", "{w}/ro_cache2"),
          setup=lambda s: s.immutable("ro_cache2/latents")),
    Probe(49, "`tiny-edm` run fills `cacheA`, a `tiny-sdxl` run reads it",
          train("--cache_latents_to_disk", "--disk_cache_dir", "{w}/cacheA"), ran(show=r"^latents:"), filled_cache("cacheA", model="tiny-edm")),
    Probe(50, "cache entry cut to 100 bytes, `--max_train_steps 4`",
          train("--max_train_steps", "4", "--cache_latents_to_disk", "--disk_cache_dir", "{w}/cache2"), healed_cache, truncate_entry),
    Probe(51, "cache entry a valid safetensors without `mean`",
          train("--cache_latents_to_disk", "--disk_cache_dir", "{w}/cache"), healed_cache, entries_without_mean),
    Probe(52, "cache entries holding NaN", train("--cache_latents_to_disk", "--disk_cache_dir", "{w}/cacheN"),
          finite_lora("out/run"), nan_entries),
    Probe(53, "shared cache: `--resolution 64`, then `--resolution 128`",
          train("--resolution", "128", "--cache_latents_to_disk", "--disk_cache_dir", "{w}/cacheR"),
          ran(needs=r"^latents: 2 encoded"), filled_cache("cacheR")),
    Probe(54, "`T --shuffle_caption --cache_text_encoder_outputs_to_disk`",
          train("--shuffle_caption", "--cache_text_encoder_outputs_to_disk", "--disk_cache_dir", "{w}/cacheS")),
    Probe(55, "`T --cache_latents_to_disk --disk_cache_dir FILE`", train("--cache_latents_to_disk", "--disk_cache_dir", "{w}/cachefile"),
          setup=files({"cachefile": "not a folder\n"})),
    Probe(56, "`T --train_text_encoder --cache_text_encoder_outputs_to_disk`",
          train("--train_text_encoder", "--cache_text_encoder_outputs_to_disk", "--disk_cache_dir", "{w}/cacheF")),
    # samples and logs
    Probe(57, "`--sample_prompts` line `a dog --w abc`", train("--sample_prompts", "{w}/bad_w.txt"), setup=files({"bad_w.txt": "a dog --w abc\n"})),
    Probe(58, "`--sample_prompts` line `a dog --zz 3`", train("--sample_prompts", "{w}/bad_zz.txt"), setup=files({"bad_zz.txt": "a dog --zz 3\n"})),
    Probe(59, "prompts file: blanks, `#`, a full line, a 2000-char line",
          train("--sample_prompts", "{w}/prompts/p59.txt", "--validation_steps", "2", "--num_validation_images", "1"),
          samples_59("out/run"), sample_prompts_59),
    Probe(60, "`T --validation_prompt \"a dog\" --validation_steps 0`", train("--validation_prompt", "a dog", "--validation_steps", "0")),
    Probe(61, "`T --sample_prompts prompts/nope.txt`", train("--sample_prompts", "{w}/prompts/nope.txt")),
    Probe(62, "`T --report_to tensorboard --logging_dir FILE` (also `out/X/logs` a file)",
          (train("--report_to", "tensorboard", "--logging_dir", "{w}/logfile"), train("--report_to", "tensorboard", out="out/X")),
          setup=files({"logfile": "a file\n", "out/X/logs": "a file\n"})),
    Probe(63, "`T --report_to tensorboard` into a finished run `out/base`", train("--report_to", "tensorboard", out="out/base"),
          checked(refused(), no_events_in("out/base")), earlier_run("out/base")),
    Probe(64, "`--sample_prompts` line `a dog --s 0 --w 64 --h 64`",
          train("--sample_prompts", "{w}/s0.txt", "--validation_steps", "1", "--num_validation_images", "1"),
          setup=files({"s0.txt": "a dog --s 0 --w 64 --h 64\n"})),
    Probe(65, "`--sample_prompts` line `a dog --w 8 --h 8 --s 2`",
          train("--sample_prompts", "{w}/w8.txt", "--validation_steps", "1", "--num_validation_images", "1"),
          setup=files({"w8.txt": "a dog --w 8 --h 8 --s 2\n"})),
    Probe(66, "`--sample_prompts` file in UTF-16",
          train("--sample_prompts", "{w}/p16.txt", "--validation_steps", "1", "--num_validation_images", "1"), either(), P16),
    Probe(67, "`T --report_to tensorboard --validation_prompt \"a dog\" --validation_steps 2`",
          train("--report_to", "tensorboard", "--validation_prompt", "a dog", "--validation_steps", "2", "--num_validation_images", "1"),
          tensorboard_events("out/run/logs")),
    # adapters
    Probe(68, "`T --adapter loha --rank 0`", train("--adapter", "loha", "--rank", "0")),
    Probe(69, "`T --adapter lokr --rank 0`", train("--adapter", "lokr", "--rank", "0")),
    Probe(70, "`T --adapter lokr --lokr_factor -1 --conv_rank 4`", train("--adapter", "lokr", "--lokr_factor", "-1", "--conv_rank", "4"),
          ran(show=r"layers|lokr")),
    Probe(71, "`T --adapter lokr --lokr_factor 0`", train("--adapter", "lokr", "--lokr_factor", "0")),
    Probe(72, "`T --conv_rank 4` (no `--adapter`)", train("--conv_rank", "4"), ran(show=r"layers|locon")),
    Probe(73, "`T --use_tucker --conv_rank 4` (lora)", train("--use_tucker", "--conv_rank", "4")),
    Probe(74, "`T --adapter loha --use_dora`", train("--adapter", "loha", "--use_dora")),
    # 75, 79-81 were refused when the research ran: issue 30 made them kohya's options, so the right result is a run
    Probe(75, "`T --network_module networks.lora`", train("--network_module", "networks.lora"),
          ran(needs=r"kohya's layers, --lora_layers attn-mlp")),
    Probe(76, "`T --network_args \"conv_dim=4\" \"algo=lokr\"`", train("--network_args", "conv_dim=4", "algo=lokr")),
    Probe(77, "`T --network_args \"conv_dim=4\"`", train("--network_args", "conv_dim=4")),
    Probe(78, "`T --optimizer_type AdamW8bit`", train("--optimizer_type", "AdamW8bit")),
    Probe(79, "`T --save_precision fp16`", train("--save_precision", "fp16"),
          stored_as("F16", "out/run/pytorch_lora_weights.safetensors", "out/run/run.safetensors")),
    Probe(80, "`T --save_every_n_epochs 1` (4 steps: 2 epochs of 2 images)", train("--save_every_n_epochs", "1", "--max_train_steps", "4"),
          epoch_files(("out/run/run-000001.safetensors", "out/run/run.safetensors"), ("out/run/run-000002.safetensors",))),
    Probe(81, "`T --resolution \"64,96\"`", train("--resolution", "64,96"), ran(needs=r"\(width x height\): 64x96 \(2\)")),
    Probe(82, "`T --dataset_config x.toml`", train("--dataset_config", "x.toml")),
    Probe(83, "`T --v_parameterization` (now kohya's v-prediction flag)", train("--v_parameterization"), ran()),
    Probe(84, "`T --zero_terminal_snr` (needs v-prediction)", train("--zero_terminal_snr"), refused(naming=r"v.?pred")),
    # infer
    Probe(85, "`I --lora out/loha/loha.safetensors:0`", infer("--lora", "{w}/out/loha/loha.safetensors:0"), compared_to_base(same=True),
          steps(fixture("loha"), fixture("base_png"))),
    Probe(86, "`I --lora …loha…:1`", infer("--lora", "{w}/out/loha/loha.safetensors:1"), compared_to_base(same=False),
          steps(fixture("loha"), fixture("base_png"))),
    Probe(87, "`I --lora out/lokr/lokr.safetensors:-1`", infer("--lora", "{w}/out/lokr/lokr.safetensors:-1"), compared_to_base(same=False),
          steps(fixture("lokr"), fixture("base_png"))),
    Probe(88, "`I --lora …lokr…:1e9`", infer("--lora", "{w}/out/lokr/lokr.safetensors:1e9"),
          image_or_refusal(r"non-finite|NaN|overflow", "out/img"), fixture("lokr"), output="out/img"),
    Probe(89, "`I --prompt \"a photo of (dog:1.5), [cat]\"`", infer("--prompt", "a photo of (dog:1.5), [cat]"), weighting_note),
    Probe(90, "`I --prompt <300 tokens> --max_token_length 75`", infer("--prompt", LONG_TEXT, "--max_token_length", "75"),
          ran(needs=r"longer than")),
    Probe(91, "… `--max_token_length 150`", infer("--prompt", LONG_TEXT, "--max_token_length", "150"), ran(needs=r"longer than")),
    Probe(92, "… `--max_token_length 100`", infer("--prompt", LONG_TEXT, "--max_token_length", "100")),
    Probe(93, "`I --model out/base/pytorch_lora_weights.safetensors`", infer("--model", "{w}/out/base/pytorch_lora_weights.safetensors"),
          refused(naming=r"LoRA"), fixture("base")),
    Probe(94, "`I --model <pipeline>/unet/diffusion_pytorch_model.safetensors`",
          infer("--model", "{tiny-sdxl}/unet/diffusion_pytorch_model.safetensors"), refused(naming=r"UNet")),
    Probe(95, "`I --width 8 --height 8`", infer("--width", "8", "--height", "8")),
    Probe(96, "`I --prompt_file p16.txt` (UTF-16)", infer("--prompt_file", "{w}/p16.txt"), either(), P16),
    Probe(97, "`I --lora out/nan` (an all-NaN LoRA)", infer("--lora", "{w}/out/nan"),
          refused_naming_cause(r"non-finite|NaN", "out/img", after_work_ok=False), fixture("nan"), output="out/img"),
    # convert_for_webui.py
    Probe(98, "`convert_for_webui.py wrongkey.safetensors --check`", convert("{w}/wrongkey.safetensors", "--check"),
          wrong_keys_named, wrong_key_lora),
    Probe(99, "`convert_for_webui.py out/lokr/lokr.safetensors --check`", convert("{w}/out/lokr/lokr.safetensors", "--check"),
          ran(needs=r"WebUI"), fixture("lokr")),
    Probe(100, "`convert_for_webui.py trunc.safetensors --check` (cut short)", convert("{w}/trunc.safetensors", "--check"),
          setup=truncated_lora),
    Probe(101, "`convert_for_webui.py out/nan/nan.safetensors --check`", convert("{w}/out/nan/nan.safetensors", "--check"),
          nonfinite_check, fixture("nan")),
    # late and destructive refusals
    Probe(102, "`T --model out/base/base.safetensors` (a LoRA file)", train("--model", "{w}/out/base/base.safetensors"),
          refused(naming=r"LoRA"), fixture("base")),
    Probe(103, "finished run with `checkpoint-1/2`, then `T --force` on `data/empty`", train("--force", data="data/empty", out="out/f"),
          checked(refused(), checkpoints_kept("out/f", ("checkpoint-1", "checkpoint-2"))),
          steps(EMPTY, earlier_run("out/f", "--checkpointing_steps", "1"))),
    Probe(104, "`T` on `data/empty` with prior preservation (2 class images)",
          train("--with_prior_preservation", "--class_data_dir", "{w}/cls", "--class_prompt", "a photo of a dog",
                "--num_class_images", "2", data="data/empty"),
          checked(refused(), no_class_images("cls")), EMPTY),
    Probe(105, "`T --learning_rate 1e38`", train("--learning_rate", "1e38")),
    Probe(106, "`T --learning_rate 1e6 --max_train_steps 4`", train("--learning_rate", "1e6", "--max_train_steps", "4"),
          diverged("out/run"), output="out/run"),
]


# ---------------------------------------------------------------------------------------------------------------------
# Running and reporting


@dataclass
class Result:
    probe: Probe
    rcs: list[Optional[int]]
    verdict: str
    note: str
    seconds: float


def file_rule(run: Run, verdict: str, note: str) -> tuple[str, str]:
    """A refusal must leave the scratch folder as it was: files it changed or removed make it SILENT-WRONG, files or
    folders it left behind make it LATE."""
    if run.rc == 0 or not run.changes:
        return verdict, note
    changes = run.changes
    if changes.modified or changes.removed:
        hurt = changes.modified + changes.removed
        found = ("SILENT-WRONG", f"refusal changed or removed {len(hurt)} earlier file(s), e.g. {', '.join(hurt[:3])}")
    else:
        found = ("LATE", f"refusal left {len(changes.created)} new file(s)/folder(s): {', '.join(changes.created[:3])}")
    if SEVERITY.index(found[0]) > SEVERITY.index(verdict):
        return found[0], f"{found[1]}; {note}"
    return verdict, f"{note}; {found[1]}"


def verdict_of(probe: Probe, run: Run) -> tuple[str, str]:
    if run.rc is None:
        return "ERROR", f"timed out after {COMMAND_TIMEOUT_S} s: {run.error()}"
    raised = traceback_line(run)
    if raised:
        return "TRACEBACK", raised
    verdict, note = probe.check(run)
    return file_rule(run, verdict, note)


def run_probe(probe: Probe, context: Context) -> Result:
    """Build the probe's scratch folder, run its command (each variant), judge it; the worst variant's verdict wins."""
    root = context.workdir / f"p{probe.number:03d}"
    remove_tree(root)
    scratch = Scratch(root, context)
    started = time.time()
    judged = []
    try:
        scratch.images("data/rgb")
        probe.setup(scratch)
    except Exception as error:  # a prerequisite run failed (SetupError) or the inputs could not be made
        scratch.cleanup()
        return Result(probe, [], "ERROR", clean(f"setup: {type(error).__name__}: {error}", scratch), time.time() - started)
    try:
        for args in probe.commands():
            run = scratch.execute(args, exempt=probe.output)
            try:
                verdict, note = verdict_of(probe, run)
            except Exception as error:  # the check could not read what the run left
                verdict, note = "ERROR", f"check failed: {type(error).__name__}: {error}"
            judged.append((run.rc, verdict, clean(note, scratch)))
    finally:
        scratch.cleanup()
    verdict = max((v for _, v, _ in judged), key=SEVERITY.index)
    note = judged[0][2] if len(judged) == 1 else clean(" / ".join(n for _, _, n in judged))
    return Result(probe, [rc for rc, _, _ in judged], verdict, note, time.time() - started)


def remove_tree(path: Path) -> None:
    """rmtree that first lifts any immutable attribute a crashed earlier run left (chattr -R -i)."""
    if path.exists():
        subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def cell(text: str) -> str:
    """Text safe in a markdown table cell."""
    return text.replace("|", "\\|")


def markdown(results: list[Result]) -> str:
    rows = ["| # | probe | rc | verdict | what it said or did |", "|---|---|---|---|---|"]
    for r in results:
        rc = "/".join("timeout" if c is None else str(c) for c in r.rcs) or "-"
        rows.append(f"| {r.probe.number} | {cell(r.probe.what)} | {rc} | {r.verdict} | {cell(r.note)} |")
    rows += ["", "| verdict | rows | which |", "|---|---|---|"]
    for verdict in VERDICTS:
        which = [r.probe.number for r in results if r.verdict == verdict]
        if which:
            rows.append(f"| {verdict} | {len(which)} | {', '.join(map(str, which))} |")
    return "\n".join(rows)


def parse_only(text: Optional[str]) -> Optional[set[int]]:
    """'1,3,5-9' -> {1, 3, 5, 6, 7, 8, 9}."""
    if not text:
        return None
    numbers = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            first, last = part.split("-", 1)
            numbers.update(range(int(first), int(last) + 1))
        elif part:
            numbers.add(int(part))
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="probe numbers to run, e.g. 1,3,9 or 40-45 (default: all 106)")
    parser.add_argument("--workdir", type=Path, help="work folder (scratch folders, model cache, fixtures); default: a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    args = parser.parse_args()
    numbers = parse_only(args.only)
    chosen = [p for p in PROBES if numbers is None or p.number in numbers]
    unknown = sorted((numbers or set()) - {p.number for p in PROBES})
    if unknown:
        parser.error(f"no probe numbered {', '.join(map(str, unknown))} (1-{len(PROBES)})")
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="probes-")) if temporary else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    context = Context(workdir)
    print(f"work folder {workdir}; building the tiny models...", file=sys.stderr)
    context.warm_up()
    results = []
    try:
        for i, probe in enumerate(chosen, start=1):
            result = run_probe(probe, context)
            results.append(result)
            print(f"[{i}/{len(chosen)}] #{probe.number} {result.verdict} ({result.seconds:.0f} s)", file=sys.stderr)
    finally:
        print(markdown(results))
        if temporary and not args.keep:
            remove_tree(workdir)
        else:
            print(f"scratch folders kept in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Nothing silent, nothing late (the hostile probes of shared/research/probes-2026-12.md): every input that needs no
model is checked in one pass before any model loads or anything is made, a refusal is one line that leaves the disk
as it was, text files come in any common encoding, nothing is dropped without a word, and non-finite values stop
the work. Each refusal test asserts the line, the exit status, no traceback and an unchanged file system."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from common.cli import UserError
from helpers import run_cli
from training_helpers import PROMPT, train_cli, write_images


def tree(root: Path) -> dict:
    """Every path under `root`, with each file's size and modification time: what a refused run must leave as it found.
    (A folder's own time is left out: checking that a folder can be written makes and removes a file in it.)"""
    return {p.relative_to(root).as_posix(): "folder" if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def tiny_run(model: str, data: Path, out: Path, *extra) -> list:
    return ["-m", model, "--instance_data_dir", data, "--instance_prompt", PROMPT, "--resolution", 64, "--train_batch_size", 1,
            "--rank", 4, "--learning_rate", 1e-2, "--max_train_steps", 2, "--seed", 0, "--output_dir", out, *extra]


def caption_folder(root: Path, name: str, caption: bytes) -> Path:
    folder = write_images(root / name, count=2)
    (folder / "image_0.txt").write_bytes(caption)
    return folder


def mask_folder(root: Path, name: str, kind: str) -> Path:
    masks = root / name
    masks.mkdir()
    if kind == "misshapen":
        Image.new("L", (48, 32), 255).save(masks / "image_0.png")
        Image.new("L", (64, 64), 255).save(masks / "image_1.png")
    elif kind == "not an image":
        (masks / "image_0.png").write_text("not an image")
        Image.new("L", (64, 64), 255).save(masks / "image_1.png")
    else:  # one missing
        Image.new("L", (64, 64), 255).save(masks / "image_0.png")
    return masks


def prompts_file(root: Path, text: str, encoding: str = "utf-8") -> Path:
    path = root / f"prompts-{abs(hash(text + encoding))}.txt"
    path.write_bytes(text.encode(encoding))
    return path


# (what it builds, extra arguments given the work folder, the part of the one line that must appear)
REFUSED_BEFORE_ANY_MODEL_LOADS = {
    "empty caption file": (lambda w: ["--instance_data_dir", caption_folder(w, "empty", b"")], "image_0.txt' is empty"),
    "caption of white space": (lambda w: ["--instance_data_dir", caption_folder(w, "ws", b"   \n\t \n")], "image_0.txt' is empty"),
    "latin-1 caption": (lambda w: ["--instance_data_dir", caption_folder(w, "latin1", "a dog in a caf\xe9".encode("latin-1"))],
                        "image_0.txt' is not UTF-8 text: byte 0xe9 at offset 14 (save it as UTF-8)"),
    "caption extension without its dot": (lambda w: ["--caption_extension", "caption"],
                                          "--caption_extension 'caption' needs its dot: .caption"),
    "a 3_ folder naming no prompt": (lambda w: ["--instance_data_dir", kohya_no_prompt(w)],
                                     "folder 3_/ names no prompt after its repeat count (N_prompt, e.g. 3_sks dog)"),
    "mask of another shape": (lambda w: ["--masked_loss", "--mask_dir", mask_folder(w, "masks_size", "misshapen")],
                              "is 48x32, its image image_0.png 64x64"),
    "mask that is no image": (lambda w: ["--masked_loss", "--mask_dir", mask_folder(w, "masks_text", "not an image")],
                              "(of image_0.png) cannot be read as an image"),
    "mask missing": (lambda w: ["--masked_loss", "--mask_dir", mask_folder(w, "masks_missing", "missing")],
                     "has no mask for 1 image(s), e.g. image_1.png"),
    "timesteps the wrong way round": (lambda w: ["--min_timestep", 900, "--max_timestep", 100], "need min < max"),
    "sigmas the wrong way round": (lambda w: ["--edm", "--min_sigma", 5, "--max_sigma", 1], "need min < max"),
    "an exponential huber schedule on an EDM base": (lambda w: ["-m", "tiny-edm", "--loss_type", "huber", "--huber_schedule", "exponential"],
                                                     "--huber_schedule exponential decays over a discrete model's timesteps"),
    "debiased estimation on an EDM base": (lambda w: ["-m", "tiny-edm", "--debiased_estimation_loss"],
                                           "--debiased_estimation_loss weights a discrete model's timesteps"),
    "a learning rate that overflows": (lambda w: ["--learning_rate", "1e38"], "--learning_rate must be a finite number in (0, 1e+20)"),
    "a learning rate that is not a number": (lambda w: ["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    "text-encoder cache with trained text encoders": (lambda w: ["--train_text_encoder", "--cache_text_encoder_outputs_to_disk"],
                                                      "--train_text_encoder trains them, so nothing would be cached"),
    "a sample line of 0 steps": (lambda w: ["--sample_prompts", prompts_file(w, "a dog --s 0\n"), "--validation_steps", 1],
                                 "line 1: --s 0 must be at least 1"),
    "a sample size the UNet cannot take": (lambda w: ["--sample_prompts", prompts_file(w, "a dog --w 8 --h 8\n"), "--validation_steps", 1],
                                           "--w 8 must be a multiple of 8 of at least 16"),
    "a sample-prompts file that is no text": (lambda w: ["--sample_prompts", prompts_file(w, "a caf\xe9 --s 2\n", "latin-1")],
                                              "is not UTF-8 text: byte 0xe9 at offset 5"),
    "a resolution the UNet cannot take": (lambda w: ["--resolution", 8], "--resolution must be at least 16"),
    "a cache subfolder that is a file": (lambda w: ["--cache_latents_to_disk", "--disk_cache_dir", cache_with_file_inside(w)],
                                         "--disk_cache_dir's folder"),
    "a logging folder that is a file": (lambda w: ["--report_to", "tensorboard", "--logging_dir", logging_file(w)],
                                        "--logging_dir"),
}


def kohya_no_prompt(work: Path) -> Path:
    root = work / "kohya-3_"
    write_images(root / "3_", count=2)
    return root


def cache_with_file_inside(work: Path) -> Path:
    cache = work / "cache-with-file"
    cache.mkdir()
    (cache / "latents").write_text("a file where the cache's folder goes")
    return cache


def logging_file(work: Path) -> Path:
    path = work / "logs-as-file"
    path.write_text("a file where the logs go")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("preflight")
    write_images(work / "rgb", count=2)
    return work


@pytest.fixture
def model_files_opened(tiny_sdxl_path, tiny_edm_path):
    """The files under the tiny models' folders this process opens while the fixture lives (an audit hook: it sees
    every open, by torch, safetensors or json alike)."""
    opened, roots = [], (str(Path(tiny_sdxl_path).resolve()), str(Path(tiny_edm_path).resolve()))
    hooks = model_files_opened.__dict__.setdefault("hooks", [])
    if not hooks:  # audit hooks cannot be removed: one, pointed at the current list
        def hook(event, args):
            if event == "open" and hooks and isinstance(args[0], (str, Path)) and str(args[0]).startswith(hooks[-1][1]):
                hooks[-1][0].append(str(args[0]))

        sys.addaudithook(hook)
    hooks.append((opened, roots))
    try:
        yield opened
    finally:
        hooks.append(([], ("\0",)))


@pytest.mark.parametrize("case", REFUSED_BEFORE_ANY_MODEL_LOADS)
def test_a_refusal_comes_before_any_model_loads_in_one_line_and_leaves_the_disk_as_it_was(case, work, tiny_sdxl_path, capsys,
                                                                                          monkeypatch):
    import train_lora

    monkeypatch.setattr(train_lora, "load_models", lambda *a, **k: pytest.fail("a model was loaded before the refusal"))
    build, expected = REFUSED_BEFORE_ANY_MODEL_LOADS[case]
    extra = build(work)
    before = tree(work)
    out = work / f"out-{case.replace(' ', '-')}"
    code, stdout, err = train_cli(capsys, *tiny_run(tiny_sdxl_path, work / "rgb", out), *extra)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert "Traceback" not in stdout + err
    assert tree(work) == before, "a refused run changed the disk"


def test_bad_data_is_refused_before_any_file_of_the_model_is_opened(work, tiny_sdxl_path, model_files_opened, capsys):
    """The data comes first in the preflight: an empty caption is refused while no file under the model's folder,
    not even its configs, has been opened."""
    data = caption_folder(work, "empty-for-audit", b"")
    code, _, err = train_cli(capsys, *tiny_run(tiny_sdxl_path, data, work / "never"))
    assert code == 2 and "is empty" in err
    assert model_files_opened == [], model_files_opened


def test_a_flavour_refusal_reads_the_models_configs_and_no_weights(work, tiny_edm_path, model_files_opened, capsys):
    code, _, err = train_cli(capsys, *tiny_run(tiny_edm_path, work / "rgb", work / "never2"), "--debiased_estimation_loss")
    assert code == 2 and "--debiased_estimation_loss weights a discrete model's timesteps" in err
    assert model_files_opened and all(path.endswith(".json") for path in model_files_opened), model_files_opened


def test_force_removes_nothing_and_tensorboard_writes_nothing_when_the_run_is_refused(work, tiny_sdxl_path, capsys):
    earlier = work / "earlier-run"
    (earlier / "checkpoint-2").mkdir(parents=True)
    (earlier / "checkpoint-2" / "lora.safetensors").write_bytes(b"state")
    (earlier / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    before = tree(work)
    bad_data = caption_folder(work, "empty-for-force", b"")
    before = tree(work)
    code, _, err = train_cli(capsys, *tiny_run(tiny_sdxl_path, bad_data, earlier, "--force"))
    assert code == 2 and "is empty" in err
    code, _, err = train_cli(capsys, *tiny_run(tiny_sdxl_path, work / "rgb", earlier, "--report_to", "tensorboard"))
    assert code == 2 and "already holds a run" in err and err.count("\n") == 1
    assert tree(work) == before, "--force removed checkpoints, or TensorBoard wrote into the earlier run"


def test_prior_preservation_makes_no_class_image_before_the_data_is_checked(work, tiny_sdxl_path, capsys):
    bad_data = caption_folder(work, "empty-for-prior", b"")
    code, _, err = train_cli(capsys, *tiny_run(tiny_sdxl_path, bad_data, work / "prior-out", "--with_prior_preservation",
                                               "--class_data_dir", work / "class", "--class_prompt", "a dog", "--num_class_images", 2))
    assert code == 2 and "is empty" in err
    assert not (work / "class").exists() and not (work / "prior-out").exists()


def test_a_refusal_after_the_claim_removes_the_output_folder_this_run_made(work, tiny_sdxl_path, capsys, monkeypatch):
    import train_lora

    def refuse(*args, **kwargs):
        raise UserError("could not load model 'x' as an SDXL pipeline: stand-in for a failure found only when loading")

    monkeypatch.setattr(train_lora, "load_models", refuse)
    code, _, err = train_cli(capsys, *tiny_run(tiny_sdxl_path, work / "rgb", work / "made-then-refused"))
    assert code == 2 and "stand-in" in err
    assert not (work / "made-then-refused").exists()


# ---------------------------------------------------------------- text files in any common encoding


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_captions_prompt_files_and_metadata_in_any_common_encoding_read_as_their_text(encoding, tmp_path):
    """UTF-8 with a byte-order mark and UTF-16/32 with one read as the same text as plain UTF-8: the mark never
    reaches the tokenizer (it became three junk tokens)."""
    from common.data import find_examples
    from common.gallery import read_prompt_file
    from infer import read_prompts

    bom = {"utf-16-be": b"\xfe\xff"}.get(encoding, b"")
    folder = write_images(tmp_path / "data", count=2)
    (folder / "image_0.txt").write_bytes(bom + "a photo of sks dog, café".encode(encoding))
    (folder / "metadata.jsonl").write_bytes(bom + json.dumps({"file_name": "image_1.png", "text": "from metadata"}).encode(encoding))
    captions = {e.name: e.caption for e in find_examples(instance_data_dir=folder, instance_prompt=None)}
    assert captions == {"image_0.png": "a photo of sks dog, café", "image_1.png": "from metadata"}
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(bom + "a dog --s 2\n".encode(encoding))
    assert read_prompt_file(prompts)[0].prompt == "a dog" and read_prompts(None, prompts, None)[0] == ["a dog --s 2"]


def test_a_utf16_file_without_its_mark_is_refused_naming_the_byte(tmp_path):
    from common.files import read_text_file

    path = tmp_path / "caption.txt"
    path.write_bytes("a dog".encode("utf-16-le"))
    with pytest.raises(UserError, match=r"is not text: byte 0x00 at offset 1 \(UTF-16 without a byte-order mark\?"):
        read_text_file(path, "caption file")


# ---------------------------------------------------------------- nothing dropped without a word


def test_the_caption_rule_is_one_for_every_layout_file_then_metadata_then_prompt(tmp_path):
    from common.data import find_examples

    folder = write_images(tmp_path / "data", count=3)
    write_images(folder / "3_cat", count=1)
    (folder / "image_0.txt").write_text("from its caption file")
    rows = [{"file_name": "image_0.png", "text": "metadata loses to the file"}, {"file_name": "image_1.png", "text": "from metadata"},
            {"file_name": "3_cat/image_0.png", "text": "metadata in a repeats folder"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    examples = {e.name: (e.caption, e.caption_from, e.repeats)
                for e in find_examples(instance_data_dir=folder, instance_prompt="the instance prompt")}
    assert examples == {"image_0.png": ("from its caption file", "file", 1), "image_1.png": ("from metadata", "metadata", 1),
                        "image_2.png": ("the instance prompt", "prompt", 1),
                        "3_cat/image_0.png": ("metadata in a repeats folder", "metadata", 3)}
    prefixed = find_examples(instance_data_dir=folder, instance_prompt="TOK", prompt_as_prefix=True)
    assert {e.caption for e in prefixed} == {"TOK, from its caption file", "TOK, from metadata", "TOK", "cat, metadata in a repeats folder"}


def test_kohya_folders_kohya_skips_are_named_with_the_rule_and_the_run_says_so(tmp_path, tiny_sdxl_path, capsys, caplog):
    from common.data import find_examples, skipped_folders

    root = tmp_path / "kohya"
    for name in ("2_cat", "0_dog", "abc_dog", "2_cat/3_cat", "notes"):
        write_images(root / name, count=1) if name != "notes" else (root / name).mkdir()
    lines = skipped_folders(root)
    assert lines == [
        "ignoring folder(s) without a repeat count: abc_dog (kohya's folders are N_prompt, e.g. 10_sks dog; kohya ignores these too)",
        "ignoring folder(s) of 0 repeats: 0_dog (0 repeats trains nothing; kohya skips them too)",
        "ignoring folder(s) inside N_prompt folders: 2_cat/3_cat (kohya reads one level; move their images up, or into an N_prompt "
        "folder of their own)",
    ]
    assert [e.name for e in find_examples(instance_data_dir=root, instance_prompt=None)] == ["2_cat/image_0.png"]
    code, _, err = train_cli(capsys, *tiny_run(tiny_sdxl_path, root, tmp_path / "out", "--max_train_steps", 1))
    assert code == 0, err
    assert all(line in caplog.text for line in lines)


# ---------------------------------------------------------------- non-finite values stop the work


@pytest.mark.heavy
def test_a_diverged_run_stops_keeps_its_last_finite_checkpoint_and_resumes_at_a_lower_rate(tmp_path, tiny_sdxl_path, capsys, caplog):
    data, out = write_images(tmp_path / "img", count=2), tmp_path / "run"
    base = tiny_run(tiny_sdxl_path, data, out, "--checkpointing_steps", 2, "--logging_steps", 1)
    code, _, err = train_cli(capsys, *base)
    assert code == 0, err
    code, _, err = train_cli(capsys, *base, "--max_train_steps", 6, "--learning_rate", 1e12, "--resume_from_checkpoint", "latest")
    line = err.strip().splitlines()[-1]
    assert code == 2 and err.count("error: ") == 1 and line.startswith("error: ") and "Traceback" not in err, err
    assert "training diverged: " in line and "checkpoint-2 holds the last finite state" in line, line
    assert "likely cause: --learning_rate 1e+12 (0.0001 is usual for adamw)" in err and "no LoRA file was written" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"], "no checkpoint of diverged weights"
    lora = load_file(out / "pytorch_lora_weights.safetensors")  # the first run's, untouched
    assert all(bool(torch.isfinite(t).all()) for t in lora.values())
    code, _, err = train_cli(capsys, *base, "--max_train_steps", 4, "--learning_rate", 1e-3, "--resume_from_checkpoint", "latest")
    assert code == 0, err
    assert "written at --learning_rate 0.01, continued at 0.001" in caplog.text
    assert all(bool(torch.isfinite(t).all()) for t in load_file(out / "pytorch_lora_weights.safetensors").values())


def test_continuing_at_a_new_rate_sets_the_schedules_base_to_it():
    from common.checkpointing import continue_at_rates

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=0.5)
    from diffusers.optimization import get_scheduler

    schedule = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    continue_at_rates(optimizer, schedule, [0.1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 6 / 10) and schedule.get_last_lr() == [optimizer.param_groups[0]["lr"]]
    optimizer.step()
    schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 5 / 10)


def test_broken_disk_cache_entries_are_encoded_again_and_counted(tmp_path, tiny_sdxl_path, capsys):
    """Cut short, a tensor missing, NaN bytes: each entry is re-encoded (the cache's own promise), the number is said,
    and the LoRA equals the one of a run from a whole cache."""
    from safetensors.torch import save_file

    data, cache = write_images(tmp_path / "img", count=3), tmp_path / "cache"
    common = ["--cache_latents_to_disk", "--disk_cache_dir", cache]
    code, _, err = train_cli(capsys, *tiny_run(tiny_sdxl_path, data, tmp_path / "first", *common))
    assert code == 0, err
    entries = sorted((cache / "latents").rglob("*.safetensors"))
    assert len(entries) == 3
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    entry = load_file(entries[1])
    save_file({"std": entry["std"]}, str(entries[1]))
    entry = load_file(entries[2])
    save_file({"mean": torch.full_like(entry["mean"], float("nan")), "std": entry["std"]}, str(entries[2]))
    code, out, err = train_cli(capsys, *tiny_run(tiny_sdxl_path, data, tmp_path / "healed", *common))
    assert code == 0, err
    assert "latents: 3 encoded, 0 read from the disk cache" in out and "3 of the encoded replaced broken entries" in out, out
    first, healed = load_file(tmp_path / "first" / "pytorch_lora_weights.safetensors"), load_file(tmp_path / "healed" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(first[k], healed[k]) for k in first)


def test_an_image_that_decodes_non_finite_is_not_saved_and_the_run_names_its_prompt_and_seed(tmp_path, monkeypatch):
    import common.generation as generation
    import common.tokens

    monkeypatch.setattr(common.tokens, "warn_about_long_prompts", lambda *a, **k: 0)
    class NanPipeline:
        from diffusers.image_processor import VaeImageProcessor as _processor

        image_processor = _processor()
        tokenizer = None

        def set_progress_bar_config(self, **kwargs):
            pass

        def __call__(self, *, prompt, generator, output_type, **kwargs):
            class Output:
                images = np.full((len(prompt), 8, 8, 3), np.nan, dtype=np.float32)

            return Output()

    settings = generation.SamplingSettings(16, 16, 1, 5.0, "euler", "Euler", adapters={"Lora": "big.safetensors:1e+09"})
    jobs = generation.plan_jobs(["a dog"], negative_prompt=None, num_images=1, seeds=[7])
    with pytest.raises(UserError, match=r"the image of prompt 'a dog', seed 7, came out non-finite .* \(with big.safetensors:1e\+09\)"):
        generation.generate_images(NanPipeline(), jobs, settings, output_dir=tmp_path, batch_size=1, show_progress=False)
    assert not list(tmp_path.iterdir()), "no black PNG written"


@pytest.mark.parametrize("size", [8, 12])
def test_infer_refuses_sizes_the_unet_cannot_take(size, capsys, tmp_path):
    import infer

    code, _, err = run_cli(infer.app, ["--model", "tiny-sdxl", "--prompt", "x", "--width", size, "--output_dir", tmp_path / "o"], capsys)
    assert code == 2 and f"--width {size} is not a multiple of 8 of at least 16" in err and not (tmp_path / "o").exists()

"""Hostile input, file-system faults and concurrent runs: each ends in one `error:` line with status 2 and no
traceback, found before the expensive work, and nothing already on disk changes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import convert_for_webui
import gen_class_images
import infer
import mjhq_fid
from helpers import make_peft_lora, run_cli


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture()
def no_model_loading(monkeypatch):
    """Fails the test if a script loads a model: the checks under test must come before that."""
    import common.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(common.models, "load_sdxl_pipeline", refuse)


def test_output_paths_that_cannot_be_written_are_refused_before_any_model_is_loaded(tiny_sdxl_path, tmp_path, capsys,
                                                                                        no_model_loading):
    a_file = tmp_path / "taken"
    a_file.write_text("someone's notes")
    cases = [
        (infer.app, ["-m", tiny_sdxl_path, "--prompt", "x", "--output_dir", a_file], ["--output_dir", "is a file"]),
        (infer.app, ["-m", tiny_sdxl_path, "--prompt", "x", "--output_dir", a_file / "sub"], ["--output_dir", "cannot be written"]),
        (gen_class_images.app, ["-m", tiny_sdxl_path, "--class_prompt", "a dog", "--class_data_dir", a_file,
                                "--num_class_images", 1], ["--class_data_dir", "is a file"]),
    ]
    for app, argv, fragments in cases:
        code, _, err = run_cli(app, argv, capsys)
        assert_one_line_error(code, err, str(a_file), *fragments)
    assert a_file.read_text() == "someone's notes"


def test_mjhq_outputs_are_checked_before_generating_or_scoring(tiny_sdxl_path, tmp_path, capsys, no_model_loading):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    meta = tmp_path / "meta_data.json"
    meta.write_text('{"an0": {"category": "animals", "prompt": "a cat"}}')
    code, _, err = run_cli(mjhq_fid.app, ["generate", "--meta_data", meta, "--gen_dir", a_file, "-m", tiny_sdxl_path], capsys)
    assert_one_line_error(code, err, "--gen_dir", "is a file")
    code, _, err = run_cli(mjhq_fid.app, ["report", str(tmp_path / "scores.json"), "--report_dir", a_file], capsys)
    assert_one_line_error(code, err, "--report_dir", "is a file")


@pytest.mark.parametrize("weight, fragment", [("nan", "is not a finite number"), ("inf", "is not a finite number"),
                                              ("-inf", "is not a finite number"), ("abc", "is not a number")])
def test_lora_weights_that_are_not_finite_numbers_are_refused(weight, fragment, tiny_sdxl_path, tmp_path, capsys,
                                                              no_model_loading):
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.a.lora_A.weight": torch.zeros(1, 1)}, lora)  # the weight is refused before the file is read
    code, _, err = run_cli(infer.app, ["-m", tiny_sdxl_path, "--prompt", "x", "--lora", f"{lora}:{weight}",
                                       "--output_dir", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, f"weight {weight!r}", fragment)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, os.urandom(4096), b'{"not": "safetensors"}'])
def test_an_unreadable_lora_or_embedding_file_is_one_line(content, tiny_sdxl_path, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    for option in ("--lora", "--embedding"):
        code, _, err = run_cli(infer.app, ["-m", tiny_sdxl_path, "--prompt", "x", option, bad, "--num_inference_steps", 1,
                                           "--width", 64, "--height", 64, "--output_dir", tmp_path / "out"], capsys)
        assert_one_line_error(code, err, str(bad))
    code, _, err = run_cli(convert_for_webui.app, [bad, "--out", tmp_path / "export"], capsys)
    assert_one_line_error(code, err, str(bad))
    assert not (tmp_path / "export").exists()


def test_a_truncated_lora_file_is_one_line_and_a_good_one_still_loads(tiny_sdxl_path, tmp_path, capsys):
    lora = make_peft_lora(tiny_sdxl_path, tmp_path / "lora", rank=2, alpha=2)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(lora.read_bytes()[: lora.stat().st_size // 2])
    code, _, err = run_cli(infer.app, ["-m", tiny_sdxl_path, "--prompt", "x", "--lora", truncated, "--num_inference_steps", 1,
                                       "--width", 64, "--height", 64, "--output_dir", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, str(truncated))


def written_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_written_safetensors_and_images_are_readable_by_other_users(tiny_sdxl_path, tmp_path, capsys):
    from common.files import user_umask

    wanted = 0o666 & ~user_umask()
    folder = tmp_path / "my_run"
    make_peft_lora(tiny_sdxl_path, folder, rank=2, alpha=2)
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}, folder / "my_run_emb.safetensors")
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "models" / "checkpoints").mkdir(parents=True)
    code, _, err = run_cli(convert_for_webui.app, [folder, "--comfyui_dir", comfyui], capsys)
    assert code == 0, err
    written = [comfyui / "models" / "loras" / "my_run.safetensors", comfyui / "models" / "embeddings" / "my_run.safetensors"]
    code, _, err = run_cli(infer.app, ["-m", tiny_sdxl_path, "--prompt", "x", "--num_inference_steps", 1, "--width", 64,
                                       "--height", 64, "--seed", 1, "--output_dir", tmp_path / "images"], capsys)
    assert code == 0, err
    written += list((tmp_path / "images").glob("*.png"))
    assert len(written) == 3 and all(written_mode(p) == wanted for p in written), {p.name: oct(written_mode(p)) for p in written}


class FakePipeline:
    """Stands in for an SDXL pipeline: one flat image per prompt, in the colour its seed draws, as diffusers' pipelines
    return them with output_type "np" (floats in [0, 1], which their image processor turns into PIL images)."""

    def set_progress_bar_config(self, **kwargs):
        pass

    tokenizer = None

    @property
    def image_processor(self):
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor()

    def __call__(self, *, prompt, generator, output_type="pil", **kwargs):
        colours = [torch.randint(0, 256, (3,), generator=g).float() / 255 for g in generator]

        class Output:
            images = np.stack([np.broadcast_to(c.numpy(), (8, 8, 3)) for c in colours])

        assert output_type == "np"
        return Output()


def test_two_runs_into_one_folder_keep_every_image(tmp_path, monkeypatch):
    """Both runs planned their numbers before either saved (as two infer.py runs started together do);
    every image is kept under a name of its own, numbered after what is there when it is saved."""
    import common.generation as generation
    import common.tokens

    monkeypatch.setattr(common.tokens, "warn_about_long_prompts", lambda *a, **k: 0)
    settings = generation.SamplingSettings(8, 8, 1, 1.0, "euler", "Euler")
    first_index = generation.next_free_index(tmp_path)
    runs = [generation.plan_jobs(["x"], negative_prompt=None, num_images=3, seeds=[5], first_index=first_index) for _ in range(2)]
    saved = [generation.generate_images(FakePipeline(), jobs, settings, output_dir=tmp_path, batch_size=2, show_progress=False)
             for jobs in runs]
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["00000-5.png", "00001-6.png", "00002-7.png", "00003-5.png", "00004-6.png", "00005-7.png"]
    assert sorted(p.name for run in saved for p in run) == names
    assert not list(tmp_path.glob(".*"))


def test_leftover_partials_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    from common.files import remove_leftover_partials

    dead = tmp_path / ".class_000001.png.999999999.partial"  # no process has such a pid
    live = tmp_path / f".class_000002.png.{os.getpid()}.partial"
    for partial in (dead, live):
        partial.write_bytes(b"half a png")
    remove_leftover_partials(tmp_path)
    assert not dead.exists() and live.exists()


def test_gen_class_images_removes_what_a_killed_run_left(tiny_sdxl_path, tmp_path, capsys):
    folder = tmp_path / "class"
    folder.mkdir()
    leftover = folder / ".class_000000.png.999999999.partial"
    leftover.write_bytes(b"half a png")
    code, _, err = run_cli(gen_class_images.app, ["-m", tiny_sdxl_path, "--class_prompt", "a dog", "--class_data_dir", folder,
                                                  "--num_class_images", 1, "--num_inference_steps", 1, "--width", 64,
                                                  "--height", 64], capsys)
    assert code == 0, err
    assert not leftover.exists() and [p.name for p in folder.iterdir()] == ["class_000000.png"]


@pytest.mark.parametrize("raised, status, message", [
    (OSError(28, "No space left on device", "/data/out/model.safetensors"), 2,
     "error: No space left on device: '/data/out/model.safetensors'\n"),
    (OSError(13, "Permission denied", "/a", None, "/b"), 2, "error: Permission denied: '/a' -> '/b'\n"),
    (KeyboardInterrupt(), 130, "error: interrupted\n"),
])
def test_file_system_errors_and_ctrl_c_end_in_one_line_in_every_script(raised, status, message, capsys):
    """Every script runs through common.cli.run_app: what reaches it is one line and a fixed status."""
    import sys

    import typer

    from common.cli import run_app

    app = typer.Typer()

    @app.command()
    def main() -> None:
        raise raised

    saved, sys.argv = sys.argv, ["script.py"]
    try:
        with pytest.raises(SystemExit) as exit_:
            run_app(app)
    finally:
        sys.argv = saved
    assert exit_.value.code == status
    assert capsys.readouterr().err == message
    scripts = sorted(Path(__file__).resolve().parents[1].glob("*.py"))
    assert len(scripts) == 6 and all("run_app(app)" in p.read_text() for p in scripts)


def test_merge_never_replaces_an_existing_result_or_an_input(tiny_sdxl_path, tmp_path, capsys):
    import merge_lora

    first = make_peft_lora(tiny_sdxl_path, tmp_path / "a", rank=2, alpha=2, seed=0).parent
    second = make_peft_lora(tiny_sdxl_path, tmp_path / "b", rank=2, alpha=2, seed=1).parent
    before = snapshot(tmp_path)
    code, _, err = run_cli(merge_lora.app, ["-m", tiny_sdxl_path, "--lora", first, "--lora", second, "--out", first, "--force"], capsys)
    assert_one_line_error(code, err, "holds the input", str(first))
    out = tmp_path / "merged"
    assert run_cli(merge_lora.app, ["-m", tiny_sdxl_path, "--lora", first, "--lora", second, "--out", out], capsys)[0] == 0
    merged = snapshot(out)
    code, _, err = run_cli(merge_lora.app, ["-m", tiny_sdxl_path, "--lora", first, "--lora", f"{second}:0.5", "--out", out], capsys)
    assert_one_line_error(code, err, "exists; pass --force")
    assert snapshot(out) == merged
    code, _, err = run_cli(merge_lora.app, ["-m", tiny_sdxl_path, "--lora", first, "--lora", f"{second}:0.5", "--out", out,
                                            "--force"], capsys)
    assert code == 0, err
    assert snapshot(out) != merged
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("merged/")} == before


@pytest.mark.heavy
def test_a_cpu_launch_that_loses_processes_is_named_with_what_works(tmp_path):
    import subprocess
    import sys

    from common.models import accelerate_launch_processes

    assert accelerate_launch_processes([".venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "x.py"]) == 2
    assert accelerate_launch_processes(["accelerate", "launch", "--num-processes=3", "x.py"]) == 3
    assert accelerate_launch_processes(["python", "x.py", "--num_processes", "2"]) is None
    script = tmp_path / "probe.py"
    script.write_text("from accelerate import PartialState\nfrom common.models import warn_about_lost_processes\n"
                      "warn_about_lost_processes(PartialState(cpu=True).num_processes)\n")
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr
    assert "accelerate launch asked for 2 processes but this run has 1" in result.stderr
    assert "torchrun --nproc_per_node 2" in result.stderr


def test_convert_checks_its_targets_before_reading_the_model(tmp_path, capsys, no_model_loading):
    folder = tmp_path / "run"
    folder.mkdir()
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 640)},
              folder / "pytorch_lora_weights.safetensors")
    blocker = tmp_path / "export"
    blocker.write_text("a file where the export folder should be")
    code, _, err = run_cli(convert_for_webui.app, [folder, "--out", blocker, "--model", "tiny-sdxl"], capsys)
    assert_one_line_error(code, err, str(blocker))
    assert blocker.read_text() == "a file where the export folder should be"


def test_training_outputs_are_claimed_locked_readable_and_hold_no_token(tiny_sdxl_path, tmp_path, capsys):
    import subprocess
    import sys

    from common.files import lock_folder, user_umask
    from training_helpers import PROMPT, train_cli, write_images

    images = write_images(tmp_path / "images", count=2)
    out = tmp_path / "run"

    def train(*extra):
        return train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", PROMPT,
                         "--resolution", 64, "--train_batch_size", 2, "--max_train_steps", 2, "--checkpointing_steps", 1,
                         "--output_dir", out, *extra)

    token = "hf_NotARealTokenButSecret42"
    code, _, err = train("--hub_token", token)
    assert code == 0, err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    wrong = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o777 != 0o666 & ~user_umask()}
    assert not wrong, wrong
    assert not [p for p in files if token.encode() in p.read_bytes()], "the token reached a file"

    before = snapshot(out)
    code, _, err = train()
    assert_one_line_error(code, err, "already holds a run", "--resume_from_checkpoint latest", "--force")
    assert snapshot(out) == before
    held = lock_folder(out, "--output_dir")
    code, _, err = train("--force")
    held.close()
    assert_one_line_error(code, err, "is in use by another run")
    assert snapshot(out) == before

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common.files import lock_folder; "
                               "h = lock_folder(sys.argv[1], 'x'); print('locked', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    code, _, err = train("--force", "--max_train_steps", 1)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"], "--force removed the earlier checkpoints"


def test_an_init_lora_for_another_shape_is_one_line(tiny_sdxl_path, tmp_path, capsys):
    from safetensors.torch import load_file

    from training_helpers import PROMPT, train_cli, write_images

    images = write_images(tmp_path / "images", count=2)
    lora = make_peft_lora(tiny_sdxl_path, tmp_path / "lora", rank=4, alpha=4, text_encoders=False)
    state = load_file(lora)
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = torch.zeros(4, state[key].shape[1] + 1)
    save_file(state, tmp_path / "other.safetensors")
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", PROMPT,
                             "--resolution", 64, "--train_batch_size", 2, "--max_train_steps", 1, "--rank", 4, "--lora_alpha", 4,
                             "--init_lora", tmp_path / "other.safetensors", "--output_dir", tmp_path / "out")
    assert_one_line_error(code, err, "--init_lora's", "another base model")

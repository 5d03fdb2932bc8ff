"""Resuming train_lora.py: from a checkpoint in the middle of an epoch, after Ctrl-C or kill -9 at any point
of a step, and to a longer run, the LoRA is bit for bit that of one uninterrupted run; a checkpoint that
cannot continue the run (past its end, other shapes, a damaged file) is refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training_helpers import PROMPT, train_cli, write_images

REPO = Path(__file__).resolve().parents[1]
STEPS = 6  # 4 images in batches of 2: two steps an epoch, so checkpoint-3 is in the middle of one
LORA = "pytorch_lora_weights.safetensors"
RESUME = ("--resume_from_checkpoint", "latest")


def run_args(model: str, images: Path, out: Path, steps: int, *extra) -> list:
    """A run whose learning rate does not follow its length (constant after a warmup, whose state a resume must
    restore), with random flips, so that data order, flips, noise and the schedule all have to continue."""
    return ["-m", model, "--instance_data_dir", images, "--instance_prompt", PROMPT, "--resolution", 64,
            "--output_dir", out, "--max_train_steps", steps, "--seed", 0, "--train_batch_size", 2, "--random_flip",
            "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", 2, "--learning_rate", 1e-3,
            "--checkpointing_steps", 3, *extra]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("instance"))


@pytest.fixture(scope="module")
def straight(tiny_sdxl_path, images, tmp_path_factory) -> Path:
    """One uninterrupted 6-step run: the result every resumed run must equal."""
    out = tmp_path_factory.mktemp("straight")
    code, _, _ = train_cli(None, *run_args(tiny_sdxl_path, images, out, STEPS))
    assert code == 0
    return out


def assert_same_lora(result: Path, straight: Path) -> None:
    expected, found = load_file(straight / LORA), load_file(result / LORA)
    assert expected.keys() == found.keys()
    unequal = {k: float((expected[k] - found[k]).abs().max()) for k in expected if not torch.equal(expected[k], found[k])}
    assert not unequal, f"{len(unequal)} of {len(expected)} tensors differ, by up to {max(unequal.values())}"


def copy_checkpoint(straight: Path, step: int, out: Path) -> Path:
    shutil.copytree(straight / f"checkpoint-{step}", out / f"checkpoint-{step}")
    return out / f"checkpoint-{step}"


# The child sends itself the signal from inside a step (at the start of its k-th batch), where a Ctrl-C or
# kill -9 from outside would most often land; it then runs to the end of that step or dies there.
SIGNALLED_CHILD = """
import os, signal, sys
import train_lora

signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal gives it, even if the suite was started with SIGINT ignored
from common.cli import run_app

signal_number, at_batch = int(sys.argv.pop(1)), int(sys.argv.pop(1))
original, batches = train_lora.batch_latents, []

def signalled_batch_latents(*args):
    batches.append(1)
    if len(batches) == at_batch:
        os.kill(os.getpid(), signal_number)
    return original(*args)

train_lora.batch_latents = signalled_batch_latents
run_app(train_lora.app)
"""


def run_signalled(argv: list, signal_number: int, at_batch: int) -> subprocess.CompletedProcess:
    # the same thread count as this process, whose runs the child's result is compared with bit for bit
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-c", SIGNALLED_CHILD, str(signal_number), str(at_batch), *map(str, argv)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_resuming_in_the_middle_of_an_epoch_gives_the_straight_runs_lora(tiny_sdxl_path, images, straight, tmp_path, capsys):
    copy_checkpoint(straight, 3, tmp_path)
    code, out, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path, STEPS, *RESUME))
    assert code == 0, err
    assert "resumed from" in out and "at step 3" in out, out
    assert_same_lora(tmp_path, straight)


@pytest.mark.heavy
def test_ctrl_c_mid_step_saves_that_step_and_resuming_gives_the_straight_runs_lora(tiny_sdxl_path, images, straight, tmp_path, capsys):
    child = run_signalled(run_args(tiny_sdxl_path, images, tmp_path, STEPS), signal.SIGINT, at_batch=5)
    errors = [line for line in child.stderr.splitlines() if line.startswith("error:")]
    assert child.returncode == 130, child.stderr[-3000:]
    assert errors == ["error: interrupted at step 5; resume with --resume_from_checkpoint latest"], child.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*checkpoint-*")) == ["checkpoint-3", "checkpoint-5"]
    code, out, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path, STEPS, *RESUME))
    assert code == 0, err
    assert "at step 5" in out, out
    assert_same_lora(tmp_path, straight)


@pytest.mark.heavy
def test_kill_9_mid_step_then_resuming_latest_gives_the_straight_runs_lora(tiny_sdxl_path, images, straight, tmp_path, capsys):
    child = run_signalled(run_args(tiny_sdxl_path, images, tmp_path, STEPS), signal.SIGKILL, at_batch=5)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]
    code, out, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path, STEPS, *RESUME))
    assert code == 0, err
    assert "at step 3" in out, out
    assert_same_lora(tmp_path, straight)


def test_a_second_ctrl_c_stops_at_once_and_the_previous_handler_comes_back(tiny_sdxl_path, images, tmp_path, capsys, monkeypatch):
    import train_lora

    original, batches = train_lora.batch_latents, []

    def twice_interrupted_batch_latents(*args):
        batches.append(1)
        if len(batches) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # asks to stop after this step
            os.kill(os.getpid(), signal.SIGINT)  # stops now, in the middle of it
        return original(*args)

    monkeypatch.setattr(train_lora, "batch_latents", twice_interrupted_batch_latents)
    # Ctrl-C as a terminal gives it, even where the suite runs with SIGINT ignored (a background job's)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, _, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path, 4))
        handler_after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted", err
    assert not list(tmp_path.glob("*checkpoint-*")), "a step half taken must not be saved"
    assert handler_after is signal.default_int_handler, "the handler that was there before comes back"


def test_extending_a_finished_constant_schedule_run_gives_the_longer_straight_runs_lora(tiny_sdxl_path, images, straight, tmp_path,
                                                                                       capsys, caplog):
    code, _, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path, 4))
    assert code == 0, err
    code, out, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path, STEPS, *RESUME))
    assert code == 0, err
    assert "at step 4" in out and "differ" not in caplog.text, (out, caplog.text)
    assert_same_lora(tmp_path, straight)


def test_a_checkpoint_past_the_end_is_refused_and_one_at_the_end_writes_the_outputs_again(tiny_sdxl_path, images, straight, tmp_path, capsys):
    copy_checkpoint(straight, STEPS, tmp_path)
    code, _, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path, 4, *RESUME))
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines[-1].startswith("error: ") and "checkpoint-6 is at step 6, past the end of this run (--max_train_steps 4)" in lines[-1], \
        err
    assert not (tmp_path / LORA).exists()
    code, out, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path, STEPS, *RESUME))
    assert code == 0, err
    assert "the run is finished" in out, out
    assert_same_lora(tmp_path, straight)


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def older_record(checkpoint: Path) -> None:
    """The record as checkpoints had it before it held the shape options: step, run length and process count."""
    record = json.loads((checkpoint / "training_state.json").read_text())
    (checkpoint / "training_state.json").write_text(json.dumps({k: record[k] for k in ("step", "total_steps", "processes")}))


UNUSABLE_CHECKPOINTS = {
    "another rank": (lambda checkpoint: None, ["--rank", 8], "was written by a run with --rank 4, this one has --rank 8"),
    "text encoders trained now, not then": (lambda checkpoint: None, ["--train_text_encoder"],
                                            "was written by a run with no --train_text_encoder, this one has --train_text_encoder"),
    "EMA now, not then": (lambda checkpoint: None, ["--use_ema"], "was written by a run with no --use_ema, this one has --use_ema"),
    "another layer set": (lambda checkpoint: None, ["--lora_layers", "attn-mlp"],
                          "was written by a run with --lora_layers attn, this one has --lora_layers attn-mlp"),
    "another rank, an older record": (older_record, ["--rank", 8], "does not fit this run: lora.safetensors has "),
    "EMA now, not then, an older record": (older_record, ["--use_ema"], "was written by a run with no --use_ema"),
    "a truncated LoRA file": (lambda checkpoint: truncate(checkpoint / "lora.safetensors"), [],
                              "could not read checkpoint file"),
    # accelerate itself would pass over this one without a word, and the resumed run would quietly differ
    "a truncated random state": (lambda checkpoint: truncate(checkpoint / "random_states_0.pkl"), [],
                                 "random_states_0.pkl"),
    "a truncated optimizer state": (lambda checkpoint: truncate(checkpoint / "optimizer.bin"), [],
                                    "could not restore checkpoint"),
}


@pytest.mark.parametrize("case", UNUSABLE_CHECKPOINTS)
def test_a_checkpoint_that_cannot_continue_the_run_is_refused_in_one_line(case, tiny_sdxl_path, images, straight, tmp_path, capsys):
    damage, extra, message = UNUSABLE_CHECKPOINTS[case]
    damage(copy_checkpoint(straight, 3, tmp_path))
    code, _, err = train_cli(capsys, *run_args(tiny_sdxl_path, images, tmp_path, STEPS, *extra, *RESUME))
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err and lines[-1].startswith("error: ") and message in lines[-1], err
    assert not (tmp_path / LORA).exists()


def config(**changes):
    from train_lora import TrainConfig

    return TrainConfig(pretrained_model_name_or_path="tiny-sdxl", output_dir="out", **changes)


@pytest.mark.parametrize("changes, differs", [
    ({}, False),
    ({"lr_scheduler": "constant_with_warmup"}, False),
    ({"lr_scheduler": "cosine"}, True),
    ({"train_text_encoder_ti": True, "train_text_encoder_ti_frac": 0.5}, True),
    ({"train_text_encoder_ti": True, "train_text_encoder_ti_frac": 1.0}, False),
])
def test_continuing_to_more_steps_is_flagged_where_a_setting_follows_the_runs_length(changes, differs):
    from common.checkpointing import resume_differences

    warnings = resume_differences(config(**changes), {"step": 6, "total_steps": 6, "processes": 1}, 6, 10, 1)
    assert bool(warnings) == differs, warnings
    assert resume_differences(config(**changes), {"step": 6, "total_steps": 10, "processes": 1}, 6, 10, 1) == []
    assert resume_differences(config(), {"step": 6, "total_steps": 10, "processes": 2}, 6, 10, 1)

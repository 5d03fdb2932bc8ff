"""train_lora.py's checkpoints: what a checkpoint-N folder holds (the trained weights only, with accelerate's optimizer
and random state and a record of the run), writing one whole or not at all, and resuming from one: the checks before
any model loads, the restore, and the warnings where the continued run cannot equal an uninterrupted one.

`config` is train_lora.py's TrainConfig (common/ never imports a script).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from common.cli import UserError
from common.files import atomic_folder
from common.lora_outputs import output_name

logger = logging.getLogger(__name__)


CHECKPOINT_FILES = ("lora.safetensors", "text_encoder.safetensors", "text_encoder_2.safetensors")


def trained_state(model) -> dict:
    """The parameters a run trains in `model`: the adapter's (LoRA/DoRA, LoHa, LoKr) and pivotal-tuning rows."""
    from common.adapters import TRAINED_PARAMETER_MARKERS

    return {
        n: p.detach().float().cpu().contiguous()
        for n, p in model.named_parameters()
        if any(marker in n for marker in (*TRAINED_PARAMETER_MARKERS, "new_rows"))
    }


def register_checkpoint_hooks(accelerator, config, caption_encoder) -> None:
    """Checkpoints hold only what is trained (not 2.6 B frozen UNet parameters), plus optimizer and RNG
    state, and with pivotal tuning the embedding file as it is at that step. A checkpoint is restored only
    into a run that trains the same weights with the same shapes."""
    from safetensors.torch import save_file

    from common.lora_formats import read_safetensors
    from common.tokens import save_embedding

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model, name in zip(models, CHECKPOINT_FILES):
                save_file(trained_state(accelerator.unwrap_model(model)), os.path.join(output_dir, name))
            if caption_encoder.rows:
                save_embedding(
                    Path(output_dir) / f"{output_name(config)}_emb.safetensors",
                    *[r.new_rows for r in caption_encoder.rows],
                    [t for group in config.token_map.values() for t in group],
                )
        weights.clear()

    def load_hook(models, input_dir):
        def does_not_fit(what: str) -> UserError:
            return UserError(
                f"checkpoint {input_dir} does not fit this run: {what}; resume with the options it was trained with "
                "(--rank, --use_dora, --lora_unet_blocks, the text-encoder options)"
            )

        for model, name in zip(list(models), CHECKPOINT_FILES):
            file = Path(input_dir) / name
            if not file.is_file():  # a checkpoint of a run that left the text encoders alone
                raise does_not_fit(f"it has no {name}")
            state = read_safetensors(file, "checkpoint file", hint="; resume from another checkpoint-N")
            trained = trained_state(accelerator.unwrap_model(model))
            mismatch = weights_mismatch(
                {n: tuple(t.shape) for n, t in state.items()}, {n: tuple(t.shape) for n, t in trained.items()}
            )
            if mismatch:
                raise does_not_fit(f"{name} {mismatch}")
            accelerator.unwrap_model(model).load_state_dict(state, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoints(output_dir: str) -> list[Path]:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


CHECKPOINT_RECORD = "training_state.json"  # the step, the run's length, its process count and shape options, for resume's checks
# The options a checkpoint's state depends on: a resume with another value cannot restore it (refused before any model
# loads), and the learning rates, which a resume may change (a diverged run continues at a lower one)
RESUME_SHAPE_OPTIONS = ("adapter", "use_ema", "use_dora", "rank", "conv_rank", "lora_layers", "train_text_encoder",
                        "train_text_encoder_ti")
RESUME_RATE_OPTIONS = ("learning_rate", "text_encoder_lr")


def save_checkpoint(accelerator, config, step: int, total_steps: int) -> None:
    """accelerate state in checkpoint-STEP, written beside and renamed, so a crash never leaves half of one."""
    with atomic_folder(
        Path(config.output_dir) / f"checkpoint-{step}", is_main_process=accelerator.is_main_process
    ) as staging:
        accelerator.wait_for_everyone()  # the main process has made the staging folder
        accelerator.save_state(str(staging))
        if accelerator.is_main_process:
            record = {"step": step, "total_steps": total_steps, "processes": accelerator.num_processes,
                      **{name: getattr(config, name) for name in RESUME_SHAPE_OPTIONS + RESUME_RATE_OPTIONS}}
            (staging / CHECKPOINT_RECORD).write_text(json.dumps(record))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process and config.checkpoints_total_limit:
        for old in checkpoints(config.output_dir)[: -config.checkpoints_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resume_checkpoint(config) -> Path | None:
    """The checkpoint --resume_from_checkpoint names (latest: the newest in --output_dir), or None without it."""
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        found = checkpoints(config.output_dir)
        if not found:
            raise UserError(f"--resume_from_checkpoint latest: no checkpoint-N folder in {config.output_dir!r}")
        return found[-1]
    return Path(config.resume_from_checkpoint)


def check_resume(config) -> None:
    """Before any model loads: the checkpoint to resume is readable and was written by a run this one can continue,
    each difference named by its option (accelerate's own refusal, after the load, names neither). A checkpoint
    written before its record held these options is judged by its files: an EMA leaves accelerate's
    custom_checkpoint_0.pkl."""
    path = resume_checkpoint(config)
    if path is None:
        return
    record = read_checkpoint_record(path)
    if "use_ema" not in record:
        record["use_ema"] = (path / "custom_checkpoint_0.pkl").is_file()
    for name in RESUME_SHAPE_OPTIONS:
        if name in record and record[name] != getattr(config, name):
            def flag(value):
                return f"--{name} {value}" if not isinstance(value, bool) else (f"--{name}" if value else f"no --{name}")

            raise UserError(f"{path} was written by a run with {flag(record[name])}, this one has {flag(getattr(config, name))}: a "
                            f"resume continues the same adapter; resume with {flag(record[name])}, or start over with --force")


def resume(config, accelerator, total_steps: int, optimizer=None, lr_scheduler=None) -> int:
    """The step to continue from: 0, or the step of the checkpoint whose state was just restored.

    A checkpoint past this run's last step is refused (an old run's, left in the folder); one at the last
    step restores the finished state, so the outputs are written from it. One written by a run of another
    length or process count is restored with a warning for each setting that makes the result differ from
    one uninterrupted run."""
    path = resume_checkpoint(config)
    if path is None:
        return 0
    record = read_checkpoint_record(path)
    step = record["step"]
    if step > total_steps:
        length = f"--max_train_steps {total_steps}" if config.max_train_steps else f"{total_steps} steps"
        raise UserError(
            f"{path} is at step {step}, past the end of this run ({length}); continue it with a larger "
            "--max_train_steps, or train into another --output_dir"
        )
    if accelerator.is_main_process:
        for warning in resume_differences(config, record, step, total_steps, accelerator.num_processes):
            logger.warning(f"{path.name}: {warning}; the result will differ from one uninterrupted run")
    rates = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups] if optimizer is not None else []
    restore_checkpoint(accelerator, path)
    if any(name in record and record[name] != getattr(config, name) for name in RESUME_RATE_OPTIONS):
        continue_at_rates(optimizer, lr_scheduler, rates)
    finished = ": the run is finished, its outputs are written again" if step == total_steps else ""
    accelerator.print(f"resumed from {path} at step {step}{finished}")
    return step


def continue_at_rates(optimizer, lr_scheduler, rates: list[float]) -> None:
    """After a checkpoint's optimizer and schedule were restored (with the rates of the run that wrote it), this run's
    rates (each parameter group's `rates`) as the schedule's base, at the restored step of the schedule."""
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper holds torch's scheduler
    schedule.base_lrs = list(rates)
    for group, rate in zip(optimizer.param_groups, rates):
        group["initial_lr"] = rate
    # diffusers' schedules are LambdaLR: the rate at a step is the base rate times the schedule's factor there
    schedule._last_lr = [factor(schedule.last_epoch) * rate for factor, rate in zip(schedule.lr_lambdas, rates)]
    for group, rate in zip(optimizer.param_groups, schedule._last_lr):
        group["lr"] = rate


def read_checkpoint_record(path: Path) -> dict:
    """The checkpoint's training_state.json; a checkpoint written before there was one gives its step by its
    name alone."""
    file = path / CHECKPOINT_RECORD
    if file.is_file():
        try:
            return json.loads(file.read_text())
        except (ValueError, OSError) as error:
            raise UserError(f"could not read {str(file)!r}: {error}; resume from another checkpoint-N") from None
    digits = path.name.rpartition("-")[2]
    if not digits.isdigit():
        raise UserError(f"--resume_from_checkpoint {str(path)!r}: a checkpoint folder is named checkpoint-STEP")
    return {"step": int(digits)}


def resume_differences(config, record: dict, step: int, total_steps: int, processes: int) -> list[str]:
    """Why continuing from a checkpoint with this config cannot equal an uninterrupted run of it: the
    settings that follow the run's length, when the checkpoint's run had another, and another process
    count (another sharding of the data, and processes without a saved random state)."""
    differences = []
    written_total = record.get("total_steps", total_steps)
    if written_total != total_steps and step < total_steps:
        changed = []
        if config.lr_scheduler not in ("constant", "constant_with_warmup"):
            changed.append(f"--lr_scheduler {config.lr_scheduler} runs over all the steps")
        for on, name, fraction in (
            (config.train_text_encoder_ti, "train_text_encoder_ti_frac", config.train_text_encoder_ti_frac),
            (config.train_text_encoder, "train_text_encoder_frac", config.train_text_encoder_frac),
        ):
            # the steps before the checkpoint trained this part up to the old run's end of it, not the new one's
            if on and min(int(fraction * written_total), step) != min(int(fraction * total_steps), step):
                changed.append(f"--{name} {fraction} ends at another step")
        if changed:
            length = f"written by a run of {written_total} steps, this one has {total_steps}"
            differences.append(f"{length}: {'; '.join(changed)}")
    written_processes = record.get("processes", processes)
    if written_processes != processes:
        differences.append(f"written by {written_processes} process(es), this run has {processes}")
    for name in RESUME_RATE_OPTIONS:
        if name in record and record[name] != getattr(config, name):
            differences.append(f"written at --{name} {record[name]:g}, continued at {getattr(config, name):g}")
    return differences


def restore_checkpoint(accelerator, path: Path) -> None:
    """accelerate's load_state, with any file it cannot read refused in one line. It passes over a random
    state it cannot read without a word, which would quietly end the bit-identical continuation, so that
    file is read here first."""
    import pickle

    import torch

    unreadable = (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError)
    random_state = path / f"random_states_{accelerator.process_index}.pkl"
    try:
        if random_state.is_file():
            torch.load(random_state, weights_only=False)  # as accelerate does next
    except unreadable as error:
        raise UserError(
            f"could not read checkpoint file {str(random_state)!r}: {str(error) or type(error).__name__}; "
            "resume from another checkpoint-N"
        ) from None
    try:
        accelerator.load_state(str(path))
    except unreadable as error:
        raise UserError(
            f"could not restore checkpoint {str(path)!r}: {str(error) or type(error).__name__}; "
            "resume from another checkpoint-N"
        ) from None


def weights_mismatch(found: dict, expected: dict) -> str | None:
    """How a checkpoint's weights (name -> shape) differ from those a run trains; None when they match."""
    unknown = sorted(set(found) - set(expected))
    if unknown:
        return f"has {len(unknown)} weights this run does not train, e.g. {unknown[0]}"
    missing = sorted(set(expected) - set(found))
    if missing:
        return f"lacks {len(missing)} weights this run trains, e.g. {missing[0]}"
    for name in sorted(found):
        if found[name] != expected[name]:
            return f"has {name} of shape {list(found[name])}, this run's is {list(expected[name])}"
    return None

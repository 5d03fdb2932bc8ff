"""kohya sd-scripts' saving decisions during a LoRA run, reproduced for the tests from its source at commit
48d368fa557731ad0488c07304dfeba8c07910eb, independently of common/save_schedule.py:
- train_network.py `NetworkTrainer.train`: `num_train_epochs = math.ceil(args.max_train_steps /
  num_update_steps_per_epoch)`; the epoch loop `for epoch in range(epoch_to_start, num_train_epochs)`; after
  `global_step += 1` the step save when `global_step % args.save_every_n_steps == 0` with `get_remove_step_no`;
  `if global_step >= args.max_train_steps: break`; at the epoch's end the save when
  `(epoch + 1) % args.save_every_n_epochs == 0 and (epoch + 1) < num_train_epochs` with `get_remove_epoch_no`;
  the final `get_last_ckpt_name` save; `remove_model` removes only a file that exists.
- library/train_util.py `EPOCH_FILE_NAME`, `STEP_FILE_NAME`, `get_epoch_ckpt_name`, `get_step_ckpt_name`,
  `get_last_ckpt_name`, `get_remove_epoch_no`, `get_remove_step_no`.

Steps are optimizer steps (kohya's `num_update_steps_per_epoch` already divides by gradient accumulation). A run
that starts at `start_step` is the rest of an uninterrupted run, over the files it left (`present`): kohya's own
counter after --resume restarts (at 0, or within the epoch with --skip_until_initial_step), which is not modelled.
"""

from __future__ import annotations

import math
from types import SimpleNamespace


def kohya_run(
    *,
    output_name: str,
    steps_per_epoch: int,
    max_train_steps: int,
    save_every_n_epochs: int | None = None,
    save_every_n_steps: int | None = None,
    save_last_n_epochs: int | None = None,
    save_last_n_steps: int | None = None,
    start_step: int = 0,
    present: frozenset[str] = frozenset(),
) -> tuple[list[tuple[str, str]], set[str]]:
    """The ("write" | "remove", file name) events of the run, in order, and the files present at its end."""
    args = SimpleNamespace(
        output_name=output_name, save_model_as="safetensors", max_train_steps=max_train_steps,
        save_every_n_epochs=save_every_n_epochs, save_every_n_steps=save_every_n_steps,
        save_last_n_epochs=save_last_n_epochs, save_last_n_steps=save_last_n_steps,
    )
    files, events = set(present), []

    def save_model(ckpt_name):
        files.add(ckpt_name)
        events.append(("write", ckpt_name))

    def remove_model(old_ckpt_name):
        if old_ckpt_name in files:
            files.remove(old_ckpt_name)
            events.append(("remove", old_ckpt_name))

    num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    global_step = start_step
    for epoch in range(start_step // steps_per_epoch, num_train_epochs):
        for _ in range(global_step - epoch * steps_per_epoch, steps_per_epoch):
            global_step += 1
            if args.save_every_n_steps is not None and global_step % args.save_every_n_steps == 0:
                save_model(get_step_ckpt_name(args, "." + args.save_model_as, global_step))
                remove_step_no = get_remove_step_no(args, global_step)
                if remove_step_no is not None:
                    remove_model(get_step_ckpt_name(args, "." + args.save_model_as, remove_step_no))
            if global_step >= args.max_train_steps:
                break
        if args.save_every_n_epochs is not None:
            saving = (epoch + 1) % args.save_every_n_epochs == 0 and (epoch + 1) < num_train_epochs
            if saving:
                save_model(get_epoch_ckpt_name(args, "." + args.save_model_as, epoch + 1))
                remove_epoch_no = get_remove_epoch_no(args, epoch + 1)
                if remove_epoch_no is not None:
                    remove_model(get_epoch_ckpt_name(args, "." + args.save_model_as, remove_epoch_no))
    save_model(get_last_ckpt_name(args, "." + args.save_model_as))
    return events, files


def get_epoch_ckpt_name(args, ext, epoch_no):
    return "{}-{:06d}".format(args.output_name, epoch_no) + ext


def get_step_ckpt_name(args, ext, step_no):
    return "{}-step{:08d}".format(args.output_name, step_no) + ext


def get_last_ckpt_name(args, ext):
    return args.output_name + ext


def get_remove_epoch_no(args, epoch_no):
    if args.save_last_n_epochs is None:
        return None
    remove_epoch_no = epoch_no - args.save_every_n_epochs * args.save_last_n_epochs
    return None if remove_epoch_no < 0 else remove_epoch_no


def get_remove_step_no(args, step_no):
    if args.save_last_n_steps is None:
        return None
    remove_step_no = step_no - args.save_last_n_steps - 1
    remove_step_no = remove_step_no - (remove_step_no % args.save_every_n_steps)
    return None if remove_step_no < 0 else remove_step_no

"""Adapter files written while training, as kohya's sd-scripts writes them: when, under which names, in which
precision, and which earlier ones are removed.

Reproduces kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb (behaviour, not code):
- `train_network.py` `NetworkTrainer.train`: a step file after every optimizer step that is a multiple of
  --save_every_n_steps (the last step included), an epoch file after every epoch that is a multiple of
  --save_every_n_epochs except the run's last epoch, then the final file; after each step or epoch file, at most one
  older file of the same kind is removed, by its computed name, if it exists.
- `library/train_util.py`: `EPOCH_FILE_NAME`, `STEP_FILE_NAME`, `get_epoch_ckpt_name`, `get_step_ckpt_name`,
  `get_last_ckpt_name`, `get_remove_epoch_no`, `get_remove_step_no`, `prepare_dtype` (--save_precision) and the
  `--save_*` argument declarations.
- `networks/lora.py` `LoRANetwork.save_weights`: with a save precision, every tensor of the state dict is cast.

The final file is never removed, and the options only ever remove files this schedule names, so a resumed run
removes the files of the run it continues, as kohya does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from common.cli import UserError

if TYPE_CHECKING:  # torch is imported where used: the scripts answer --help without it
    import torch

SUFFIX = ".safetensors"
# kohya's --save_precision names, as torch's attribute names ("float" is float32: `prepare_dtype`)
SAVE_PRECISIONS = {"float": "float32", "fp16": "float16", "bf16": "bfloat16"}


def epoch_file_name(name: str, epoch: int) -> str:
    """NAME-000004.safetensors: kohya's `EPOCH_FILE_NAME` ("{}-{:06d}"), the epoch counted from 1."""
    return f"{name}-{epoch:06d}{SUFFIX}"


def step_file_name(name: str, step: int) -> str:
    """NAME-step00000100.safetensors: kohya's `STEP_FILE_NAME` ("{}-step{:08d}"), the step counted in optimizer steps."""
    return f"{name}-step{step:08d}{SUFFIX}"


def final_file_name(name: str) -> str:
    """NAME.safetensors: kohya's `get_last_ckpt_name`."""
    return f"{name}{SUFFIX}"


def epoch_to_remove(epoch: int, every_n_epochs: int, last_n_epochs: int) -> int | None:
    """The epoch whose file goes after the file of `epoch` is written: the one `last_n_epochs` saves back
    (kohya's `get_remove_epoch_no`: epoch - every_n_epochs * last_n_epochs). None while there is none; kohya also
    names epoch 0, which no run writes."""
    expired = epoch - every_n_epochs * last_n_epochs
    return expired if expired >= 1 else None


def step_to_remove(step: int, every_n_steps: int, last_n_steps: int) -> int | None:
    """The step whose file goes after the file of `step` is written (kohya's `get_remove_step_no`): the newest
    multiple of `every_n_steps` at or below step - last_n_steps - 1, so the files of the last `last_n_steps` steps
    stay. A span, not a count: with every 10 and last 25, step 50 removes step 20 and keeps 30, 40 and 50.
    None while there is none; kohya also names step 0, which no run writes."""
    before_span = step - last_n_steps - 1
    expired = before_span - before_span % every_n_steps
    return expired if expired >= 1 else None


def cast_for_saving(state_dict: Mapping[str, torch.Tensor], precision: str | None) -> dict[str, torch.Tensor]:
    """The state dict with its floating-point tensors in the --save_precision dtype (None: as they are).

    kohya (`LoRANetwork.save_weights`) casts every tensor; an integer or boolean tensor is kept here, as a cast
    to float would change what it means."""
    if precision is None:
        return dict(state_dict)
    if precision not in SAVE_PRECISIONS:
        raise UserError(_precision_refusal(precision))
    import torch

    dtype = getattr(torch, SAVE_PRECISIONS[precision])
    return {key: t.to(dtype) if t.is_floating_point() else t for key, t in state_dict.items()}


def _precision_refusal(precision: object) -> str:
    return f"--save_precision {precision!r}: choose {', '.join(SAVE_PRECISIONS)} (float is float32)"


@dataclass(frozen=True, kw_only=True)
class SaveSchedule:
    """kohya's --save_every_n_epochs, --save_every_n_steps, --save_last_n_epochs, --save_last_n_steps and
    --save_precision for the adapter files named after `name` (--output_name)."""

    name: str
    every_n_epochs: int | None = None
    every_n_steps: int | None = None
    last_n_epochs: int | None = None
    last_n_steps: int | None = None
    precision: str | None = None

    def check(self) -> SaveSchedule:
        """Itself, or a UserError naming the first bad option, its value and what is accepted."""
        counts = {"every_n_epochs": self.every_n_epochs, "every_n_steps": self.every_n_steps,
                  "last_n_epochs": self.last_n_epochs, "last_n_steps": self.last_n_steps}
        rules = [
            (bool(self.name) and Path(self.name).name == self.name and self.name not in (".", ".."),
             f"--output_name {self.name!r}: a file name without a folder, which the files are named after"),
            *(
                (value is None or (isinstance(value, int) and value >= 1),
                 f"--save_{option} {value!r}: a whole number >= 1 (leave it out for none)")
                for option, value in counts.items()
            ),
            # kohya ignores these without the matching --save_every_n_*: nothing would ever be removed
            (self.last_n_epochs is None or self.every_n_epochs is not None,
             f"--save_last_n_epochs {self.last_n_epochs} keeps the last files of --save_every_n_epochs, which is not "
             "given: add --save_every_n_epochs N or leave it out"),
            (self.last_n_steps is None or self.every_n_steps is not None,
             f"--save_last_n_steps {self.last_n_steps} keeps the files of the last N steps of --save_every_n_steps, "
             "which is not given: add --save_every_n_steps N or leave it out"),
            (self.precision is None or self.precision in SAVE_PRECISIONS, _precision_refusal(self.precision)),
        ]
        for ok, refusal in rules:
            if not ok:
                raise UserError(refusal)
        return self

    @property
    def final_name(self) -> str:
        return final_file_name(self.name)

    def file_after_step(self, step: int) -> str | None:
        """The file to write after optimizer step `step` (counted from 1), or None. kohya writes it at the run's
        last step too, beside the final file of the same weights."""
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            return step_file_name(self.name, step)
        return None

    def file_after_epoch(self, epoch: int, num_epochs: int) -> str | None:
        """The file to write after epoch `epoch` (counted from 1) of `num_epochs`, or None. The run's last epoch
        has none: the final file is written instead. kohya counts ceil(total steps / steps per epoch) epochs."""
        if self.every_n_epochs is not None and epoch % self.every_n_epochs == 0 and epoch < num_epochs:
            return epoch_file_name(self.name, epoch)
        return None

    def expired(self, saved_name: str) -> list[str]:
        """The files that go once `saved_name` is written (at most one, kohya's rule); none after the final file."""
        kind, number = self.numbered(saved_name) or (None, 0)
        if kind == "epoch" and self.last_n_epochs is not None:
            old = epoch_to_remove(number, self.every_n_epochs, self.last_n_epochs)
            return [] if old is None else [epoch_file_name(self.name, old)]
        if kind == "step" and self.last_n_steps is not None:
            old = step_to_remove(number, self.every_n_steps, self.last_n_steps)
            return [] if old is None else [step_file_name(self.name, old)]
        return []

    def remove_expired(self, folder: str | Path, saved_name: str) -> list[Path]:
        """Remove from `folder` the files that `saved_name` makes expire, where they exist; the removed paths."""
        removed = []
        for file_name in self.expired(saved_name):
            path = Path(folder) / file_name
            if path.is_file():
                path.unlink()
                removed.append(path)
        return removed

    def numbered(self, file_name: str) -> tuple[str, int] | None:
        """("epoch", 4) for NAME-000004.safetensors, ("step", 100) for NAME-step00000100.safetensors, None for
        any other name: only the exact spelling this schedule writes counts."""
        match = re.fullmatch(re.escape(self.name) + r"-(step)?(\d+)" + re.escape(SUFFIX), file_name)
        if match is None:
            return None
        kind, number = ("step" if match[1] else "epoch"), int(match[2])
        written = step_file_name(self.name, number) if kind == "step" else epoch_file_name(self.name, number)
        return (kind, number) if written == file_name and number >= 1 else None

    def saved_files(self, folder: str | Path) -> list[Path]:
        """The epoch and step files of this name in `folder`, epochs first, each kind in order of its number."""
        folder = Path(folder)
        if not folder.is_dir():
            return []
        found = [(self.numbered(path.name), path) for path in folder.iterdir() if path.is_file()]
        return [path for numbered, path in sorted((n, p) for n, p in found if n is not None)]

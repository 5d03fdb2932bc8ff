"""A training loop's progress: the bar with its loss read only every --logging_steps (each read waits for the device),
the stop of a diverged run in one line, and Ctrl-C taken at a step boundary.

`config` is train_lora.py's TrainConfig (common/ never imports a script).
"""

from __future__ import annotations

import math
import signal
import threading

from tqdm.auto import tqdm

from common.checkpointing import checkpoints
from common.cli import UserError


class CtrlC:
    """Ctrl-C (SIGINT) during the loop asks for a stop at the next step boundary, where the state is whole
    and can be saved: stopping mid-step would save half a step's random state under the last step's name.
    The handler that was there before comes back with the first Ctrl-C, so a second one stops at once.
    In a run of several processes, a request in any of them stops all at the same step: the processes share
    their requests every `every` steps (--logging_steps), not with a collective, and its wait, every step."""

    def __init__(self, accelerator, every: int = 1):
        self.accelerator, self.every, self.requested, self.previous = accelerator, every, False, None

    def __enter__(self) -> CtrlC:
        current = signal.getsignal(signal.SIGINT)
        # handlers can be set from the main thread only; an ignored SIGINT (a background job's) stays ignored
        if threading.current_thread() is threading.main_thread() and current not in (None, signal.SIG_IGN):
            self.previous = current
            signal.signal(signal.SIGINT, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True
        self._restore()

    def _restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def __exit__(self, *exc) -> None:
        self._restore()

    def pressed(self, step: int) -> bool:
        if self.accelerator.num_processes == 1:
            return self.requested
        if step % self.every:
            return False
        import torch

        flag = torch.tensor([float(self.requested)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="max").item())


class Progress:
    """A progress bar with loss, learning rate and, for Prodigy, the adapted step size d*lr.

    The loss stays on the device, summed, and is read once every `every` steps (--logging_steps) and at the end:
    reading it waits for the device to finish, so the steps in between queue their work without waiting. The mean
    over those steps is shown and logged at the step it was read."""

    def __init__(self, total: int, start: int, accelerator, every: int = 1, diverged=None):
        self.bar = tqdm(
            total=total, initial=start, desc="training", unit="step", disable=not accelerator.is_local_main_process
        )
        self.accelerator, self.every = accelerator, every
        self.loss_sum, self.summed, self.schedule = None, 0, None
        self.shown: dict = {}  # values kept on the bar between reads (the validation loss)
        self.last_values: dict = {}
        # diverged(step, mean loss or None, (step, mean loss) last finite or None) -> the error that stops the run
        self.diverged, self.last_finite = diverged, None

    def update(self, loss, optimizer, lr_scheduler, check_models: list | None = None) -> None:
        """Add a step's loss; read the mean every `every` steps, and with `check_models` (a checkpoint follows) read it
        now and check those models' trained weights finite too."""
        loss = loss.detach()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.summed += 1
        self.schedule = (optimizer, lr_scheduler)
        self.bar.update(1)
        if self.bar.n % self.every == 0 or self.bar.n == self.bar.total or check_models is not None:
            self.flush()
        if check_models is not None:
            self.check_finite(check_models, self.bar.n)

    def flush(self) -> None:
        """Read, show and log the mean loss of the steps since the last read (the one host synchronisation)."""
        if not self.summed:
            return
        optimizer, lr_scheduler = self.schedule
        group = optimizer.param_groups[0]
        values = {"loss": float(self.loss_sum) / self.summed, "lr": lr_scheduler.get_last_lr()[0]}
        if not math.isfinite(values["loss"]):  # read here anyway: the check costs no wait of its own
            self.loss_sum, self.summed = None, 0
            self.stop(values["loss"])
        self.last_finite = (self.bar.n, values["loss"])
        if "d" in group:
            values["d*lr"] = group["d"] * group["lr"]
        self.last_values = values
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in (values | self.shown).items()})
        self.accelerator.log(values, step=self.bar.n)
        self.loss_sum, self.summed = None, 0

    def validation(self, loss: float) -> None:
        """Show the held-out loss on the bar from now on, and log it as loss/validation (kohya's name)."""
        self.shown["val_loss"] = loss
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in (self.last_values | self.shown).items()})
        self.accelerator.log({"loss/validation": loss}, step=self.bar.n)

    def close(self) -> None:
        self.flush()
        self.bar.close()

    def check_finite(self, models: list, step: int) -> None:
        """Every trained weight is finite: one reduction on the device, read where the run waits anyway (before a
        checkpoint and the final save), so that neither ever holds a diverged adapter."""
        import torch

        parameters = [p for model in models for p in model.parameters() if p.requires_grad]
        if parameters and not bool(torch.stack([torch.isfinite(p).all() for p in parameters]).all()):
            self.stop(None, step)

    def stop(self, loss: float | None, step: int | None = None) -> None:
        self.bar.close()
        if self.diverged is None:
            raise UserError(f"training diverged at step {step or self.bar.n}")
        raise self.diverged(step or self.bar.n, loss, self.last_finite)


def divergence_error(config, step: int, loss: float | None, last_finite: tuple | None) -> UserError:
    """The one line a diverged run stops with: where, the last finite loss, the likely cause, and the last good
    checkpoint to resume at a lower rate (every checkpoint was checked finite before it was written)."""
    what = f"the mean loss up to step {step} is {loss}" if loss is not None else f"the trained weights are not finite at step {step}"
    last = f" (the last finite mean loss: {last_finite[1]:.4g} at step {last_finite[0]})" if last_finite else ""
    usual = {"adamw": 1e-4, "adafactor": 1e-4, "prodigy": 1.0}[config.optimizer]
    causes = [f"--{name} {rate:g} ({usual:g} is usual for {config.optimizer})"
              for name, rate in (("learning_rate", config.learning_rate), ("text_encoder_lr", config.text_encoder_lr))
              if rate > 100 * usual and (name == "learning_rate" or config.train_text_encoder or config.train_text_encoder_ti)]
    if config.mixed_precision == "fp16":
        causes.append("fp16 overflow (--mixed_precision bf16 has float32's range)")
    cause = " or ".join(causes) or "the learning rate, or an image with extreme values"
    kept = checkpoints(config.output_dir)
    resume = (f"{kept[-1].name} holds the last finite state: resume it at a lower rate with --resume_from_checkpoint latest"
              if kept else f"no checkpoint was written before it (every {config.checkpointing_steps} steps): start over at a lower rate")
    return UserError(f"training diverged: {what}{last}; likely cause: {cause}; {resume}; no LoRA file was written")

"""The held-out validation loss: the training loss on images no step trains on (a dataset's --validation_split), with
the same noise, timesteps (or EDM's sigmas) and latent draws for each image at every evaluation, so that the curve
measures the model and not the draw.

kohya's train_network.py (48d368f) validates the same way in spirit: a fixed seed per evaluation, the loss on
held-out images, logged as loss/validation. Here each image has its own seed (`image_seed`), so the value of one
image does not depend on how many others there are or in which order they come.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from common.progress import Progress
    from common.training_data import TrainingData


def image_seed(seed: int, index: int) -> int:
    """The seed of held-out image `index`'s draws, the same at every evaluation."""
    return int.from_bytes(hashlib.sha256(f"{seed}:validation:{index}".encode()).digest()[:8], "little")


@dataclass
class ValidationSchedule:
    """When the validation loss is computed: every N steps, every N epochs, or (neither given) after every epoch."""

    every_n_steps: int | None = None
    every_n_epochs: int | None = None

    def due_at_step(self, step: int) -> bool:
        return self.every_n_steps is not None and step % self.every_n_steps == 0

    def due_after_epoch(self, epoch: int) -> bool:
        """After epoch `epoch` (counted from 1)."""
        if self.every_n_steps is not None and self.every_n_epochs is None:
            return False
        return epoch % (self.every_n_epochs or 1) == 0


def validation_loss(loss_of_batch, items: list[dict], collate, seed: int, models: list) -> float:
    """The mean loss over held-out `items` (one image each, as its dataset gives it), each computed alone with its own
    generator state (`image_seed`): `loss_of_batch(batch)` draws its noise, timesteps and latents from torch's
    generators, which are set for each image and restored afterwards, so training continues on the draws it would
    have made. No gradient; `models` (the adapted UNet, text encoders) in eval mode meanwhile, so dropout is off."""
    was_training = [model.training for model in models]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    losses = []
    try:
        for model in models:
            model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for index, item in enumerate(items):
                torch.manual_seed(image_seed(seed, index))  # every device's generator too
                losses.append(float(loss_of_batch(collate([item]))))
    finally:
        for model, training in zip(models, was_training):
            model.train(training)
    return sum(losses) / len(losses)


@dataclass
class HeldOut:
    """train_lora.py's validation loss of the held-out images (`validation_loss`), when it is due; nothing without them."""

    data: TrainingData
    batch_loss: object  # train_lora.py's BatchLoss: (batch, class batch, step) -> the batch's loss
    models: list
    config: object  # train_lora.py's TrainConfig
    progress: Progress

    def __post_init__(self):
        self.schedule = ValidationSchedule(self.config.validate_every_n_steps, self.config.validate_every_n_epochs)

    def due_at_step(self, step: int) -> bool:
        return bool(self.data.held_out) and self.schedule.due_at_step(step)

    def due_after_epoch(self, epoch: int) -> bool:
        return bool(self.data.held_out) and self.schedule.due_after_epoch(epoch)

    def __call__(self, step: int) -> float | None:
        from common.data import collate

        if not self.data.held_out:
            return None
        loss = validation_loss(lambda batch: self.batch_loss(batch, None, step), self.data.held_out, collate,
                               self.config.seed, self.models)
        self.progress.validation(loss)
        return loss

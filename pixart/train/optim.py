"""Optimizers and learning-rate schedules for PixArt training.

PixArt's published recipe: CAME, lr 2e-5, betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16), no
weight decay, linear warm-up then a constant rate, the rate scaled by sqrt(global batch / 256).
AdamW is offered as the common alternative.

The schedule is a ``LearningRateSchedule`` cell evaluated inside the optimizer's graph from its
``global_step`` Parameter (the count of optimizer steps taken). That Parameter is optimizer state
and is checkpointed, so a resumed run continues the schedule where it stopped, and nothing on the
host changes between steps (no recompilation).
"""
import math

import mindspore as ms
from mindspore import nn, ops

from pixart.utils.errors import ConfigError

OPTIMIZERS = ("came", "adamw")
SCHEDULES = ("constant", "cosine")
AUTO_LR = ("none", "sqrt", "linear")


def scaled_learning_rate(lr, global_batch, rule="none", reference_batch=256):
    """The learning rate for a global batch: ``lr`` (none), × sqrt(B/256) (sqrt) or × B/256 (linear)."""
    if rule == "none":
        return float(lr)
    if rule == "sqrt":
        return float(lr) * math.sqrt(global_batch / reference_batch)
    if rule == "linear":
        return float(lr) * global_batch / reference_batch
    raise ConfigError(f"auto_lr must be one of {AUTO_LR}, got {rule!r}")


def lr_at(step, lr, warmup_steps=0, schedule="constant", total_steps=None, min_lr=0.0):
    """Host-side value of the schedule after ``step`` optimizer steps (for logs and tests).

    Warm-up is linear from lr/warmup to lr over ``warmup_steps`` (the first step already moves;
    diffusers' schedule spends it at lr 0), then constant, or cosine down to ``min_lr`` at
    ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant" or not total_steps or total_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupSchedule(nn.learning_rate_schedule.LearningRateSchedule):
    """``lr_at`` as a graph cell: global_step (int32 scalar Tensor) -> learning rate (fp32 scalar)."""

    def __init__(self, lr, warmup_steps=0, schedule="constant", total_steps=None, min_lr=0.0):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "cosine" and not total_steps:
            raise ConfigError("the cosine schedule needs the total number of steps")
        self.lr, self.min_lr = float(lr), float(min_lr)
        self.warmup_steps = int(warmup_steps)
        self.cosine = schedule == "cosine" and total_steps > warmup_steps
        self.decay_steps = float(max(1, (total_steps or 1) - self.warmup_steps))

    def construct(self, global_step):
        step = global_step.astype(ms.float32)
        lr = step * 0.0 + self.lr
        if self.cosine:
            progress = ops.clamp((step - self.warmup_steps) / self.decay_steps, 0.0, 1.0)
            lr = self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        if self.warmup_steps > 0:
            lr = lr * ops.clamp((step + 1.0) / self.warmup_steps, 0.0, 1.0)
        return lr.reshape(())


def build_optimizer(name, params, schedule, betas=None, eps=None, weight_decay=0.0, clip_threshold=1.0):
    """CAME (mindone) or AdamW over ``params`` with a learning-rate schedule cell.

    betas/eps default to the recipe's: CAME (0.9, 0.999, 0.9999) / (1e-30, 1e-16), AdamW
    (0.9, 0.999) / 1e-8. ``clip_threshold`` is CAME's update clipping d (1.0 as in CAME's paper).
    """
    params = list(params)
    if not params:
        raise ConfigError("nothing to train: the model has no trainable parameters")
    if name == "came":
        from mindone.trainers.came import CAME

        betas = tuple(betas or (0.9, 0.999, 0.9999))
        eps = tuple(eps or (1e-30, 1e-16))
        if len(betas) != 3 or len(eps) != 2:
            raise ConfigError(f"CAME takes 3 betas and 2 eps, got betas {list(betas)} and eps {list(eps)}")
        return CAME(params, learning_rate=schedule, betas=betas, eps=eps, weight_decay=weight_decay,
                    clip_threshold=clip_threshold)
    if name == "adamw":
        betas = tuple(betas or (0.9, 0.999))
        eps = tuple(eps or (1e-8,))
        if len(betas) != 2 or len(eps) != 1:
            raise ConfigError(f"AdamW takes 2 betas and 1 eps, got betas {list(betas)} and eps {list(eps)}")
        return nn.AdamWeightDecay(params, learning_rate=schedule, beta1=betas[0], beta2=betas[1], eps=eps[0],
                                  weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def optimizer_state(optimizer, exclude):
    """The optimizer's own Parameters (moments, global_step...) by name: {name: Parameter}.

    ``exclude``: the trained parameters (the optimizer holds them too; they are saved as the model).
    Names come from the optimizer's attribute paths, which only depend on the code and the
    parameter list, so a resumed run finds the same names.
    """
    skip = {id(p) for p in exclude}
    return {name: p for name, p in optimizer.parameters_and_names() if id(p) not in skip}

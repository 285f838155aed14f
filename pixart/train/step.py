"""The train step: diffusion loss, gradients, all-reduce, clipping, optimizer, EMA, loss scaling.

Three compiled graphs (``ms.jit``; each compiles once per input shape, i.e. once per aspect bucket):

    ForwardBackward   (latents, captions, noise, t, ...) -> loss terms and gradients
    GradAccumulator   grads -> adds them into fp32 buffers (only with gradient accumulation)
    OptimizerStep     grads -> all-reduce (data parallel), unscale, clip, CAME/AdamW, EMA

Everything random in a step (timesteps, noise, class dropout, the VAE posterior sample) comes from
``draw_step_noise(seed, step, micro_batch)`` on the host: a pure function of those integers, so a
resumed run, a different world size (micro_batch counts across ranks) or a repeated run sees the
same numbers, and no RNG state has to be checkpointed.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops

_add_into = ops.MultitypeFuncGraph("add_into")
_zero = ops.MultitypeFuncGraph("zero")
_mul = ops.MultitypeFuncGraph("mul")
_square_sum = ops.MultitypeFuncGraph("square_sum")


@_add_into.register("Tensor", "Tensor")
def _add_into_one(buffer, grad):
    return ops.assign_add(buffer, grad.astype(buffer.dtype))


@_zero.register("Tensor")
def _zero_one(buffer):
    return ops.assign(buffer, ops.zeros_like(buffer))


@_mul.register("Tensor", "Tensor")
def _mul_one(factor, grad):
    return grad * factor.astype(grad.dtype)


@_square_sum.register("Tensor")
def _square_sum_one(grad):
    return ops.sum(ops.square(grad.astype(ms.float32)))


# ----------------------------------------------------------------------------- randomness


def draw_step_noise(seed, step, micro_batch, batch_size, latent_shape, num_timesteps=1000, drop_prob=0.0):
    """The random inputs of one micro-batch, fixed by (seed, optimizer step, global micro-batch index).

    ``micro_batch`` = accumulation index × world_size + rank, so 2 ranks × 1 micro-batch and
    1 rank × 2 accumulated micro-batches draw the same numbers for the same data.

    Returns a dict of numpy arrays: t (B,) int32 uniform in [0, num_timesteps); drop_ids (B,) bool
    (caption replaced by the null caption, probability drop_prob); noise (B, *latent_shape) float32
    standard normal, the diffusion ε. (The VAE posterior's ε is ``pixart.data.features.latent_noise``.)
    """
    rng = np.random.default_rng([int(seed), int(step), int(micro_batch)])
    shape = (batch_size, *latent_shape)
    return {
        "t": rng.integers(0, num_timesteps, size=batch_size).astype(np.int32),
        "drop_ids": rng.random(batch_size) < drop_prob,
        "noise": rng.standard_normal(shape, dtype=np.float32),
    }


# ----------------------------------------------------------------------------- loss


class DiffusionLoss(nn.Cell):
    """IDDPM hybrid loss (ε MSE + variational bound for the learned σ), averaged over the batch.

    Args:
        net: the denoiser (possibly wrapped for mixed precision), called as
            ``net(x_t, t, y, mask, resolution, aspect_ratio, drop_ids)`` -> (N, 2C, H, W).
        diffusion: ``pixart.samplers.GaussianDiffusion`` on the 1000-step training schedule.
    """

    def __init__(self, net, diffusion):
        super().__init__()
        self.net = net
        self.diffusion = diffusion

    def construct(self, latents, y, mask, t, noise, drop_ids, resolution, aspect_ratio, loss_scale, control=None):
        """latents/noise (N, C, H, W) fp32, y (N, L, E), mask (N, L), t (N,) int32, drop_ids (N,) bool,
        resolution (N, 2), aspect_ratio (N, 1) (used by PixArt-α micro-conditions only), loss_scale (),
        control (N, C, H, W) ControlNet hint latents (the net is then a ``ControlPixArt``) or None.

        Returns (loss · loss_scale, loss, mse, vb): scalars; only the first is differentiated.
        """
        x_t = self.diffusion.q_sample(latents, t, noise)
        if control is None:
            out = self.net(x_t, t, y, mask, resolution, aspect_ratio, drop_ids)
        else:
            out = self.net(x_t, t, y, mask, resolution, aspect_ratio, drop_ids, control)
        terms = self.diffusion.training_losses(out, latents, x_t, t, noise)
        loss = terms["loss"].mean()
        return loss * loss_scale, loss, terms["mse"].mean(), terms["vb"].mean()


class LossScaler(nn.Cell):
    """Loss scale for fp16: doubled after ``window`` finite steps, halved (and the step skipped) on
    inf/NaN gradients. ``dynamic=False`` keeps it at 1 (fp32 and bf16 need no scaling).

    State (checkpointed): ``scale`` (fp32) and ``good_steps`` (int32).
    """

    def __init__(self, dynamic=False, init_scale=65536.0, window=1000):
        super().__init__()
        self.dynamic = dynamic
        self.window = int(window)
        self.scale = ms.Parameter(ms.Tensor(float(init_scale) if dynamic else 1.0, ms.float32), name="loss_scale",
                                  requires_grad=False)
        self.good_steps = ms.Parameter(ms.Tensor(0, ms.int32), name="good_steps", requires_grad=False)

    def update(self, finite):
        """Graph-side update after a step; ``finite`` is a bool scalar Tensor."""
        good = ops.select(finite, self.good_steps + 1, ops.zeros_like(self.good_steps))
        grow = good >= self.window
        scale = ops.select(finite, ops.select(grow, self.scale * 2.0, self.scale),
                           ops.maximum(self.scale * 0.5, ops.ones_like(self.scale)))
        good = ops.select(grow, ops.zeros_like(good), good)
        ops.assign(self.good_steps, good)
        return ops.assign(self.scale, scale)

    def state_dict(self):
        return {"train.loss_scale": self.scale, "train.good_steps": self.good_steps}


# ----------------------------------------------------------------------------- graphs


class ForwardBackward(nn.Cell):
    """(batch) -> (loss, mse, vb, grads): gradients of loss · loss_scale w.r.t. ``weights``."""

    def __init__(self, loss_fn, weights, scaler):
        super().__init__()
        self.loss_fn = loss_fn
        self.weights = ms.ParameterTuple(weights)
        self.scaler = scaler
        self.grad_fn = ops.value_and_grad(loss_fn, grad_position=None, weights=self.weights, has_aux=True)

    @ms.jit
    def construct(self, latents, y, mask, t, noise, drop_ids, resolution, aspect_ratio, control=None):
        (_, loss, mse, vb), grads = self.grad_fn(latents, y, mask, t, noise, drop_ids, resolution, aspect_ratio,
                                                 self.scaler.scale, control)
        return loss, mse, vb, grads


class GradAccumulator(nn.Cell):
    """fp32 buffers summing the gradients of the micro-batches of one optimizer step."""

    def __init__(self, weights):
        super().__init__()
        self.buffers = ms.ParameterTuple([
            ms.Parameter(ops.zeros(p.shape, ms.float32), name=f"grad_accum_{i}", requires_grad=False)
            for i, p in enumerate(weights)])
        self.hyper_map = ops.HyperMap()

    @ms.jit
    def construct(self, grads):
        return self.hyper_map(_add_into, self.buffers, grads)

    @ms.jit
    def reset(self):
        return self.hyper_map(_zero, self.buffers)


class OptimizerStep(nn.Cell):
    """grads -> all-reduce mean over ranks, divide by loss scale × micro-batches, clip the global
    norm, optimizer update, EMA update, loss-scale update. Returns (grad norm, finite, loss scale).

    With a dynamic loss scale a step whose gradients are not finite is skipped (weights, optimizer
    state and EMA untouched). ``clip_norm`` <= 0 disables clipping. Clipping is torch's
    ``clip_grad_norm_``: grads × min(1, clip / (norm + 1e-6)).
    """

    def __init__(self, optimizer, scaler, ema=None, clip_norm=0.01, accum_steps=1, grad_reducer=None):
        super().__init__()
        self.optimizer = optimizer
        self.scaler = scaler
        self.ema = ema
        self.clip_norm = float(clip_norm)
        self.accum_steps = int(accum_steps)
        self.grad_reducer = grad_reducer
        self.hyper_map = ops.HyperMap()

    def _update(self, grads):
        done = self.optimizer(grads)
        if self.ema is not None:
            done = ops.depend(self.ema(), done)
        return done

    @ms.jit
    def construct(self, grads):
        if self.grad_reducer is not None:
            grads = self.grad_reducer(grads)
        # Unscaling and clipping are one multiplication of the gradients (one extra copy of them in
        # memory, not two): the norm of grads / (scale · accum) is the raw norm times that factor.
        factor = 1.0 / (self.scaler.scale * self.accum_steps)
        norm = ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads))) * factor
        if self.clip_norm > 0:
            factor = factor * ops.minimum(self.clip_norm / (norm + 1e-6), ops.ones_like(norm))
        grads = self.hyper_map(ops.partial(_mul, factor), grads)
        finite = ops.isfinite(norm)
        scale = self.scaler.scale
        if self.scaler.dynamic:
            if finite:
                norm = ops.depend(norm, self._update(grads))
            scale = self.scaler.update(finite)
        else:
            norm = ops.depend(norm, self._update(grads))
        return norm, finite, scale


# ----------------------------------------------------------------------------- the driver


class TrainStep:
    """The graphs of one optimizer step and how they are driven (used by the trainer and benchmarks).

        step = TrainStep(net, trained, WarmupSchedule(2e-5, 1000), accum_steps=2)
        for inputs in micro_batches:             # accum_steps of them
            loss, mse, vb = step.micro_batch(inputs)
        grad_norm, finite = step.apply()

    Args:
        net: the denoiser as called in the loss (the model, or its mixed-precision wrapper).
        trained: [(name, Parameter)] to optimize; EMA is kept of these.
        lr_schedule: a LearningRateSchedule cell (``pixart.train.optim.WarmupSchedule``).
        optim, betas, eps, weight_decay: see ``pixart.train.optim.build_optimizer``.
        ema_rate: EMA decay, or None for no EMA.
        dtype: compute dtype name; "fp16" turns on the dynamic loss scale (init_loss_scale, scale_window).
        clip_norm: global-norm gradient clipping (<= 0: off).
        world_size: > 1 all-reduces the gradients (mean) over the data-parallel ranks.
    """

    def __init__(self, net, trained, lr_schedule, optim="came", betas=None, eps=None, weight_decay=0.0, ema_rate=None,
                 dtype="fp32", clip_norm=0.01, accum_steps=1, world_size=1, init_loss_scale=65536.0,
                 scale_window=1000):
        from pixart.samplers import IDDPMSampler
        from pixart.train.ema import EMA
        from pixart.train.optim import build_optimizer, optimizer_state

        weights = [p for _, p in trained]
        self.optimizer = build_optimizer(optim, weights, lr_schedule, betas=betas, eps=eps, weight_decay=weight_decay)
        self.optimizer_params = optimizer_state(self.optimizer, exclude=weights)
        self.ema = EMA(trained, ema_rate) if ema_rate is not None else None
        self.scaler = LossScaler(dynamic=dtype == "fp16", init_scale=init_loss_scale, window=scale_window)
        self.diffusion = IDDPMSampler().diffusion  # 1000 linear-β steps (1e-4 … 0.02)
        self.forward_backward = ForwardBackward(DiffusionLoss(net, self.diffusion), weights, self.scaler)
        self.accumulator = GradAccumulator(weights) if accum_steps > 1 else None
        reducer = nn.DistributedGradReducer(ms.ParameterTuple(weights), mean=True, degree=world_size) \
            if world_size > 1 else None
        self.optimizer_step = OptimizerStep(self.optimizer, self.scaler, self.ema, clip_norm=clip_norm,
                                            accum_steps=accum_steps, grad_reducer=reducer)
        self._grads = None

    def micro_batch(self, inputs):
        """Forward and backward of one micro-batch (``DiffusionLoss`` inputs); -> (loss, mse, vb) Tensors."""
        loss, mse, vb, grads = self.forward_backward(*inputs)
        # A plain tuple input is a compile-time constant to ms.jit (one recompilation per step);
        # mutable makes it a variable of the one compiled graph.
        grads = ms.mutable(grads)
        if self.accumulator is not None:
            self.accumulator(grads)
        else:
            self._grads = grads
        return loss, mse, vb

    def apply(self):
        """The optimizer step over the micro-batches since the last one; -> (grad norm, finite) Tensors."""
        if self.accumulator is not None:
            norm, finite, _ = self.optimizer_step(ms.mutable(tuple(self.accumulator.buffers)))
            self.accumulator.reset()
        else:
            norm, finite, _ = self.optimizer_step(self._grads)
            self._grads = None
        return norm, finite

    def optimizer_steps_done(self):
        """Updates applied so far (skipped fp16 steps excluded): the schedule's position."""
        return int(self.optimizer.global_step.asnumpy().reshape(-1)[0])

    def state_tensors(self):
        """{name: Parameter} of the EMA, the optimizer and the loss scale, for checkpoints."""
        tensors = dict(self.ema.state_dict()) if self.ema is not None else {}
        tensors.update({"optimizer." + name: p for name, p in self.optimizer_params.items()})
        tensors.update(self.scaler.state_dict())
        return tensors

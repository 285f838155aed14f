"""Exponential moving average of the trained weights.

    ema ← decay · ema + (1 − decay) · weight          after every optimizer step

The averages are fp32 Parameters updated inside the optimizer-step graph (no host work). They are
saved in checkpoints, swapped into the model for validation images, and exported at the end.
"""
from contextlib import contextmanager

import mindspore as ms
from mindspore import nn, ops

_ema_update = ops.MultitypeFuncGraph("ema_update")


@_ema_update.register("Number", "Tensor", "Tensor")
def _update_one(decay, average, weight):
    return ops.assign(average, average * decay + weight.astype(ms.float32) * (1.0 - decay))


class EMA(nn.Cell):
    """Moving averages of ``named_params`` ([(name, Parameter)], e.g. the trainable ones).

    ``construct()`` performs one update (call it inside the train graph after the optimizer);
    ``state_dict()`` gives ``{"ema.<name>": Parameter}`` (checkpointed and restored with the rest);
    ``swapped_in()`` temporarily puts the averages into the model (for validation or export) and
    restores the weights exactly.
    """

    prefix = "ema."

    def __init__(self, named_params, decay=0.9999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.names = [name for name, _ in named_params]
        self.weights = ms.ParameterTuple([p for _, p in named_params])
        # Start from the current weights (as the original PixArt code does), always in fp32.
        self.averages = ms.ParameterTuple([
            ms.Parameter(ms.Tensor(p.astype(ms.float32).asnumpy()), name=f"ema_{i}", requires_grad=False)
            for i, (_, p) in enumerate(named_params)])
        self.hyper_map = ops.HyperMap()

    def construct(self):
        return self.hyper_map(ops.partial(_ema_update, self.decay), self.averages, self.weights)

    def state_dict(self):
        return {self.prefix + name: p for name, p in zip(self.names, self.averages)}

    @contextmanager
    def swapped_in(self):
        """Inside the block the model's weights are the averages (cast to each weight's dtype)."""
        # In-place writes (assign), not set_data: the compiled train graphs keep using the same
        # device buffers, and the copies restore the weights bit for bit.
        saved = [p.astype(ms.float32) if p.dtype == ms.bfloat16 else ms.Tensor(p.asnumpy().copy())
                 for p in self.weights]
        try:
            for weight, average in zip(self.weights, self.averages):
                ops.assign(weight, average.astype(weight.dtype))
            yield
        finally:
            for weight, value in zip(self.weights, saved):
                ops.assign(weight, value.astype(weight.dtype))

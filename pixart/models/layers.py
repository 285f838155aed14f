"""Small pieces shared by the models, written for speed and accuracy on every MindSpore backend."""
import math

from mindspore import nn, ops

_GELU_SCALE = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh(x):
    """tanh-approximated GELU, 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))), as x·sigmoid(2·√(2/π)(…)).

    The same function, rewritten because MindSpore's CPU GeLU kernel is ~5× slower than this
    form and its CPU tanh is accurate only to ~1e-4.
    """
    return x * ops.sigmoid(_GELU_SCALE * (x + 0.044715 * x * x * x))


def set_child(parent, name, child):
    """Put ``child`` in ``parent`` under ``name`` (an index for CellList / SequentialCell)."""
    if isinstance(parent, (nn.CellList, nn.SequentialCell)):
        parent[int(name)] = child
    else:
        setattr(parent, name, child)


def sync_parameter_names(model):
    """Give every Parameter its full path as ``.name``, after ``set_child`` swaps.

    MindSpore names a Parameter relative to the cell it was assigned into, so a swapped-in layer's
    parameters would be called ``qkv.weight``/``lora_A`` in every block: checkpoints and optimizers
    (which need unique names) use ``.name``, so restore the full paths.
    """
    for name, param in model.parameters_and_names():
        if param.name != name:
            param.name = name

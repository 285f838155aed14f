"""Small pieces shared by the models, written for speed and accuracy on every MindSpore backend."""
import hashlib
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


_CELL_ATTRIBUTES = frozenset(vars(nn.Cell()))  # what every Cell carries: bookkeeping, not structure
_PLAIN = (bool, int, float, str, type(None))


def _setting(value):
    """A cell attribute as text for ``structure_key``: plain values and primitives in full."""
    if isinstance(value, _PLAIN) or (isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value)):
        return repr(value)
    if isinstance(value, ops.Primitive):
        return f"{type(value).__name__}{sorted((k, repr(v)) for k, v in value.attrs.items())}"
    return type(value).__qualname__


def structure_key(cell):
    """A digest of what ``cell`` computes from its parameters: every sub-cell's path, class, mode
    and own settings (plain attributes, primitives), every parameter's name, shape, dtype and
    trainability. Cells with equal keys differ only in their parameters' values."""
    parts = []
    for path, sub in cell.cells_and_names():
        settings = sorted((name, _setting(value)) for name, value in vars(sub).items()
                          if name not in _CELL_ATTRIBUTES and name not in ("_cell_init_args", "no_inline")
                          and not isinstance(value, nn.Cell))
        params = sorted((name, tuple(p.shape), str(p.dtype), p.requires_grad)
                        for name, p in sub._params.items() if p is not None)
        parts.append((path, f"{type(sub).__module__}.{type(sub).__qualname__}", sub.training, settings, params))
    return hashlib.sha1(repr(parts).encode()).hexdigest()


def share_compiled_graph(cells):
    """Let graph mode compile the ``construct`` of structurally equal ``cells`` once.

    This is MindSpore's ``lazy_inline(policy="front")`` applied to instances: cells whose
    ``cell_init_args`` match are parsed and type-inferred once, with their parameters as inputs,
    then inlined before the backend (the CPU backend cannot run the un-inlined form). MindSpore
    matches by that string alone (cells of different structure under one string fail to compile),
    so it is ``structure_key``, to be set again after any layer swap (LoRA, kernels): call this
    right before the graph compiles. Results are bitwise those of separately compiled cells.
    """
    for cell in cells:
        key = f"lazy_inline_{type(cell).__name__}_{structure_key(cell)}"
        # only when it changes: setting a Cell attribute, even to its value, makes the next graph-mode
        # call compile again (every pipeline call paid a 256² step's compile, ~4 s, before this)
        if getattr(cell, "cell_init_args", None) != key or getattr(cell, "no_inline", None) is not False:
            cell.cell_init_args = key
            cell.no_inline = False

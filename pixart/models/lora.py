"""LoRA adapters for the PixArt DiT: train low-rank updates of chosen Dense layers, save only them.

A LoRA-adapted Dense computes

    y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ,      A (r, in), B (out, r), s = alpha / r,

with W and b frozen. B starts at zero, so an adapted model is exactly the base model until the
first optimizer step. Merging folds the update into the base weight, W ← W + s · B A, so a
sampling model runs at full speed with no adapter code at all.

Flow:

    model = pixart.models.pixart_weights.from_pretrained(path)
    params = inject_lora(model, rank=16)               # every other parameter is frozen
    optimizer = nn.AdamWeightDecay(params, ...)          # ... train ...
    save_lora(model, "lora.safetensors")               # adapters + rank/alpha/targets only

    model = from_pretrained(path)                      # later, e.g. in sample.py --lora
    merge_lora(model, "lora.safetensors")

Names: an adapted layer keeps its base parameters under their original names
(``blocks.3.attn.qkv.weight`` / ``.bias``) and adds ``blocks.3.attn.qkv.lora_A`` / ``.lora_B``,
so full checkpoints of an adapted model still load by name into an adapted model, and the base
weights load with ``strict=False``.
"""
import json
import math
import os
from collections import OrderedDict

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from pixart.utils.checkpoint import (read_safetensors_metadata, load_into_cell, read_state_dict, save_ckpt,
                                     save_safetensors, to_tensor)
from pixart.utils.errors import CheckpointError, ConfigError

# The attention projections, as in most DiT LoRA recipes; the MLPs (mlp.fc1, mlp.fc2) can be added.
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj")
LORA_SUFFIXES = (".lora_A", ".lora_B")
FORMAT = "pixart-lora"
FORMAT_VERSION = 1
_CONFIG_KEY = "lora_config"  # safetensors __metadata__ entry / .ckpt string entry holding the JSON config


# ----------------------------------------------------------------------------- the adapted layer


class LoRADense(nn.Cell):
    """An ``nn.Dense`` plus a trainable low-rank update; the base weight and bias are shared, not copied.

    Args:
        base: the ``nn.Dense`` to adapt (its ``weight`` (out, in) and ``bias`` (out,) Parameters
            are taken over, so their names and values stay those of the base model).
        rank: r, the inner dimension of the update.
        alpha: the update is scaled by alpha / r (so changing r keeps the learning-rate scale).
        dropout: dropout on the adapter's input (training only).
        lora_a: initial A, (r, in) float32 array. B starts at zero.

    The adapter parameters are float32 whatever the base dtype: they are what the optimizer updates,
    and their tiny updates would round away in half precision. They are cast to the input's dtype
    for the forward pass.
    """

    def __init__(self, base, rank, alpha, dropout, lora_a):
        super().__init__()
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.weight = base.weight
        self.has_bias = base.has_bias
        self.bias = base.bias
        self.activation = base.activation
        self.activation_flag = base.activation_flag
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.BiasAdd()
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        self.lora_A = ms.Parameter(ms.Tensor(np.asarray(lora_a, np.float32)), name="lora_A")
        self.lora_B = ms.Parameter(ms.Tensor(np.zeros((self.out_channels, self.rank), np.float32)), name="lora_B")
        self.use_dropout = dropout > 0
        self.dropout = nn.Dropout(p=dropout) if self.use_dropout else nn.Identity()

    def construct(self, x):
        """x (..., in) -> (..., out)."""
        x_shape = x.shape
        if len(x_shape) != 2:
            x = x.reshape(-1, x_shape[-1])
        # The base path is nn.Dense's own arithmetic, so with B = 0 the output is bitwise the base one.
        y = self.matmul(x, self.weight)
        if self.has_bias:
            y = self.bias_add(y, self.bias)
        # The adapter computes in the input's dtype: under auto_mixed_precision (O2) that is the half
        # dtype the base matmul also uses; the float32 adapter weights are cast, their gradients not.
        h = self.dropout(x)
        lora_a, lora_b = self.lora_A.astype(h.dtype), self.lora_B.astype(h.dtype)
        # Scale the (M, r) intermediate rather than the (M, out) result: r is the small side.
        delta = self.matmul(self.matmul(h, lora_a) * self.scaling, lora_b)
        y = y + delta.astype(y.dtype)
        if self.activation_flag:
            y = self.activation(y)
        if len(x_shape) != 2:
            y = y.reshape(x_shape[:-1] + (y.shape[-1],))
        return y


# ----------------------------------------------------------------------------- injection


def _matches(name, targets):
    """True if the dotted cell name ends with one of the targets on a component boundary
    ("attn.proj" matches "blocks.3.attn.proj", not "blocks.3.cross_attn.proj")."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _normalise_targets(target_modules):
    if isinstance(target_modules, str):
        target_modules = [t for t in target_modules.replace(",", " ").split() if t]
    targets = tuple(str(t).strip(".") for t in target_modules or ())
    if not targets or not all(targets):
        raise ConfigError(f"LoRA target modules must be a non-empty list of layer names, got {target_modules!r}")
    return targets


def _dense_patterns(model):
    """The model's Dense layer names with block indices generalised ('blocks.*.attn.qkv'), for messages."""
    seen = []
    for name, cell in model.cells_and_names():
        if isinstance(cell, (nn.Dense, LoRADense)):
            parts = name.split(".")
            pattern = ".".join("*" if p.isdigit() and i > 0 and parts[i - 1] == "blocks" else p
                               for i, p in enumerate(parts))
            if pattern not in seen:
                seen.append(pattern)
    return seen


def _set_child(parent, attr, cell):
    if isinstance(parent, (nn.CellList, nn.SequentialCell)):
        parent[int(attr)] = cell
    else:
        setattr(parent, attr, cell)


def _sync_parameter_names(model):
    """Give every Parameter its full path as ``.name``.

    MindSpore names a Parameter relative to the cell it was assigned into, so after swapping in a
    LoRADense its parameters would be called ``qkv.weight``/``lora_A``: checkpoints and optimizers
    (which need unique names) use ``.name``, so restore the full paths.
    """
    for name, param in model.parameters_and_names():
        if param.name != name:
            param.name = name


def inject_lora(model, rank, alpha=None, target_modules=DEFAULT_TARGETS, dropout=0.0, init="kaiming", seed=0):
    """Replace the targeted ``nn.Dense`` layers of ``model`` by ``LoRADense`` and freeze everything else.

    Args:
        model: a PixArt/PixArtMS (any ``nn.Cell``).
        rank: r ≥ 1.
        alpha: scale numerator (default: rank, i.e. scale 1).
        target_modules: layer-name suffixes on dotted boundaries (e.g. "attn.qkv", "mlp.fc1"), as a
            list or a comma-separated string. Every target must match at least one Dense layer.
        dropout: dropout probability on the adapter input, in [0, 1).
        init: "kaiming" (A ~ kaiming-uniform(a=√5), i.e. U(±1/√in), as PEFT) or "gaussian"
            (A ~ N(0, 1/r)). B is always zero, so the model output is unchanged at injection.
        seed: seeds A's initialisation (numpy), so runs are reproducible.

    Returns the trainable parameters: exactly the adapters' lora_A and lora_B (every other
    parameter gets ``requires_grad = False``). The config is kept as ``model.lora_config``.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if init not in ("kaiming", "gaussian"):
        raise ConfigError(f"LoRA init must be 'kaiming' or 'gaussian', got {init!r}")
    targets = _normalise_targets(target_modules)

    cells = OrderedDict(model.cells_and_names())
    if any(isinstance(cell, LoRADense) for cell in cells.values()):
        raise ConfigError("the model already has LoRA adapters; inject them once")
    chosen = [name for name, cell in cells.items() if isinstance(cell, nn.Dense) and _matches(name, targets)]
    unmatched = [t for t in targets if not any(_matches(name, (t,)) for name in chosen)]
    if unmatched:
        raise ConfigError(f"LoRA target module(s) {', '.join(unmatched)} match no Dense layer of the model; "
                          f"its Dense layers are: {', '.join(_dense_patterns(model))}")

    rng = np.random.default_rng(seed)
    for name in chosen:
        base = cells[name]
        if init == "kaiming":
            bound = 1.0 / math.sqrt(base.in_channels)
            lora_a = rng.uniform(-bound, bound, size=(rank, base.in_channels))
        else:
            lora_a = rng.normal(0.0, 1.0 / rank, size=(rank, base.in_channels))
        parent_name, _, attr = name.rpartition(".")
        _set_child(cells[parent_name], attr, LoRADense(base, rank, alpha, float(dropout), lora_a))
    _sync_parameter_names(model)

    trainable = []
    for name, param in model.parameters_and_names():
        is_lora = name.endswith(LORA_SUFFIXES)
        param.requires_grad = is_lora
        if is_lora:
            trainable.append(param)
    model.lora_config = {"rank": int(rank), "alpha": alpha, "target_modules": list(targets),
                         "dropout": float(dropout)}
    return trainable


def lora_modules(model):
    """{dotted name: LoRADense} of an adapted model, in model order."""
    return OrderedDict((name, cell) for name, cell in model.cells_and_names() if isinstance(cell, LoRADense))


# ----------------------------------------------------------------------------- saving and loading


def lora_state_dict(model):
    """Only the adapters: {"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)} float32 numpy."""
    state = OrderedDict()
    for name, param in model.parameters_and_names():
        if name.endswith(LORA_SUFFIXES):
            state[name] = param.astype(ms.float32).asnumpy()
    if not state:
        raise ConfigError("the model has no LoRA adapters (call inject_lora first)")
    return state


def save_lora(model, path, metadata=None):
    """Write the adapters and their config (rank, alpha, target modules, dropout) to ``path``, atomically.

    ``.safetensors`` keeps the config as JSON in the header's ``__metadata__``; ``.ckpt`` as a string
    entry. ``metadata`` (JSON-serialisable, e.g. {"base_model": ..., "step": ...}) is stored with it.
    Returns the config written.
    """
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **getattr(model, "lora_config", {})}
    if "rank" not in config:
        raise ConfigError("the model has no LoRA adapters (call inject_lora first)")
    if metadata:
        config["metadata"] = dict(metadata)
    state = lora_state_dict(model)
    text = json.dumps(config)
    suffix = os.path.splitext(os.fspath(path))[1]
    if suffix == ".safetensors":
        save_safetensors(state, path, metadata={_CONFIG_KEY: text})
    elif suffix == ".ckpt":
        save_ckpt(state, path, extra={_CONFIG_KEY: text})
    else:
        raise ConfigError(f"LoRA file {path} must end in .safetensors or .ckpt")
    return config


def load_lora(path):
    """Read a LoRA file written by ``save_lora`` -> (state, config).

    state: {"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)} numpy; config: dict with rank,
    alpha, target_modules, dropout (and metadata). A file that is not a complete PixArt LoRA
    (missing config, stray tensors, A without B, wrong rank) is a CheckpointError.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"LoRA file {path} does not exist")
    state = read_state_dict(path)
    raw_config = state.pop(_CONFIG_KEY, None)
    if path.endswith(".safetensors"):
        raw_config = read_safetensors_metadata(path).get(_CONFIG_KEY)
    if raw_config is None:
        raise CheckpointError(f"{path} has no LoRA config ({_CONFIG_KEY}); it was not written by save_lora")
    try:
        config = json.loads(str(raw_config))
    except ValueError:
        raise CheckpointError(f"{path}: unreadable LoRA config") from None
    if config.get("format") != FORMAT or not isinstance(config.get("rank"), int):
        raise CheckpointError(f"{path} is not a PixArt LoRA file (format {config.get('format')!r})")
    _check_lora_state(state, config["rank"], path)
    return state, config


def _check_lora_state(state, rank, source):
    stray = [k for k in state if not k.endswith(LORA_SUFFIXES)]
    if stray:
        raise CheckpointError(f"{source} holds non-LoRA tensors: {', '.join(stray[:4])}")
    for module in _modules_of(state):
        a, b = state.get(module + ".lora_A"), state.get(module + ".lora_B")
        if a is None or b is None:
            raise CheckpointError(f"{source}: {module} has only one of lora_A / lora_B")
        if np.ndim(a) != 2 or np.ndim(b) != 2 or np.shape(a)[0] != rank or np.shape(b)[1] != rank:
            raise CheckpointError(f"{source}: {module} has lora_A {tuple(np.shape(a))} and lora_B "
                                  f"{tuple(np.shape(b))}, not rank {rank}")
    if not state:
        raise CheckpointError(f"{source} holds no LoRA tensors")


def _modules_of(state):
    return list(OrderedDict.fromkeys(k.rsplit(".", 1)[0] for k in state))


def _resolve(source, config):
    """(state, config) from a path, a (state, config) pair from load_lora, or a state dict + config."""
    if isinstance(source, (str, os.PathLike)):
        return load_lora(source)
    if isinstance(source, tuple) and len(source) == 2:
        source, config = source
    if not (isinstance(config, dict) and "rank" in config and "alpha" in config):
        raise ConfigError("a LoRA state dict needs its config with rank and alpha: pass config= or a path")
    state = OrderedDict((k, np.asarray(v.asnumpy() if isinstance(v, ms.Tensor) else v)) for k, v in source.items())
    _check_lora_state(state, config["rank"], "LoRA state")
    return state, config


def load_lora_into(model, source, config=None):
    """Copy saved adapters into a model that already has matching ones (resuming LoRA training).

    ``source``: a path, a (state, config) pair, or a state dict with ``config``. Rank, alpha and the
    set of adapted layers must all match the model's, else a CheckpointError says what differs.
    """
    state, config = _resolve(source, config)
    mine = getattr(model, "lora_config", None)
    if mine is None:
        raise ConfigError("the model has no LoRA adapters (call inject_lora with the file's config first)")
    if (mine["rank"], float(mine["alpha"])) != (config["rank"], float(config["alpha"])):
        raise CheckpointError(f"LoRA rank/alpha {config['rank']}/{config['alpha']} do not match the model's "
                              f"{mine['rank']}/{mine['alpha']}")
    adapters = OrderedDict((n, p) for n, p in model.parameters_and_names() if n.endswith(LORA_SUFFIXES))
    missing = [k for k in adapters if k not in state]
    unexpected = [k for k in state if k not in adapters]
    if missing or unexpected:
        raise CheckpointError(f"LoRA adapters do not match the model's: {len(missing)} missing "
                              f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    load_into_cell(model, state, source="LoRA state", strict=False)


# ----------------------------------------------------------------------------- merging


def merge_lora(model, source, config=None, strength=1.0):
    """Fold saved adapters into a plain (adapter-free) model: W ← W + strength · (alpha / r) · B A.

    Args:
        model: the base model, e.g. freshly loaded with ``from_pretrained`` (no LoRADense layers).
        source: a LoRA file path, a (state, config) pair from ``load_lora``, or a state dict with
            ``config`` (needs "rank" and "alpha").
        strength: multiplier of the update (1 = as trained; 0.5 = half the effect).

    The update is computed in float32 and cast to each weight's dtype. Every adapted layer must
    exist in the model with a matching shape, else a CheckpointError lists the mismatches and
    nothing is changed. Returns the names of the merged layers.
    """
    state, config = _resolve(source, config)
    if lora_modules(model):
        raise ConfigError("merge_lora merges into a model without adapters; this one has LoRA layers "
                          "(load the base model afresh)")
    scale = float(strength) * float(config["alpha"]) / int(config["rank"])
    params = OrderedDict(model.parameters_and_names())
    problems, updates = [], []
    for module in _modules_of(state):
        a, b = np.asarray(state[module + ".lora_A"], np.float32), np.asarray(state[module + ".lora_B"], np.float32)
        weight = params.get(module + ".weight")
        if weight is None:
            problems.append(f"{module} is not a layer of the model")
        elif tuple(weight.shape) != (b.shape[0], a.shape[1]):
            problems.append(f"{module}.weight is {tuple(weight.shape)}, the LoRA update is {(b.shape[0], a.shape[1])}")
        else:
            updates.append((weight, a, b))
    if problems:
        shown = "; ".join(problems[:4]) + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else "")
        raise CheckpointError(f"LoRA (targets {', '.join(config.get('target_modules', []))}) does not fit the "
                              f"model: {shown}")
    for weight, a, b in updates:  # checked first, so a bad file changes nothing
        merged = weight.astype(ms.float32).asnumpy() + scale * (b @ a)
        weight.set_data(to_tensor(merged.astype(np.float32), weight.dtype))
    return _modules_of(state)


def unmerge_lora(model, source, config=None, strength=1.0):
    """Undo ``merge_lora`` with the same arguments (up to float rounding)."""
    return merge_lora(model, source, config=config, strength=-float(strength))

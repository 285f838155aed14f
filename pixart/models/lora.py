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
import logging
import math
import os
import re
from collections import OrderedDict

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from pixart.models.layers import set_child, sync_parameter_names
from pixart.utils.checkpoint import (find_weight_files, read_safetensors_metadata, load_into_cell, read_state_dict, save_ckpt,
                                     save_safetensors, to_tensor)
from pixart.utils.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

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
        set_child(cells[parent_name], attr, LoRADense(base, rank, alpha, float(dropout), lora_a))
    sync_parameter_names(model)

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
    """Read LoRA adapters in any of the layouts people share -> (state, config).

    Layouts (detected from the keys):
    - this project's (``save_lora``): ``blocks.3.attn.qkv.lora_A`` + a ``lora_config`` entry;
    - peft / diffusers: ``[transformer.|base_model.model.]transformer_blocks.3.attn1.to_q.lora_A.weight``
      (a file, or a peft ``save_pretrained`` folder); ``lora_alpha`` (and ``rank_pattern``,
      ``alpha_pattern``, ``use_rslora``) from ``adapter_config.json`` beside the weights or the
      safetensors ``lora_adapter_metadata``; without either, alpha = rank (scale 1), as diffusers;
    - kohya / OneTrainer: ``lora_transformer_transformer_blocks_3_attn1_to_q.lora_down.weight``,
      ``.lora_up.weight`` and ``.alpha`` (default: the rank).
    Foreign adapters are mapped onto the original layer names (q/k/v adapters become one adapter
    of the fused ``attn.qkv``, exactly) with each layer's alpha / r folded into its lora_B; their
    config has ``rank`` None and ``converted_from`` "peft" or "kohya". Text-encoder adapters in the
    same file are skipped with a warning (this loader adapts the DiT).

    state: {"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)} numpy; config: dict with rank,
    alpha, target_modules, dropout (and metadata). An incomplete or unknown file is a CheckpointError
    (one line, listing a few of its keys).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"LoRA file {path} does not exist")
    files = find_weight_files(path)
    state = read_state_dict(path)
    metadata = read_safetensors_metadata(files[0]) if files[0].endswith(".safetensors") else {}
    raw_config = metadata.get(_CONFIG_KEY, state.pop(_CONFIG_KEY, None))
    if raw_config is not None:
        return _load_own(state, raw_config, path)
    layout = detect_lora_layout(state)
    if layout == "peft":
        return _from_peft(state, _peft_config(path, metadata), path)
    if layout == "kohya":
        return _from_kohya(state, path)
    keys = [k for k in state if not k.startswith("__")]
    shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
    raise CheckpointError(f"{path} is not a LoRA file this loader knows (this project's, peft/diffusers "
                          f"'...lora_A.weight' or kohya '...lora_down.weight'); its keys: {shown or 'none'}")


def _load_own(state, raw_config, path):
    try:
        config = json.loads(str(raw_config))
    except ValueError:
        raise CheckpointError(f"{path}: unreadable LoRA config") from None
    if config.get("format") != FORMAT or not isinstance(config.get("rank"), int):
        raise CheckpointError(f"{path} is not a PixArt LoRA file (format {config.get('format')!r})")
    _check_lora_state(state, config["rank"], path)
    return state, config


def _check_lora_state(state, rank, source):
    """Every module has lora_A (r, in) and lora_B (out, r); r is ``rank`` unless rank is None
    (converted adapters, whose rank may differ per layer)."""
    stray = [k for k in state if not k.endswith(LORA_SUFFIXES)]
    if stray:
        raise CheckpointError(f"{source} holds non-LoRA tensors: {', '.join(stray[:4])}")
    for module in _modules_of(state):
        a, b = state.get(module + ".lora_A"), state.get(module + ".lora_B")
        if a is None or b is None:
            raise CheckpointError(f"{source}: {module} has only one of lora_A / lora_B")
        r = np.shape(a)[0] if rank is None else rank
        if np.ndim(a) != 2 or np.ndim(b) != 2 or np.shape(a)[0] != r or np.shape(b)[1] != r:
            raise CheckpointError(f"{source}: {module} has lora_A {tuple(np.shape(a))} and lora_B "
                                  f"{tuple(np.shape(b))}, not rank {r}")
    if not state:
        raise CheckpointError(f"{source} holds no LoRA tensors")


# ----------------------------------------------------------------------------- peft / kohya layouts

_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")  # optional adapter name
_KOHYA_KEY = re.compile(r"^(?P<module>[^.]+)\.(?:(?P<kind>lora_down|lora_up)\.weight|(?P<alpha>alpha))$")
# Prefixes in front of the transformer's own layer names: diffusers pipelines / trainers and peft.
_MODEL_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.")
_TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_PREFIXES = ("lora_transformer_", "lora_unet_")
_PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry


def detect_lora_layout(state):
    """"peft", "kohya" or None from a LoRA state dict's keys ("ours" files carry a config entry)."""
    keys = [k for k in state if not k.startswith("__")]
    if any(k.endswith((".lora_magnitude_vector", ".dora_scale")) or ".lora_magnitude_vector." in k for k in keys):
        raise CheckpointError("DoRA adapters (lora_magnitude_vector / dora_scale) are not supported; merge them "
                              "into the model with peft first")
    if keys and all(_PEFT_KEY.match(k) for k in keys):
        return "peft"
    if keys and all(_KOHYA_KEY.match(k) for k in keys):
        return "kohya"
    return None


def _strip(name, prefixes):
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _peft_config(path, metadata):
    """The peft LoraConfig fields of a peft / diffusers LoRA: adapter_config.json beside the weights,
    or diffusers' ``lora_adapter_metadata`` (keys optionally prefixed "transformer."); {} if none."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config_json = os.path.join(folder, "adapter_config.json")
    if os.path.isfile(config_json):
        with open(config_json) as f:
            return json.load(f)
    raw = metadata.get(_PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{path}: unreadable {_PEFT_METADATA_KEY} metadata") from None
    if any(k.startswith("transformer.") for k in packed):  # a pipeline's file: {"transformer.r": ...}
        return {k[len("transformer."):]: v for k, v in packed.items() if k.startswith("transformer.")}
    return packed


def _pattern_value(patterns, module, default):
    """peft's rank_pattern / alpha_pattern: a key matches a layer name ending in it (regex allowed)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return value
    return default


def _from_peft(state, peft_config, source):
    if peft_config.get("use_dora"):
        raise CheckpointError(f"{source} is a DoRA adapter (use_dora); merge it into the model with peft first")
    if not peft_config:
        logger.warning("%s has no adapter_config.json or lora_adapter_metadata: assuming lora_alpha = r "
                       "(scale 1), as diffusers does", source)
    pairs, skipped = OrderedDict(), 0
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        module = _strip(match["module"], _MODEL_PREFIXES)
        if module.startswith(_TEXT_ENCODER_PREFIXES) or match["module"].startswith(_TEXT_ENCODER_PREFIXES):
            skipped += 1
            continue
        pairs.setdefault(module, {})[match["ab"]] = np.asarray(value, np.float32)
    layers = OrderedDict()
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{source}: {module} has only lora_{''.join(ab)}")
        rank = ab["A"].shape[0]
        alpha = float(_pattern_value(peft_config.get("alpha_pattern"), module, peft_config.get("lora_alpha", rank)))
        scale = alpha / (math.sqrt(rank) if peft_config.get("use_rslora") else rank)
        layers[module] = (ab["A"], ab["B"], scale)
    return _to_original_layers(layers, "peft", source, skipped)


def _from_kohya(state, source):
    entries, skipped = OrderedDict(), 0
    for key, value in state.items():
        match = _KOHYA_KEY.match(key)
        name = match["module"]
        if name.startswith(_TEXT_ENCODER_PREFIXES):
            skipped += 1
            continue
        kind = "alpha" if match["alpha"] else match["kind"]
        entries.setdefault(_strip(name, _KOHYA_PREFIXES), {})[kind] = np.asarray(value, np.float32)
    depth = 1 + max([int(m) for n in entries for m in re.findall(r"(?:^|_)blocks_(\d+)_", n)] or [-1])
    from pixart.models.pixart_weights import layer_names

    dotted = {n.replace(".", "_"): n for layout in ("diffusers", "original") for n in layer_names(depth, layout)}
    layers, unknown = OrderedDict(), []
    for name, parts in entries.items():
        if name not in dotted:
            unknown.append(name)
            continue
        if "lora_down" not in parts or "lora_up" not in parts:
            raise CheckpointError(f"{source}: {name} lacks lora_down or lora_up")
        rank = parts["lora_down"].shape[0]
        alpha = float(parts["alpha"].reshape(-1)[0]) if "alpha" in parts else float(rank)
        layers[dotted[name]] = (parts["lora_down"], parts["lora_up"], alpha / rank)
    if unknown:
        raise CheckpointError(f"{source}: kohya LoRA layers that are not PixArt transformer layers: "
                              f"{', '.join(unknown[:4])}")
    return _to_original_layers(layers, "kohya", source, skipped)


def _to_original_layers(layers, layout, source, skipped):
    """{layer (diffusers or original name): (A, B, scale)} -> (state, config) on original layers.

    A conv adapter (A (r, in, kh, kw), B (out, r, 1, 1)) is flattened to matrices. The q, k, v
    adapters of one block become a single adapter of the fused qkv layer: A stacked (Σr, in), B
    block-diagonal (3·out, Σr), so B·A is exactly their updates stacked by rows (a part without
    an adapter gets zero rows); likewise cross-attention k, v.
    """
    from pixart.models.pixart_weights import diffusers_module_to_original, original_module_to_diffusers

    fused, unknown = OrderedDict(), []
    for module, (a, b, scale) in layers.items():
        target = diffusers_module_to_original(module)
        if target is None and original_module_to_diffusers(module) is not None:
            target = (module, 0, 1)  # already an original layer name
        if target is None:
            unknown.append(module)
            continue
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        if a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{source}: {module} has lora_A {a.shape} and lora_B {b.shape} of different ranks")
        name, part, parts = target
        fused.setdefault(name, [None] * parts)[part] = (a, b * np.float32(scale))
    if unknown:
        raise CheckpointError(f"{source}: {layout} LoRA layers that are not PixArt transformer layers: "
                              f"{', '.join(unknown[:4])}")
    state = OrderedDict()
    for name, pieces in fused.items():
        present = [p for p in pieces if p is not None]
        out = present[0][1].shape[0]
        lora_a = np.concatenate([a for a, _ in present], axis=0)
        lora_b = np.zeros((out * len(pieces), lora_a.shape[0]), np.float32)
        col = 0
        for i, piece in enumerate(pieces):
            if piece is not None:
                lora_b[i * out:(i + 1) * out, col:col + piece[0].shape[0]] = piece[1]
                col += piece[0].shape[0]
        state[name + ".lora_A"], state[name + ".lora_B"] = lora_a.astype(np.float32), lora_b
    if skipped:
        logger.warning("%s: skipped %d text-encoder LoRA tensors (only the DiT's adapters are merged)", source, skipped)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "rank": None, "alpha": None,
              "converted_from": layout, "target_modules": list(fused), "dropout": 0.0, "skipped": skipped}
    _check_lora_state(state, None, source)
    return state, config


def _base_scale(config):
    """alpha / r of this project's adapters; 1 for converted ones (their scales are in lora_B)."""
    return float(config["alpha"]) / int(config["rank"]) if config.get("rank") else 1.0


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

    Adapters converted from peft / kohya files carry their per-layer scales in lora_B (rank None).
    The update is computed in float32 and cast to each weight's dtype. Every adapted layer must
    exist in the model with a matching shape, else a CheckpointError lists the mismatches and
    nothing is changed. Returns the names of the merged layers.
    """
    state, config = _resolve(source, config)
    if lora_modules(model):
        raise ConfigError("merge_lora merges into a model without adapters; this one has LoRA layers "
                          "(load the base model afresh)")
    scale = float(strength) * _base_scale(config)
    params = OrderedDict(model.parameters_and_names())
    problems, updates = [], []
    for module in _modules_of(state):
        a, b = np.asarray(state[module + ".lora_A"], np.float32), np.asarray(state[module + ".lora_B"], np.float32)
        weight = params.get(module + ".weight")
        if weight is None:
            problems.append(f"{module} is not a layer of the model")
        # a conv weight (out, in, kh, kw) takes the update of its flattened (out, in·kh·kw) matrix
        elif (tuple(weight.shape[:1]), int(np.prod(weight.shape[1:]))) != ((b.shape[0],), a.shape[1]):
            problems.append(f"{module}.weight is {tuple(weight.shape)}, the LoRA update is {(b.shape[0], a.shape[1])}")
        else:
            updates.append((weight, a, b))
    if problems:
        shown = "; ".join(problems[:4]) + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else "")
        raise CheckpointError(f"LoRA (targets {', '.join(config.get('target_modules', []))}) does not fit the "
                              f"model: {shown}")
    for weight, a, b in updates:  # checked first, so a bad file changes nothing
        merged = weight.astype(ms.float32).asnumpy() + (scale * (b @ a)).reshape(weight.shape)
        weight.set_data(to_tensor(merged.astype(np.float32), weight.dtype))
    return _modules_of(state)


def unmerge_lora(model, source, config=None, strength=1.0):
    """Undo ``merge_lora`` with the same arguments (up to float rounding)."""
    return merge_lora(model, source, config=config, strength=-float(strength))


# ----------------------------------------------------------------------------- export to peft


def peft_state_dict(source, config=None):
    """This project's adapters in the peft / diffusers layout -> (state, adapter_config).

    state: {"transformer_blocks.3.attn1.to_q.lora_A.weight": (r, in), "...lora_B.weight": (out, r)}:
    a fused qkv adapter becomes to_q / to_k / to_v adapters sharing A, each with its rows of B,
    which is exactly the same update. adapter_config: peft LoraConfig fields (r, lora_alpha, ...).
    """
    from pixart.models.pixart_weights import original_module_to_diffusers

    state, config = _resolve(source, config)
    if not config.get("rank"):
        raise ConfigError(f"these adapters were converted from a {config.get('converted_from')} file; export "
                          "only applies to LoRA files written by this project (train.py --lora_rank)")
    out, targets = OrderedDict(), []
    for module in _modules_of(state):
        names = original_module_to_diffusers(module)
        if names is None:
            raise ConfigError(f"{module} has no diffusers equivalent (KV compression layers exist only in the "
                              "original layout), so these adapters cannot be written for peft")
        a = np.asarray(state[module + ".lora_A"], np.float32)
        for name, rows in zip(names, np.split(np.asarray(state[module + ".lora_B"], np.float32), len(names))):
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a, np.ascontiguousarray(rows)
            targets.append(name)
    base = (config.get("metadata") or {}).get("base_model")
    adapter_config = {"peft_type": "LORA", "r": int(config["rank"]), "lora_alpha": float(config["alpha"]),
                      "target_modules": sorted(targets), "lora_dropout": float(config.get("dropout", 0.0)),
                      "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
                      "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
                      "task_type": None, "inference_mode": True, "base_model_name_or_path": base}
    return out, adapter_config


def save_lora_peft(source, target):
    """Write this project's adapters for peft / diffusers; returns the number of tensors.

    ``target`` a folder: what peft's ``save_pretrained`` writes (adapter_model.safetensors with
    "base_model.model." keys + adapter_config.json), for ``PeftModel.from_pretrained(transformer,
    target)``. ``target`` a .safetensors file: diffusers' single-file layout ("transformer." keys,
    the config in the ``lora_adapter_metadata`` metadata entry).
    """
    state, adapter_config = peft_state_dict(source)
    target = os.fspath(target)
    if target.endswith(".safetensors"):
        packed = {f"transformer.{k}": v for k, v in adapter_config.items()}
        save_safetensors(OrderedDict((f"transformer.{k}", v) for k, v in state.items()), target,
                         metadata={"format": "pt", _PEFT_METADATA_KEY: json.dumps(packed, sort_keys=True)})
    else:
        os.makedirs(target, exist_ok=True)
        save_safetensors(OrderedDict((f"base_model.model.{k}", v) for k, v in state.items()),
                         os.path.join(target, "adapter_model.safetensors"), metadata={"format": "pt"})
        tmp = os.path.join(target, ".adapter_config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(adapter_config, f, indent=2)
        os.replace(tmp, os.path.join(target, "adapter_config.json"))
    return len(state)

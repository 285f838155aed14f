"""PixArt DiT weights: the original and diffusers checkpoint layouts, loading and saving.

The model (``pixart.py``) carries the original parameter names; this module maps the diffusers
layout onto them, reads the architecture a file describes, and builds a model from any source.
"""
import json
import os

import numpy as np

from pixart.models.pixart import build_pixart
from pixart.utils.checkpoint import load_into_cell, read_safetensors_metadata, read_state_dict, unwrap_state_dict
from pixart.utils.errors import CheckpointError, ConfigError

# (diffusers prefix, original prefix); blocks are handled separately because q/k/v are fused.
_DIFFUSERS_TOP = [
    ("pos_embed.proj.", "x_embedder.proj."),
    ("caption_projection.linear_1.", "y_embedder.y_proj.fc1."),
    ("caption_projection.linear_2.", "y_embedder.y_proj.fc2."),
    ("adaln_single.emb.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
    ("adaln_single.emb.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
    ("adaln_single.emb.resolution_embedder.linear_1.", "csize_embedder.mlp.0."),
    ("adaln_single.emb.resolution_embedder.linear_2.", "csize_embedder.mlp.2."),
    ("adaln_single.emb.aspect_ratio_embedder.linear_1.", "ar_embedder.mlp.0."),
    ("adaln_single.emb.aspect_ratio_embedder.linear_2.", "ar_embedder.mlp.2."),
    ("adaln_single.linear.", "t_block.1."),
    ("proj_out.", "final_layer.linear."),
    ("scale_shift_table", "final_layer.scale_shift_table"),
]
_DIFFUSERS_BLOCK = [
    ("attn1.to_out.0.", "attn.proj."),
    ("attn2.to_q.", "cross_attn.q_linear."),
    ("attn2.to_out.0.", "cross_attn.proj."),
    ("ff.net.0.proj.", "mlp.fc1."),
    ("ff.net.2.", "mlp.fc2."),
    ("scale_shift_table", "scale_shift_table"),
]
_FUSED = [(("attn1.to_q.", "attn1.to_k.", "attn1.to_v."), "attn.qkv."), (("attn2.to_k.", "attn2.to_v."), "cross_attn.kv_linear.")]


def is_diffusers_layout(state):
    return any(k.startswith(("transformer_blocks.", "adaln_single.")) for k in state)


def _rename(key, table):
    for src, dst in table:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def diffusers_to_original(state):
    """diffusers PixArtTransformer2DModel keys -> original PixArt keys (q/k/v fused)."""
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith("transformer_blocks."):
            _, idx, rest = key.split(".", 2)
            if any(rest.startswith(p) for group, _ in _FUSED for p in group):
                continue  # fused below
            new = _rename(rest, _DIFFUSERS_BLOCK)
            new = f"blocks.{idx}.{new}" if new else None
        else:
            new = _rename(key, _DIFFUSERS_TOP)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    for i in blocks:
        for parts, target in _FUSED:
            for leaf in ("weight", "bias"):
                names = [f"transformer_blocks.{i}.{p}{leaf}" for p in parts]
                if all(n in state for n in names):
                    out[f"blocks.{i}.{target}{leaf}"] = np.concatenate([np.asarray(state[n]) for n in names], axis=0)
    if unknown:
        raise CheckpointError(f"unknown diffusers PixArt keys: {', '.join(unknown[:4])}")
    return out


def diffusers_module_to_original(name):
    """A diffusers PixArt layer name -> ``(original layer, part, parts)``, or None if unknown.

    ``part`` / ``parts`` place q, k, v (or cross-attention k, v) in their fused original layer:
    ``"transformer_blocks.3.attn1.to_k"`` -> ``("blocks.3.attn.qkv", 1, 3)``; unfused layers
    have part 0 of 1. Used to move LoRA adapters between the layouts.
    """
    if name.startswith("transformer_blocks."):
        _, idx, rest = name.split(".", 2)
        for group, target in _FUSED:
            if rest + "." in group:
                return f"blocks.{idx}.{target[:-1]}", group.index(rest + "."), len(group)
        new = _rename(rest + ".", [(a, b) for a, b in _DIFFUSERS_BLOCK if a.endswith(".")])
        return (f"blocks.{idx}.{new[:-1]}", 0, 1) if new else None
    new = _rename(name + ".", [(a, b) for a, b in _DIFFUSERS_TOP if a.endswith(".")])
    return (new[:-1], 0, 1) if new else None


def original_module_to_diffusers(name):
    """An original PixArt layer name -> its diffusers layer names (three for attn.qkv, two for
    cross_attn.kv_linear, in row order), or None if it has no diffusers equivalent."""
    if name.startswith("blocks."):
        _, idx, rest = name.split(".", 2)
        for group, target in _FUSED:
            if rest + "." == target:
                return [f"transformer_blocks.{idx}.{p[:-1]}" for p in group]
        new = _rename(rest + ".", [(b, a) for a, b in _DIFFUSERS_BLOCK if a.endswith(".")])
        return [f"transformer_blocks.{idx}.{new[:-1]}"] if new else None
    new = _rename(name + ".", [(b, a) for a, b in _DIFFUSERS_TOP if a.endswith(".")])
    return [new[:-1]] if new else None


def layer_names(depth, layout="diffusers"):
    """Every Linear / Conv layer name of a ``depth``-block PixArt in a layout ("diffusers" or
    "original"), for reading names whose dots were replaced by underscores (kohya LoRA files)."""
    if layout == "diffusers":
        top = [a[:-1] for a, _ in _DIFFUSERS_TOP if a.endswith(".")]
        block = [a[:-1] for a, _ in _DIFFUSERS_BLOCK if a.endswith(".")] + [p[:-1] for g, _ in _FUSED for p in g]
        prefix = "transformer_blocks"
    else:
        top = [b[:-1] for a, b in _DIFFUSERS_TOP if a.endswith(".")]
        block = [b[:-1] for a, b in _DIFFUSERS_BLOCK if a.endswith(".")] + [t[:-1] for _, t in _FUSED]
        prefix = "blocks"
    return top + [f"{prefix}.{i}.{b}" for i in range(depth) for b in block]


def original_to_diffusers(state):
    """Original PixArt keys -> diffusers keys; the null caption and pos_embed are not stored there."""
    out = {}
    for key, value in state.items():
        if key in ("y_embedder.y_embedding", "pos_embed"):
            continue
        if key.startswith("blocks."):
            _, idx, rest = key.split(".", 2)
            fused = [(parts, t) for parts, t in _FUSED if rest.startswith(t)]
            if fused:
                parts, target = fused[0]
                leaf = rest[len(target):]
                for part, chunk in zip(parts, np.split(np.asarray(value), len(parts), axis=0)):
                    out[f"transformer_blocks.{idx}.{part}{leaf}"] = chunk
                continue
            new = _rename(rest, [(o, d) for d, o in _DIFFUSERS_BLOCK])
            if new is None:
                raise CheckpointError(f"{key} has no diffusers equivalent (KV compression and qk-norm "
                                      "weights exist only in the original layout)")
            out[f"transformer_blocks.{idx}.{new}"] = value
        else:
            new = _rename(key, [(o, d) for d, o in _DIFFUSERS_TOP])
            if new is None:
                raise CheckpointError(f"{key} has no diffusers equivalent")
            out[new] = value
    return out


def config_from_diffusers(cfg):
    """diffusers transformer config.json -> PixArtMS keyword arguments."""
    sample_size = cfg.get("sample_size", 128)
    interpolation = cfg.get("interpolation_scale")
    if interpolation is None:
        interpolation = max(sample_size // 64, 1)
    additional = cfg.get("use_additional_conditions")
    if additional is None:
        additional = sample_size == 128
    heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72)
    in_channels = cfg.get("in_channels", 4)
    out_channels = cfg.get("out_channels") or in_channels
    if cfg.get("cross_attention_dim", heads * head_dim) != heads * head_dim:
        raise ConfigError("cross_attention_dim must equal num_attention_heads * attention_head_dim")
    return dict(input_size=sample_size, patch_size=cfg.get("patch_size", 2), in_channels=in_channels,
                hidden_size=heads * head_dim, depth=cfg.get("num_layers", 28), num_heads=heads,
                caption_channels=cfg.get("caption_channels") or 4096, pe_interpolation=float(interpolation),
                learn_sigma=out_channels == 2 * in_channels, micro_condition=bool(additional))


def config_to_diffusers(config):
    """PixArtMS keyword arguments -> diffusers transformer config.json."""
    d, heads = config["hidden_size"], config["num_heads"]
    return {"_class_name": "PixArtTransformer2DModel", "_diffusers_version": "0.35.2",
            "num_attention_heads": heads, "attention_head_dim": d // heads, "in_channels": config["in_channels"],
            "out_channels": config["in_channels"] * (2 if config["learn_sigma"] else 1),
            "num_layers": config["depth"], "cross_attention_dim": d, "attention_bias": True,
            "sample_size": config["input_size"], "patch_size": config["patch_size"],
            "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False, "norm_eps": 1e-6, "interpolation_scale": config["pe_interpolation"],
            "use_additional_conditions": config["micro_condition"], "caption_channels": config["caption_channels"],
            "dropout": 0.0, "norm_num_groups": 32, "upcast_attention": False, "attention_type": "default"}


def infer_config(state):
    """Architecture facts readable from original-layout weights (not num_heads, input_size, pe)."""
    try:
        hidden, in_channels, patch, _ = np.shape(state["x_embedder.proj.weight"])
        out_features = np.shape(state["final_layer.linear.weight"])[0]
        caption_channels = np.shape(state["y_embedder.y_proj.fc1.weight"])[1]
    except KeyError as err:
        raise CheckpointError(f"not a PixArt checkpoint: {err.args[0]} is missing") from None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    kv_layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.") and ".attn.sr." in k})
    config = dict(hidden_size=int(hidden), in_channels=int(in_channels), patch_size=int(patch), depth=depth,
                  num_heads=max(int(hidden) // 72, 1), caption_channels=int(caption_channels),
                  learn_sigma=out_features // (patch * patch) == 2 * in_channels,
                  micro_condition="csize_embedder.mlp.0.weight" in state,
                  qk_norm="blocks.0.attn.q_norm.weight" in state,
                  mlp_ratio=np.shape(state["blocks.0.mlp.fc1.weight"])[0] / hidden if depth else 4.0)
    if "y_embedder.y_embedding" in state:
        config["model_max_length"] = int(np.shape(state["y_embedder.y_embedding"])[0])
    if kv_layers:
        scale = int(np.shape(state[f"blocks.{kv_layers[0]}.attn.sr.weight"])[-1])
        config["kv_compress_config"] = {"sampling": "conv", "scale_factor": scale, "kv_compress_layer": kv_layers}
    return config


def load_pixart_state(path, use_ema=False, copy_on_write=False):
    """Read PixArt weights from a .ckpt/.pth/.safetensors file or a diffusers ``transformer/`` folder.

    Returns ``(state, config)``: original-layout tensors (pos_embed dropped) and the architecture
    arguments known from the source (a diffusers config.json, a .ckpt's stored config, or the keys).
    ``copy_on_write``: see ``read_state_dict``.
    """
    raw = read_state_dict(path, copy_on_write=copy_on_write)
    stored = raw.pop("pixart_config", None)
    if stored is None and os.path.isfile(path) and path.endswith(".safetensors"):
        stored = read_safetensors_metadata(path).get("pixart_config")  # --to original files
    state = unwrap_state_dict(raw, use_ema=use_ema, source=path)
    state = {k: v for k, v in state.items() if isinstance(v, np.ndarray) or hasattr(v, "shape")}
    if any(k.startswith("base_model.") for k in state):  # an official ControlNet file: its frozen base DiT
        state = {k[len("base_model."):]: v for k, v in state.items() if k.startswith("base_model.")}
    config = {}
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config_json = os.path.join(folder, "config.json")
    if is_diffusers_layout(state):
        state = diffusers_to_original(state)
        if os.path.isfile(config_json):
            with open(config_json) as f:
                config.update(config_from_diffusers(json.load(f)))
    state.pop("pos_embed", None)
    config = {**infer_config(state), **config}
    if stored is not None:
        config.update(json.loads(str(stored)))
    return state, config



def guess_version(config, path=""):
    """"alpha" or "sigma" for a checkpoint: from its null caption (α 120 tokens, Σ 300), else from
    the published file names (``PixArt-Sigma-...`` vs ``PixArt-XL-2-...``); default "sigma"."""
    tokens = config.get("model_max_length")
    if tokens in (120, 300):
        return "alpha" if tokens == 120 else "sigma"
    name = os.path.basename(os.path.normpath(str(path))).lower()
    return "alpha" if name.startswith("pixart-xl") or "alpha" in name else "sigma"


def original_layout_state(state, config):
    """Weights as the official PixArt code's ``state_dict`` holds them: original names, the null
    caption, and the fixed ``pos_embed`` buffer of the base grid (official loaders delete it, the
    official α→diffusers script expects it)."""
    from pixart.models.pixart import sincos_pos_embed_2d

    out = dict(state)
    base = config["input_size"] // config["patch_size"]
    pos = sincos_pos_embed_2d(config["hidden_size"], base, base, base, float(config["pe_interpolation"]))
    out["pos_embed"] = pos.asnumpy().astype(np.asarray(state["x_embedder.proj.weight"]).dtype)
    return out


def from_pretrained(path, use_ema=False, strict=True, **overrides):
    """Build the model the weights describe and load them (any source ``load_pixart_state`` reads).

    ``overrides`` set what the weights cannot tell (``input_size``, ``pe_interpolation``,
    ``model_max_length``, ``dtype``, ``attention_backend``...) or switch KV compression on
    (``kv_compress_config``). A source without the null caption (diffusers) keeps the initialised
    one; KV-compression layers the weights lack keep their initialisation (an average pool and an
    identity LayerNorm), as the original code does with published non-KV weights.
    """
    # The state dict is this model's alone: it adopts the file's pages (copy-on-write) and the
    # fused q/k/v arrays instead of copying them (2.4 GB for XL-2: ~4 s of a 9 s load).
    state, config = load_pixart_state(path, use_ema=use_ema, copy_on_write=True)
    model = build_pixart(config, initialize=False, **overrides)
    initialise = {name for name, _ in model.parameters_and_names() if name not in state and
                  (".attn.sr." in name or ".attn.norm." in name or name == "y_embedder.y_embedding")}
    model.initialize_weights(names=initialise)
    for name, param in model.parameters_and_names():
        if name in initialise:
            state[name] = np.array(param.asnumpy())
    load_into_cell(model, state, source=path, strict=strict, adopt=True)
    return model


def save_pixart_ckpt(model, path, extra=None):
    """Save original-layout weights plus the architecture (as JSON) in a MindSpore .ckpt."""
    from pixart.utils.checkpoint import save_ckpt

    state = {name: param for name, param in model.parameters_and_names()}
    save_ckpt(state, path, extra={"pixart_config": json.dumps(model.config.to_dict()), **(extra or {})})

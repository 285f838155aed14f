"""ControlNet for PixArt-α / PixArt-Σ: the ControlNet-Transformer ("ControlNet-Half") of PixArt-δ.

The design of the official ``ControlPixArtHalf`` / ``ControlPixArtMSHalf`` (and of diffusers'
research ``PixArtControlNetAdapterModel``): the first ``num_layers`` (13) DiT blocks are copied
into a trainable branch; each copy ends in a zero-initialised Linear ``after_proj`` and the first
one starts with a zero-initialised ``before_proj``. The hint is the control image encoded by the
VAE (scaled latents, like the image latents) and embedded by the base model's own patch embedding
and position embedding. With base blocks B0..B27 and copies C0..C12:

    x = B0(x);  c = hint
    for i in 0..12:   c = C_i(x + before_proj(c) if i == 0 else c);   x = B_{i+1}(x + scale · after_proj_i(c))
    x = B14..B27(x)

The zero projections make a fresh ControlNet leave the base model's output unchanged.

Parameter names are the official checkpoint's: ``controlnet.N.copied_block.<block names>``,
``controlnet.0.before_proj.*``, ``controlnet.N.after_proj.*`` (the official file also holds the
frozen base as ``base_model.*``). The diffusers research layout (``controlnet_blocks.N.
transformer_block.*`` with diffusers block names) is mapped onto them when it is read.

Shapes: N batch, C latent channels, H×W latent size, T tokens, D hidden size, L text tokens.
"""
import json
import os

import numpy as np
import mindspore as ms
from mindspore import nn

from pixart.models.attention import resolve_backend
from pixart.models.pixart import PixArtBlock
from pixart.utils.checkpoint import load_into_cell, read_state_dict, save_ckpt, to_tensor, unwrap_state_dict
from pixart.utils.errors import CheckpointError, ConfigError

DEFAULT_LAYERS = 13  # PixArt-δ: half of the 28 blocks (minus the first)
CONFIG_KEY = "controlnet_config"
_BASE_KEYS = ("hidden_size", "depth", "num_heads", "mlp_ratio", "qk_norm", "model_max_length", "caption_channels",
              "micro_condition", "in_channels", "patch_size")


def config_dict(config):
    """A DiT's ``PixArtConfig`` (or a plain dict of its fields) as a dict."""
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def zero_dense(dim):
    """A Linear (D -> D) with zero weight and bias: the branch starts as a no-op."""
    layer = nn.Dense(dim, dim)
    layer.weight.set_data(ms.Tensor(np.zeros((dim, dim), np.float32)))
    layer.bias.set_data(ms.Tensor(np.zeros(dim, np.float32)))
    return layer


class ControlBlock(nn.Cell):
    """One ControlNet block: a copy of base block ``index`` between zero projections.

    ``construct(x, c, ...)``: x (N, T, D) the base model's tokens entering base block index+1,
    c (N, T, D) the branch state (the embedded hint for block 0). Returns (c', after_proj(c')).
    """

    def __init__(self, index, hidden_size, num_heads, mlp_ratio=4.0, kv_compress=None, kv_scale=1, qk_norm=False,
                 backend="math"):
        super().__init__()
        self.index = index
        self.first = index == 0
        if self.first:
            self.before_proj = zero_dense(hidden_size)
        self.copied_block = PixArtBlock(hidden_size, num_heads, mlp_ratio, kv_compress, kv_scale, qk_norm, backend)
        self.after_proj = zero_dense(hidden_size)

    def construct(self, x, c, text_kv, text_bias, t0, grid_h, grid_w):
        if self.first:
            c = x + self.before_proj(c)
        c = self.copied_block(c, text_kv, text_bias, t0, grid_h, grid_w)
        return c, self.after_proj(c)


class PixArtControlNet(nn.Cell):
    """The ControlNet branch alone (``controlnet.N.*`` parameters).

    Args:
        base_config: the base DiT's ``config`` (hidden size, heads, depth, ...); the branch copies
            the architecture of its first ``num_layers`` blocks and is checked against it on use.
        num_layers: copied blocks (13 in PixArt-δ); at most depth - 1.
    """

    def __init__(self, base_config, num_layers=DEFAULT_LAYERS, attention_backend="auto", dtype=ms.float32):
        super().__init__()
        base_config = config_dict(base_config)
        depth = int(base_config["depth"])
        if not 1 <= num_layers < depth:
            raise ConfigError(f"a ControlNet copies 1 to depth - 1 = {depth - 1} blocks of the base model, got "
                              f"num_layers {num_layers}")
        self.config = {k: base_config.get(k) for k in _BASE_KEYS}
        self.config["num_layers"] = int(num_layers)
        self.num_layers = int(num_layers)
        backend = resolve_backend(attention_backend)
        kv = base_config.get("kv_compress_config") or {}
        kv_layers = set(kv.get("kv_compress_layer") or []) if kv.get("sampling") else set()
        self.controlnet = nn.CellList([
            ControlBlock(i, base_config["hidden_size"], base_config["num_heads"], base_config.get("mlp_ratio", 4.0),
                         kv.get("sampling") if i in kv_layers else None,
                         kv.get("scale_factor", 1) if i in kv_layers else 1, base_config.get("qk_norm", False), backend)
            for i in range(num_layers)])
        if dtype != ms.float32:
            for _, param in self.parameters_and_names():
                param.set_data(param.astype(dtype))

    @classmethod
    def from_base(cls, base, num_layers=DEFAULT_LAYERS, **kwargs):
        """A fresh ControlNet for ``base`` (a PixArtMS): copies of its first blocks, zero projections."""
        net = cls(base.config, num_layers, dtype=base.dtype, **kwargs)
        blocks = dict(base.parameters_and_names())
        for name, param in net.parameters_and_names():
            if ".copied_block." in name:
                _, index, _, rest = name.split(".", 3)
                param.set_data(to_tensor(blocks[f"blocks.{index}.{rest}"].asnumpy(), param.dtype))
        return net

    def check_base(self, base, source="the ControlNet"):
        """Raise a one-line CheckpointError if ``base`` is not the kind of DiT this branch was made for."""
        check_base_config(self.config, config_dict(base.config), source)
        return self


def check_base_config(control_config, base_config, source="the ControlNet"):
    """Compare what a ControlNet records of its base model with the DiT it is used with."""
    def describe(cfg):
        tokens = cfg.get("model_max_length")
        kind = {120: "PixArt-α", 300: "PixArt-Σ"}.get(tokens, f"{tokens}-token")
        return f"{kind} (hidden {cfg.get('hidden_size')}, depth {cfg.get('depth')})"

    differing = [k for k in ("hidden_size", "model_max_length", "caption_channels", "micro_condition", "in_channels",
                             "patch_size", "mlp_ratio", "qk_norm", "depth")
                 if control_config.get(k) is not None and base_config.get(k) is not None
                 and control_config[k] != base_config[k]]
    # The null caption's length tells PixArt-α (120) from PixArt-Σ (300); other lengths are a
    # training choice (--t5_max_length), not another base model.
    if "model_max_length" in differing and {control_config["model_max_length"], base_config["model_max_length"]} \
            != {120, 300}:
        differing.remove("model_max_length")
    too_deep = control_config["num_layers"] >= base_config["depth"]
    if differing or too_deep:
        detail = ", ".join(f"{k} {control_config[k]} vs {base_config[k]}" for k in differing) or \
            f"{control_config['num_layers']} copied blocks vs depth {base_config['depth']}"
        raise CheckpointError(f"{source} was made for a {describe(control_config)} base model, not this "
                              f"{describe(base_config)} one ({detail}): use the ControlNet trained on this base")


class ControlPixArt(nn.Cell):
    """The denoiser with a ControlNet: the DiT's call signature plus the hint latents.

    ``construct(x, timestep, y, mask, resolution, aspect_ratio, drop_ids, control, scale)``:
    control (N, C, H, W) scaled VAE latents of the control images (as x), scale the
    ``controlnet_conditioning_scale`` multiplying each injected residual. Same output as the DiT,
    (N, C_out, H, W); ``control=None`` runs the base model alone.

    Parameter names are the official checkpoint's: ``base_model.*`` and ``controlnet.N.*``.
    """

    def __init__(self, base_model, controlnet):
        super().__init__()
        controlnet.check_base(base_model)
        self.base_model = base_model
        self.controlnet = controlnet.controlnet  # the CellList: names controlnet.N.*, as the official file
        self.num_layers = controlnet.num_layers

    def text_context(self, y, drop_ids=None):
        """The base model's ``text_context`` followed by the copied blocks' (K, V)."""
        base = self.base_model
        y = base.embed_caption(y, drop_ids)
        return tuple(block.cross_attn.text_kv(y) for block in base.blocks) + \
            tuple(layer.copied_block.cross_attn.text_kv(y) for layer in self.controlnet)

    def construct(self, x, timestep, y, mask=None, resolution=None, aspect_ratio=None, drop_ids=None, control=None,
                  scale=1.0):
        base = self.base_model
        if isinstance(y, tuple) and drop_ids is not None:
            raise ValueError("drop_ids replaces caption features; a precomputed text_context has none")
        text = y if isinstance(y, tuple) else self.text_context(y, drop_ids)
        x, text_bias, t, t0, grid_h, grid_w = base.embed_inputs(x, timestep, mask, resolution, aspect_ratio)
        blocks = base.blocks
        if control is None:
            for i, block in enumerate(blocks):
                x = block(x, text[i], text_bias, t0, grid_h, grid_w)
            return base.decode_tokens(x, t, grid_h, grid_w)
        depth = len(blocks)
        c = base.embed_patches(control, grid_h, grid_w)  # the hint: base patch + position embedding
        x = blocks[0](x, text[0], text_bias, t0, grid_h, grid_w)
        for i in range(self.num_layers):
            c, residual = self.controlnet[i](x, c, text[depth + i], text_bias, t0, grid_h, grid_w)
            x = blocks[i + 1](x + residual * scale, text[i + 1], text_bias, t0, grid_h, grid_w)
        for i in range(self.num_layers + 1, depth):
            x = blocks[i](x, text[i], text_bias, t0, grid_h, grid_w)
        return base.decode_tokens(x, t, grid_h, grid_w)


# ----------------------------------------------------------------------------- weights layouts

# diffusers BasicTransformerBlock names inside the research layout -> the original block names
# (pixart_weights maps whole transformers; a block is renamed through it under a fake index).


def diffusers_research_to_official(state):
    """``controlnet_blocks.N.{before_proj,after_proj,transformer_block.*}`` -> ``controlnet.N.*``."""
    from pixart.models.pixart_weights import diffusers_to_original

    out, blocks = {}, {}
    for key, value in state.items():
        parts = key.split(".", 3)
        if len(parts) < 3 or parts[0] != "controlnet_blocks":
            raise CheckpointError(f"unknown key {key} in a diffusers PixArt ControlNet (controlnet_blocks.N.*)")
        index = parts[1]
        if parts[2] in ("before_proj", "after_proj"):
            out[f"controlnet.{index}.{parts[2]}.{parts[3]}"] = value
        elif parts[2] == "transformer_block":
            blocks[f"transformer_blocks.{index}.{parts[3]}"] = value
        else:
            raise CheckpointError(f"unknown key {key} in a diffusers PixArt ControlNet")
    for key, value in diffusers_to_original(blocks).items():
        _, index, rest = key.split(".", 2)  # blocks.N.rest
        out[f"controlnet.{index}.copied_block.{rest}"] = value
    return out


def split_official_state(state):
    """An official ControlNet file's tensors -> (controlnet.* tensors, base_model tensors without
    the prefix, or {} when the file has no base)."""
    control = {k: v for k, v in state.items() if k.startswith("controlnet.")}
    base = {k[len("base_model."):]: v for k, v in state.items() if k.startswith("base_model.")}
    return control, base


def is_controlnet_state(state):
    return any(k.startswith(("controlnet.", "controlnet_blocks.")) for k in state)


def infer_control_config(control, base_state=None):
    """What the tensors tell of the ControlNet (and, from a bundled base, of its base model)."""
    indices = sorted({int(k.split(".")[1]) for k in control})
    if not indices or "controlnet.0.after_proj.weight" not in control:
        raise CheckpointError("not a PixArt ControlNet: controlnet.0.after_proj.weight is missing")
    hidden = int(np.shape(control["controlnet.0.after_proj.weight"])[0])
    fc1 = control.get("controlnet.0.copied_block.mlp.fc1.weight")
    config = {"num_layers": len(indices), "hidden_size": hidden,
              "qk_norm": "controlnet.0.copied_block.attn.q_norm.weight" in control}
    if fc1 is not None:
        config["mlp_ratio"] = np.shape(fc1)[0] / hidden
    if base_state:
        from pixart.models.pixart_weights import infer_config

        base = infer_config(base_state)
        config.update({k: base[k] for k in ("depth", "caption_channels", "micro_condition", "in_channels",
                                             "patch_size", "model_max_length") if k in base})
    return config


def read_controlnet(path):
    """Read ControlNet weights from any layout -> (controlnet.* state, recorded config, base state).

    Sources: the official ``.pth`` (``{'state_dict': {base_model.*, controlnet.*}}``), a file
    with ``controlnet.*`` only (train.py's ``controlnet.ckpt``, with its config), or a diffusers
    research ``PixArtControlNetAdapterModel`` folder / safetensors (``controlnet_blocks.N.*``).
    ``base state`` is the bundled base DiT ({} when absent).
    """
    if not os.path.exists(path):
        raise CheckpointError(f"ControlNet weights {path} not found")
    raw = read_state_dict(path)
    stored = raw.pop(CONFIG_KEY, None)
    state = unwrap_state_dict(raw)
    state = {k: v for k, v in state.items() if hasattr(v, "shape")}
    if not is_controlnet_state(state):
        raise CheckpointError(f"{path} is not a PixArt ControlNet (no controlnet.N.* or controlnet_blocks.N.* "
                              "tensors); a plain DiT goes to --checkpoint")
    if any(k.startswith("controlnet_blocks.") for k in state):
        control, base = diffusers_research_to_official(state), {}
    else:
        control, base = split_official_state(state)
        base.pop("pos_embed", None)
    config = infer_control_config(control, base)
    if stored is not None:
        config.update(json.loads(str(stored)))
    return control, config, base


def load_controlnet(path, base, attention_backend="auto"):
    """A ``PixArtControlNet`` for the DiT ``base`` from ``path`` (any layout ``read_controlnet``
    reads); a ControlNet made for another base model raises one CheckpointError."""
    control, config, _ = read_controlnet(path)
    check_base_config(config, config_dict(base.config), source=f"ControlNet {path}")
    net = PixArtControlNet(base.config, config["num_layers"], attention_backend=attention_backend, dtype=base.dtype)
    load_into_cell(net, control, source=path)
    return net


def save_controlnet(controlnet, path, extra=None):
    """Write ``controlnet.*`` tensors and the config (base model facts) to a MindSpore .ckpt, atomically."""
    state = {name: param for name, param in controlnet.parameters_and_names()}
    save_ckpt(state, path, extra={CONFIG_KEY: json.dumps(controlnet.config), **(extra or {})})
    return path


# ----------------------------------------------------------------------------- control images


def check_conditioning_scale(scale):
    """``controlnet_conditioning_scale`` must be a number in [0, 1] (1 = as trained, 0 = no control)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= float(scale) <= 1.0:
        raise ConfigError(f"controlnet_conditioning_scale must be in [0, 1], got {scale!r}")
    return float(scale)


def read_control_image(path):
    """A control image file (edge map...) -> RGB PIL image; a one-line ConfigError if unreadable."""
    from PIL import Image

    if not os.path.isfile(path):
        raise ConfigError(f"control image {path} not found")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise ConfigError(f"cannot read control image {path}: {err}") from None


def control_image_array(image):
    """PIL image, or numpy (H, W, 3) / (H, W) in [0, 255] (uint8) or [0, 1] (float) -> float32
    (H, W, 3) in [0, 1]."""
    if isinstance(image, str):
        image = read_control_image(image)
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ConfigError(f"a control image must be (H, W, 3) or (H, W), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if array.min() < 0.0 or array.max() > 1.0:
        raise ConfigError(f"a float control image must be in [0, 1], got values in [{array.min():.3g}, "
                          f"{array.max():.3g}] (uint8 images are read as [0, 255])")
    return array


def control_image_size(image):
    """(height, width) of a control image in any accepted form."""
    if hasattr(image, "size") and hasattr(image, "convert"):
        return image.size[1], image.size[0]
    return tuple(np.shape(control_image_array(image))[:2])


def prepare_control_images(images, height, width):
    """Control image(s) -> float32 (K, 3, height, width) in [-1, 1], the VAE's input.

    An image not at (height, width) (the aspect-ratio bin the pipeline generates at) is resized
    to it with PIL's Lanczos filter, as diffusers' control-image processor does.
    """
    from PIL import Image

    images = images if isinstance(images, (list, tuple)) else [images]
    out = []
    for image in images:
        array = control_image_array(image)
        if array.shape[:2] != (height, width):
            array = np.stack([np.asarray(Image.fromarray(array[..., k], mode="F").resize(
                (width, height), Image.LANCZOS)) for k in range(3)], axis=-1).clip(0.0, 1.0)
        out.append(array.transpose(2, 0, 1) * 2.0 - 1.0)
    return np.stack(out).astype(np.float32)


def encode_control_images(vae, images):
    """(K, 3, H, W) in [-1, 1] -> (K, C, H/8, W/8) hint latents: the VAE posterior mean times the
    scaling factor, one image per VAE call. (The official code samples the posterior; its mean
    is the deterministic choice and differs from a sample by the posterior's small std.)"""
    latents = [vae.encode(ms.Tensor(images[k:k + 1])).mean.astype(ms.float32) for k in range(images.shape[0])]
    return ms.ops.concat(latents, axis=0) * vae.scaling_factor


def check_control_options(controlnet, control_image, scale):
    """sample.py / demo.py: --controlnet, --control_image and the scale go together and are valid."""
    if control_image and not controlnet:
        raise ConfigError("--control_image needs --controlnet (the ControlNet weights)")
    if controlnet and not control_image:
        raise ConfigError("--controlnet needs --control_image (e.g. an edge map from tools/make_control_images.py)")
    check_conditioning_scale(scale)
    read_control_image(control_image)

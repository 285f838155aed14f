"""Convert PixArt weights between the original, diffusers and MindSpore layouts.

    python tools/convert.py --source models/PixArt-Sigma-XL-2-1024-MS.pth --target models/PixArt-Sigma-XL-2-1024-MS.ckpt
    python tools/convert.py --source transformer/ --target model.ckpt --dtype fp16
    python tools/convert.py --source model.ckpt --target out/transformer --to diffusers --image_size 1024

The source may be an original .pth (``state_dict``, ``state_dict_ema`` with --use_ema, or bare), an original- or diffusers-
layout .safetensors, a diffusers ``transformer/`` folder or a .ckpt; the layout is detected. A .ckpt
target holds original key names plus the architecture as JSON; the loader reads every source
directly, so converting is optional.
"""
import argparse
import json
import os
import re


import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from pixart.tables import PE_INTERPOLATION  # noqa: E402
from pixart.models.pixart_weights import config_to_diffusers, load_pixart_state, original_to_diffusers  # noqa: E402
from pixart.utils.checkpoint import save_ckpt, save_safetensors  # noqa: E402
from pixart.utils.errors import ConfigError, run_cli  # noqa: E402

DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def image_size_from_name(path):
    """The base resolution in a published file name: ...-256x256, -512-MS, -1024-MS, -2K-MS."""
    name = os.path.basename(os.path.normpath(path))
    match = re.search(r"-(\d{3,4})(?:x\d{3,4})?(?:-MS)?\b", name) or re.search(r"-(\d)K\b", name)
    if not match:
        return None
    value = int(match.group(1))
    return value * 1024 if value < 10 else value


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help=".pth / .safetensors / .ckpt file or diffusers transformer/ folder")
    p.add_argument("--target", required=True, help=".ckpt file, or a folder with --to diffusers")
    p.add_argument("--to", choices=["ckpt", "diffusers"], default="ckpt", help="target layout (default: ckpt)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep)")
    p.add_argument("--use_ema", action="store_true", help="take the EMA weights of a training checkpoint (state_dict_ema, as the official code saves them)")
    p.add_argument("--image_size", type=int, default=None,
                   help="base resolution (256/512/1024/2048/4096); default: from the file name or stored config")
    p.add_argument("--num_heads", type=int, default=None,
                   help="attention heads, which weights do not record (default: hidden size / 72, as published)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    state, config = load_pixart_state(args.source, use_ema=args.use_ema)
    image_size = args.image_size or (None if "input_size" in config else image_size_from_name(args.source))
    if image_size:  # given or read from a published file name; a stored config already knows it
        if image_size not in PE_INTERPOLATION:
            raise ConfigError(f"--image_size must be one of {sorted(PE_INTERPOLATION)}, got {image_size}")
        config["input_size"] = image_size // 8
        config["pe_interpolation"] = PE_INTERPOLATION[image_size]
    if args.num_heads:
        config["num_heads"] = args.num_heads
    if args.dtype:
        state = {k: np.asarray(v).astype(DTYPES[args.dtype]) for k, v in state.items()}
    if args.to == "ckpt":
        if not args.target.endswith(".ckpt"):
            raise ConfigError(f"--target must end with .ckpt (got {args.target}); use --to diffusers for a folder")
        save_ckpt(state, args.target, extra={"pixart_config": json.dumps(config)})
    else:
        if "input_size" not in config:
            raise ConfigError("diffusers config needs the base resolution: pass --image_size (e.g. 1024)")
        config.setdefault("model_max_length", 300)
        os.makedirs(args.target, exist_ok=True)
        save_safetensors(original_to_diffusers(state), os.path.join(args.target, "diffusion_pytorch_model.safetensors"),
                         metadata={"format": "pt"})
        with open(os.path.join(args.target, "config.json"), "w") as f:
            json.dump(config_to_diffusers({"mlp_ratio": 4.0, **config}), f, indent=2)
    print(f"wrote {args.target} ({len(state)} tensors)")


if __name__ == "__main__":
    run_cli(main)

"""Convert PixArt weights between the original, diffusers and MindSpore layouts, and LoRA adapters to peft.

    python tools/convert.py --source models/PixArt-Sigma-XL-2-1024-MS.pth --target models/PixArt-Sigma-XL-2-1024-MS.ckpt
    python tools/convert.py --source transformer/ --target model.ckpt --dtype fp16
    python tools/convert.py --source run/final/ema.ckpt --target out/transformer --to diffusers
    python tools/convert.py --source run/final/ema.ckpt --target out/model.safetensors --to original
    python tools/convert.py --source run/final/lora.safetensors --target out/lora_peft --to peft

The source may be an original .pth (``state_dict``, ``state_dict_ema`` with --use_ema, or bare), an
original- or diffusers-layout .safetensors, a diffusers ``transformer/`` folder or a .ckpt; the layout
is detected. Targets: ``ckpt`` (original names plus the architecture as JSON; the loader reads every
source directly, so this is optional), ``diffusers`` (a folder PixArtTransformer2DModel.from_pretrained
loads), ``original`` (a .safetensors with the official PixArt state_dict names, pos_embed included),
``peft`` (a LoRA file of this project as a peft folder or a diffusers-style .safetensors).
"""
import argparse
import json
import os
import re

import ml_dtypes
import numpy as np

from pixart.models.pixart_weights import (config_to_diffusers, guess_version, load_pixart_state,
                                          original_layout_state, original_to_diffusers)
from pixart.tables import PE_INTERPOLATION, pe_interpolation_for
from pixart.utils.checkpoint import save_ckpt, save_safetensors
from pixart.utils.errors import ConfigError, run_cli

DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}
TARGETS = ("ckpt", "diffusers", "original", "peft")


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
    p.add_argument("--target", required=True,
                   help=".ckpt file; a folder with --to diffusers; .safetensors with --to original; "
                        "a folder or .safetensors with --to peft")
    p.add_argument("--to", choices=TARGETS, default="ckpt", help="target layout (default: ckpt)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep)")
    p.add_argument("--use_ema", action="store_true",
                   help="take the EMA weights of a training checkpoint (state_dict_ema, as the official code saves them)")
    p.add_argument("--image_size", type=int, default=None,
                   help="base resolution (256/512/1024/2048/4096); default: from the file name or stored config")
    p.add_argument("--num_heads", type=int, default=None,
                   help="attention heads, which weights do not record (default: hidden size / 72, as published)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.to == "peft":
        from pixart.models.lora import save_lora_peft

        written = save_lora_peft(args.source, args.target)
        print(f"wrote {args.target} ({written} tensors, peft layout)")
        return
    state, config = load_pixart_state(args.source, use_ema=args.use_ema)
    image_size = args.image_size or (None if "input_size" in config else image_size_from_name(args.source))
    if image_size:  # given or read from a published file name; a stored config already knows it
        if image_size not in PE_INTERPOLATION:
            raise ConfigError(f"--image_size must be one of {sorted(PE_INTERPOLATION)}, got {image_size}")
        config["input_size"] = image_size // 8
        # α and Σ differ at 256 (1.0 vs 0.5): the null caption's length tells them apart
        config["pe_interpolation"] = pe_interpolation_for(image_size, guess_version(config, args.source))
    if args.num_heads:
        config["num_heads"] = args.num_heads
    if args.dtype:
        state = {k: np.asarray(v).astype(DTYPES[args.dtype]) for k, v in state.items()}
    if args.to in ("diffusers", "original") and "input_size" not in config:
        raise ConfigError(f"--to {args.to} needs the base resolution: pass --image_size (e.g. 1024)")
    config.setdefault("mlp_ratio", 4.0)
    if args.to == "ckpt":
        if not args.target.endswith(".ckpt"):
            raise ConfigError(f"--target must end with .ckpt (got {args.target}); use --to diffusers for a folder")
        save_ckpt(state, args.target, extra={"pixart_config": json.dumps(config)})
    elif args.to == "original":
        if not args.target.endswith(".safetensors"):
            raise ConfigError(f"--to original writes a .safetensors file; --target is {args.target}")
        state = original_layout_state(state, config)
        save_safetensors(state, args.target, metadata={"format": "pt", "pixart_config": json.dumps(config)})
    else:
        config.setdefault("model_max_length", 300)
        os.makedirs(args.target, exist_ok=True)
        save_safetensors(original_to_diffusers(state), os.path.join(args.target, "diffusion_pytorch_model.safetensors"),
                         metadata={"format": "pt"})
        with open(os.path.join(args.target, "config.json"), "w") as f:
            json.dump(config_to_diffusers(config), f, indent=2)
    print(f"wrote {args.target} ({len(state)} tensors)")


if __name__ == "__main__":
    run_cli(main)

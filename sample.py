"""Text-to-image sampling with PixArt-Σ / PixArt-α.

    python sample.py -c configs/inference/pixart-sigma-1024-MS.yaml --prompt "a cat" --image_width 1024 --image_height 512 --seed 0

The YAML config sets defaults for any option below; the command line overrides it.
"""
import logging
import os
import re
import time

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only, so our messages stay readable

import numpy as np  # noqa: E402

from pixart.utils.config import ArgumentParser, parse_args_with_config, str2bool  # noqa: E402
from pixart.utils.device import set_device  # noqa: E402
from pixart.utils.errors import CheckpointError, ConfigError, run_cli  # noqa: E402

DEFAULT_PROMPT = "A small cactus with a happy face in the Sahara desert."
SIGMA_REPO = "https://huggingface.co/PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"
DTYPES = ("fp32", "fp16", "bf16")
MAX_SIDE = 8192

logger = logging.getLogger("sample")


def build_parser():
    p = ArgumentParser(prog="sample.py", description="PixArt text-to-image sampling")
    p.add_argument("-c", "--config", help="YAML file whose keys set defaults for these options")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", default=None, help="the prompt (default: a demo prompt)")
    g.add_argument("--prompt_path", default=None, help="a text file with one prompt per line")
    g.add_argument("--negative_prompt", default="")
    g = p.add_argument_group("image")
    g.add_argument("--image_width", type=int, default=None, help="default: the model's base resolution")
    g.add_argument("--image_height", type=int, default=None)
    g.add_argument("--use_resolution_binning", type=str2bool, default=True,
                   help="generate at the nearest aspect-ratio bin, then resize and crop back (True|False)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--num_images", type=int, default=1, help="images per prompt")
    g.add_argument("--batch_size", type=int, default=1)
    g.add_argument("--imagegrid", type=str2bool, default=False, help="also save all images as one grid")
    g.add_argument("--output_path", default="samples")
    g = p.add_argument_group("sampler")
    g.add_argument("--sampling_method", choices=["dpm", "sa-solver", "ddim", "iddpm"], default="dpm")
    g.add_argument("--sampling_steps", type=int, default=None, help="default: 20 dpm, 25 sa-solver, 50 ddim, 100 iddpm")
    g.add_argument("--guidance_scale", type=float, default=4.5)
    g.add_argument("--ddim_eta", type=float, default=0.0)
    g = p.add_argument_group("model")
    g.add_argument("--version", choices=["sigma", "alpha"], default="sigma", help="PixArt-Σ or PixArt-α pipeline")
    g.add_argument("--image_size", type=int, choices=[256, 512, 1024, 2048, 4096], default=None,
                   help="the checkpoint's base resolution (when it does not record it)")
    g.add_argument("--pe_interpolation", type=float, default=None,
                   help="position-embedding interpolation (default: by image_size, Σ: 256 0.5, 512 1, 1024 2, ...)")
    g.add_argument("--pretrained_path", default=None, help="a diffusers-format PixArt folder")
    g.add_argument("--checkpoint", default=None, help="DiT weights: .ckpt, .pth, .safetensors or transformer/")
    g.add_argument("--vae_root", default="models/vae")
    g.add_argument("--text_encoder_root", default="models/text_encoder")
    g.add_argument("--tokenizer_root", default="models/tokenizer")
    g.add_argument("--lora", default=None, help="LoRA adapters saved by train.py --lora_rank, merged into the DiT")
    g.add_argument("--lora_scale", type=float, default=1.0, help="strength of the LoRA update (1 = as trained)")
    g.add_argument("--kv_compress", type=str2bool, default=False, help="KV token compression (PixArt-Σ 2K/4K)")
    g.add_argument("--kv_compress_sampling", choices=["conv", "ave", "uniform"], default="conv")
    g.add_argument("--kv_compress_scale_factor", type=int, default=1)
    g.add_argument("--kv_compress_layer", type=int, nargs="*", default=None)
    g = p.add_argument_group("runtime")
    g.add_argument("--dtype", choices=DTYPES, default="fp32", help="DiT parameter dtype")
    g.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    g.add_argument("--device_target", choices=["Ascend", "GPU", "CPU"], default=None,
                   help="default: Ascend if present, else GPU, else CPU")
    g.add_argument("--attention_backend", choices=["auto", "math", "flash"], default="auto")
    return p


def read_prompts(args):
    if args.prompt_path:
        if not os.path.isfile(args.prompt_path):
            raise ConfigError(f"prompt file {args.prompt_path} does not exist")
        with open(args.prompt_path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ConfigError(f"prompt file {args.prompt_path} has no prompts (one per line)")
        return prompts
    return [args.prompt if args.prompt is not None else DEFAULT_PROMPT]


def check_args(args):
    for name in ("image_width", "image_height"):
        value = getattr(args, name)
        if value is not None and (value % 8 or not 8 <= value <= MAX_SIDE):
            raise ConfigError(f"--{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {value}")
    if args.sampling_steps is not None and args.sampling_steps < 1:
        raise ConfigError(f"--sampling_steps must be at least 1, got {args.sampling_steps}")
    if args.num_images < 1 or args.batch_size < 1:
        raise ConfigError("--num_images and --batch_size must be at least 1")
    if args.kv_compress and (args.kv_compress_scale_factor < 2 or not args.kv_compress_layer):
        raise ConfigError("--kv_compress needs --kv_compress_scale_factor >= 2 and --kv_compress_layer")


def resolve_checkpoint(path):
    """The DiT weights file; a missing .ckpt with the original .pth beside it reads the .pth."""
    if os.path.exists(path):
        return path
    pth = re.sub(r"\.ckpt$", ".pth", path)
    if pth != path and os.path.exists(pth):
        logger.warning("%s not found; reading %s directly", path, pth)
        return pth
    name = os.path.splitext(os.path.basename(path))[0]
    raise CheckpointError(
        f"{path} not found: download {name}.pth from the PixArt-Σ release (https://huggingface.co/PixArt-alpha) "
        f"into {os.path.dirname(path) or '.'}/ and run: python tools/convert.py --source "
        f"{os.path.splitext(path)[0]}.pth --target {os.path.splitext(path)[0]}.ckpt")


def check_component_folders(args):
    for flag in ("vae_root", "text_encoder_root", "tokenizer_root"):
        folder = getattr(args, flag)
        if not os.path.isdir(folder):
            sub = flag.replace("_root", "")
            raise CheckpointError(f"{folder} not found (--{flag}): download the {sub}/ folder of {SIGMA_REPO} "
                                  f"there (PixArt-α uses the SD VAE and the same T5)")


def check_weights(args):
    """Fail fast, before anything loads, when a weights path is missing."""
    if args.pretrained_path:
        if not os.path.isdir(args.pretrained_path):
            raise CheckpointError(f"{args.pretrained_path} not found (--pretrained_path): a diffusers PixArt folder, "
                                  f"e.g. PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
        return
    if not args.checkpoint:
        raise ConfigError("give --pretrained_path (diffusers folder) or --checkpoint with the vae/text encoder roots")
    args.checkpoint = resolve_checkpoint(args.checkpoint)
    check_component_folders(args)


def build_pipeline(args):
    import mindspore as ms

    from pixart import PixArtAlphaPipeline, PixArtSigmaPipeline

    cls = PixArtSigmaPipeline if args.version == "sigma" else PixArtAlphaPipeline
    dtype = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[args.dtype]
    # CPU MindSpore has no bf16 kernels: bf16 there means fp32 activations and bf16 GEMMs (pixart.ops)
    use_bf16_gemm = dtype == ms.bfloat16 and ms.get_context("device_target") == "CPU"
    if use_bf16_gemm:
        dtype = ms.float32
    kv = None
    if args.kv_compress:
        kv = {"sampling": args.kv_compress_sampling, "scale_factor": args.kv_compress_scale_factor,
              "kv_compress_layer": list(args.kv_compress_layer)}
    lora = None
    if args.lora:  # read and checked before any model loads; merged whenever the DiT loads
        from pixart.models.lora import load_lora
        lora = load_lora(args.lora)
    common = dict(dtype=dtype, use_bf16_gemm=use_bf16_gemm, attention_backend=args.attention_backend,
                  sampler=args.sampling_method, mode=args.mode,
                  sampler_kwargs={"eta": args.ddim_eta} if args.sampling_method == "ddim" else None)
    lora_name = "+" + os.path.basename(args.lora) if args.lora else ""
    if args.pretrained_path:
        pipe = cls.from_pretrained(args.pretrained_path, kv_compress_config=kv, lora=lora, lora_scale=args.lora_scale,
                                   **common)
        return pipe, os.path.basename(os.path.normpath(args.pretrained_path)) + lora_name
    pipe = cls.from_components(args.checkpoint, args.vae_root, args.text_encoder_root, args.tokenizer_root,
                               image_size=args.image_size, pe_interpolation=args.pe_interpolation,
                               kv_compress_config=kv, lora=lora, lora_scale=args.lora_scale, **common)
    return pipe, os.path.basename(args.checkpoint) + lora_name


def png_metadata(**fields):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in fields.items():
        info.add_text(key, str(value))
    return info


def save_grid(images, path):
    from PIL import Image

    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    grid.save(path)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args_with_config(build_parser(), argv)
    check_args(args)
    prompts = read_prompts(args)
    check_weights(args)
    target = set_device(args.device_target)
    pipe, model_name = build_pipeline(args)

    # All prompts go through T5 at once; T5 is then released before the DiT loads.
    jobs = [(p, k) for p in prompts for k in range(args.num_images)]
    texts = [p for p, _ in jobs]
    do_cfg = args.guidance_scale > 1.0
    started = time.time()
    embeds, mask, neg, neg_mask = pipe.encode_prompt(texts, args.negative_prompt, do_cfg)
    logger.info("encoded %d prompt(s) in %.1fs", len(prompts), time.time() - started)
    height, width = pipe.generation_size(args.image_height, args.image_width, args.use_resolution_binning)
    request = pipe.generation_size(args.image_height, args.image_width, use_resolution_binning=False)
    logger.info("generating %dx%d (requested %dx%d) on %s", width, height, request[1], request[0], target)

    os.makedirs(args.output_path, exist_ok=True)
    saved = []
    steps = args.sampling_steps
    for start in range(0, len(jobs), args.batch_size):
        index = list(range(start, min(start + args.batch_size, len(jobs))))
        pick = lambda t: None if t is None else t[index[0]:index[-1] + 1]  # noqa: E731
        # Image k starts from seed + k (the pipeline seeds each image alone), whatever the batch size.
        out = pipe(prompt_embeds=pick(embeds), prompt_attention_mask=pick(mask), negative_prompt_embeds=pick(neg),
                   negative_prompt_attention_mask=pick(neg_mask), seed=args.seed + index[0],
                   num_inference_steps=steps, guidance_scale=args.guidance_scale, height=args.image_height,
                   width=args.image_width, use_resolution_binning=args.use_resolution_binning)
        for k, image in zip(index, out.images):
            path = os.path.join(args.output_path, f"{k:05d}.png")
            image.save(path, pnginfo=png_metadata(
                prompt=jobs[k][0], negative_prompt=args.negative_prompt, seed=args.seed + k,
                steps=steps or pipe_default_steps(args.sampling_method), guidance_scale=args.guidance_scale,
                sampler=args.sampling_method, size=f"{image.size[0]}x{image.size[1]}", model=model_name))
            saved.append(image)
            logger.info("saved %s", path)
    if args.imagegrid and saved:
        save_grid(saved, os.path.join(args.output_path, "grid.png"))
    logger.info("done: %d image(s) in %.1fs", len(saved), time.time() - started)


def pipe_default_steps(method):
    from pixart.samplers import DEFAULT_STEPS

    return DEFAULT_STEPS[method]


if __name__ == "__main__":
    run_cli(main)

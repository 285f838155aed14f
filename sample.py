"""Text-to-image sampling with PixArt-Σ / PixArt-α.

    python sample.py -c configs/inference/pixart-sigma-1024-MS.yaml --prompt "a cat" --image_width 1024 --image_height 512 --seed 0

The YAML config sets defaults for any option (``python sample.py --help``); the command line
overrides it. Image k is written to ``<output_path>/k.png`` with the settings that reproduce it.
"""
import logging
import os
import time

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only, so our messages stay readable

from pixart.cli import DEFAULT_PROMPT, check_side, parse_args_with_config, sample_parser  # noqa: E402
from pixart.pipelines.config import PipelineConfig  # noqa: E402
from pixart.utils.errors import ConfigError, run_cli  # noqa: E402

logger = logging.getLogger("sample")


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


def main(argv=None):
    from pixart.pipelines.images import save_grid, save_png
    from pixart.utils.device import set_device

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args_with_config(sample_parser(), argv)
    config = PipelineConfig.from_args(args).check()
    for name in ("image_width", "image_height"):
        if getattr(args, name) is not None:
            check_side(name, getattr(args, name))
    if args.num_images < 1 or args.batch_size < 1:
        raise ConfigError("--num_images and --batch_size must be at least 1")
    if args.init_image is None and (args.mask_image is not None or args.strength is not None):
        raise ConfigError("--mask_image and --strength need --init_image")
    if args.init_image is not None:  # read and checked before any model loads
        from pixart.pipelines.img2img import check_image_inputs

        check_image_inputs(args.init_image, args.mask_image, args.strength)
    prompts = read_prompts(args)
    if args.control_image or args.controlnet:
        from pixart.models.controlnet import check_control_options

        check_control_options(args.controlnet, args.control_image, args.controlnet_conditioning_scale)
    config.check_weights()
    target = set_device(config.device_target)
    pipe = config.build()

    started = time.time()
    logger.info("generating %d image(s) of %d prompt(s) on %s", len(prompts) * args.num_images, len(prompts), target)
    saved = []
    for item in pipe.generate(prompts, args.num_images, args.batch_size, args.seed, args.negative_prompt,
                              config.guidance_scale, config.sampling_steps, height=args.image_height,
                              width=args.image_width, use_resolution_binning=args.use_resolution_binning,
                              timesteps=config.timesteps, image=args.init_image, strength=args.strength,
                              mask_image=args.mask_image, control_image=args.control_image,
                              controlnet_conditioning_scale=args.controlnet_conditioning_scale):
        path = save_png(item.image, os.path.join(args.output_path, f"{item.index:05d}.png"), item.fields)
        saved.append(item.image)
        logger.info("saved %s (%s)", path, item.fields["size"])
    if args.imagegrid and saved:
        save_grid(saved, os.path.join(args.output_path, "grid.png"))
    logger.info("done: %d image(s) in %.1fs", len(saved), time.time() - started)


if __name__ == "__main__":
    run_cli(main)

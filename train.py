"""Fine-tune PixArt-Σ / PixArt-α.

    python train.py -c configs/train/pixart-sigma-512-MS.yaml --json_path labels.json --image_dir images/
    msrun --worker_num=8 --local_worker_num=8 train.py -c ... --json_path ... --image_dir ... --use_parallel True

The YAML config sets defaults for any option below; the command line overrides it. Outputs go to
--output_path: checkpoints/step-*.ckpt (resume with --resume), samples/step-*/ (validation images),
final/model.ckpt and final/ema.ckpt (for sample.py --checkpoint), train.log; train.lock while it runs.
A refused run writes nothing there (see pixart/train/outputs.py).
"""
import os

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only, so our messages stay readable

from pixart.utils.config import ArgumentParser, parse_args_with_config, str2bool  # noqa: E402
from pixart.utils.device import set_device  # noqa: E402
from pixart.utils.errors import CheckpointError, ConfigError, run_cli  # noqa: E402

IMAGE_SIZES = (256, 512, 1024, 2048)
DEFAULT_VALIDATION_PROMPTS = ["A small cactus with a happy face in the Sahara desert."]


def build_parser():
    p = ArgumentParser(prog="train.py", description="PixArt fine-tuning")
    p.add_argument("-c", "--config", help="YAML file whose keys set defaults for these options")
    g = p.add_argument_group("data")
    g.add_argument("--json_path", default=None, help="dataset JSON: [{path, prompt, sharegpt4v, height, width, ratio}]")
    g.add_argument("--image_dir", default=None, help="folder the records' paths are relative to")
    g.add_argument("--feature_dir", default=None,
                   help="train from cached VAE latents + T5 embeddings (tools/extract_features.py) instead of images")
    g.add_argument("--skip_bad_records", type=str2bool, default=False,
                   help="drop invalid records with a warning instead of stopping (True|False)")
    g.add_argument("--multi_scale", type=str2bool, default=True, help="aspect-ratio buckets (else square images)")
    g.add_argument("--real_prompt_ratio", type=float, default=0.5,
                   help="probability of the `prompt` caption rather than `sharegpt4v`")
    g.add_argument("--class_dropout_prob", type=float, default=0.1,
                   help="probability of training on the null caption (for classifier-free guidance)")
    g.add_argument("--batch_size", type=int, default=1, help="images per rank per micro-batch")
    g.add_argument("--prefetch", type=int, default=2, help="batches loaded ahead by the loader thread")
    g = p.add_argument_group("model")
    g.add_argument("--version", choices=["sigma", "alpha"], default="sigma", help="PixArt-Σ (300 tokens) or α (120)")
    g.add_argument("--pretrained_path", default=None, help="a diffusers-format PixArt folder (all components)")
    g.add_argument("--checkpoint", default=None, help="DiT weights: .ckpt, .pth, .safetensors or transformer/")
    g.add_argument("--vae_root", default="models/vae")
    g.add_argument("--text_encoder_root", default="models/text_encoder")
    g.add_argument("--tokenizer_root", default="models/tokenizer")
    g.add_argument("--image_size", type=int, choices=IMAGE_SIZES, default=None,
                   help="base resolution: the aspect buckets and the model's input size / pe_interpolation "
                        "(default: what the weights record)")
    g.add_argument("--pe_interpolation", type=float, default=None, help="override the position-embedding scale")
    g.add_argument("--t5_max_length", type=int, default=None, help="text tokens (default: Σ 300, α 120)")
    g.add_argument("--kv_compress", type=str2bool, default=False, help="KV token compression (PixArt-Σ 2K/4K)")
    g.add_argument("--kv_compress_sampling", choices=["conv", "ave", "uniform"], default="conv")
    g.add_argument("--kv_compress_scale_factor", type=int, default=1)
    g.add_argument("--kv_compress_layer", type=int, nargs="*", default=None)
    g.add_argument("--attention_backend", choices=["auto", "math", "flash"], default="auto")
    g = p.add_argument_group("LoRA (train only low-rank adapters)")
    g.add_argument("--lora_rank", type=int, default=0, help="adapter rank; 0 = full fine-tuning")
    g.add_argument("--lora_alpha", type=float, default=None, help="adapter scale numerator (default: the rank)")
    g.add_argument("--lora_target_modules", nargs="+", default=None,
                   help="Dense layer name suffixes (default: the attention projections)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optim", choices=["came", "adamw"], default="came")
    g.add_argument("--start_learning_rate", type=float, default=2e-5)
    g.add_argument("--auto_lr", choices=["none", "sqrt", "linear"], default="none",
                   help="scale the learning rate by sqrt (or linearly in) global batch / 256")
    g.add_argument("--scheduler", choices=["constant", "cosine"], default="constant", help="after the warm-up")
    g.add_argument("--warmup_steps", type=int, default=1000)
    g.add_argument("--min_learning_rate", type=float, default=0.0, help="end of the cosine schedule")
    g.add_argument("--betas", type=float, nargs="+", default=None,
                   help="CAME: 3 betas (0.9 0.999 0.9999); AdamW: 2 (0.9 0.999)")
    g.add_argument("--eps", type=float, nargs="+", default=None, help="CAME: 2 eps (1e-30 1e-16); AdamW: 1 (1e-8)")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--clip_grad", type=str2bool, default=True, help="clip the gradients' global norm")
    g.add_argument("--max_grad_norm", type=float, default=0.01)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: epochs decide)")
    g.add_argument("--seed", type=int, default=42, help="fixes data order, noise, dropout: runs are reproducible")
    g = p.add_argument_group("precision and memory")
    g.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="mixed-precision compute dtype (weights stay fp32); auto: bf16 on Ascend, else fp32")
    g.add_argument("--amp_level", choices=["O2", "auto"], default="O2", help="MindSpore auto_mixed_precision level")
    g.add_argument("--init_loss_scale", type=float, default=65536.0, help="fp16 dynamic loss scale start")
    g.add_argument("--scale_window", type=int, default=1000, help="fp16: finite steps before the scale doubles")
    g.add_argument("--recompute", type=str2bool, default=False, help="recompute each block in the backward pass")
    g = p.add_argument_group("EMA")
    g.add_argument("--use_ema", type=str2bool, default=True)
    g.add_argument("--ema_rate", type=float, default=0.9999, help="EMA decay per optimizer step")
    g = p.add_argument_group("output, checkpoints, validation")
    g.add_argument("--output_path", default="output")
    g.add_argument("--log_loss_interval", type=int, default=10, help="log every N steps")
    g.add_argument("--ckpt_save_interval", type=int, default=500, help="checkpoint every N steps (and at the end)")
    g.add_argument("--ckpt_max_keep", type=int, default=3, help="keep the last K checkpoints (0: all)")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint in output_path, or from the given one")
    g.add_argument("--visualize", type=str2bool, default=False, help="validation images every visualize_interval")
    g.add_argument("--visualize_interval", type=int, default=500, help="steps between validation images")
    g.add_argument("--validation_prompts", nargs="*", default=DEFAULT_VALIDATION_PROMPTS)
    g.add_argument("--validation_negative_prompts", nargs="*", default=None)
    g.add_argument("--sampling_method", choices=["dpm", "sa-solver", "ddim", "iddpm"], default="dpm")
    g.add_argument("--sampling_steps", type=int, default=20)
    g.add_argument("--guidance_scale", type=float, default=4.5)
    g = p.add_argument_group("runtime")
    g.add_argument("--use_parallel", type=str2bool, default=False, help="data parallel over the msrun workers")
    g.add_argument("--device_target", choices=["Ascend", "GPU", "CPU"], default=None,
                   help="default: Ascend if present, else GPU, else CPU")
    return p


def check_args(args):
    """Option checks that need no files and no MindSpore: fail before anything loads."""
    positive = ("batch_size", "gradient_accumulation_steps", "epochs", "log_loss_interval", "ckpt_save_interval",
                "sampling_steps", "scale_window")
    for name in positive:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("max_steps", "warmup_steps", "ckpt_max_keep", "lora_rank", "visualize_interval", "prefetch"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ("real_prompt_ratio", "class_dropout_prob"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    if not 0.0 <= args.ema_rate < 1.0:
        raise ConfigError(f"--ema_rate must be in [0, 1), got {args.ema_rate}")
    if args.start_learning_rate <= 0 or args.max_grad_norm <= 0:
        raise ConfigError("--start_learning_rate and --max_grad_norm must be positive")
    if args.kv_compress and (args.kv_compress_scale_factor < 2 or not args.kv_compress_layer):
        raise ConfigError("--kv_compress needs --kv_compress_scale_factor >= 2 and --kv_compress_layer")
    if not args.feature_dir and not (args.json_path and args.image_dir):
        raise ConfigError("give --json_path and --image_dir (or --feature_dir with cached features)")
    if args.feature_dir and not os.path.isdir(args.feature_dir):
        raise ConfigError(f"--feature_dir {args.feature_dir} does not exist (create it with tools/extract_features.py)")
    if not args.feature_dir and args.image_size is None:
        raise ConfigError("--image_size is needed for the aspect-ratio buckets (256, 512, 1024 or 2048; the "
                          "configs in configs/train set it)")
    if args.lora_rank and args.lora_target_modules is None:
        from pixart.models.lora import DEFAULT_TARGETS

        args.lora_target_modules = list(DEFAULT_TARGETS)


def check_weights(args):
    """Fail fast, before anything loads, when a weights path is missing (sample.py's checks)."""
    from sample import check_component_folders, resolve_checkpoint

    if args.pretrained_path:
        if not os.path.isdir(os.path.join(args.pretrained_path, "transformer")):
            raise CheckpointError(f"{args.pretrained_path} is not a diffusers PixArt folder (--pretrained_path): "
                                  "it needs transformer/, vae/, text_encoder/ and tokenizer/")
        return
    if not args.checkpoint:
        raise ConfigError("give --pretrained_path (diffusers folder) or --checkpoint with the vae/text encoder roots")
    args.checkpoint = resolve_checkpoint(args.checkpoint)
    if not args.feature_dir or args.visualize:  # cached features replace the VAE and T5, except for validation
        check_component_folders(args)


def main(argv=None):
    args = parse_args_with_config(build_parser(), argv)
    check_args(args)
    check_weights(args)
    from pixart.train.outputs import check_output_folder, claim_output_folder, setup_logging

    # Nothing is written to output_path until every check has passed (outputs.py): a refused run
    # leaves an earlier run's folder as it was.
    check_output_folder(args.output_path, args.resume)
    import mindspore as ms

    from pixart.train.trainer import Trainer, init_distributed

    target = set_device(args.device_target)
    rank, world_size = init_distributed(args.use_parallel)
    setup_logging(rank, world_size)
    ms.set_seed(args.seed)
    trainer = Trainer(args, rank=rank, world_size=world_size, device_target=target)
    with claim_output_folder(args, rank, resumed_step=trainer.step if args.resume else None):
        return trainer.train()


if __name__ == "__main__":
    run_cli(main)

"""Command-line options, declared once and shared by sample.py, demo.py, train.py and tools/.

Each ``add_*_options(parser)`` adds one argument group; an entry point combines the groups it
needs, and a YAML file given with ``-c`` sets any of its options by name (the one config parser,
``pixart.utils.config``). Typed configs are then built from the parsed options:
``PipelineConfig.from_args`` (pixart/pipelines/config.py) and ``TrainConfig.from_args``
(pixart/train/config.py). Nothing here imports MindSpore, so ``--help`` and option errors are fast.
"""
from pixart.tables import BASE_SIZES, DTYPE_NAMES, SAMPLER_NAMES, VERSIONS
from pixart.utils.compile_cache import DEFAULT_ROOT as DEFAULT_COMPILE_CACHE
from pixart.utils.config import ArgumentParser, parse_args_with_config, str2bool  # noqa: F401 (re-exported)

DEVICE_TARGETS = ("Ascend", "GPU", "CPU")
MAX_SIDE = 8192
DEFAULT_PROMPT = "A small cactus with a happy face in the Sahara desert."


def add_config_option(p, help="YAML file whose keys set defaults for these options"):
    p.add_argument("-c", "--config", help=help)


def add_prompt_options(p):
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", default=None, help="the prompt (default: a demo prompt)")
    g.add_argument("--prompt_path", default=None, help="a text file with one prompt per line")
    g.add_argument("--negative_prompt", default="")


def add_image_options(p):
    g = p.add_argument_group("image")
    g.add_argument("--image_width", type=int, default=None, help="default: the model's base resolution")
    g.add_argument("--image_height", type=int, default=None)
    g.add_argument("--use_resolution_binning", type=str2bool, default=True,
                   help="generate at the nearest aspect-ratio bin, then resize and crop back (True|False)")
    g.add_argument("--seed", type=int, default=42, help="image k of a run uses seed + k")
    return g


def add_sampler_options(p, steps_default=None, title="sampler"):
    g = p.add_argument_group(title)
    g.add_argument("--sampling_method", choices=SAMPLER_NAMES, default="dpm")
    g.add_argument("--sampling_steps", type=int, default=steps_default,
                   help="default: 20 dpm, 25 sa-solver, 50 ddim, 100 iddpm, 4 lcm")
    g.add_argument("--timesteps", type=int, nargs="+", default=None,
                   help="custom timesteps, descending, instead of --sampling_steps (e.g. 400: PixArt-α-DMD's one step)")
    g.add_argument("--guidance_scale", type=float, default=4.5, help="classifier-free guidance (1 turns it off)")
    g.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    return g


def add_image_input_options(p):
    """img2img / inpainting from an init image."""
    g = p.add_argument_group("img2img / inpainting")
    g.add_argument("--init_image", default=None, help="start from this image (img2img; default size: the image's)")
    g.add_argument("--strength", type=float, default=None,
                   help="how much of the schedule to run, 0..1 (default 0.8; 1.0 with --mask_image)")
    g.add_argument("--mask_image", default=None, help="inpainting mask of the init image's size: white = repaint")
    return g


def add_weights_options(p, components=True):
    """Where the weights are: a diffusers pipeline folder, or a DiT checkpoint and component folders."""
    g = p.add_argument_group("weights")
    g.add_argument("--version", choices=VERSIONS, default="sigma",
                   help="PixArt-Σ (300 text tokens) or PixArt-α (120)")
    g.add_argument("--pretrained_path", default=None, help="a diffusers-format PixArt folder (all components) or its Hugging Face repo id")
    g.add_argument("--checkpoint", default=None, help="DiT weights: .ckpt, .pth, .safetensors or transformer/")
    if components:
        add_component_options(g)
    return g


def add_component_options(g):
    g.add_argument("--vae_root", default="models/vae")
    g.add_argument("--text_encoder_root", default="models/text_encoder")
    g.add_argument("--tokenizer_root", default="models/tokenizer")


def add_architecture_options(p):
    """What a DiT checkpoint may not record, and the runtime choices of its layers."""
    g = p.add_argument_group("architecture")
    g.add_argument("--image_size", type=int, choices=BASE_SIZES, default=None,
                   help="base resolution: the model's input size and pe_interpolation when the weights do not "
                        "record them, and training's aspect-ratio buckets")
    g.add_argument("--pe_interpolation", type=float, default=None,
                   help="position-embedding interpolation (default: by image_size, Σ: 256 0.5, 512 1, 1024 2, ...)")
    g.add_argument("--kv_compress", type=str2bool, default=False, help="KV token compression (PixArt-Σ 2K/4K)")
    g.add_argument("--kv_compress_sampling", choices=["conv", "ave", "uniform", "uniform_every"], default="conv")
    g.add_argument("--kv_compress_scale_factor", type=int, default=1)
    g.add_argument("--kv_compress_layer", type=int, nargs="*", default=None)
    g.add_argument("--attention_backend", choices=["auto", "math", "flash"], default="auto")
    return g


def add_lora_options(p):
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", default=None, help="LoRA adapters, merged into the DiT: train.py --lora_rank output, a peft/diffusers or a kohya/OneTrainer file")
    g.add_argument("--lora_scale", type=float, default=1.0, help="strength of the LoRA update (1 = as trained)")
    return g


def add_controlnet_options(p):
    g = p.add_argument_group("ControlNet")
    g.add_argument("--controlnet", default=None,
                   help="ControlNet weights: the official .pth, a diffusers PixArtControlNetAdapterModel folder, or "
                        "train.py --controlnet's controlnet.ckpt")
    g.add_argument("--control_image", default=None,
                   help="the control image (e.g. an edge map from tools/make_control_images.py); its size is the "
                        "default image size")
    g.add_argument("--controlnet_conditioning_scale", type=float, default=1.0,
                   help="strength of the control in [0, 1] (1 = as trained)")
    return g


def add_device_option(g):
    g.add_argument("--device_target", choices=DEVICE_TARGETS, default=None,
                   help="default: Ascend if present, else GPU, else CPU")


def add_runtime_options(p):
    """Inference runtime: parameter dtype, execution mode, device."""
    g = p.add_argument_group("runtime")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="DiT parameter dtype")
    g.add_argument("--mode", choices=["graph", "pynative"], default="graph",
                   help="graph compiles the denoiser; pynative runs it eagerly")
    g.add_argument("--compile_cache", default=DEFAULT_COMPILE_CACHE,
                   help="folder where compiled denoiser graphs are kept for later runs of the same size "
                        "(graph mode; default %(default)s, or $PIXART_COMPILE_CACHE; none: off)")
    add_device_option(g)
    return g


def add_data_options(p):
    """A training set: records and images, or cached features."""
    g = p.add_argument_group("data")
    g.add_argument("--json_path", default=None, help="dataset JSON: [{path, prompt, sharegpt4v, height, width, ratio}]")
    g.add_argument("--image_dir", default=None, help="folder the records' paths are relative to")
    g.add_argument("--feature_dir", default=None,
                   help="cached VAE latents + T5 embeddings (tools/extract_features.py writes them, train.py reads them)")
    g.add_argument("--skip_bad_records", type=str2bool, default=False,
                   help="drop invalid records with a warning instead of stopping (True|False)")
    g.add_argument("--multi_scale", type=str2bool, default=True, help="aspect-ratio buckets (else square images)")
    g.add_argument("--t5_max_length", type=int, default=None, help="text tokens (default: Σ 300, α 120)")
    return g


def sample_parser():
    """sample.py's options (demo.py adds its server's)."""
    p = ArgumentParser(prog="sample.py", description="PixArt text-to-image sampling")
    add_config_option(p)
    add_prompt_options(p)
    g = add_image_options(p)
    g.add_argument("--num_images", type=int, default=1, help="images per prompt")
    g.add_argument("--batch_size", type=int, default=1, help="images per denoiser call")
    g.add_argument("--imagegrid", type=str2bool, default=False, help="also save all images as one grid")
    g.add_argument("--output_path", default="samples")
    add_sampler_options(p)
    add_image_input_options(p)
    add_weights_options(p)
    add_architecture_options(p)
    add_lora_options(p)
    add_controlnet_options(p)
    add_runtime_options(p)
    return p


def check_side(name, value, flag=True):
    """An image side: a multiple of 8 in [8, MAX_SIDE]; ``flag`` words the message for the command line."""
    label = f"--{name}" if flag else name
    from pixart.utils.errors import ConfigError

    if value is None or value != int(value) or value % 8 or not 8 <= value <= MAX_SIDE:
        raise ConfigError(f"{label} must be a multiple of 8 between 8 and {MAX_SIDE}, got {value}")
    return int(value)


def train_parser():
    """train.py's options."""
    p = ArgumentParser(prog="train.py", description="PixArt fine-tuning")
    add_config_option(p)
    g = add_data_options(p)
    g.add_argument("--real_prompt_ratio", type=float, default=0.5,
                   help="probability of the `prompt` caption rather than `sharegpt4v`")
    g.add_argument("--class_dropout_prob", type=float, default=0.1,
                   help="probability of training on the null caption (for classifier-free guidance)")
    g.add_argument("--batch_size", type=int, default=1, help="images per rank per micro-batch")
    g.add_argument("--prefetch", type=int, default=2, help="batches loaded ahead by the loader thread")
    add_weights_options(p)
    add_architecture_options(p)
    g = p.add_argument_group("LoRA (train only low-rank adapters)")
    g.add_argument("--lora_rank", type=int, default=0, help="adapter rank; 0 = full fine-tuning")
    g.add_argument("--lora_alpha", type=float, default=None, help="adapter scale numerator (default: the rank)")
    g.add_argument("--lora_target_modules", nargs="+", default=None,
                   help="Dense layer name suffixes (default: the attention projections)")
    g = p.add_argument_group("ControlNet (train only a ControlNet branch; records need a `control` image)")
    g.add_argument("--controlnet", nargs="?", const="init", default=None,
                   help="no value: a new branch copied from the DiT's first blocks; PATH: continue from those weights")
    g.add_argument("--controlnet_layers", type=int, default=None, help="copied blocks of a new branch (default 13)")
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
    g.add_argument("--dtype", choices=("auto",) + DTYPE_NAMES, default="auto",
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
    g.add_argument("--validation_prompts", nargs="*", default=[DEFAULT_PROMPT])
    g.add_argument("--validation_negative_prompts", nargs="*", default=None)
    add_sampler_options(p, steps_default=20, title="validation sampling")
    g = p.add_argument_group("runtime")
    g.add_argument("--use_parallel", type=str2bool, default=False, help="data parallel over the msrun workers")
    add_device_option(g)
    return p


def extract_features_parser():
    """tools/extract_features.py's options; with ``-c`` a training YAML's other keys are ignored."""
    p = ArgumentParser(prog="tools/extract_features.py", description="precompute VAE latents and T5 embeddings")
    add_config_option(p, help="training YAML; the keys of the options below are taken from it")
    g = add_data_options(p)
    g.add_argument("--clean_caption", type=str2bool, default=False,
                   help="diffusers' caption cleaning before T5 (train.py feeds captions as they are)")
    g = p.add_argument_group("weights")
    g.add_argument("--version", choices=VERSIONS, default="sigma", help="sets the default t5_max_length")
    g.add_argument("--image_size", type=int, choices=BASE_SIZES, default=None,
                   help="base resolution of the model to train: picks the aspect-ratio buckets")
    g.add_argument("--pretrained_path", default=None,
                   help="a diffusers PixArt folder (its vae/, text_encoder/ and tokenizer/ are used)")
    add_component_options(g)
    g = p.add_argument_group("storage and runtime")
    g.add_argument("--keep_padding", type=str2bool, default=False,
                   help="also store T5 outputs at padded positions (masked in training; default: drop them)")
    g.add_argument("--embed_dtype", choices=DTYPE_NAMES, default="fp32", help="storage dtype of T5 embeddings")
    g.add_argument("--overwrite", type=str2bool, default=False, help="recompute everything, even current files")
    g.add_argument("--progress", type=str2bool, default=True, help="show progress bars")
    add_device_option(g)
    return p

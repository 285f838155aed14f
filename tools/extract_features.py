"""Precompute the VAE latents and T5 caption embeddings of a training set (see pixart/data/features.py).

    python tools/extract_features.py -c configs/train/<config>.yaml --json_path labels.json \
        --image_dir images/ --feature_dir features/ --pretrained_path PixArt-Sigma-XL-2-512-MS

Each image is resized and centre-cropped to its aspect bucket exactly as the training dataset
does, encoded by the VAE, and its posterior (mean, std) stored; each record's `prompt` and
`sharegpt4v` captions go through T5 (300 tokens for Σ, 120 for α), uncleaned by default as
train.py feeds them. Train with
``--feature_dir features/`` and neither model is loaded during training.

Resumable: every file is written atomically and records whose files are current (same image,
bucket and captions) are skipped, so an interrupted run is simply started again. A folder made
with other settings or other VAE/T5 weights is refused (``--overwrite True`` recomputes it).

``-c`` takes a training YAML: the keys below are read from it, its other (training) keys are
ignored, with a warning for a key that looks like a misspelt one of these.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only

from pixart.data.aspect_ratios import BASE_SIZES, get_bins  # noqa: E402
from pixart.data.dataset import load_records  # noqa: E402
from pixart.data.extract import EMBED_DTYPES, extract_features  # noqa: E402
from pixart.utils.config import ArgumentParser, parse_args_with_config, str2bool  # noqa: E402
from pixart.utils.errors import CheckpointError, ConfigError, run_cli  # noqa: E402

logger = logging.getLogger("extract_features")

MAX_LENGTH = {"sigma": 300, "alpha": 120}


def build_parser():
    p = ArgumentParser(prog="tools/extract_features.py", description="precompute VAE latents and T5 embeddings")
    p.add_argument("-c", "--config", help="training YAML; the keys of the options below are taken from it")
    g = p.add_argument_group("data")
    g.add_argument("--json_path", default=None, help="dataset JSON (list of records)")
    g.add_argument("--image_dir", default=None, help="folder the records' paths are relative to")
    g.add_argument("--feature_dir", default=None, help="output folder (created; resumed if it exists)")
    g.add_argument("--skip_bad_records", type=str2bool, default=False, help="drop invalid records instead of failing")
    g = p.add_argument_group("model")
    g.add_argument("--version", choices=["sigma", "alpha"], default="sigma", help="sets the default t5_max_length")
    g.add_argument("--image_size", type=int, choices=list(BASE_SIZES), default=None,
                   help="base resolution of the model to train: picks the aspect-ratio buckets")
    g.add_argument("--multi_scale", type=str2bool, default=True,
                   help="aspect-ratio buckets (else every image is cropped square), as in train.py")
    g.add_argument("--t5_max_length", type=int, default=None, help="T5 tokens (default 300 for sigma, 120 for alpha)")
    g.add_argument("--clean_caption", type=str2bool, default=False,
                   help="diffusers' caption cleaning before T5 (train.py feeds captions as they are)")
    g.add_argument("--pretrained_path", default=None,
                   help="a diffusers PixArt folder (its vae/, text_encoder/ and tokenizer/ are used)")
    g.add_argument("--vae_root", default="models/vae")
    g.add_argument("--text_encoder_root", default="models/text_encoder")
    g.add_argument("--tokenizer_root", default="models/tokenizer")
    g = p.add_argument_group("storage and runtime")
    g.add_argument("--keep_padding", type=str2bool, default=False,
                   help="also store T5 outputs at padded positions (masked in training; default: drop them)")
    g.add_argument("--embed_dtype", choices=list(EMBED_DTYPES), default="fp32", help="storage dtype of T5 embeddings")
    g.add_argument("--overwrite", type=str2bool, default=False, help="recompute everything, even current files")
    g.add_argument("--batch_size", type=int, default=8, help="images / captions per VAE / T5 call")
    g.add_argument("--device_target", choices=["Ascend", "GPU", "CPU"], default=None)
    g.add_argument("--progress", type=str2bool, default=True, help="show progress bars")
    return p


def parse_args(argv=None):
    """Command line over the YAML's values for our options; the YAML's training keys are ignored."""
    return parse_args_with_config(build_parser(), argv, ignore_unknown=True)


def check_args(args):
    for flag in ("json_path", "image_dir", "feature_dir", "image_size"):
        if getattr(args, flag) is None:
            raise ConfigError(f"--{flag} is required (on the command line or in the -c config)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.t5_max_length is None:
        args.t5_max_length = MAX_LENGTH[args.version]
    if args.t5_max_length < 1:
        raise ConfigError(f"--t5_max_length must be at least 1, got {args.t5_max_length}")


def component_folders(args):
    """(vae, text_encoder, tokenizer) folders; a missing one is a CheckpointError naming the flag."""
    if args.pretrained_path:
        folders = [(os.path.join(args.pretrained_path, sub), "pretrained_path") for sub in
                   ("vae", "text_encoder", "tokenizer")]
    else:
        folders = [(args.vae_root, "vae_root"), (args.text_encoder_root, "text_encoder_root"),
                   (args.tokenizer_root, "tokenizer_root")]
    for folder, flag in folders:
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder} not found (--{flag}): a diffusers vae/, text_encoder/ or tokenizer/ "
                                  "folder, e.g. from PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers")
    return [folder for folder, _ in folders]


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    check_args(args)
    vae_root, text_encoder_root, tokenizer_root = component_folders(args)
    records, counts = load_records(args.json_path, args.image_dir, skip_bad_records=args.skip_bad_records)
    # The buckets train.py uses: the aspect-ratio bins, or one square bucket without multi_scale.
    bins = get_bins(args.image_size) if args.multi_scale else {"1.0": (args.image_size, args.image_size)}

    import mindspore as ms

    if args.device_target:
        ms.set_device(args.device_target)
    ms.set_context(mode=ms.PYNATIVE_MODE)  # each model runs once per batch: compiling would not pay off
    summary = extract_features(records, args.image_dir, args.feature_dir, bins, vae_root, text_encoder_root,
                               tokenizer_root, max_length=args.t5_max_length, image_size=args.image_size,
                               batch_size=args.batch_size, clean_caption=args.clean_caption,
                               keep_padding=args.keep_padding, embed_dtype=args.embed_dtype,
                               overwrite=args.overwrite, counts=counts, progress=args.progress)
    logger.info("features of %d/%d records in %s (%d images and %d captions encoded now, %d unreadable)",
                summary["with_features"], summary["records"], args.feature_dir, summary["encoded_images"],
                summary["encoded_captions"], summary["unreadable"])


if __name__ == "__main__":
    run_cli(main)

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

``-c`` takes a training YAML: the keys of this tool's options (``--help``) are read from it, its
other (training) keys are ignored, with a warning for a key that looks like a misspelt option.
The YAML's ``batch_size`` (images per training step) is one of the ignored keys: every image and
caption is encoded on its own, as train.py does without a cache, so the features are bit for bit
what it would compute.
"""
import logging
import os

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only

from pixart.cli import extract_features_parser, parse_args_with_config  # noqa: E402
from pixart.data.aspect_ratios import get_bins  # noqa: E402
from pixart.data.dataset import load_records  # noqa: E402
from pixart.data.extract import extract_features  # noqa: E402
from pixart.tables import TEXT_TOKENS  # noqa: E402
from pixart.utils.errors import CheckpointError, ConfigError, run_cli  # noqa: E402

logger = logging.getLogger("extract_features")


def parse_args(argv=None):
    """Command line over the YAML's values for our options; the YAML's training keys are ignored."""
    return parse_args_with_config(extract_features_parser(), argv, ignore_unknown=True)


def check_args(args):
    for flag in ("json_path", "image_dir", "feature_dir", "image_size"):
        if getattr(args, flag) is None:
            raise ConfigError(f"--{flag} is required (on the command line or in the -c config)")
    if args.t5_max_length is None:
        args.t5_max_length = TEXT_TOKENS[args.version]
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

    from pixart.utils.device import set_device  # imports MindSpore: after the checks above

    set_device(args.device_target)  # eager: each model runs once per batch, compiling would not pay off
    summary = extract_features(records, args.image_dir, args.feature_dir, bins, vae_root, text_encoder_root,
                               tokenizer_root, max_length=args.t5_max_length, image_size=args.image_size,
                               clean_caption=args.clean_caption,
                               keep_padding=args.keep_padding, embed_dtype=args.embed_dtype,
                               overwrite=args.overwrite, counts=counts, progress=args.progress)
    logger.info("features of %d/%d records in %s (%d images and %d captions encoded now, %d unreadable)",
                summary["with_features"], summary["records"], args.feature_dir, summary["encoded_images"],
                summary["encoded_captions"], summary["unreadable"])


if __name__ == "__main__":
    run_cli(main)

"""Feature extraction: precompute the VAE posteriors and T5 caption embeddings of a training set.

``extract_features`` writes the folder that ``pixart.data.features.FeatureDataset`` reads (the
command line is ``tools/extract_features.py``). Each image is resized and centre-cropped to its
aspect bucket exactly as the training dataset does, encoded by the VAE, and its posterior (mean,
std) stored; each record's captions go through T5. Every file is written atomically and current
files are skipped, so an interrupted extraction is simply started again.
"""
import gc
import hashlib
import json
import logging
import os

from pixart.data.dataset import TrainDataset, UnreadableImage
from pixart.data.features import (CAPTION_SOURCES, FORMAT, FORMAT_VERSION, INDEX_NAME, NULL_NAME, encode_captions,
                                  encode_posteriors, file_is_current, latent_file, latent_meta, text_file, text_meta,
                                  write_index, write_latent_file, write_text_file)
from pixart.tables import DTYPE_NAMES, np_dtype
from pixart.utils.checkpoint import save_safetensors
from pixart.utils.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

# Config entries that make two extractions incompatible (paths are recorded but may change).
_COMPATIBILITY_KEYS = ("image_size", "bins", "max_length", "clean_caption", "keep_padding", "embed_dtype",
                       "scaling_factor", "latent_channels", "vae_downscale", "vae_fingerprint",
                       "text_encoder_fingerprint", "tokenizer_fingerprint")


def fingerprint(folder):
    """Identity of a model folder that survives moving it: its config files and weight file sizes."""
    digest = hashlib.sha1()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith((".json", ".model", ".txt")):
            with open(path, "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
        else:
            digest.update(f"{name}\0{os.path.getsize(path)}".encode())
    return digest.hexdigest()


def _progress(total, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it", disable=not enabled or total == 0, mininterval=1.0)


def extract_features(records, image_dir, feature_dir, bins, vae_root, text_encoder_root, tokenizer_root,
                     max_length=300, image_size=None, clean_caption=False, keep_padding=False,
                     embed_dtype="fp32", overwrite=False, counts=None, progress=True):
    """Write the feature folder for `records` (validated, from ``load_records``); returns a summary dict.

    Pass 1 encodes the images with the VAE, which is then freed; pass 2 encodes the captions with
    T5, so the two models are never in memory together. Each image and caption is encoded on its
    own (``encode_posteriors`` / ``encode_captions``, as on-the-fly training does), so the stored
    numbers are bit for bit what training without the cache computes. Unreadable images are
    skipped (logged) and left out of the index.
    """
    # Model imports load MindSpore: done here, so --help and argument errors stay fast.
    from pixart.models.autoencoder_kl import AutoencoderKL, VAEConfig
    from pixart.models.t5 import T5Encoder
    from pixart.models.tokenizer import PromptTokenizer

    if embed_dtype not in DTYPE_NAMES:
        raise ConfigError(f"embed_dtype must be one of {list(DTYPE_NAMES)}, got {embed_dtype!r}")
    vae_config_path = os.path.join(vae_root, "config.json")
    if not os.path.isfile(vae_config_path):
        raise CheckpointError(f"{vae_config_path} is missing: --vae_root must be a diffusers vae/ folder")
    with open(vae_config_path) as f:
        vae_config = VAEConfig.from_dict(json.load(f), source=vae_config_path)
    config = {
        "image_size": image_size, "bins": {k: list(v) for k, v in bins.items()}, "max_length": int(max_length),
        "clean_caption": bool(clean_caption), "keep_padding": bool(keep_padding), "embed_dtype": embed_dtype,
        "scaling_factor": float(vae_config.scaling_factor), "latent_channels": int(vae_config.latent_channels),
        "vae_downscale": int(vae_config.downscale),
        "vae_fingerprint": fingerprint(vae_root), "text_encoder_fingerprint": fingerprint(text_encoder_root),
        "tokenizer_fingerprint": fingerprint(tokenizer_root),
        "vae": os.path.abspath(vae_root), "text_encoder": os.path.abspath(text_encoder_root),
        "tokenizer": os.path.abspath(tokenizer_root),
    }
    _claim_folder(feature_dir, config, overwrite)

    images = TrainDataset(records, image_dir, bins, real_prompt_ratio=1.0)  # only its images are used
    unreadable = set()

    # Pass 1: VAE posteriors, one bucket at a time (a VAE batch needs one size). Records of the
    # same image share one file, computed once.
    todo, scheduled = {}, {}
    for i, record in enumerate(records):
        name = latent_file(record)
        if name in scheduled:
            scheduled[name].append(i)
            continue
        meta = latent_meta(record, image_dir, images.bucket_size(i))
        if overwrite or not file_is_current(os.path.join(feature_dir, name), meta):
            scheduled[name] = [i]
            todo.setdefault(images.bucket_size(i), []).append((i, name, meta))
    num_images = sum(map(len, todo.values()))
    if num_images:
        vae = AutoencoderKL.from_pretrained(vae_root).set_train(False)
        with _progress(num_images, "VAE latents", progress) as bar:
            for jobs in todo.values():
                for i, name, meta in jobs:
                    try:
                        image = images.get(i)["image"]  # (3, H, W) in [-1, 1], bucket size
                    except UnreadableImage as err:
                        logger.warning("skipping image %s: %s", records[i]["path"], err)
                        unreadable.update(scheduled[name])
                    else:
                        mean, std = encode_posteriors(vae, image[None])
                        write_latent_file(os.path.join(feature_dir, name), mean[0], std[0], meta)
                    bar.update(1)
        del vae
        gc.collect()

    # Pass 2: T5 embeddings of both captions of every record (and of the empty caption).
    captions, pending = [], {}
    for i, record in enumerate(records):
        name = text_file(record)
        if i in unreadable or name in pending:
            continue
        meta = text_meta(record)
        if overwrite or not file_is_current(os.path.join(feature_dir, name), meta):
            sources = [s for s in CAPTION_SOURCES if s == "prompt" or record[s]]
            pending[name] = {"meta": meta, "missing": len(sources), "captions": {}}
            captions += [(name, s, record[s]) for s in sources]
    null_file = os.path.join(feature_dir, NULL_NAME)
    need_null = overwrite or not file_is_current(null_file, {"caption": ""})
    if captions or need_null:
        tokenizer = PromptTokenizer.from_pretrained(tokenizer_root)
        encoder = T5Encoder.from_pretrained(text_encoder_root)
        dtype = np_dtype(embed_dtype)
        with _progress(len(captions), "T5 captions", progress) as bar:
            for name, source, caption in captions:
                embeds, mask = encode_captions(tokenizer, encoder, [caption], max_length, clean_caption)
                job = pending[name]
                job["captions"][source] = (embeds[0], mask[0])
                job["missing"] -= 1
                if job["missing"] == 0:  # all of the record's captions done: write, forget
                    write_text_file(os.path.join(feature_dir, name), job["captions"], job["meta"], keep_padding, dtype)
                    del pending[name]
                bar.update(1)
        if need_null:  # kept whole (padding included): it is one file
            embeds, mask = encode_captions(tokenizer, encoder, [""], max_length, clean_caption)
            save_safetensors({"embeds": embeds[0].astype(dtype), "mask": mask[0]}, null_file,
                             metadata={"caption": ""})
        del encoder
        gc.collect()

    # ControlNet training sets (every record has a `control` image): the hint latents too.
    control_files = {}
    if records and all("control" in r for r in records):
        from pixart.train.controlnet import extract_control_latents

        control_files = extract_control_latents(records, image_dir, feature_dir, bins, vae_root, overwrite)
    done = [i for i in range(len(records)) if i not in unreadable]
    index_records = [{**records[i], "latent_file": latent_file(records[i]), "text_file": text_file(records[i]),
                      **({"control_file": control_files[i]} if i in control_files else {})} for i in done]
    encoded = num_images - len({latent_file(records[i]) for i in unreadable})
    summary = {"records": len(records), "with_features": len(done), "unreadable": len(unreadable),
               "encoded_images": encoded, "encoded_captions": len(captions)}
    write_index(feature_dir, {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": True,
                              "config": config, "counts": {**(counts or {}), **summary},
                              "records": index_records})
    return summary


def _claim_folder(feature_dir, config, overwrite):
    """Create the folder, or check that an existing one was made with compatible settings; mark it
    incomplete until this run finishes."""
    index_file = os.path.join(feature_dir, INDEX_NAME)
    if os.path.isfile(index_file) and not overwrite:
        with open(index_file, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("format") != FORMAT:
            raise ConfigError(f"{feature_dir} holds a {INDEX_NAME} that is not a feature index; choose another folder")
        previous = old.get("config", {})
        changed = [k for k in _COMPATIBILITY_KEYS if previous.get(k) != config[k]]
        if changed or old.get("format_version") != FORMAT_VERSION:
            what = ", ".join(changed) or "format version"
            raise ConfigError(f"{feature_dir} holds features made with other settings ({what} differ); use a new "
                              "--feature_dir or --overwrite True")
    elif os.path.isdir(feature_dir) and os.listdir(feature_dir) and not overwrite:
        raise ConfigError(f"{feature_dir} exists and is not a feature folder; choose an empty or new folder")
    os.makedirs(feature_dir, exist_ok=True)
    write_index(feature_dir, {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False,
                              "config": config, "records": []})

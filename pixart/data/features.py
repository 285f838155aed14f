"""Cached training features: VAE posteriors and T5 caption embeddings computed once, read every step.

On-the-fly training runs the VAE encoder and T5-XXL on every batch, although neither is trained:
``tools/extract_features.py`` runs them once per record and this module reads the results. A
feature folder holds

    index.json                      format, config (VAE/T5 fingerprints, max_length, bins, scaling
                                    factor...), the records that have features, counts
    null.safetensors                T5 of the empty caption: embeds (L, D), mask (L,)
    latents/<hash>.safetensors      the posterior of the record's image at its bucket size:
                                    mean, std (C, h, w) float32, unscaled
    text/<hash>.safetensors         prompt_embeds (n, D), prompt_mask (L,) [, sharegpt4v_embeds,
                                    sharegpt4v_mask]; n = number of real tokens unless the padding
                                    was kept (then n = L)

The posterior, not a sample, is stored, so training still draws z = (mean + std · ε) · scaling_factor
with fresh ε every epoch exactly as on-the-fly training does; both captions are stored so
``real_prompt_ratio`` keeps working. Padded T5 positions are not stored by default (they are
masked out of the DiT's cross-attention, so their values never reach the output) and come back
as zeros.

Drop-in for the on-the-fly dataset:

    dataset = FeatureDataset(feature_dir, real_prompt_ratio=0.5, seed=seed)
    sampler = BucketBatchSampler(dataset.records, dataset.bins, batch_size, seed=seed, ...)
    for indices in sampler:
        batch, skipped = load_feature_batch(dataset, indices, epoch)
        # batch["latents"] (B, C, h, w) scaled, batch["caption_embeds"] (B, L, D), batch["caption_mask"] (B, L)

and on-the-fly training gives the same numbers: both encode with ``encode_posteriors`` and
``encode_captions`` (one image / caption per VAE / T5 call) and draw the latents with
``sample_latents(mean, std, latent_noise(...), scaling_factor)``.
"""
import hashlib
import json
import logging
import os

import numpy as np

from ..utils.checkpoint import read_safetensors, read_safetensors_metadata, save_safetensors
from ..utils.errors import ConfigError, PixArtError
from .dataset import TrainDataset, batch_metadata, bucket_of, collect_batch_items

logger = logging.getLogger(__name__)

FORMAT = "pixart-features"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
NULL_NAME = "null.safetensors"
CAPTION_SOURCES = ("prompt", "sharegpt4v")
# Appended to (seed, epoch, index) to seed the latent noise: a stream distinct from the caption
# choice / flip draws of TrainDataset, which are seeded by (seed, epoch, index) alone.
NOISE_STREAM = 1


class UnreadableFeature(PixArtError):
    """A feature file listed in the index is missing or damaged; the batch loader skips its record."""


# ----------------------------------------------------------------------------------------------
# Latent sampling shared by cached and on-the-fly training
# ----------------------------------------------------------------------------------------------

def latent_noise(seed, epoch, indices, shape):
    """ε for the records `indices`: float32 (B, C, h, w), fixed by (seed, epoch, index).

    Each record's draw depends only on its own index, so the noise does not depend on the batch
    it lands in; a resumed run sees the same ε as the uninterrupted one.
    """
    return np.stack([np.random.default_rng([int(seed), int(epoch), int(idx), NOISE_STREAM])
                     .standard_normal(tuple(shape), dtype=np.float32) for idx in indices])


def sample_latents(mean, std, noise, scaling_factor):
    """z = (mean + std · ε) · scaling_factor, float32, the same float32 operations (and so the same
    bits) as ``DiagonalGaussian.sample(noise=ε) * scaling_factor`` on the VAE's output."""
    mean, std, noise = (np.asarray(a, dtype=np.float32) for a in (mean, std, noise))
    if noise.shape != mean.shape:
        raise ValueError(f"noise shape {noise.shape} != latent shape {mean.shape}")
    return (mean + std * noise) * np.float32(scaling_factor)


def encode_posteriors(vae, images):
    """(B, 3, H, W) images in [-1, 1] -> the VAE posterior (mean, std), float32 numpy (B, C, h, w).

    One image per VAE call: CPU convolution kernels round differently at other batch sizes
    (measured on AVX2 CPUs), and an image's features must not depend on the batch it came in.
    """
    import mindspore as ms

    posteriors = [vae.encode(ms.Tensor(np.asarray(images[k:k + 1], np.float32))) for k in range(len(images))]
    return (np.concatenate([p.mean.astype(ms.float32).asnumpy() for p in posteriors]),
            np.concatenate([p.std.astype(ms.float32).asnumpy() for p in posteriors]))


def encode_captions(tokenizer, encoder, captions, max_length, clean_caption=False):
    """Captions -> T5 (embeds (B, L, D) float32, mask (B, L) int32) numpy, padded to ``max_length``.

    One caption per T5 call, for the reason of ``encode_posteriors`` (GEMM kernels round a row
    differently for other row counts).
    """
    from ..models.tokenizer import encode_prompts

    outputs = [encode_prompts(tokenizer, encoder, [caption], max_length, clean_caption) for caption in captions]
    return (np.concatenate([e.asnumpy().astype(np.float32) for e, _ in outputs]),
            np.concatenate([m.asnumpy().astype(np.int32) for _, m in outputs]))


# ----------------------------------------------------------------------------------------------
# The folder layout (written by tools/extract_features.py)
# ----------------------------------------------------------------------------------------------

def _sha1(text):
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _key(text):
    """Two-level file stem ("ab/cdef...") from a hash, to keep folders small."""
    digest = _sha1(text)[:24]
    return f"{digest[:2]}/{digest[2:]}"


def latent_file(record):
    """Path of a record's posterior, relative to the feature folder. Named by the image path and
    size (which set the bucket), so it is stable when the JSON is reordered or extended (a re-run
    finds what is done) and shared by records of the same image."""
    source = "\0".join([record["path"], str(record["height"]), str(record["width"])])
    return f"latents/{_key(source)}.safetensors"


def text_file(record):
    """Path of a record's caption embeddings, relative to the feature folder. Named by the image
    path and both captions, so several records of one image with different captions do not clash."""
    source = "\0".join([record["path"], *(record[s] for s in CAPTION_SOURCES)])
    return f"text/{_key(source)}.safetensors"


def latent_meta(record, image_dir, size):
    """What a latent file was computed from: the image (path, bytes, mtime) and the bucket size."""
    stat = os.stat(os.path.join(image_dir, record["path"]))
    return {"path": record["path"], "size": f"{size[0]}x{size[1]}", "bytes": str(stat.st_size),
            "mtime_ns": str(stat.st_mtime_ns)}


def text_meta(record):
    """What a text file was computed from: the two captions (hashed)."""
    return {"path": record["path"], **{source: _sha1(record[source]) for source in CAPTION_SOURCES}}


def file_is_current(path, meta):
    """True if `path` is a complete feature file written from exactly `meta` (resuming skips it)."""
    if not os.path.isfile(path):
        return False
    try:
        stored = read_safetensors_metadata(path)
    except (PixArtError, OSError):
        return False  # a damaged file is recomputed
    return stored == {k: str(v) for k, v in meta.items()}


def write_latent_file(path, mean, std, meta):
    """Atomically store one posterior: mean, std (C, h, w) float32, unscaled."""
    save_safetensors({"mean": np.asarray(mean, np.float32), "std": np.asarray(std, np.float32)}, path, metadata=meta)


def write_text_file(path, captions, meta, keep_padding=False, dtype=np.float32):
    """Atomically store a record's caption embeddings.

    captions: {source: (embeds (L, D), mask (L,))} for the sources present. Without keep_padding
    only the real tokens (the mask's leading ones) are kept.
    """
    state = {}
    for source, (embeds, mask) in captions.items():
        embeds, mask = np.asarray(embeds), np.asarray(mask, np.int32)
        length = embeds.shape[0] if keep_padding else int(mask.sum())
        state[f"{source}_embeds"] = np.ascontiguousarray(embeds[:length]).astype(dtype)
        state[f"{source}_mask"] = mask
    save_safetensors(state, path, metadata=meta)


def write_index(feature_dir, index):
    """Write index.json atomically (temporary file + rename)."""
    path = os.path.join(feature_dir, INDEX_NAME)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_index(feature_dir):
    """The folder's index.json, checked to be a complete feature index; else a ConfigError."""
    path = os.path.join(feature_dir, INDEX_NAME)
    if not os.path.isfile(path):
        raise ConfigError(f"{feature_dir} is not a feature folder ({INDEX_NAME} missing); create it with "
                          "python tools/extract_features.py")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a PixArt feature index")
    if index.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path} has feature format version {index.get('format_version')}, this code reads "
                          f"{FORMAT_VERSION}; extract the features again")
    if not index.get("complete"):
        raise ConfigError(f"feature extraction into {feature_dir} did not finish; run tools/extract_features.py "
                          "again with the same arguments to complete it")
    if not index.get("records"):
        raise ConfigError(f"{path} lists no records with features")
    return index


def _pad(embeds, length):
    """(n, D) -> (length, D) float32, zero rows appended."""
    embeds = np.asarray(embeds, dtype=np.float32)
    if embeds.shape[0] == length:
        return np.array(embeds)
    out = np.zeros((length, embeds.shape[1]), np.float32)
    out[:embeds.shape[0]] = embeds
    return out


def _read(path):
    """{name: own numpy copy} of a feature file, or UnreadableFeature."""
    try:
        return {k: np.array(v) for k, v in read_safetensors(path).items()}
    except (PixArtError, OSError, ValueError) as err:
        raise UnreadableFeature(f"cannot read feature file {path}: {err}") from None


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------

class FeatureDataset(TrainDataset):
    """TrainDataset over a feature folder: same records, buckets and caption choice, no decoding.

    The caption choice (``choose_caption``) and bucket sizes are TrainDataset's own, so for the
    same (seed, epoch, index) both datasets pick the same caption. ``records`` and ``bins`` feed
    ``BucketBatchSampler`` exactly as for the image dataset. Random flips are not available
    (features are of the unflipped image).

    Attributes: config (the extraction config from index.json), scaling_factor, max_length,
    latent_channels, feature_dir.
    """

    def __init__(self, feature_dir, real_prompt_ratio=0.5, seed=0):
        index = read_index(feature_dir)
        config = index["config"]
        bins = {key: tuple(size) for key, size in config["bins"].items()}
        super().__init__(index["records"], image_dir=None, bins=bins, real_prompt_ratio=real_prompt_ratio,
                         seed=seed, random_flip=False)
        self.feature_dir = feature_dir
        self.config = config
        self.scaling_factor = float(config["scaling_factor"])
        self.max_length = int(config["max_length"])
        self.latent_channels = int(config["latent_channels"])
        self.downscale = int(config["vae_downscale"])

    def check_compatible(self, image_size=None, max_length=None, clean_caption=None):
        """Raise a ConfigError if the features were extracted for another base resolution, T5
        length or caption cleaning than the training run uses (None: not checked)."""
        wanted = {"image_size": image_size, "max_length": max_length, "clean_caption": clean_caption}
        differing = [f"{key} {self.config.get(key)!r} (training uses {value!r})" for key, value in wanted.items()
                     if value is not None and self.config.get(key) != value]
        if differing:
            raise ConfigError(f"the features in {self.feature_dir} were extracted with {', '.join(differing)}; "
                              "extract them again for this configuration")

    def null_caption(self):
        """T5 of the empty caption: (embeds float32 (1, L, D), mask int32 (1, L)), e.g. the negative
        prompt for validation images without loading T5."""
        state = _read(os.path.join(self.feature_dir, NULL_NAME))
        return _pad(state["embeds"], self.max_length)[None], state["mask"].astype(np.int32)[None]

    def read_posterior(self, idx):
        """(mean, std), float32 (C, h, w) each, of record idx; UnreadableFeature if damaged."""
        path = os.path.join(self.feature_dir, self.records[idx]["latent_file"])
        state = _read(path)
        height, width = self.bucket_size(idx)
        expected = (self.latent_channels, height // self.downscale, width // self.downscale)
        if any(tuple(state.get(k, np.empty(0)).shape) != expected for k in ("mean", "std")):
            raise UnreadableFeature(f"feature file {path} does not hold a {expected} posterior")
        return state["mean"], state["std"]

    def read_caption(self, idx, source):
        """(embeds float32 (L, D), mask int32 (L,)) of record idx's `source` caption."""
        path = os.path.join(self.feature_dir, self.records[idx]["text_file"])
        state = _read(path)
        if f"{source}_embeds" not in state or f"{source}_mask" not in state:
            raise UnreadableFeature(f"feature file {path} has no {source} caption")
        mask = state[f"{source}_mask"].astype(np.int32)
        if mask.shape != (self.max_length,):
            raise UnreadableFeature(f"feature file {path}: {source} mask is {mask.shape}, not ({self.max_length},)")
        return _pad(state[f"{source}_embeds"], self.max_length), mask

    def get(self, idx, epoch=0, noise=None):
        """One training example from the cache.

        noise: ε (C, h, w) for this record, default ``latent_noise(seed, epoch, [idx])``.
        Returns a dict: latents float32 (C, h, w), scaled; caption_embeds float32 (L, D);
        caption_mask int32 (L,); caption; caption_source; size (H, W) in pixels; original_size;
        ratio; bucket; flipped (always False); index. Raises UnreadableFeature.
        """
        record = self.records[idx]
        mean, std = self.read_posterior(idx)
        if noise is None:
            noise = latent_noise(self.seed, epoch, [idx], mean.shape)[0]
        caption, source = self.choose_caption(idx, epoch)
        embeds, mask = self.read_caption(idx, source)
        return {
            "latents": sample_latents(mean, std, noise, self.scaling_factor),
            "caption_embeds": embeds,
            "caption_mask": mask,
            "caption": caption,
            "caption_source": source,
            "size": self.bucket_size(idx),
            "original_size": (record["height"], record["width"]),
            "ratio": record["ratio"],
            "bucket": bucket_of(record, self.bins),
            "flipped": False,
            "index": int(idx),
        }


def load_feature_batch(dataset, indices, epoch=None, noise=None):
    """Load a sampler batch from a FeatureDataset, skipping damaged feature files (logged).

    noise: optional ε (len(indices), C, h, w), row k for indices[k]; default ``latent_noise``.
    Returns (batch, num_skipped), like ``load_batch``. batch is None when nothing could be read,
    else a dict: latents float32 (B, C, h, w), scaled by the VAE scaling factor; caption_embeds
    float32 (B, L, D); caption_mask int32 (B, L); captions [B] str; caption_sources [B];
    indices [B]; original_sizes int64 (B, 2) as (height, width); ratios float32 (B,); size (H, W)
    in pixels; bucket (bin key).
    """
    epoch = dataset.epoch if epoch is None else epoch
    if noise is not None and len(noise) != len(indices):
        raise ValueError(f"noise holds {len(noise)} samples for {len(indices)} indices")
    loaders = [lambda k=k, idx=idx: dataset.get(idx, epoch, noise=None if noise is None else noise[k])
               for k, idx in enumerate(indices)]
    items, skipped = collect_batch_items(loaders, indices, UnreadableFeature)
    if not items:
        return None, skipped
    return {
        "latents": np.stack([item["latents"] for item in items]),
        "caption_embeds": np.stack([item["caption_embeds"] for item in items]),
        "caption_mask": np.stack([item["caption_mask"] for item in items]),
        "caption_sources": [item["caption_source"] for item in items],
        **batch_metadata(items),
    }, skipped

"""Training data: validated records, multi-aspect bucket batches, and image/caption loading.

The dataset is a JSON list of records (the format of the MindSpore PixArt-Σ example):

    [{"path": "a.png", "prompt": "...", "sharegpt4v": "...", "height": 512, "width": 768,
      "ratio": 0.667}, ...]                                  # ratio = height / width

Flow for the train loop:

    records, counts = load_records(json_path, image_dir)          # validate everything up front
    bins = get_bins(1024)
    sampler = BucketBatchSampler(records, bins, batch_size, seed=seed, rank=rank, world_size=n)
    dataset = TrainDataset(records, image_dir, bins, real_prompt_ratio=0.5, seed=seed)
    for epoch, indices, state in sampler.rank_stream():           # one bucket per batch, endless
        batch, skipped = load_batch(dataset, indices, epoch)      # unreadable images skipped
        ...
        # checkpoint: state; on resume: sampler.load_state_dict(state)
    # (per-epoch iteration also works: sampler.set_epoch(e); for indices in sampler: ...)

Everything random is drawn from numpy generators seeded by (seed, epoch[, index]) so a resumed run
sees exactly the batches, captions and flips the uninterrupted run would have seen.
"""
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from numbers import Real

import numpy as np
from PIL import Image

from ..utils.errors import ConfigError, PixArtError
from .aspect_ratios import closest_ratio, resize_and_crop

logger = logging.getLogger(__name__)

# Records whose height/width is beyond 4.5 (or below 1/4.5) are dropped: the bins stop at 4:1, and
# cropping a 5:1 panorama to 4:1 would lose too much of what the caption describes.
MAX_RATIO = 4.5
# A stated ratio this far (relatively) from height / width means the record is wrong, most often
# width / height instead of height / width; small gaps are rounding and are tolerated.
RATIO_TOLERANCE = 0.1
_SHOWN_BAD_RECORDS = 5
# Unreadable images met during training: the first few are logged one by one, the rest only counted.
SHOWN_SKIPPED_RECORDS = 5


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------

def load_records(json_path, image_dir, skip_bad_records=False, max_ratio=MAX_RATIO, check_images=False):
    """Read and validate the dataset JSON before any training starts.

    Every record must have `path` (an existing file under image_dir), `prompt` (str), positive
    integer `height` and `width`, and `ratio` (≈ height / width); `sharegpt4v` (str) is optional.
    With check_images, each image's header is read too (format and size, not the pixels: a few KB
    per file), so files that are not images at all are found before any model loads; a file
    damaged further in is still only found when it is decoded during training (and skipped).
    Bad records raise one ConfigError naming how many and the first few (index and reason), unless
    skip_bad_records, in which case they are dropped with a warning. Records with an aspect ratio
    beyond max_ratio (tall) or below 1 / max_ratio (wide) are always dropped and counted.

    Returns (records, counts): records is a list of dicts with keys path, prompt, sharegpt4v
    ("" when absent), height, width, ratio (recomputed as height / width); counts is
    {"total", "bad", "extreme_ratio", "kept"}.
    """
    raw = _read_json_list(json_path)
    if not os.path.isdir(image_dir):
        raise ConfigError(f"image directory not found: {image_dir}")

    good, bad = [], []
    check = lambda record: _record_problem(record, image_dir, check_images)  # noqa: E731
    with ThreadPoolExecutor(max_workers=8) as pool:  # file system latency, not CPU, bounds this
        problems = list(pool.map(check, raw))
    for index, (record, reason) in enumerate(zip(raw, problems)):
        if reason is None:
            good.append(_clean_record(record))
        else:
            bad.append((index, reason))

    if bad:
        shown = "; ".join(f"#{index}: {reason}" for index, reason in bad[:_SHOWN_BAD_RECORDS])
        more = f" (and {len(bad) - _SHOWN_BAD_RECORDS} more)" if len(bad) > _SHOWN_BAD_RECORDS else ""
        summary = f"{len(bad)} of {len(raw)} records in {json_path} are invalid: {shown}{more}"
        if not skip_bad_records:
            raise ConfigError(f"{summary}; fix them or set skip_bad_records to train on the rest")
        logger.warning("skipping %s", summary)

    records = [r for r in good if 1.0 / max_ratio <= r["ratio"] <= max_ratio]
    extreme = len(good) - len(records)
    if extreme:
        logger.warning("dropped %d records with aspect ratio (height/width) beyond %g or below 1/%g",
                       extreme, max_ratio, max_ratio)
    if not records:
        raise ConfigError(f"no usable records in {json_path}: {len(raw)} in the file, {len(bad)} invalid, "
                          f"{extreme} with an extreme aspect ratio")
    counts = {"total": len(raw), "bad": len(bad), "extreme_ratio": extreme, "kept": len(records)}
    return records, counts


def _read_json_list(json_path):
    """The JSON file's top-level list, or a ConfigError saying what is wrong with the file."""
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"dataset JSON not found: {json_path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read dataset JSON {json_path}: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"dataset JSON {json_path} is not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise ConfigError(f"dataset JSON {json_path} must hold a list of records, got {type(data).__name__}")
    return data


def _is_number(value):
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value):
    # JSON written by some tools stores 512 as 512.0: accept integral floats.
    return _is_number(value) and value > 0 and float(value).is_integer()


def _record_problem(record, image_dir, check_image=False):
    """Why the record is unusable (one short phrase), or None if it is fine."""
    if not isinstance(record, dict):
        return f"not an object but {type(record).__name__}"
    missing = [key for key in ("path", "prompt", "height", "width", "ratio") if key not in record]
    if missing:
        return "missing key " + ", ".join(repr(key) for key in missing)
    if not isinstance(record["path"], str) or not record["path"]:
        return f"'path' must be a non-empty string, got {record['path']!r}"
    if not isinstance(record["prompt"], str):
        return f"'prompt' must be a string, got {type(record['prompt']).__name__}"
    if record.get("sharegpt4v") is not None and not isinstance(record["sharegpt4v"], str):
        return f"'sharegpt4v' must be a string, got {type(record['sharegpt4v']).__name__}"
    for key in ("height", "width"):
        if not _is_positive_int(record[key]):
            return f"'{key}' must be a positive integer, got {record[key]!r}"
    if not _is_number(record["ratio"]) or record["ratio"] <= 0:
        return f"'ratio' must be a positive number, got {record['ratio']!r}"
    expected = record["height"] / record["width"]
    if abs(record["ratio"] - expected) > RATIO_TOLERANCE * expected:
        return f"'ratio' {record['ratio']} is not height/width = {expected:.3g}"
    path = os.path.join(image_dir, record["path"])
    if not os.path.isfile(path):
        return f"image not found: {record['path']}"
    if check_image:
        try:
            with Image.open(path):  # parses the header only; the pixels are decoded in training
                pass
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            return f"not a readable image: {record['path']} ({type(err).__name__}: {err})"
    return None


def _clean_record(record):
    """A validated record with normalised types; ratio is recomputed exactly as height / width."""
    height, width = int(record["height"]), int(record["width"])
    clean = {
        "path": record["path"],
        "prompt": record["prompt"],
        "sharegpt4v": record.get("sharegpt4v") or "",
        "height": height,
        "width": width,
        "ratio": height / width,
    }
    if "control" in record:  # a ControlNet control image (train.py --controlnet checks it)
        clean["control"] = record["control"]
    return clean


# ----------------------------------------------------------------------------------------------
# Buckets and the batch sampler
# ----------------------------------------------------------------------------------------------

def bucket_of(record, bins):
    """Key of the bin nearest the record's height / width (every bin can be chosen, the last too)."""
    return closest_ratio(record["height"] / record["width"], bins)


def group_by_bucket(records, bins):
    """{bin key: [record indices]} over every bin of the table, in table order (empty lists kept)."""
    buckets = {key: [] for key in bins}
    for index, record in enumerate(records):
        buckets[bucket_of(record, bins)].append(index)
    return buckets


class BucketBatchSampler:
    """Batches of record indices, each batch drawn from a single aspect-ratio bucket.

    One epoch's plan is built identically on every rank from (seed, epoch): shuffle each bucket,
    cut it into batches (a bucket's incomplete last batch is dropped when drop_last, else kept
    smaller), shuffle the order of all batches. Rank r then takes global batches r, r + W, r + 2W...
    (W = world_size), so shards are disjoint. Every rank gets the same number of batches, keeping
    data-parallel steps in lockstep: with drop_last the plan is cut to a multiple of W; otherwise
    it is padded by repeating its first batches (those few samples are then seen twice).

    Resuming: state_dict() records the epoch and how many global batches were handed out;
    load_state_dict() continues with exactly the remaining batches (also after a change of
    world_size: the remainder is re-sharded). A finished epoch moves the sampler to the next one,
    so iterating again without set_epoch gives a new epoch.

    The train loop uses ``rank_stream()`` instead of per-epoch iteration: one endless global
    sequence of batches, epoch after epoch, sharded without cutting or padding epochs, so that
    what a step trains on does not depend on the rank count.
    """

    def __init__(self, records, bins, batch_size, shuffle=True, seed=0, rank=0, world_size=1, drop_last=True):
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ConfigError(f"rank must be in [0, world_size), got rank {rank!r} of world_size {world_size!r}")
        if not (isinstance(seed, int) and seed >= 0):
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        self.buckets = group_by_bucket(records, bins)
        self.num_records = len(records)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._start = 0     # global batches of this epoch consumed before the current pass began
        self._yielded = 0   # batches this rank handed out in the current pass

        self.num_global_batches = sum(self._num_batches(len(indices)) for indices in self.buckets.values())
        if self.num_global_batches < world_size and drop_last:
            largest = max(len(indices) for indices in self.buckets.values())
            raise ConfigError(
                f"only {self.num_global_batches} full batches of {batch_size} for {world_size} rank(s): "
                f"{self.num_records} records over {sum(map(bool, self.buckets.values()))} aspect buckets, "
                f"the largest holding {largest}; lower the batch size or add data")

    def _num_batches(self, bucket_len):
        return bucket_len // self.batch_size if self.drop_last else -(-bucket_len // self.batch_size)

    def epoch_plan(self, epoch):
        """All ranks' batches of an epoch, in order: list of lists of record indices."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for indices in self.buckets.values():
            order = rng.permutation(indices) if self.shuffle else np.asarray(indices, dtype=np.int64)
            for start in range(0, len(order) - self.batch_size + 1 if self.drop_last else len(order), self.batch_size):
                batches.append(order[start:start + self.batch_size].tolist())
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _rank_batches(self, epoch, start):
        """This rank's batches among the plan's global batches from `start` on."""
        plan = self.epoch_plan(epoch)
        remaining = plan[start:]
        if self.drop_last:
            remaining = remaining[:len(remaining) - len(remaining) % self.world_size]
        else:
            # Pad from the plan's beginning; `start` is a multiple of world_size, so a resumed pass
            # pads exactly as the uninterrupted one did.
            pad = -len(remaining) % self.world_size
            remaining = remaining + [plan[i % len(plan)] for i in range(pad)]
        return remaining[self.rank::self.world_size]

    def __len__(self):
        """Batches per rank in a full epoch (the same for every rank and every epoch)."""
        if self.drop_last:
            return self.num_global_batches // self.world_size
        return -(-self.num_global_batches // self.world_size)

    def __iter__(self):
        epoch, start = self.epoch, self._start
        batches = self._rank_batches(epoch, start)
        for position in range(self._yielded, len(batches)):
            # Count the batch as consumed when it is handed out: a checkpoint taken after the
            # step that used it must not replay it.
            self._yielded = position + 1
            yield batches[position]
        if (self.epoch, self._start) == (epoch, start):  # not re-positioned meanwhile
            self.epoch, self._start, self._yielded = epoch + 1, 0, 0

    def rank_stream(self):
        """This rank's batches, endlessly, from the current position: yields (epoch, indices, state).

        The global stream is every epoch's plan one after the other (``num_global_batches`` = G
        each); rank r of W takes global batches N0 + r, N0 + r + W, ... So the sequence of global
        batches, and with it what each optimizer step trains on, does not depend on the rank
        count, also across epoch ends: a step may take its last batches from the next epoch
        (2 ranks equal 1 process accumulating 2 micro-batches for any G). Nothing is dropped or
        repeated at an epoch's end. ``state`` is ``state_dict()`` as of the end of the W-batch
        group this batch belongs to: what a checkpoint taken after it stores. The sampler itself
        is not moved.
        """
        G, W = self.num_global_batches, self.world_size
        n = self.epoch * G + self.state_dict()["consumed_batches"] + self.rank
        plan_epoch, plan = None, None
        while True:
            epoch, position = divmod(n, G)
            if epoch != plan_epoch:
                plan_epoch, plan = epoch, self.epoch_plan(epoch)
            yield epoch, plan[position], self._state_at(n - self.rank + W)
            n += W

    def _state_at(self, consumed):
        """state_dict() for ``consumed`` global batches since epoch 0 (an epoch's end stays in it)."""
        epoch, within = divmod(consumed, self.num_global_batches)
        if within == 0 and epoch > 0:
            epoch, within = epoch - 1, self.num_global_batches
        return {**self.state_dict(), "epoch": epoch, "consumed_batches": within}

    def set_epoch(self, epoch):
        """Start `epoch` from its beginning; keeps the position if it is already the current epoch
        (so `set_epoch` after `load_state_dict` continues the resumed epoch)."""
        if epoch != self.epoch:
            self.epoch, self._start, self._yielded = int(epoch), 0, 0

    def state_dict(self):
        """Position to resume from: plain ints, safe to store in a checkpoint."""
        return {
            "epoch": self.epoch,
            "consumed_batches": self._start + self._yielded * self.world_size,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_records": self.num_records,
            "shuffle": bool(self.shuffle),
            "drop_last": bool(self.drop_last),
        }

    def load_state_dict(self, state):
        """Continue where `state` left off; the data, seed and batching must be the same."""
        mine = self.state_dict()
        differing = [key for key in ("seed", "batch_size", "num_records", "shuffle", "drop_last")
                     if key in state and state[key] != mine[key]]
        if differing:
            detail = ", ".join(f"{key} {state[key]!r} -> {mine[key]!r}" for key in differing)
            raise ConfigError(f"cannot resume the data order: {detail} changed since the checkpoint")
        self.epoch = int(state["epoch"])
        self._start = int(state["consumed_batches"])
        self._yielded = 0


# ----------------------------------------------------------------------------------------------
# Images and captions
# ----------------------------------------------------------------------------------------------

class UnreadableImage(PixArtError):
    """An image file that exists but cannot be decoded; the train loop skips it and counts it."""

    def __init__(self, path, reason):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path
        self.reason = reason


def read_rgb(path):
    """Decode an image file to an RGB PIL image, or raise UnreadableImage."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now, inside the try, not lazily later
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL reports truncated/corrupt data as OSError (UnidentifiedImageError included) and some
        # malformed headers as SyntaxError/ValueError.
        raise UnreadableImage(path, f"{type(err).__name__}: {err}") from None


def to_chw_float(image):
    """RGB PIL image -> float32 (3, H, W) array in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


class TrainDataset:
    """Records -> (image at its bucket size, caption, metadata), reproducibly per (seed, epoch, index).

    real_prompt_ratio is the probability of training on the record's `prompt` rather than its
    `sharegpt4v` caption (1: always the prompt, 0: always ShareGPT4V when there is one).
    random_flip (off by default: flipping breaks captions that say "left"/"right") mirrors half
    of the images.
    """

    def __init__(self, records, image_dir, bins, real_prompt_ratio=0.5, seed=0, random_flip=False):
        if not (_is_number(real_prompt_ratio) and 0.0 <= real_prompt_ratio <= 1.0):
            raise ConfigError(f"real_prompt_ratio must be in [0, 1], got {real_prompt_ratio!r}")
        self.records = records
        self.image_dir = image_dir
        self.bins = bins
        self.real_prompt_ratio = float(real_prompt_ratio)
        self.seed = int(seed)
        self.random_flip = random_flip
        self.epoch = 0

    def __len__(self):
        return len(self.records)

    def set_epoch(self, epoch):
        """Epoch used by `dataset[idx]`; `get(idx, epoch)` takes it explicitly."""
        self.epoch = int(epoch)

    def bucket_size(self, idx):
        """(height, width) the record's image is trained at."""
        h, w = self.bins[bucket_of(self.records[idx], self.bins)]
        return int(h), int(w)

    def _draws(self, idx, epoch):
        """Two uniform numbers in [0, 1) fixed by (seed, epoch, idx): caption choice, flip.

        Both are always drawn so turning flipping on does not change the captions.
        """
        return np.random.default_rng([self.seed, int(epoch), int(idx)]).random(2)

    def choose_caption(self, idx, epoch):
        """(caption, source) with source "prompt" or "sharegpt4v"; an empty ShareGPT4V falls back."""
        record = self.records[idx]
        use_prompt = self._draws(idx, epoch)[0] < self.real_prompt_ratio
        if use_prompt or not record["sharegpt4v"]:
            return record["prompt"], "prompt"
        return record["sharegpt4v"], "sharegpt4v"

    def get(self, idx, epoch=0):
        """One training example.

        Returns a dict: image float32 (3, H, W) in [-1, 1] at the bucket size (H, W); caption (str);
        caption_source; size (H, W); original_size (record height, width); ratio (record h / w);
        bucket (bin key, e.g. "0.57"); flipped (bool); index. Raises UnreadableImage.
        """
        record = self.records[idx]
        height, width = self.bucket_size(idx)
        image = read_rgb(os.path.join(self.image_dir, record["path"]))
        image = resize_and_crop(image, height, width)
        flip = self.random_flip and self._draws(idx, epoch)[1] < 0.5
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        caption, source = self.choose_caption(idx, epoch)
        return {
            "image": to_chw_float(image),
            "caption": caption,
            "caption_source": source,
            "size": (height, width),
            "original_size": (record["height"], record["width"]),
            "ratio": record["ratio"],
            "bucket": bucket_of(record, self.bins),
            "flipped": bool(flip),
            "index": int(idx),
        }

    def __getitem__(self, idx):
        return self.get(idx, self.epoch)


def load_batch(dataset, indices, epoch=None):
    """Load a sampler batch, skipping unreadable images (each logged as a warning).

    Returns (batch, num_skipped). batch is None when every image was unreadable, else a dict:
    images float32 (B, 3, H, W) in [-1, 1]; captions [B] str; indices [B]; original_sizes int64
    (B, 2) as (height, width); ratios float32 (B,); size (H, W); bucket (bin key). B may be smaller
    than len(indices) by num_skipped.
    """
    epoch = dataset.epoch if epoch is None else epoch
    items, skipped = collect_batch_items([lambda idx=idx: dataset.get(idx, epoch) for idx in indices], indices,
                                         UnreadableImage)
    if not items:
        return None, skipped
    return {"images": np.stack([item["image"] for item in items]), **batch_metadata(items)}, skipped


class SkipMessages:
    """Logs the first ``limit`` skipped records one by one, then says once that the rest are only
    counted (a dataset of broken files must not flood the log: the step lines carry the counts)."""

    def __init__(self, limit=SHOWN_SKIPPED_RECORDS):
        self.limit = limit
        self.reset()

    def reset(self):
        self.count = 0

    def __call__(self, idx, err):
        self.count += 1
        if self.count <= self.limit:
            logger.warning("skipping record %d: %s", idx, err)
        if self.count == self.limit:
            logger.warning("further unreadable records are not listed one by one, only counted (training: in the "
                           "step log lines)")


# One per process: the train loop resets it when it starts.
skip_messages = SkipMessages()


def collect_batch_items(loaders, indices, unreadable):
    """Call each loader, skipping records that raise ``unreadable`` (reported to ``skip_messages``).

    Returns (items, num_skipped); the items must all come from one aspect bucket.
    """
    items, skipped = [], 0
    for load, idx in zip(loaders, indices):
        try:
            items.append(load())
        except unreadable as err:
            skip_messages(idx, err)
            skipped += 1
    sizes = {item["size"] for item in items}
    if len(sizes) > 1:
        raise ValueError(f"a batch must come from one aspect bucket, got sizes {sorted(sizes)}")
    return items, skipped


def batch_metadata(items):
    """The fields every batch carries: captions, indices, original_sizes, ratios, size, bucket."""
    return {
        "captions": [item["caption"] for item in items],
        "indices": [item["index"] for item in items],
        "original_sizes": np.array([item["original_size"] for item in items], dtype=np.int64),
        "ratios": np.array([item["ratio"] for item in items], dtype=np.float32),
        "size": items[0]["size"],
        "bucket": items[0]["bucket"],
    }

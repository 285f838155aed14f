"""Aspect-ratio bins and training data (numpy + PIL; no MindSpore needed)."""
from .aspect_ratios import (
    ASPECT_RATIO_256,
    ASPECT_RATIO_512,
    ASPECT_RATIO_1024,
    ASPECT_RATIO_2048,
    ASPECT_RATIO_4096,
    BASE_SIZES,
    classify_height_width_bin,
    closest_ratio,
    get_bins,
    resize_and_crop,
    resize_and_crop_batch,
)
from .dataset import (
    MAX_RATIO,
    BucketBatchSampler,
    TrainDataset,
    UnreadableImage,
    bucket_of,
    group_by_bucket,
    load_batch,
    load_records,
    read_rgb,
)

__all__ = [
    "ASPECT_RATIO_256", "ASPECT_RATIO_512", "ASPECT_RATIO_1024", "ASPECT_RATIO_2048", "ASPECT_RATIO_4096",
    "BASE_SIZES", "classify_height_width_bin", "closest_ratio", "get_bins", "resize_and_crop",
    "resize_and_crop_batch", "MAX_RATIO", "BucketBatchSampler", "TrainDataset", "UnreadableImage",
    "bucket_of", "group_by_bucket", "load_batch", "load_records", "read_rgb",
]

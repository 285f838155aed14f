"""ControlNet training (train.py --controlnet): the base DiT frozen, only the ControlNet branch trained.

Records carry a ``control`` image path (relative to --image_dir like ``path``, or absolute;
tools/make_control_images.py writes them), of the same size as the record's image. Each control
image is resized and cropped to the batch's bucket exactly as its image is, encoded by the VAE
(posterior mean, as at sampling time) and scaled; the denoiser is ``ControlPixArt`` with those
hint latents. Everything else (loss, optimizer, EMA, checkpoints, exact resume, msrun) is plain
fine-tuning's, with the branch's ``controlnet.N.*`` parameters as the trained weights.
"""
import logging
import os

import numpy as np

from pixart.data.aspect_ratios import resize_and_crop
from pixart.data.dataset import UnreadableImage, read_rgb, to_chw_float
from pixart.utils.errors import CheckpointError, ConfigError

logger = logging.getLogger("train")

_SHOWN = 5


def control_path(record, image_dir):
    return os.path.join(image_dir, record["control"])


def check_control_records(records, image_dir):
    """Every record needs a ``control`` image that exists; one ConfigError lists the first bad ones."""
    bad = []
    for index, record in enumerate(records):
        control = record.get("control")
        if not isinstance(control, str) or not control:
            bad.append(f"#{index} ({record['path']}): no 'control' image path")
        elif not os.path.isfile(control_path(record, image_dir)):
            bad.append(f"#{index} ({record['path']}): control image not found: {control}")
    if bad:
        more = f" (and {len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""
        raise ConfigError(f"--controlnet needs a 'control' image in every record; {len(bad)} of {len(records)} "
                          f"lack one: {'; '.join(bad[:_SHOWN])}{more} (tools/make_control_images.py writes them)")


def load_control_images(dataset, indices, size, epoch):
    """The control images of a loaded batch -> float32 (B, 3, H, W) in [-1, 1] at the bucket size,
    resized, cropped (and flipped) exactly as the records' images."""
    from PIL import Image

    out = []
    for idx in indices:
        record = dataset.records[idx]
        path = control_path(record, dataset.image_dir)
        try:
            image = read_rgb(path)
            with Image.open(os.path.join(dataset.image_dir, record["path"])) as source:
                source_size = source.size
        except UnreadableImage as err:
            raise ConfigError(str(err)) from None
        if image.size != source_size:
            raise ConfigError(f"control image {record['control']} is {image.size[0]}x{image.size[1]} but its image "
                              f"{record['path']} is {source_size[0]}x{source_size[1]}: they must have the same size")
        image = resize_and_crop(image, *size)
        if dataset.random_flip and dataset._draws(idx, epoch)[1] < 0.5:  # as TrainDataset.get flips
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(to_chw_float(image))
    return np.stack(out)


def with_control_images(load, dataset):
    """Wrap the trainer's batch loader: each batch also gets ``control_images`` (B, 3, H, W)."""
    def load_with_control(indices, epoch):
        data, skipped = load(indices, epoch)
        if data is not None:
            data["control_images"] = load_control_images(dataset, data["indices"], data["size"], epoch)
        return data, skipped
    return load_with_control


def build_controlnet_training(model, source, num_layers=None, attention_backend="auto"):
    """Freeze ``model`` (the base DiT) and make its ControlNet branch.

    ``source``: "init" (copies of the base's first ``num_layers`` blocks, zero projections) or
    ControlNet weights to continue from. Returns (branch, [(name, Parameter)] to train,
    ``ControlPixArt`` denoiser).
    """
    from pixart.models.controlnet import DEFAULT_LAYERS, ControlPixArt, PixArtControlNet, load_controlnet

    for _, param in model.parameters_and_names():
        param.requires_grad = False
    if source == "init":
        branch = PixArtControlNet.from_base(model, num_layers or DEFAULT_LAYERS, attention_backend=attention_backend)
    else:
        branch = load_controlnet(source, model, attention_backend=attention_backend)
        if num_layers and branch.num_layers != num_layers:
            raise CheckpointError(f"{source} has {branch.num_layers} ControlNet blocks, --controlnet_layers says "
                                  f"{num_layers}")
    trained = list(branch.parameters_and_names())
    for _, param in trained:
        param.requires_grad = True
    return branch, trained, ControlPixArt(model, branch)


def encode_control(vae, control_images):
    """(B, 3, H, W) control images in [-1, 1] -> scaled hint latents (B, C, H/8, W/8), fp32."""
    from pixart.models.controlnet import encode_control_images

    return encode_control_images(vae, control_images)

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


# ----------------------------------------------------------------------------- cached features


def control_file(record, size):
    """Path (in a feature folder) of a record's hint latents: named by its image, control image and bucket."""
    from pixart.data.features import _key

    source = "\0".join([record["path"], record["control"], f"{size[0]}x{size[1]}"])
    return f"control/{_key(source)}.safetensors"


def extract_control_latents(records, image_dir, feature_dir, bins, vae_root, overwrite=False):
    """tools/extract_features.py, when every record has a ``control`` image: store each one's VAE
    posterior mean (unscaled, (C, h, w)) at its bucket size, encoded one image per VAE call as
    training does, so cached and on-the-fly ControlNet training give the same numbers.
    Returns {record index: control_file}; current files (same control image, size) are kept."""
    from pixart.data.dataset import TrainDataset
    from pixart.data.features import file_is_current
    from pixart.models.autoencoder_kl import AutoencoderKL
    from pixart.utils.checkpoint import save_safetensors

    check_control_records(records, image_dir)
    dataset = TrainDataset(records, image_dir, bins, real_prompt_ratio=1.0)
    files, vae = {}, None
    for i, record in enumerate(records):
        size = dataset.bucket_size(i)
        name = files[i] = control_file(record, size)
        stat = os.stat(control_path(record, image_dir))
        meta = {"control": record["control"], "size": f"{size[0]}x{size[1]}", "bytes": str(stat.st_size),
                "mtime_ns": str(stat.st_mtime_ns)}
        path = os.path.join(feature_dir, name)
        if not overwrite and file_is_current(path, meta):
            continue
        if vae is None:
            vae = AutoencoderKL.from_pretrained(vae_root).set_train(False)
        images = load_control_images(dataset, [i], size, 0)
        mean = vae.encode(images).mean.asnumpy()[0]
        save_safetensors({"mean": mean.astype(np.float32)}, path, metadata=meta)
    return files


def with_control_features(load, dataset):
    """Wrap the feature batch loader: each batch also gets ``control_latents`` (B, C, h, w), scaled."""
    from pixart.data.features import _read

    missing = [r["path"] for r in dataset.records if "control_file" not in r]
    if missing:
        raise ConfigError(f"--controlnet: the features in {dataset.feature_dir} hold no control latents for "
                          f"{len(missing)} record(s) (first: {missing[0]}); run tools/extract_features.py on records "
                          "with a 'control' image")

    def load_with_control(indices, epoch):
        data, skipped = load(indices, epoch)
        if data is not None:
            means = [_read(os.path.join(dataset.feature_dir, dataset.records[i]["control_file"]))["mean"]
                     for i in data["indices"]]
            data["control_latents"] = np.stack(means) * np.float32(dataset.scaling_factor)
        return data, skipped
    return load_with_control


def control_inputs(vae, data):
    """The hint latents of a batch: cached (``control_latents``) or encoded from its control images."""
    import mindspore as ms

    if "control_latents" in data:
        return ms.Tensor(data["control_latents"])
    return encode_control(vae, data["control_images"])


def validation_control_image(records, image_dir):
    """The control image validation samples use: the first record's (None, with a warning, when
    it cannot be found, e.g. training from features without --image_dir)."""
    path = control_path(records[0], image_dir or "")
    if os.path.isfile(path):
        return path
    logger.warning("validation images without control: %s not found (give --image_dir)", records[0]["control"])
    return None

"""img2img and inpainting inputs for the PixArt pipelines (Σ and α, the plain 4-channel DiT).

As diffusers' img2img / legacy inpainting pipelines (no special inpainting model):

* strength s in [0, 1] keeps the last int(n·s) of the sampler's n timesteps (t_start = n - int(n·s));
  the run starts from the image latents noised to the first kept timestep. s = 0 runs no step and
  returns the VAE round trip of the image; s = 1 runs all n steps from (almost) pure noise.
* inpainting: the mask (white = repaint, black = keep) is resized to the latent grid; after every step
  the kept area is replaced by the image latents noised to the next timestep (the clean latents after
  the last step), so the kept area ends exactly at the image latents.

The image latents are the VAE posterior mean (no sampling noise) × scaling_factor. The added noise of
image k is drawn from its own ``default_rng([seed + k, 2])`` (or is the ``latents`` the caller passes),
so an image does not depend on the batch it is generated in.
"""
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from pixart.data.aspect_ratios import resize_and_crop
from pixart.utils.errors import ConfigError

IMG2IMG_STRENGTH = 0.8     # diffusers' img2img default
INPAINT_STRENGTH = 1.0     # diffusers' inpainting default


@dataclass
class ImageInputs:
    """Checked img2img / inpainting inputs, before resizing to the generation size.

    images: one or per-image (H, W, 3) float32 arrays in [0, 1] or PIL RGB images; masks likewise
    (H, W) (None: img2img); strength in [0, 1]; size (H, W) of the inputs.
    """
    images: list
    masks: Optional[list]
    strength: float
    size: tuple

    @property
    def inpainting(self):
        return self.masks is not None


def check_image_inputs(image, mask_image=None, strength=None) -> ImageInputs:
    """Validate image= / mask_image= / strength= (paths, PIL images or arrays; one or a list)."""
    images = [_read(im, "image") for im in (image if isinstance(image, (list, tuple)) else [image])]
    if not images:
        raise ConfigError("image is an empty list")
    size = _size(images[0])
    if any(_size(im) != size for im in images):
        raise ConfigError(f"all init images must have the same size; got {sorted({_size(im) for im in images})}")
    masks = None
    if mask_image is not None:
        masks = [_read(m, "mask_image") for m in (mask_image if isinstance(mask_image, (list, tuple)) else [mask_image])]
        for m in masks:
            if _size(m) != size:
                raise ConfigError(f"mask_image is {_size(m)[1]}x{_size(m)[0]} but the init image is "
                                  f"{size[1]}x{size[0]} (width x height): give a mask of the image's size")
        if len(masks) not in (1, len(images)) and len(images) != 1:
            raise ConfigError(f"got {len(masks)} masks for {len(images)} init images")
    if strength is None:
        strength = INPAINT_STRENGTH if masks is not None else IMG2IMG_STRENGTH
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise ConfigError(f"strength must be a number in [0, 1], got {strength!r}") from None
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength must be in [0, 1], got {strength}")
    return ImageInputs(images=images, masks=masks, strength=strength, size=size)


def default_size(inputs: ImageInputs, height, width):
    """The requested size: the given one, else the init image's (rounded down to multiples of 8)."""
    h, w = inputs.size
    return height or max(8, h // 8 * 8), width or max(8, w // 8 * 8)


def strength_timesteps(timesteps: np.ndarray, strength: float) -> np.ndarray:
    """The timesteps an img2img run of this strength visits: the last int(n·strength) of n."""
    n = len(timesteps)
    keep = min(int(n * strength), n)
    return timesteps[n - keep:]


def image_batch(inputs: ImageInputs, batch: int, height: int, width: int) -> np.ndarray:
    """(batch, 3, height, width) float32 in [-1, 1]: the init image(s) resized to cover the generation
    size and centre-cropped (PIL: bicubic, arrays: bilinear)."""
    out = [_as_float(resize_and_crop(im, height, width), 3) for im in inputs.images]
    return np.stack(_per_image(out, batch, "init images")).transpose(0, 3, 1, 2) * 2.0 - 1.0


def latent_mask(inputs: ImageInputs, batch: int, height: int, width: int) -> np.ndarray:
    """(batch, 1, height/8, width/8) float32 in {0, 1}: 1 where the image is repainted.

    The mask is resized like the image, binarised at 0.5 (as diffusers), then a latent cell is
    repainted if any pixel of its 8×8 block is (so the whole masked area is regenerated).
    """
    masks = []
    for m in inputs.masks:
        m = _as_float(resize_and_crop(m, height, width), 1)[..., 0] >= 0.5
        masks.append(m.reshape(height // 8, 8, width // 8, 8).max(axis=(1, 3)))
    return np.stack(_per_image(masks, batch, "masks"))[:, None].astype(np.float32)


def img2img_noise(seed: int, count: int, shape) -> np.ndarray:
    """(count, *shape) float32 noise added to the image latents; image k from default_rng([seed + k, 2])."""
    return np.stack([np.random.default_rng([seed + k, 2]).standard_normal(shape) for k in range(count)]
                    ).astype(np.float32)


# ---------------------------------------------------------------------------- reading
def _read(value, name):
    """A path, PIL image or array -> PIL image (RGB for images, L for masks) or float32 array in [0, 1]."""
    from PIL import Image

    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.isfile(path):
            raise ConfigError(f"{name} {path} does not exist")
        try:
            value = Image.open(path)
            value.load()
        except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
            raise ConfigError(f"{name} {path} is not a readable image: {err}") from None
    if isinstance(value, Image.Image):
        return value.convert("L" if name == "mask_image" else "RGB")
    array = np.asarray(value)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == bool:
        array = array.astype(np.float32)
    elif not np.issubdtype(array.dtype, np.floating):
        raise ConfigError(f"{name} must be a PIL image, a uint8 array or a float array in [0, 1]; got {array.dtype}")
    if name == "mask_image":
        if array.ndim == 3:
            array = array.mean(axis=2)
        if array.ndim != 2:
            raise ConfigError(f"mask_image must be (H, W) or (H, W, C), got shape {array.shape}")
    elif array.ndim != 3 or array.shape[2] != 3:
        raise ConfigError(f"image must be an (H, W, 3) RGB array, got shape {array.shape}")
    if array.min() < 0.0 or array.max() > 1.0:
        raise ConfigError(f"{name} values must lie in [0, 1] (or be uint8), got [{array.min():.3g}, {array.max():.3g}]")
    return array.astype(np.float32)


def _size(image):
    return (image.height, image.width) if hasattr(image, "height") else tuple(image.shape[:2])


def _as_float(image, channels):
    """PIL or float array -> (H, W, channels) float32 in [0, 1]."""
    array = np.asarray(image)
    array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    return array.reshape(array.shape[0], array.shape[1], channels)


def _per_image(items: List, batch: int, what: str):
    if len(items) == 1:
        return items * batch
    if len(items) != batch:
        raise ConfigError(f"got {len(items)} {what} for {batch} images: give one, or one per image")
    return items

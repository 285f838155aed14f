"""Aspect-ratio bins and the resize-and-centre-crop that goes with them.

PixArt models trained at a base resolution accept any aspect ratio from 1:4 to 4:1, but only on a
fixed set of sizes ("bins"), all about base_size² pixels and multiples of 16/32/64. A requested
(height, width) is mapped to the bin with the nearest height/width ratio, the image is generated (or
trained) there, and resized-and-centre-cropped back to the requested size.

Conventions (identical to diffusers):
  * keys are the ratio height / width as a string ("0.25" is a wide image, "4.0" a tall one);
  * values are (height, width) in pixels; e.g. 1024: "0.25" -> (512, 2048), "4.0" -> (2048, 512).

Tables for 256/512/1024 are diffusers' `ASPECT_RATIO_{256,512,1024}_BIN` (33 bins, pipeline_pixart_alpha),
2048 is `ASPECT_RATIO_2048_BIN` (40 bins, pipeline_pixart_sigma). PixArt-Σ's 4K model has no table in
the PixArt pipelines: ours is exactly 2x the 2048 table (every bin doubled), which is what PixArt-Σ's
own 4K test table does and equals diffusers' `ASPECT_RATIO_4096_BIN` (pipeline_sana).
"""
import numpy as np
from PIL import Image

from ..tables import BASE_SIZES
from ..utils.errors import ConfigError

# ratio (height / width) -> (height, width)
ASPECT_RATIO_256 = {
    "0.25": (128, 512), "0.28": (128, 464), "0.32": (144, 448), "0.33": (144, 432),
    "0.35": (144, 416), "0.4": (160, 400), "0.42": (160, 384), "0.48": (176, 368),
    "0.5": (176, 352), "0.52": (176, 336), "0.57": (192, 336), "0.6": (192, 320),
    "0.68": (208, 304), "0.72": (208, 288), "0.78": (224, 288), "0.82": (224, 272),
    "0.88": (240, 272), "0.94": (240, 256), "1.0": (256, 256), "1.07": (256, 240),
    "1.13": (272, 240), "1.21": (272, 224), "1.29": (288, 224), "1.38": (288, 208),
    "1.46": (304, 208), "1.67": (320, 192), "1.75": (336, 192), "2.0": (352, 176),
    "2.09": (368, 176), "2.4": (384, 160), "2.5": (400, 160), "3.0": (432, 144),
    "4.0": (512, 128),
}

ASPECT_RATIO_512 = {
    "0.25": (256, 1024), "0.28": (256, 928), "0.32": (288, 896), "0.33": (288, 864),
    "0.35": (288, 832), "0.4": (320, 800), "0.42": (320, 768), "0.48": (352, 736),
    "0.5": (352, 704), "0.52": (352, 672), "0.57": (384, 672), "0.6": (384, 640),
    "0.68": (416, 608), "0.72": (416, 576), "0.78": (448, 576), "0.82": (448, 544),
    "0.88": (480, 544), "0.94": (480, 512), "1.0": (512, 512), "1.07": (512, 480),
    "1.13": (544, 480), "1.21": (544, 448), "1.29": (576, 448), "1.38": (576, 416),
    "1.46": (608, 416), "1.67": (640, 384), "1.75": (672, 384), "2.0": (704, 352),
    "2.09": (736, 352), "2.4": (768, 320), "2.5": (800, 320), "3.0": (864, 288),
    "4.0": (1024, 256),
}

ASPECT_RATIO_1024 = {
    "0.25": (512, 2048), "0.28": (512, 1856), "0.32": (576, 1792), "0.33": (576, 1728),
    "0.35": (576, 1664), "0.4": (640, 1600), "0.42": (640, 1536), "0.48": (704, 1472),
    "0.5": (704, 1408), "0.52": (704, 1344), "0.57": (768, 1344), "0.6": (768, 1280),
    "0.68": (832, 1216), "0.72": (832, 1152), "0.78": (896, 1152), "0.82": (896, 1088),
    "0.88": (960, 1088), "0.94": (960, 1024), "1.0": (1024, 1024), "1.07": (1024, 960),
    "1.13": (1088, 960), "1.21": (1088, 896), "1.29": (1152, 896), "1.38": (1152, 832),
    "1.46": (1216, 832), "1.67": (1280, 768), "1.75": (1344, 768), "2.0": (1408, 704),
    "2.09": (1472, 704), "2.4": (1536, 640), "2.5": (1600, 640), "3.0": (1728, 576),
    "4.0": (2048, 512),
}

ASPECT_RATIO_2048 = {
    "0.25": (1024, 4096), "0.26": (1024, 3968), "0.27": (1024, 3840), "0.28": (1024, 3712),
    "0.32": (1152, 3584), "0.33": (1152, 3456), "0.35": (1152, 3328), "0.4": (1280, 3200),
    "0.42": (1280, 3072), "0.48": (1408, 2944), "0.5": (1408, 2816), "0.52": (1408, 2688),
    "0.57": (1536, 2688), "0.6": (1536, 2560), "0.68": (1664, 2432), "0.72": (1664, 2304),
    "0.78": (1792, 2304), "0.82": (1792, 2176), "0.88": (1920, 2176), "0.94": (1920, 2048),
    "1.0": (2048, 2048), "1.07": (2048, 1920), "1.13": (2176, 1920), "1.21": (2176, 1792),
    "1.29": (2304, 1792), "1.38": (2304, 1664), "1.46": (2432, 1664), "1.67": (2560, 1536),
    "1.75": (2688, 1536), "2.0": (2816, 1408), "2.09": (2944, 1408), "2.4": (3072, 1280),
    "2.5": (3200, 1280), "2.89": (3328, 1152), "3.0": (3456, 1152), "3.11": (3584, 1152),
    "3.62": (3712, 1024), "3.75": (3840, 1024), "3.88": (3968, 1024), "4.0": (4096, 1024),
}

# The 4K table is the 2K one with every side doubled (same 40 ratios): 1.0 -> (4096, 4096).
ASPECT_RATIO_4096 = {ratio: (2 * h, 2 * w) for ratio, (h, w) in ASPECT_RATIO_2048.items()}

_TABLES = {
    256: ASPECT_RATIO_256,
    512: ASPECT_RATIO_512,
    1024: ASPECT_RATIO_1024,
    2048: ASPECT_RATIO_2048,
    4096: ASPECT_RATIO_4096,
}
assert tuple(_TABLES) == BASE_SIZES


def get_bins(base_size):
    """The aspect-ratio bins of a base resolution: {ratio string: (height, width)}.

    Returns a fresh copy, so callers may edit it without changing the shared table.
    """
    if isinstance(base_size, bool) or not isinstance(base_size, (int, np.integer, str)):
        raise ConfigError(f"aspect-ratio base size must be one of {_allowed()}, got {base_size!r}")
    try:
        key = int(base_size)
    except ValueError:
        key = None
    if key not in _TABLES:
        raise ConfigError(f"no aspect-ratio bins for base size {base_size!r}; choose one of {_allowed()}")
    return dict(_TABLES[key])


def _allowed():
    return ", ".join(str(size) for size in BASE_SIZES)


def closest_ratio(ratio, bins):
    """Key of the bin whose ratio is nearest to `ratio` (= height / width).

    Ties go to the first key in table order, as with diffusers' `min` over the keys.
    """
    return min(bins.keys(), key=lambda key: abs(float(key) - ratio))


def classify_height_width_bin(height, width, bins):
    """Map a requested (height, width) to the (height, width) of its nearest-ratio bin, as ints.

    Same rule as diffusers' `PixArtImageProcessor.classify_height_width_bin`.
    """
    bin_h, bin_w = bins[closest_ratio(float(height / width), bins)]
    return int(bin_h), int(bin_w)


# ----------------------------------------------------------------------------------------------
# Resize so the image covers (height, width), then centre-crop.
# ----------------------------------------------------------------------------------------------

def _cover_size(orig_h, orig_w, height, width):
    """Smallest scaled (h, w) of an orig_h x orig_w image that covers height x width.

    Same formula as diffusers (scale by the larger of the two ratios, truncate with int), with one
    fix: the float product can land a hair under the target (e.g. 7 * (61 / 7) = 60.99..., int -> 60),
    after which diffusers' crop offset is -1 and its slice comes out wrong (one row); we never go
    below the target.
    """
    scale = max(height / orig_h, width / orig_w)
    return max(int(orig_h * scale), height), max(int(orig_w * scale), width)


def _crop_offsets(resized_h, resized_w, height, width):
    """Top-left corner of the centred crop (floor division, as diffusers)."""
    return (resized_h - height) // 2, (resized_w - width) // 2


def _linear_taps(in_size, out_size):
    """Source indices and weights of 1-D linear resampling, as torch's bilinear, align_corners=False.

    Returns (i0, i1, w0, w1), each (out_size,): out[j] = w0[j] * x[i0[j]] + w1[j] * x[i1[j]].
    No antialiasing, like `F.interpolate(mode="bilinear")`. The rounding copies torch's CPU kernel
    (float32 scale, source coordinate formed in higher precision then stored as float32), which
    makes the taps bit-identical to torch's.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = ((np.arange(out_size) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))  # the first pixels' centres map left of 0: clamp
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return i0, i1, np.float32(1.0) - w1, w1


def _resize_linear(x, out_size, axis):
    """Linear resampling of float32 array `x` along one axis to length `out_size`."""
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    i0, i1, w0, w1 = _linear_taps(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    return np.take(x, i0, axis=axis) * w0.reshape(shape) + np.take(x, i1, axis=axis) * w1.reshape(shape)


def resize_and_crop_batch(samples, height, width):
    """Resize a batch so it covers (height, width), then centre-crop: diffusers' resize_and_crop_tensor.

    This is what the PixArt pipelines apply to the decoded image (in [-1, 1]) to go from the bin size
    back to the requested size. Bilinear (align_corners=False, no antialias), computed separably.
    Note the argument order is (height, width); diffusers' is (new_width, new_height).

    samples: (N, C, H, W) array. Returns float32 (N, C, height, width).
    """
    samples = np.asarray(samples, dtype=np.float32)
    orig_h, orig_w = samples.shape[2], samples.shape[3]
    if (orig_h, orig_w) == (height, width):
        return samples
    resized_h, resized_w = _cover_size(orig_h, orig_w, height, width)
    # Separable (width, then height): equal to torch's 2-D bilinear up to float32 rounding (~1e-7).
    samples = _resize_linear(samples, resized_w, axis=3)
    samples = _resize_linear(samples, resized_h, axis=2)
    top, left = _crop_offsets(resized_h, resized_w, height, width)
    return np.ascontiguousarray(samples[:, :, top:top + height, left:left + width])


def resize_and_crop(image, height, width):
    """Resize one image so it covers (height, width), then centre-crop to exactly that size.

    * numpy (H, W, C) or (H, W), uint8 or float: same arithmetic as `resize_and_crop_batch` (i.e.
      diffusers' bilinear); returns float32 in the input's value range (uint8 is not rescaled).
    * PIL image: resized with PIL's bicubic filter, which antialiases when shrinking (as the original
      PixArt training transform `Resize(BICUBIC) + CenterCrop` does; plain bilinear would alias when
      a photo is shrunk several times); returns a PIL image of the same mode.
    Both use the same cover size and the same crop offsets.
    """
    if isinstance(image, Image.Image):
        resized_h, resized_w = _cover_size(image.height, image.width, height, width)
        if (resized_h, resized_w) != (image.height, image.width):
            image = image.resize((resized_w, resized_h), resample=Image.BICUBIC)
        top, left = _crop_offsets(resized_h, resized_w, height, width)
        return image.crop((left, top, left + width, top + height))

    array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {array.shape}")
    chw = array.reshape(array.shape[0], array.shape[1], -1).transpose(2, 0, 1)[None]  # (1, C, H, W)
    out = resize_and_crop_batch(chw, height, width)[0].transpose(1, 2, 0)  # (height, width, C)
    return np.ascontiguousarray(out.reshape((height, width) + array.shape[2:]))

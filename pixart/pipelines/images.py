"""Writing generated images: PNGs with their settings as text metadata, and image grids."""
import os

import numpy as np


def png_info(fields):
    """PNG text chunks for ``fields`` ({name: value}, written as strings)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in fields.items():
        info.add_text(key, str(value))
    return info


def save_png(image, path, fields):
    """Write ``image`` (PIL) to ``path`` with ``fields`` (prompt, seed, steps, ...) in its metadata."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, pnginfo=png_info(fields))
    return path


def save_grid(images, path):
    """All ``images`` (PIL, one size) tiled row by row into a near-square grid."""
    from PIL import Image

    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    grid.save(path)
    return path

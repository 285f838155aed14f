"""Make ControlNet control images (Canny edge maps, OpenCV) for a training set or one picture.

    # a training set: writes <control_dir>/<path>.png and a JSON whose records gain a `control` path
    python tools/make_control_images.py --json_path labels.json --image_dir images/ \
        --control_dir images/canny --output_json labels_control.json
    # one picture, for sample.py --control_image
    python tools/make_control_images.py --image photo.jpg --output edges.png

Edge maps are white edges on black, 3-channel, at the source image's size (training resizes and
crops image and control image alike; sampling generates at the control image's size). A record's
`control` is relative to --image_dir when the edge map lies under it (as `path` is), else absolute.
Existing edge maps are recomputed only with --overwrite True.
"""
import json
import logging
import os

os.environ.setdefault("GLOG_v", "3")

from pixart.cli import ArgumentParser, str2bool  # noqa: E402
from pixart.utils.errors import ConfigError, run_cli  # noqa: E402

logger = logging.getLogger("make_control_images")


def parser():
    p = ArgumentParser(prog="tools/make_control_images.py", description="Canny edge maps for PixArt ControlNet")
    p.add_argument("--json_path", default=None, help="dataset JSON: [{path, prompt, height, width, ratio}, ...]")
    p.add_argument("--image_dir", default=None, help="folder the records' paths are relative to")
    p.add_argument("--control_dir", default=None, help="where edge maps go (default: <image_dir>/canny)")
    p.add_argument("--output_json", default=None, help="the records with `control` (default: <json>_control.json)")
    p.add_argument("--image", default=None, help="one picture instead of a dataset")
    p.add_argument("--output", default=None, help="with --image: the edge map's file (.png)")
    p.add_argument("--low_threshold", type=int, default=100, help="Canny hysteresis low threshold (0-255)")
    p.add_argument("--high_threshold", type=int, default=200, help="Canny hysteresis high threshold (0-255)")
    p.add_argument("--blur", type=int, default=0, help="Gaussian blur kernel size before Canny (odd; 0: none)")
    p.add_argument("--overwrite", type=str2bool, default=False, help="recompute edge maps that exist")
    return p


def canny_edges(rgb, low=100, high=200, blur=0):
    """uint8 (H, W, 3) RGB -> uint8 (H, W, 3) Canny edge map (255 on edges, 0 elsewhere)."""
    import cv2
    import numpy as np

    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    if blur:
        gray = cv2.GaussianBlur(gray, (blur, blur), 0)
    edges = cv2.Canny(gray, low, high)
    return np.repeat(edges[..., None], 3, axis=-1)


def make_edge_map(source, target, args):
    """Read ``source``, write its edge map to ``target`` (atomically: temporary file, then rename)."""
    import numpy as np
    from PIL import Image

    from pixart.data.dataset import UnreadableImage, read_rgb

    try:
        rgb = np.asarray(read_rgb(source))
    except UnreadableImage as err:
        raise ConfigError(str(err)) from None
    edges = canny_edges(rgb, args.low_threshold, args.high_threshold, args.blur)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    temporary = os.path.join(os.path.dirname(os.path.abspath(target)), "." + os.path.basename(target) + ".tmp.png")
    Image.fromarray(edges).save(temporary)
    os.replace(temporary, target)
    return edges


def check(args):
    if not 0 <= args.low_threshold <= args.high_threshold <= 255:
        raise ConfigError("need 0 <= --low_threshold <= --high_threshold <= 255, got "
                          f"{args.low_threshold} and {args.high_threshold}")
    if args.blur and (args.blur < 0 or args.blur % 2 == 0):
        raise ConfigError(f"--blur must be 0 or an odd kernel size, got {args.blur}")
    if args.image:
        if not args.output or not args.output.lower().endswith(".png"):
            raise ConfigError("--image needs --output FILE.png")
        if not os.path.isfile(args.image):
            raise ConfigError(f"image {args.image} not found")
    elif not (args.json_path and args.image_dir):
        raise ConfigError("give --json_path and --image_dir (a training set) or --image and --output (one picture)")


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    check(args)
    if args.image:
        make_edge_map(args.image, args.output, args)
        logger.info("wrote %s", args.output)
        return
    from pixart.data.dataset import load_records

    load_records(args.json_path, args.image_dir)  # the same validation as train.py, before any work
    with open(args.json_path, encoding="utf-8") as f:
        raw = json.load(f)
    control_dir = args.control_dir or os.path.join(args.image_dir, "canny")
    output_json = args.output_json or os.path.splitext(args.json_path)[0] + "_control.json"
    image_root = os.path.abspath(args.image_dir)
    made = kept = 0
    for record in raw:
        target = os.path.join(control_dir, os.path.splitext(record["path"])[0] + ".png")
        if args.overwrite or not os.path.isfile(target):
            make_edge_map(os.path.join(args.image_dir, record["path"]), target, args)
            made += 1
        else:
            kept += 1
        absolute = os.path.abspath(target)
        inside = os.path.commonpath([absolute, image_root]) == image_root
        record["control"] = os.path.relpath(absolute, image_root) if inside else absolute
    temporary = output_json + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=1, ensure_ascii=False)
    os.replace(temporary, output_json)
    logger.info("%d edge map(s) written, %d kept, in %s; records with `control`: %s", made, kept, control_dir,
                output_json)


if __name__ == "__main__":
    run_cli(main)

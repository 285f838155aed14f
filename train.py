"""Fine-tune PixArt-Σ / PixArt-α.

    python train.py -c configs/train/pixart-sigma-512-MS.yaml --json_path labels.json --image_dir images/
    msrun --worker_num=8 --local_worker_num=8 train.py -c ... --json_path ... --image_dir ... --use_parallel True

The YAML config sets defaults for any option (`python train.py --help`); the command line overrides it. Outputs go to
--output_path: checkpoints/step-*.ckpt (resume with --resume), samples/step-*/ (validation images),
final/model.ckpt and final/ema.ckpt (for sample.py --checkpoint), train.log.
"""
import json
import logging
import os
import sys

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only, so our messages stay readable

from pixart.cli import parse_args_with_config, train_parser  # noqa: E402
from pixart.train.config import TrainConfig  # noqa: E402
from pixart.utils.device import set_device  # noqa: E402
from pixart.utils.errors import run_cli  # noqa: E402


def setup_logging(output_path, rank, world_size):
    """Every line says which rank wrote it; rank 0 also writes <output>/train.log."""
    fmt = logging.Formatter(f"[rank {rank}/{world_size}] %(asctime)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in [h for h in root.handlers if getattr(h, "pixart_train", False)]:  # a previous main() call's
        root.removeHandler(handler)
        handler.close()
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        os.makedirs(output_path, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_path, "train.log")))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.pixart_train = True
        root.addHandler(handler)


def main(argv=None):
    config = TrainConfig.from_args(parse_args_with_config(train_parser(), argv)).check().check_weights()
    import mindspore as ms

    from pixart.train.trainer import Trainer, init_distributed

    target = set_device(config.device_target)
    rank, world_size = init_distributed(config.use_parallel)
    setup_logging(config.output_path, rank, world_size)
    ms.set_seed(config.seed)
    if rank == 0:
        from pixart.train import checkpointing

        checkpointing.remove_stale_temporaries(config.output_path)
        with open(os.path.join(config.output_path, "args.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1)
    trainer = Trainer(config, rank=rank, world_size=world_size, device_target=target)
    return trainer.train()


if __name__ == "__main__":
    run_cli(main)

"""Fine-tune PixArt-Σ / PixArt-α.

    python train.py -c configs/train/pixart-sigma-512-MS.yaml --json_path labels.json --image_dir images/
    msrun --worker_num=8 --local_worker_num=8 train.py -c ... --json_path ... --image_dir ... --use_parallel True

The YAML config sets defaults for any option (`python train.py --help`); the command line overrides it. Outputs go to
--output_path: checkpoints/step-*.ckpt (resume with --resume), samples/step-*/ (validation images),
final/model.ckpt and final/ema.ckpt (for sample.py --checkpoint), train.log; train.lock while it runs.
A refused run writes nothing there (see pixart/train/outputs.py).
"""
import os

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only, so our messages stay readable

from pixart.cli import parse_args_with_config, train_parser  # noqa: E402
from pixart.train.config import TrainConfig  # noqa: E402
from pixart.utils.device import set_device  # noqa: E402
from pixart.utils.errors import run_cli  # noqa: E402


def main(argv=None):
    from pixart.train.outputs import check_output_folder, claim_output_folder, setup_logging

    config = TrainConfig.from_args(parse_args_with_config(train_parser(), argv)).check().check_weights()
    # Nothing is written to output_path until every check has passed (outputs.py): a refused run
    # leaves an earlier run's folder as it was.
    check_output_folder(config.output_path, config.resume)
    import mindspore as ms

    from pixart.train.trainer import Trainer, init_distributed

    target = set_device(config.device_target)
    rank, world_size = init_distributed(config.use_parallel)
    setup_logging(rank, world_size)
    ms.set_seed(config.seed)
    trainer = Trainer(config, rank=rank, world_size=world_size, device_target=target)
    with claim_output_folder(config, rank, resumed_step=trainer.step if config.resume else None):
        return trainer.train()


if __name__ == "__main__":
    run_cli(main)

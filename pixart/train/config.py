"""TrainConfig: everything a fine-tuning run is told, as train.py's options and YAML keys give it
(``python train.py --help`` describes each field)."""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional

from pixart.cli import DEFAULT_PROMPT
from pixart.pipelines.config import PipelineConfig, WeightsConfig
from pixart.utils.config import config_from_args
from pixart.utils.errors import ConfigError


@dataclass
class TrainConfig(WeightsConfig):
    """A fine-tuning run's options (the weights and architecture fields come from ``WeightsConfig``)."""

    # data
    json_path: Optional[str] = None
    image_dir: Optional[str] = None
    feature_dir: Optional[str] = None
    skip_bad_records: bool = False
    multi_scale: bool = True
    t5_max_length: Optional[int] = None
    real_prompt_ratio: float = 0.5
    class_dropout_prob: float = 0.1
    batch_size: int = 1
    prefetch: int = 2
    # LoRA
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    lora_target_modules: Optional[List[str]] = None
    # ControlNet
    controlnet: Optional[str] = None
    controlnet_layers: Optional[int] = None
    # optimisation
    optim: str = "came"
    start_learning_rate: float = 2e-05
    auto_lr: str = "none"
    scheduler: str = "constant"
    warmup_steps: int = 1000
    min_learning_rate: float = 0.0
    betas: Optional[List[float]] = None
    eps: Optional[List[float]] = None
    weight_decay: float = 0.0
    clip_grad: bool = True
    max_grad_norm: float = 0.01
    gradient_accumulation_steps: int = 1
    epochs: int = 10
    max_steps: int = 0
    seed: int = 42
    # precision and memory
    dtype: str = "auto"
    amp_level: str = "O2"
    init_loss_scale: float = 65536.0
    scale_window: int = 1000
    recompute: bool = False
    use_ema: bool = True
    ema_rate: float = 0.9999
    # output, checkpoints, validation
    output_path: str = "output"
    log_loss_interval: int = 10
    ckpt_save_interval: int = 500
    ckpt_max_keep: int = 3
    resume: Optional[str] = None
    visualize: bool = False
    visualize_interval: int = 500
    validation_prompts: List[str] = field(default_factory=lambda: [DEFAULT_PROMPT])
    validation_negative_prompts: Optional[List[str]] = None
    sampling_method: str = "dpm"
    sampling_steps: int = 20
    timesteps: Optional[List[int]] = None
    guidance_scale: float = 4.5
    ddim_eta: float = 0.0
    # runtime
    use_parallel: bool = False
    device_target: Optional[str] = None

    @classmethod
    def from_args(cls, args, **changes):
        return config_from_args(cls, args, **changes)

    def to_dict(self):
        return dataclasses.asdict(self)

    @property
    def weights(self):
        """The weights and validation sampler as a PipelineConfig (its checks and paths); the
        training dtype is a mixed-precision setting, not the pipeline's parameter dtype. (The
        ControlNet to train is checked by ``check``: ``--controlnet`` alone means a new one.)"""
        return PipelineConfig.from_args(self, mode="graph", dtype="fp32", compile_cache=None, controlnet=None)

    @property
    def paths(self):
        return self.weights.paths

    def check(self):
        """Option checks that need no files and no MindSpore: fail before anything loads."""
        positive = ("batch_size", "gradient_accumulation_steps", "epochs", "log_loss_interval", "ckpt_save_interval",
                    "sampling_steps", "scale_window")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "ckpt_max_keep", "lora_rank", "visualize_interval", "prefetch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must not be negative, got {getattr(self, name)}")
        for name in ("real_prompt_ratio", "class_dropout_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_rate < 1.0:
            raise ConfigError(f"--ema_rate must be in [0, 1), got {self.ema_rate}")
        if self.start_learning_rate <= 0 or self.max_grad_norm <= 0:
            raise ConfigError("--start_learning_rate and --max_grad_norm must be positive")
        self.weights.check()
        if not self.feature_dir and not (self.json_path and self.image_dir):
            raise ConfigError("give --json_path and --image_dir (or --feature_dir with cached features)")
        if self.feature_dir and not os.path.isdir(self.feature_dir):
            raise ConfigError(f"--feature_dir {self.feature_dir} does not exist (create it with "
                              "tools/extract_features.py)")
        if not self.feature_dir and self.image_size is None:
            raise ConfigError("--image_size is needed for the aspect-ratio buckets (256, 512, 1024 or 2048; the "
                              "configs in configs/train set it)")
        if self.controlnet:
            if self.lora_rank:
                raise ConfigError("--controlnet trains the ControlNet branch only; it cannot be combined with --lora_rank")
            if self.controlnet != "init" and not os.path.exists(self.controlnet):
                from pixart.utils.errors import CheckpointError

                raise CheckpointError(f"{self.controlnet} not found (--controlnet): ControlNet weights to continue "
                                      "from, or no value to start from the base model's blocks")
            if self.controlnet_layers is not None and self.controlnet_layers < 1:
                raise ConfigError(f"--controlnet_layers must be at least 1, got {self.controlnet_layers}")
        if self.lora_rank and self.lora_target_modules is None:
            from pixart.models.lora import DEFAULT_TARGETS

            self.lora_target_modules = list(DEFAULT_TARGETS)
        return self

    def check_weights(self):
        """Fail fast when a weights path is missing (cached features replace the VAE and T5, except
        for validation)."""
        weights = self.weights
        if self.pretrained_path and not os.path.isdir(os.path.join(self.pretrained_path, "transformer")):
            from pixart.utils.errors import CheckpointError

            raise CheckpointError(f"{self.pretrained_path} is not a diffusers PixArt folder (--pretrained_path): "
                                  "it needs transformer/, vae/, text_encoder/ and tokenizer/")
        weights.check_weights(components=not self.feature_dir or self.visualize)
        self.checkpoint = weights.checkpoint  # a missing .ckpt may have switched to the .pth beside it
        return self


def parse_train_config(argv=None):
    """train.py's command line (with ``-c`` YAML defaults) -> an unchecked TrainConfig."""
    from pixart.cli import parse_args_with_config, train_parser

    return TrainConfig.from_args(parse_args_with_config(train_parser(), argv))

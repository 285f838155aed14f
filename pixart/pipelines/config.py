"""PipelineConfig: which weights to load and how to sample, as sample.py, demo.py and training-time
validation give it; ``build()`` makes the pipeline.

    config = PipelineConfig(pretrained_path="models/PixArt-Sigma-XL-2-1024-MS")   # or from_args(args)
    config.check(); config.check_weights()        # fail fast, before anything loads
    pipe = config.build()                         # lazy: components load on first use
"""
import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

from pixart.tables import BASE_SIZES, DTYPE_NAMES, SAMPLER_NAMES, VERSIONS, ms_dtype
from pixart.utils.compile_cache import DEFAULT_ROOT as DEFAULT_COMPILE_CACHE
from pixart.utils.compile_cache import resolve_root
from pixart.utils.config import config_from_args
from pixart.utils.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

SIGMA_COMPONENTS_REPO = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"
_COMPONENTS_URL = f"https://huggingface.co/{SIGMA_COMPONENTS_REPO}"


@dataclass
class WeightsConfig:
    """Which weights, and what the DiT's checkpoint may not record (shared by PipelineConfig and
    TrainConfig).

    ``pretrained_path`` (a diffusers PixArt folder or hub id) or ``checkpoint`` (DiT weights) with
    ``vae_root`` / ``text_encoder_root`` / ``tokenizer_root``. ``image_size`` and
    ``pe_interpolation`` say what a checkpoint does not record; ``kv_compress*`` switch on KV token
    compression.
    """

    version: str = "sigma"
    pretrained_path: Optional[str] = None
    checkpoint: Optional[str] = None
    vae_root: str = "models/vae"
    text_encoder_root: str = "models/text_encoder"
    tokenizer_root: str = "models/tokenizer"
    image_size: Optional[int] = None
    pe_interpolation: Optional[float] = None
    kv_compress: bool = False
    kv_compress_sampling: str = "conv"
    kv_compress_scale_factor: int = 1
    kv_compress_layer: Optional[List[int]] = None
    attention_backend: str = "auto"


@dataclass
class PipelineConfig(WeightsConfig):
    """Weights (``WeightsConfig``), LoRA / ControlNet, runtime and the default sampler of a pipeline."""

    lora: Optional[str] = None
    lora_scale: float = 1.0
    controlnet: Optional[str] = None
    dtype: str = "fp32"
    mode: str = "graph"
    compile_cache: Optional[str] = DEFAULT_COMPILE_CACHE
    device_target: Optional[str] = None
    sampling_method: str = "dpm"
    sampling_steps: Optional[int] = None
    timesteps: Optional[List[int]] = None
    guidance_scale: float = 4.5
    ddim_eta: float = 0.0
    sampler_kwargs: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args, **changes):
        """From an argparse namespace holding (some of) these fields by name."""
        return config_from_args(cls, args, **changes)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ checks

    def check(self):
        """Option checks that need no files: raise ConfigError naming the option."""
        if self.version not in VERSIONS:
            raise ConfigError(f"--version must be one of {list(VERSIONS)}, got {self.version!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"--dtype must be one of {list(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.image_size is not None and self.image_size not in BASE_SIZES:
            raise ConfigError(f"--image_size must be one of {list(BASE_SIZES)}, got {self.image_size}")
        if self.sampling_method not in SAMPLER_NAMES:
            raise ConfigError(f"--sampling_method must be one of {list(SAMPLER_NAMES)}, got {self.sampling_method!r}")
        if self.sampling_steps is not None and self.sampling_steps < 1:
            raise ConfigError(f"--sampling_steps must be at least 1, got {self.sampling_steps}")
        if self.kv_compress and (self.kv_compress_scale_factor < 2 or not self.kv_compress_layer):
            raise ConfigError("--kv_compress needs --kv_compress_scale_factor >= 2 and --kv_compress_layer")
        if self.timesteps is not None or self.sampling_method == "lcm":  # the sampler's own checks, before loading
            from pixart.samplers import build_sampler

            try:
                build_sampler(self.sampling_method, self.sampling_steps, timesteps=self.timesteps)
            except ValueError as err:
                raise ConfigError(f"--sampling_method {self.sampling_method}: {err}") from None
        return self

    def check_weights(self, components=True):
        """Fail fast, before anything loads, when a weights path is missing; a missing ``.ckpt``
        with the original ``.pth`` beside it switches to the ``.pth``. ``components=False`` skips
        the VAE / T5 / tokenizer folders (training from cached features)."""
        if self.controlnet and not os.path.exists(self.controlnet):
            raise CheckpointError(f"{self.controlnet} not found (--controlnet): ControlNet weights, e.g. the "
                                  "official PixArt-XL-2-1024-ControlNet.pth")
        if self.pretrained_path:
            from pixart.utils.hub import is_repo_id, resolve_pretrained

            if is_repo_id(self.pretrained_path):  # a Hugging Face repo id: HF cache, or download it now
                self.pretrained_path = resolve_pretrained(self.pretrained_path, what="--pretrained_path")
            if not os.path.isdir(self.pretrained_path):
                raise CheckpointError(f"{self.pretrained_path} not found (--pretrained_path): a diffusers PixArt "
                                      "folder or its Hugging Face repo id, e.g. PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
            return self
        if not self.checkpoint:
            raise ConfigError("give --pretrained_path (diffusers folder) or --checkpoint with the vae/text encoder "
                              "roots")
        self.checkpoint = resolve_checkpoint(self.checkpoint)
        if components:
            for flag in ("vae_root", "text_encoder_root", "tokenizer_root"):
                folder = getattr(self, flag)
                if not os.path.isdir(folder):
                    raise CheckpointError(f"{folder} not found (--{flag}): download the {flag[:-5]}/ folder of "
                                          f"{_COMPONENTS_URL} there (PixArt-α uses the SD VAE and the same T5)")
        return self

    # ------------------------------------------------------------------ building

    @property
    def paths(self):
        """{component: path} of the DiT, VAE, text encoder and tokenizer."""
        if self.pretrained_path:
            root = self.pretrained_path
            return {name: os.path.join(root, name) for name in ("transformer", "vae", "text_encoder", "tokenizer")}
        return {"transformer": self.checkpoint, "vae": self.vae_root, "text_encoder": self.text_encoder_root,
                "tokenizer": self.tokenizer_root}

    @property
    def kv_compress_config(self):
        if not self.kv_compress:
            return None
        return {"sampling": self.kv_compress_sampling, "scale_factor": self.kv_compress_scale_factor,
                "kv_compress_layer": list(self.kv_compress_layer)}

    @property
    def model_name(self):
        """What PNG metadata calls the model: the folder or checkpoint name (+ the LoRA file)."""
        from pixart.utils.hub import display_name  # a Hugging Face cache folder is named by its repo id

        base = display_name(self.pretrained_path or self.checkpoint or "pixart")
        return base + ("+" + os.path.basename(self.lora) if self.lora else "")

    def default_sampler_kwargs(self):
        options = dict(self.sampler_kwargs)
        if self.sampling_method == "ddim":
            options.setdefault("eta", self.ddim_eta)
        return options

    def build(self, **kwargs):
        """The pipeline (lazy: its components load on first use). ``kwargs`` go to the pipeline
        constructor (e.g. ``low_memory``)."""
        from pixart.pipelines.pixart_pipeline import PixArtAlphaPipeline, PixArtSigmaPipeline

        cls = PixArtSigmaPipeline if self.version == "sigma" else PixArtAlphaPipeline
        lora = None
        if self.lora:  # read and checked before any model loads; merged whenever the DiT loads
            from pixart.models.lora import load_lora

            lora = load_lora(self.lora)
        import mindspore as ms

        dtype = ms_dtype(self.dtype)
        # CPU MindSpore has no bf16 kernels: bf16 there means fp32 activations and bf16 GEMMs (pixart.ops)
        use_bf16_gemm = self.dtype == "bf16" and ms.get_context("device_target") == "CPU"
        common = dict(dtype=ms.float32 if use_bf16_gemm else dtype, use_bf16_gemm=use_bf16_gemm,
                      attention_backend=self.attention_backend,
                      sampler=self.sampling_method, mode=self.mode, sampler_kwargs=self.default_sampler_kwargs(),
                      kv_compress_config=self.kv_compress_config, lora=lora, lora_scale=self.lora_scale,
                      controlnet=self.controlnet, **kwargs)
        if self.pretrained_path:
            pipe = cls.from_pretrained(self.pretrained_path, **common)
        else:
            pipe = cls.from_components(self.checkpoint, self.vae_root, self.text_encoder_root, self.tokenizer_root,
                                       image_size=self.image_size, pe_interpolation=self.pe_interpolation, **common)
        pipe.name = self.model_name
        pipe.compile_cache = resolve_root(self.compile_cache)
        return pipe


def resolve_checkpoint(path):
    """The DiT weights file; a missing .ckpt with the original .pth beside it reads the .pth."""
    if os.path.exists(path):
        return path
    pth = re.sub(r"\.ckpt$", ".pth", path)
    if pth != path and os.path.exists(pth):
        logger.warning("%s not found; reading %s directly", path, pth)
        return pth
    name = os.path.splitext(os.path.basename(path))[0]
    stem = os.path.splitext(path)[0]
    raise CheckpointError(
        f"{path} not found: download {name}.pth from the PixArt-Σ release (https://huggingface.co/PixArt-alpha) "
        f"into {os.path.dirname(path) or '.'}/ and run: python tools/convert.py --source {stem}.pth --target "
        f"{stem}.ckpt")

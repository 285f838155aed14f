"""Text-to-image pipelines for PixArt-Σ and PixArt-α, with the diffusers calling convention.

    pipe = PixArtSigmaPipeline.from_pretrained("PixArt-Sigma-XL-2-1024-MS")   # diffusers folder
    image = pipe("a small cactus with a happy face", seed=0).images[0]

Components load lazily. With ``low_memory=True`` (the default) the T5 encoder is loaded, the
prompts encoded and the encoder released before the denoiser loads, so the 4.7B-parameter T5 and
the DiT are never in memory together.
"""
import gc
import json
import os
from dataclasses import dataclass, field

import numpy as np
import mindspore as ms
from mindspore import ops
from tqdm.auto import tqdm

from pixart.data.aspect_ratios import classify_height_width_bin, get_bins, resize_and_crop_batch
from pixart.tables import PE_INTERPOLATION, TEXT_TOKENS, pe_interpolation_for
from pixart.models.pixart import compile_blocks_once
from pixart.models.pixart_weights import from_pretrained as load_transformer
from pixart.pipelines import img2img
from pixart.samplers import DEFAULT_STEPS, PerImageNoise, build_sampler, sampler_for_scheduler_config
from pixart.utils.device import launch_cpu_ops_synchronously
from pixart.utils.errors import CheckpointError, ConfigError
from pixart.utils.hub import resolve_pretrained

SIGMA_COMPONENTS_REPO = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"


@dataclass
class PipelineOutput:
    images: list = field(default_factory=list)


class PixArtSigmaPipeline:
    """PixArt-Σ: 300 text tokens, no micro-conditions.

    Args:
        transformer, vae, text_encoder: models, or zero-argument callables that load them (lazy).
        tokenizer: a ``PromptTokenizer`` (or a callable returning one).
        sampler: default sampling method ("dpm", "sa-solver", "ddim", "iddpm").
        sampler_kwargs: extra arguments for ``build_sampler`` (e.g. ``eta`` for DDIM).
        low_memory: release the text encoder after encoding and the denoiser before the text
            encoder is loaded again.
        mode: "graph" compiles the denoiser (the 20-100 step loop) with MindSpore's graph mode;
            "pynative" runs it eagerly. T5 and the VAE run once per image and stay eager.
        controlnet: a ControlNet (``pixart.models.controlnet``: a path any of its layouts, or a
            ``PixArtControlNet``), used when a call passes ``control_image``.
    """

    default_max_length = TEXT_TOKENS["sigma"]
    version = "sigma"

    def __init__(self, transformer, vae, tokenizer, text_encoder=None, sampler="dpm", sampler_kwargs=None,
                 low_memory=True, schedule=None, mode="pynative", controlnet=None):
        if mode not in ("graph", "pynative"):
            raise ConfigError(f"mode must be graph or pynative, got {mode!r}")
        self.mode = mode
        launch_cpu_ops_synchronously()  # T5, the VAE and eager steps at full speed on CPU (see there)
        components = {"transformer": transformer, "vae": vae, "tokenizer": tokenizer, "text_encoder": text_encoder}
        self._loaders = {k: v for k, v in components.items() if _is_loader(v)}
        self._loaded = {k: v for k, v in components.items() if v is not None and not _is_loader(v)}
        self.sampler_name = sampler
        self.sampler_kwargs = dict(sampler_kwargs or {})
        self.schedule = dict(schedule or {})  # num_train_timesteps / beta_* from scheduler_config.json
        self.low_memory = low_memory
        self.controlnet = controlnet
        self._control_denoiser = None  # (base DiT, ControlPixArt), rebuilt when the DiT reloads
        self.name = "pixart"  # the model name PNG metadata records (PipelineConfig.build sets it)
        # Encode (and cross-attend to) only up to the longest real prompt, bucketed; exact, since
        # padded tokens are masked in T5 and in the DiT (see encode_prompts).
        self.trim_text_tokens = True
        # A folder for MindSpore's compile cache (graph mode): a later process reuses the denoiser
        # graph compiled for the same shapes instead of compiling it again. None: off.
        self.compile_cache = None

    # ------------------------------------------------------------------ components

    def _get(self, name):
        if name not in self._loaded:
            if name not in self._loaders:
                raise ConfigError(f"this pipeline has no {name}; pass precomputed embeddings instead")
            if name == "text_encoder" and self.low_memory:
                self.release("transformer")  # T5 and the DiT are never loaded together
            self._loaded[name] = self._loaders[name]()
        return self._loaded[name]

    def release(self, name):
        """Free a component that was given as a loader; it is loaded again on next use."""
        if name in self._loaders and self._loaded.pop(name, None) is not None:
            gc.collect()
        return self

    @property
    def transformer(self):
        return self._get("transformer")

    @property
    def vae(self):
        return self._get("vae")

    @property
    def tokenizer(self):
        return self._get("tokenizer")

    @property
    def text_encoder(self):
        return self._get("text_encoder")

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path, dtype=ms.float32, text_encoder_dtype=ms.float32, vae_dtype=ms.float32,
                        attention_backend="auto", **kwargs):
        """Build from a diffusers-format folder (model_index.json, transformer/, text_encoder/,
        tokenizer/, vae/, scheduler/); the architecture is read from their configs. ``path`` may be
        a Hugging Face repo id (pixart.utils.hub.resolve_pretrained: HF cache, or a download)."""
        path = resolve_pretrained(path, what="pipeline folder")
        if not os.path.isdir(path):
            raise CheckpointError(f"pipeline folder {path} does not exist")
        for sub in ("transformer", "vae", "text_encoder", "tokenizer"):
            if not os.path.isdir(os.path.join(path, sub)):
                raise CheckpointError(f"{os.path.join(path, sub)} is missing: a diffusers PixArt folder has "
                                      f"transformer/, text_encoder/, tokenizer/ and vae/ (see {SIGMA_COMPONENTS_REPO})")
        schedule = {}
        scheduler_json = os.path.join(path, "scheduler", "scheduler_config.json")
        if os.path.isfile(scheduler_json):
            with open(scheduler_json) as f:
                cfg = json.load(f)
            schedule = {k: cfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule") if k in cfg}
            if "sampler" not in kwargs:  # e.g. PixArt-LCM ships an LCMScheduler: sample with LCM
                name, options = sampler_for_scheduler_config(cfg)
                if name is not None:
                    kwargs.update(sampler=name, sampler_kwargs={**options, **(kwargs.get("sampler_kwargs") or {})})
        return cls.from_components(os.path.join(path, "transformer"), os.path.join(path, "vae"),
                                   os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer"),
                                   dtype=dtype, text_encoder_dtype=text_encoder_dtype, vae_dtype=vae_dtype,
                                   attention_backend=attention_backend, schedule=schedule, **kwargs)

    @classmethod
    def from_components(cls, checkpoint, vae_root, text_encoder_root, tokenizer_root, image_size=None,
                        pe_interpolation=None, dtype=ms.float32, text_encoder_dtype=ms.float32, vae_dtype=ms.float32,
                        attention_backend="auto", kv_compress_config=None, vae_tile_size=1024, lora=None,
                        lora_scale=1.0, use_bf16_gemm=False, **kwargs):
        """Build from the seed layout: a DiT checkpoint (.ckpt/.pth/.safetensors or transformer/
        folder) plus vae/, text_encoder/ and tokenizer/ folders. ``image_size`` (256...4096) sets the
        base resolution and the published pe_interpolation for it and this pipeline's version (α 256
        is 1.0, Σ 256 0.5; ``pe_interpolation`` overrides). ``lora`` (a path or ``load_lora``'s result)
        is merged into the DiT each time it loads, with ``lora_scale``. ``use_bf16_gemm`` (CPU): the
        DiT's and T5's linear layers and the VAE's convolutions run as bf16 GEMMs with bf16 weights
        (``pixart.ops.cpu_kernels``; fp32 where unavailable). On CPU an fp32 DiT's norms, gates, attention
        and fp32 linear layers (bias and GELU inside the GEMM kernel), and an fp32 VAE's GroupNorm
        + SiLU, run as fused kernels (``cpu_kernels.use_fused_kernels``), its fp32 convolutions as
        im2col + the kernels' sgemm (``cpu_kernels.use_conv_kernels``)."""
        from pixart.models.autoencoder_kl import AutoencoderKL
        from pixart.models.t5 import T5Encoder
        from pixart.models.tokenizer import PromptTokenizer

        overrides = {"dtype": dtype, "attention_backend": attention_backend,
                     "model_max_length": cls.default_max_length}
        if image_size is not None:
            if image_size not in PE_INTERPOLATION:
                raise ConfigError(f"image_size must be one of {sorted(PE_INTERPOLATION)}, got {image_size}")
            overrides.update(input_size=image_size // 8, pe_interpolation=pe_interpolation_for(image_size, cls.version))
        if pe_interpolation is not None:
            overrides["pe_interpolation"] = float(pe_interpolation)
        if kv_compress_config:
            overrides["kv_compress_config"] = kv_compress_config

        def transformer():
            model = load_transformer(checkpoint, **overrides)
            if lora is not None:
                from pixart.models.lora import merge_lora
                merge_lora(model, lora, strength=lora_scale)
            if ms.get_context("device_target") == "CPU" and model.dtype == ms.float32:
                from pixart.ops import cpu_kernels
                if use_bf16_gemm:
                    cpu_kernels.use_bf16_gemm(model)
                cpu_kernels.use_fused_kernels(model)
            model.set_train(False)
            return model

        def vae():
            model = AutoencoderKL.from_pretrained(vae_root, dtype=vae_dtype)
            if ms.get_context("device_target") == "CPU" and model.compute_dtype == ms.float32:
                from pixart.ops import cpu_kernels
                if use_bf16_gemm:
                    cpu_kernels.use_bf16_gemm(model, convs=True)
                cpu_kernels.use_conv_kernels(model)  # the fp32 convolutions left (all without bf16 GEMMs)
                cpu_kernels.use_fused_norms(model)
            return _tiled_vae(model, vae_tile_size)

        return cls(transformer=transformer, vae=vae,
                   tokenizer=lambda: PromptTokenizer.from_pretrained(tokenizer_root),
                   text_encoder=lambda: T5Encoder.from_pretrained(text_encoder_root, dtype=text_encoder_dtype,
                                                                 backend=attention_backend, use_bf16_gemm=use_bf16_gemm),
                   **kwargs)

    # ------------------------------------------------------------------ text

    def encode_prompt(self, prompt, negative_prompt="", do_classifier_free_guidance=True, num_images_per_prompt=1,
                      max_sequence_length=None, clean_caption=True):
        """prompt(s) -> (embeds (B, L, E), mask (B, L), negative embeds, negative mask), B = N·images.

        L is ``max_sequence_length`` (300 Σ, 120 α), or with ``trim_text_tokens`` (the default) the
        longest real prompt or negative prompt rounded up to a bucket (16, 32, 64, ...).

        The negative prompt gets its own attention mask (as diffusers; the original code reused the
        prompt's). With ``low_memory`` the T5 encoder is released afterwards.
        """
        from pixart.models.tokenizer import encode_prompts

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        max_length = max_sequence_length or self.default_max_length
        texts = prompts
        if do_classifier_free_guidance:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ConfigError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
            texts = prompts + negatives
        embeds, mask = encode_prompts(self.tokenizer, self.text_encoder, texts, max_length=max_length,
                                      clean_caption=clean_caption, trim=self.trim_text_tokens)
        if self.low_memory:
            self.release("text_encoder")
        embeds, mask = embeds.astype(ms.float32), mask.astype(ms.int32)
        repeat = lambda t: ops.repeat_interleave(t, num_images_per_prompt, axis=0)  # noqa: E731
        n = len(prompts)
        if not do_classifier_free_guidance:
            return repeat(embeds), repeat(mask), None, None
        return repeat(embeds[:n]), repeat(mask[:n]), repeat(embeds[n:]), repeat(mask[n:])

    # ------------------------------------------------------------------ sampling

    def generation_size(self, height=None, width=None, use_resolution_binning=True):
        """The (height, width) images are generated at: the request (default: the model's base
        resolution), or with binning the nearest aspect-ratio bin of the base resolution."""
        model = self.transformer
        base = model.base_size * model.patch_size * 8
        height, width = height or base, width or base
        if use_resolution_binning:
            height, width = classify_height_width_bin(height, width, get_bins(base))
        if height % 8 or width % 8 or height < 8 or width < 8:
            raise ConfigError(f"height and width must be positive multiples of 8, got {height}x{width}")
        return int(height), int(width)

    def micro_conditions(self, height, width, batch):
        """PixArt-α 1024-MS: (resolution (B, 2), aspect ratio (B, 1)) of the generated size."""
        return None, None

    def prepare_latents(self, batch, height, width, latents, seed):
        channels = self.transformer.in_channels
        shape = (batch, channels, height // 8, width // 8)
        if latents is None:
            return ms.Tensor(initial_latents(seed, batch, shape[1:]))
        latents = latents if isinstance(latents, ms.Tensor) else ms.Tensor(np.asarray(latents, np.float32))
        if tuple(latents.shape) != shape:
            raise ConfigError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.astype(ms.float32)

    def prepare_image_latents(self, inputs, sampler, batch, height, width, seed, noise=None):
        """img2img / inpainting start at the generation size.

        Encodes the init image(s) (VAE posterior mean × scaling_factor), keeps the timesteps of
        ``inputs.strength`` (the sampler is reset to them) and noises the latents to the first one
        (none kept: the clean latents). ``noise``: (B, C, h, w) Tensor, or None for the per-image
        streams. Returns (latents (B, C, h, w), timesteps to run, inpainting state or None).
        """
        vae = self.vae
        pixels = ms.Tensor(img2img.image_batch(inputs, batch, height, width))
        image_latents = vae.encode(pixels).mode().astype(ms.float32) * vae.scaling_factor
        if noise is None:
            noise = ms.Tensor(img2img.img2img_noise(seed, batch, tuple(image_latents.shape[1:])))
        run = img2img.strength_timesteps(sampler.timesteps, inputs.strength)
        if 0 < len(run) < len(sampler.timesteps):
            sampler.set_timesteps(timesteps=run)  # a fresh multistep history, starting at run[0]
        x = sampler.add_noise(image_latents, noise, run[0]) if len(run) else image_latents
        inpaint = None
        if inputs.inpainting:
            mask = ms.Tensor(img2img.latent_mask(inputs, batch, height, width))
            inpaint = {"mask": mask, "keep": 1.0 - mask, "latents": image_latents, "noise": noise}
        return x, run, inpaint

    @staticmethod
    def blend_inpaint(x, inpaint, sampler, next_timestep):
        """Inpainting after a step: the kept area (mask 0) becomes the image latents noised to the
        next timestep (clean after the last step); the masked area keeps the sampler's x."""
        known = inpaint["latents"] if next_timestep is None else \
            sampler.add_noise(inpaint["latents"], inpaint["noise"], next_timestep)
        return inpaint["mask"] * x + inpaint["keep"] * known

    def __call__(self, prompt=None, negative_prompt="", num_inference_steps=None, guidance_scale=4.5, height=None,
                 width=None, num_images_per_prompt=1, seed=None, latents=None, prompt_embeds=None,
                 prompt_attention_mask=None, negative_prompt_embeds=None, negative_prompt_attention_mask=None,
                 use_resolution_binning=True, max_sequence_length=None, output_type="pil", callback=None,
                 sampler=None, sampler_kwargs=None, clean_caption=True, progress=True, timesteps=None,
                 image=None, strength=None, mask_image=None, control_image=None, controlnet_conditioning_scale=1.0):
        """Generate images.

        Image k of the batch starts from ``initial_latents(seed + k)`` unless ``latents`` are
        given, and a stochastic sampler's noise for it comes from its own stream of seed + k: an
        image depends on its seed, not on the batch it is generated in. ``sampler`` / ``sampler_kwargs`` (e.g.
        ``{"eta": 0.5}`` for DDIM) override the pipeline's default sampler for this call.
        ``timesteps`` (strictly descending, e.g. [400] for PixArt-α-DMD) replace the sampler's own.

        img2img / inpainting (see ``pixart.pipelines.img2img``): ``image`` (path, PIL image or
        (H, W, 3) array in [0, 1]; one, or one per image) with ``strength`` in [0, 1] (default 0.8;
        1.0 with a mask), and ``mask_image`` of the image's size (white = repaint). The size defaults
        to the image's; the added noise of image k comes from ``default_rng([seed + k, 2])``, or is
        ``latents`` when given.

        ``control_image`` (with a ``controlnet``): one image for all, or one per image; a PIL
        image, a file path, or numpy (H, W, 3) in [0, 255] (uint8) or [0, 1] (float). It must have
        the requested size (``height`` × ``width``, which default to its size); when resolution
        binning generates at another bin it is resized to the bin (Lanczos).
        ``controlnet_conditioning_scale`` in [0, 1] scales the ControlNet's residuals.

        Returns ``PipelineOutput(images)``: PIL images, (H, W, 3) float arrays in [0, 1] for
        ``output_type="np"``, or the (N, C, H/8, W/8) latents for ``"latent"``.
        """
        if control_image is not None:
            height, width = self._check_control(control_image, controlnet_conditioning_scale, height, width)
        sampler_name = sampler or self.sampler_name
        steps = DEFAULT_STEPS[sampler_name] if num_inference_steps is None else num_inference_steps
        if steps < 1 and timesteps is None:
            raise ConfigError(f"num_inference_steps must be at least 1, got {steps}")
        if mask_image is not None and image is None:
            raise ConfigError("mask_image needs an init image (image=)")
        image_inputs = None if image is None else img2img.check_image_inputs(image, mask_image, strength)
        if image_inputs is not None:
            height, width = img2img.default_size(image_inputs, height, width)
        if output_type not in ("pil", "np", "latent"):
            raise ConfigError(f"output_type must be pil, np or latent, got {output_type!r}")
        do_cfg = guidance_scale > 1.0

        # 1. text features (before the denoiser loads)
        if prompt_embeds is None:
            if prompt is None:
                raise ConfigError("give a prompt or prompt_embeds")
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = \
                self.encode_prompt(prompt, negative_prompt, do_cfg, num_images_per_prompt, max_sequence_length,
                                   clean_caption)
        else:
            prompt_embeds, prompt_attention_mask = _as_tensor(prompt_embeds), _as_mask(prompt_attention_mask, prompt_embeds)
            if do_cfg:
                if negative_prompt_embeds is None:
                    raise ConfigError("with guidance, precomputed prompt_embeds need negative_prompt_embeds")
                negative_prompt_embeds = _as_tensor(negative_prompt_embeds)
                negative_prompt_attention_mask = _as_mask(negative_prompt_attention_mask, negative_prompt_embeds)
        batch = prompt_embeds.shape[0]

        # 2. size: nearest aspect-ratio bin of the model's base resolution
        model = self.transformer
        requested = self.generation_size(height, width, use_resolution_binning=False)
        height, width = self.generation_size(height, width, use_resolution_binning)

        # 3. denoise
        options = dict(self.sampler_kwargs if sampler_name == self.sampler_name else {}, **(sampler_kwargs or {}))
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31))
        # Image k's step noise has its own stream, apart from its starting latents' stream.
        noise = PerImageNoise([seed + k for k in range(batch)], stream=1)
        try:
            sampler_obj = build_sampler(sampler_name, steps, timesteps=timesteps, generator=noise, **self.schedule,
                                        **options)
        except ValueError as err:
            raise ConfigError(f"sampler {sampler_name}: {err}") from None
        x = self.prepare_latents(batch, height, width, latents, seed) * sampler_obj.init_noise_sigma
        run, inpaint = sampler_obj.timesteps, None
        if image_inputs is not None:
            x, run, inpaint = self.prepare_image_latents(image_inputs, sampler_obj, batch, height, width, seed,
                                                         noise=x if latents is not None else None)
        y, y_mask = prompt_embeds, prompt_attention_mask
        if do_cfg:  # unconditional first, as diffusers
            y = ops.concat([negative_prompt_embeds, prompt_embeds], axis=0)
            y_mask = ops.concat([negative_prompt_attention_mask, prompt_attention_mask], axis=0)
        model_batch = batch * (2 if do_cfg else 1)
        resolution, aspect = self.micro_conditions(height, width, model_batch)
        timesteps = [ms.Tensor(np.full((model_batch,), t, np.int32)) for t in run]
        channels = x.shape[1]
        control = None
        if control_image is not None:  # hint latents, the same for the guided and unguided halves
            model, control = self._control_inputs(control_image, height, width, batch, do_cfg)
        denoise = ImageRows(model, batch, do_cfg, per_image=ms.get_context("device_target") == "CPU",
                            y=y, mask=y_mask, resolution=resolution, aspect=aspect, control=control)
        previous_mode = ms.get_context("mode")
        ms.set_context(mode=ms.GRAPH_MODE if self.mode == "graph" else ms.PYNATIVE_MODE)
        if self.mode == "graph":  # after any layer swap (LoRA, kernels): the blocks' keys follow them
            compile_blocks_once(model)
        if self.mode == "graph" and self.compile_cache:
            from pixart.ops.cpu_kernels import (bf16_gemm_layers, fused_attention_layers, fused_linear_layers,
                                                fused_norm_layers)
            from pixart.utils.compile_cache import use_graph_cache

            base = self.transformer  # model is the ControlPixArt around it with a ControlNet
            rows = denoise.rows_per_call
            use_graph_cache(self.compile_cache, {
                "model": base.config.to_dict(), "class": type(model).__name__, "dtype": str(base.dtype),
                "x": (rows,) + tuple(x.shape[1:]), "y": (rows,) + tuple(y.shape[1:]),
                "mask": (rows,) + tuple(y_mask.shape[1:]), "micro": resolution is not None,
                "backend": getattr(base.blocks[0].attn, "backend", None), "bf16_gemm_layers": bf16_gemm_layers(base),
                "fused_norm_layers": fused_norm_layers(base), "fused_linear_layers": fused_linear_layers(base),
                "fused_attention_layers": fused_attention_layers(base),
                "controlnet": getattr(model, "num_layers", None)})
        try:
            for i, t in enumerate(tqdm(run, disable=not progress, desc="sampling")):
                model_in = ops.concat([x, x], axis=0) if do_cfg else x
                out = denoise(model_in, timesteps[i], controlnet_conditioning_scale)
                if do_cfg:
                    uncond, cond = out[:batch], out[batch:]
                    eps = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
                    out = ops.concat([eps, cond[:, channels:]], axis=1) if cond.shape[1] > channels else eps
                x = sampler_obj.step(out, int(t), x)
                if inpaint is not None:
                    x = self.blend_inpaint(x, inpaint, sampler_obj, run[i + 1] if i + 1 < len(run) else None)
                if callback is not None:
                    callback(i, int(t), x)
        finally:
            ms.set_context(mode=previous_mode)

        if output_type == "latent":
            return PipelineOutput(images=x)
        # 4. decode, back to the requested size, to images. One image per VAE call: the CPU conv
        # kernels' arithmetic depends on the batch size, and peak memory is one image's.
        vae = self.vae
        z = x / vae.scaling_factor
        image = np.concatenate([vae.decode(z[k:k + 1]).astype(ms.float32).asnumpy() for k in range(z.shape[0])])
        if (height, width) != requested:  # resize before clamping, as diffusers does
            image = resize_and_crop_batch(image, *requested)
        image = np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        if output_type == "np":
            return PipelineOutput(images=list(image))
        from PIL import Image
        return PipelineOutput(images=[Image.fromarray((im * 255).round().astype(np.uint8)) for im in image])


    # ------------------------------------------------------------------ ControlNet

    def _check_control(self, control_image, scale, height, width):
        """Fail fast on bad ControlNet input; -> the (height, width) request (default: the image's)."""
        from pixart.models.controlnet import check_conditioning_scale, control_image_size

        if self.controlnet is None:
            raise ConfigError("control_image needs a ControlNet: build the pipeline with controlnet= "
                              "(sample.py --controlnet PATH)")
        check_conditioning_scale(scale)
        images = control_image if isinstance(control_image, (list, tuple)) else [control_image]
        sizes = {control_image_size(image) for image in images}
        if len(sizes) > 1:
            raise ConfigError(f"the control images have different sizes {sorted(sizes)}")
        size = sizes.pop()
        requested = (height or size[0], width or size[1])
        if requested != size:
            raise ConfigError(f"the control image is {size[1]}x{size[0]} (width x height) but the requested size is "
                              f"{requested[1]}x{requested[0]}: give a control image of that size, or leave "
                              "height/width unset to generate at the control image's size")
        return requested

    def control_denoiser(self):
        """The DiT with the ControlNet branch (``ControlPixArt``), loaded with the DiT."""
        from pixart.models.controlnet import ControlPixArt, PixArtControlNet, load_controlnet

        base = self.transformer
        if self._control_denoiser is None or self._control_denoiser[0] is not base:
            branch = self.controlnet
            if not isinstance(branch, PixArtControlNet):
                branch = load_controlnet(branch, base)
                weight = branch.controlnet[0].after_proj.weight
                if ms.get_context("device_target") == "CPU" and weight.dtype == ms.float32:
                    from pixart.ops import cpu_kernels  # as for the DiT (from_components)
                    cpu_kernels.use_fused_kernels(branch)
            branch.set_train(False)
            self._control_denoiser = (base, ControlPixArt(base, branch))
        return self._control_denoiser[1]

    def _control_inputs(self, control_image, height, width, batch, do_cfg):
        """-> (denoiser, hint latents (B or 2B, C, H/8, W/8)) for the generation size."""
        from pixart.models.controlnet import encode_control_images, prepare_control_images

        images = control_image if isinstance(control_image, (list, tuple)) else [control_image]
        if len(images) not in (1, batch):
            raise ConfigError(f"give one control image or one per image ({batch}), got {len(images)}")
        denoiser = self.control_denoiser()
        latents = encode_control_images(self.vae, prepare_control_images(images, height, width))
        if latents.shape[0] != batch:
            latents = ops.tile(latents, (batch, 1, 1, 1))
        return denoiser, ops.concat([latents, latents], axis=0) if do_cfg else latents

    def generate(self, prompts, num_images=1, batch_size=1, seed=42, negative_prompt="", guidance_scale=4.5,
                 num_inference_steps=None, sampler=None, sampler_kwargs=None, height=None, width=None,
                 use_resolution_binning=True, progress=True, callback=None, timesteps=None, image=None,
                 strength=None, mask_image=None, control_image=None, controlnet_conditioning_scale=1.0):
        """Yield a ``GeneratedImage`` for each of ``num_images`` images of every prompt, in order.

        ``timesteps``, ``image``, ``strength``, ``mask_image``, ``control_image`` and
        ``controlnet_conditioning_scale`` are ``__call__``'s (custom timesteps, img2img / inpainting
        from one init image, ControlNet).

        All prompts go through T5 first (with ``low_memory`` it is then released, before the DiT
        loads); the images are then denoised ``batch_size`` at a time. Image k (counting over all
        prompts) uses seed ``seed + k``, whatever the batch size, and its ``fields`` are the
        settings that reproduce it (what sample.py writes into the PNG).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if num_images < 1 or batch_size < 1:
            raise ConfigError("num_images and batch_size must be at least 1")
        sampler_name = sampler or self.sampler_name
        steps = DEFAULT_STEPS[sampler_name] if num_inference_steps is None else num_inference_steps
        extra = image_fields(timesteps, image, strength, mask_image)
        if timesteps is not None:
            steps = len(timesteps)
        jobs = [p for p in prompts for _ in range(num_images)]
        do_cfg = guidance_scale > 1.0
        embeds, mask, neg, neg_mask = self.encode_prompt(jobs, negative_prompt, do_cfg)
        for start in range(0, len(jobs), batch_size):
            rows = slice(start, min(start + batch_size, len(jobs)))
            pick = lambda t: None if t is None else t[rows]  # noqa: E731
            out = self(prompt_embeds=pick(embeds), prompt_attention_mask=pick(mask), negative_prompt_embeds=pick(neg),
                       negative_prompt_attention_mask=pick(neg_mask), seed=seed + start,
                       num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                       use_resolution_binning=use_resolution_binning, sampler=sampler_name,
                       sampler_kwargs=sampler_kwargs, progress=progress, callback=callback, timesteps=timesteps,
                       image=image, strength=strength, mask_image=mask_image, control_image=control_image,
                       controlnet_conditioning_scale=controlnet_conditioning_scale)
            for k, picture in enumerate(out.images, start):
                fields = dict(prompt=jobs[k], negative_prompt=negative_prompt, seed=seed + k, steps=steps,
                              guidance_scale=guidance_scale, sampler=sampler_name,
                              size=f"{picture.size[0]}x{picture.size[1]}", model=self.name, **extra)
                if control_image is not None:
                    fields.update(controlnet_fields(self.controlnet, control_image, controlnet_conditioning_scale))
                yield GeneratedImage(index=k, image=picture, fields=fields)


def image_fields(timesteps=None, image=None, strength=None, mask_image=None):
    """The metadata fields of the few-step / img2img options that were used (file names of paths)."""
    fields = {"timesteps": " ".join(map(str, timesteps))} if timesteps else {}
    if image is not None:
        default = img2img.INPAINT_STRENGTH if mask_image is not None else img2img.IMG2IMG_STRENGTH
        fields.update(init_image=os.path.basename(image) if isinstance(image, str) else "(array)",
                      strength=strength if strength is not None else default)
        if mask_image is not None:
            fields["mask_image"] = os.path.basename(mask_image) if isinstance(mask_image, str) else "(array)"
    return fields


def controlnet_fields(controlnet, control_image, scale):
    """The metadata fields of a ControlNet run (file names of paths)."""
    return {"controlnet": os.path.basename(os.path.normpath(controlnet)) if isinstance(controlnet, str) else "ControlNet",
            "control_image": os.path.basename(control_image) if isinstance(control_image, str) else "(array)",
            "controlnet_conditioning_scale": scale}


class ImageRows:
    """The denoiser over a batch's model rows: (unconditional rows, then conditional) under guidance.

    With ``per_image`` (on CPU) each image's rows (its unconditional and conditional pair) go
    through the denoiser in a call of their own: CPU GEMM kernels round a row differently for
    other row counts (measured on AVX2), and image k must be bit for bit the same at any batch
    size. Elsewhere the whole batch is one call. The per-call text context (the blocks' caption
    K/V, ``model.text_context``), mask, micro-conditions and ControlNet hints are made once; only
    the latents and timesteps are split each step.
    """

    def __init__(self, model, batch, guided, per_image, y, mask, resolution=None, aspect=None, control=None):
        model_batch = batch * (2 if guided else 1)
        if per_image and batch > 1:
            self.groups = [[k, batch + k] if guided else [k] for k in range(batch)]
        else:
            self.groups = [list(range(model_batch))]
        self.model = model
        self.rows_per_call = len(self.groups[0])
        self.picks = [ms.Tensor(np.array(g, np.int32)) for g in self.groups]
        self.inputs = []
        for pick in self.picks:
            y_k, mask_k, resolution_k, aspect_k, control_k = (self._take(v, pick)
                                                              for v in (y, mask, resolution, aspect, control))
            # mutable: a graph input, not a constant baked into the graph (a new prompt would recompile it)
            self.inputs.append((ms.mutable(model.text_context(y_k)), mask_k, resolution_k, aspect_k, control_k))
        self.order = ms.Tensor(np.argsort(np.concatenate(self.groups)).astype(np.int32))

    def _take(self, v, pick):
        return v if v is None or len(self.groups) == 1 else ops.gather(v, pick, 0)

    def __call__(self, x, t, control_scale=1.0):
        """x (model batch, C, H, W), t (model batch,) -> the denoiser's output, rows in x's order."""
        model, outs = self.model, []
        for pick, (text, mask, resolution, aspect, control) in zip(self.picks, self.inputs):
            x_k, t_k = self._take(x, pick), self._take(t, pick)
            if control is not None:
                outs.append(model(x_k, t_k, text, mask, resolution, aspect, None, control, control_scale))
            elif resolution is not None:
                outs.append(model(x_k, t_k, text, mask, resolution, aspect))
            else:
                outs.append(model(x_k, t_k, text, mask))
        return outs[0] if len(outs) == 1 else ops.gather(ops.concat(outs, axis=0), self.order, 0)


@dataclass
class GeneratedImage:
    """One image of ``generate``: its index k, the PIL image and the settings that reproduce it."""

    index: int
    image: object
    fields: dict


class PixArtAlphaPipeline(PixArtSigmaPipeline):
    """PixArt-α: 120 text tokens; the 1024-MS model adds image-size micro-conditions."""

    default_max_length = TEXT_TOKENS["alpha"]
    version = "alpha"

    def micro_conditions(self, height, width, batch):
        if not self.transformer.micro_condition:
            return None, None
        resolution = ms.Tensor(np.tile(np.array([[height, width]], np.float32), (batch, 1)))
        aspect = ms.Tensor(np.full((batch, 1), height / width, np.float32))
        return resolution, aspect


def initial_latents(seed, count, shape):
    """(count, *shape) fp32 starting noise; image k is drawn from its own ``default_rng(seed + k)``,
    so an image does not depend on the batch it was generated in."""
    return np.stack([np.random.default_rng(seed + k).standard_normal(shape) for k in range(count)]).astype(np.float32)


def _tiled_vae(vae, tile_size):
    """Images larger than ``tile_size`` px decode in blended tiles of that size, so 2K/4K decoding
    memory is bounded by the tile (an untiled SDXL decode needs ~6 GiB at 1024², ~4× that at 2K);
    up to ``tile_size`` the decode is untiled, exactly as diffusers'."""
    vae.set_train(False)
    vae.enable_tiling(tile_sample_min_size=tile_size)
    return vae


def _is_loader(value):
    """A zero-argument callable that builds a component (a Cell is callable too, but is a model)."""
    return callable(value) and not isinstance(value, ms.nn.Cell) and not hasattr(value, "tokenize")


def _as_tensor(value):
    return value.astype(ms.float32) if isinstance(value, ms.Tensor) else ms.Tensor(np.asarray(value, np.float32))


def _as_mask(mask, embeds):
    if mask is None:
        return ops.ones(embeds.shape[:2], ms.int32)
    return mask.astype(ms.int32) if isinstance(mask, ms.Tensor) else ms.Tensor(np.asarray(mask, np.int32))

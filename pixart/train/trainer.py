"""PixArt fine-tuning: the loop around the train step (data, checkpoints, resume, EMA, validation).

    trainer = Trainer(args)          # args: train.py's options (see train.py --help)
    trainer.train()

One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``batch_size`` images on every
rank. Per micro-batch (host side, outside the compiled graphs): load the images (a background
thread), encode them with the VAE and the captions with T5 (or read both from a feature folder),
draw the step's noise, then run the compiled ForwardBackward graph; per step the compiled
OptimizerStep graph. Rank 0 logs, validates and writes checkpoints.

Exact resume: a checkpoint holds the weights, EMA, optimizer state, step and the data position;
all randomness is a function of (seed, step, micro-batch index) or (seed, epoch, record). A run
resumed from step k performs the same arithmetic on the same inputs as the uninterrupted run.
"""
import logging
import os
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import mindspore as ms

from pixart.data import BucketBatchSampler, TrainDataset, get_bins, load_batch, load_records
from pixart.models.pixart_weights import from_pretrained, save_pixart_ckpt
from pixart.tables import PE_INTERPOLATION, TEXT_TOKENS, ms_dtype
from pixart.train import checkpointing as ckpt
from pixart.train.optim import WarmupSchedule, lr_at, scaled_learning_rate
from pixart.train.step import TrainStep, draw_step_noise
from pixart.utils.checkpoint import to_tensor
from pixart.utils.errors import CheckpointError, ConfigError

logger = logging.getLogger("train")

NULL_CAPTION = "y_embedder.y_embedding"
# Options a resumed run must share with the checkpoint: they decide what the stored state means.
RESUME_KEYS = ("seed", "batch_size", "image_size", "multi_scale", "optim", "use_ema", "lora_rank", "lora_alpha",
               "lora_target_modules", "controlnet", "controlnet_layers")
# Options that may change on resume, at the price of exactness (a warning says so). Switching between
# images and cached features keeps it exact: both give the same numbers.
RESUME_WARN_KEYS = ("world_size", "gradient_accumulation_steps", "class_dropout_prob", "real_prompt_ratio")


# ----------------------------------------------------------------------------- environment


def init_distributed(use_parallel):
    """-> (rank, world_size). Data parallel over all workers started by msrun."""
    if not use_parallel:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init
    from mindspore.context import ParallelMode

    init()
    rank, world = get_rank(), get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=world)
    return rank, world


def resolve_dtype(name, device_target):
    """Mixed-precision compute dtype; "auto" = bf16 on Ascend, fp32 elsewhere."""
    if name == "auto":
        name = "bf16" if device_target == "Ascend" else "fp32"
    if name == "bf16" and device_target == "CPU":
        raise ConfigError("bf16 mixed precision has no MindSpore CPU kernels (MatMul); use --dtype fp32 or fp16 "
                          "on CPU")
    return name


# ----------------------------------------------------------------------------- data


@dataclass
class Batch:
    """A loaded micro-batch and the sampler position right after it (what a checkpoint stores)."""
    data: dict
    epoch: int
    skipped: int
    data_state: dict


class BatchStream:
    """Endless micro-batches over epochs, loaded ``prefetch`` batches ahead by a background thread.

    Batches whose images are all unreadable are skipped (their count is carried to the next one).
    The order is the sampler's, so it is deterministic; each Batch carries ``sampler.state_dict()``
    as of its own position, not the thread's read-ahead position.
    """

    def __init__(self, sampler, load, prefetch=2):
        self.sampler, self.load = sampler, load
        self.queue = queue.Queue(maxsize=max(1, prefetch))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="batch-loader", daemon=True)
        self.thread.start()

    def _produce(self):
        try:
            skipped = 0
            while not self.stopped.is_set():
                epoch = self.sampler.epoch
                for indices in self.sampler:
                    data, n = self.load(indices, epoch)
                    skipped += n
                    if data is not None:
                        self._put(Batch(data, epoch, skipped, self.sampler.state_dict()))
                        skipped = 0
                    if self.stopped.is_set():
                        return
        except BaseException as err:  # handed to the training thread, which raises it
            self._put(err)

    def _put(self, item):
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def __next__(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.stopped.set()


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Builds everything from ``args`` (train.py's namespace) and runs ``train()``."""

    def __init__(self, args, rank=0, world_size=1, device_target="CPU"):
        self.args = args
        self.rank, self.world_size = rank, world_size
        self.device_target = device_target
        self.step = 0
        self.history = []  # (step, loss) of every logged window, for tests and plots
        self.feature_mode = bool(getattr(args, "feature_dir", None))
        self.dtype = resolve_dtype(args.dtype, device_target)
        self.vae = self.tokenizer = self.text_encoder = None
        self.controlnet = None  # the ControlNet branch (train.py --controlnet); the DiT is then frozen
        self.validation_inputs = None
        self.epoch = 0

        self._build_data()
        self._build_model()
        self._build_step()
        self.data_state = self.sampler.state_dict()
        if args.resume:
            self._resume(args.resume)
        elif ckpt.latest_checkpoint(args.output_path):
            raise ConfigError(f"{args.output_path} already holds the checkpoints of a run "
                              f"({ckpt.latest_checkpoint(args.output_path)}): pass --resume to continue it, or "
                              "choose another --output_path")

    # ------------------------------------------------------------------ setup

    def _build_data(self):
        args = self.args
        if self.feature_mode:
            from pixart.data.features import FeatureDataset, load_feature_batch

            self.dataset = FeatureDataset(args.feature_dir, real_prompt_ratio=args.real_prompt_ratio, seed=args.seed)
            self.bins = self.dataset.bins
            # The features fix the resolution (their buckets); the model geometry follows it as in image mode.
            extracted = int(self.dataset.config["image_size"])
            if args.image_size not in (None, extracted):
                raise ConfigError(f"--image_size {args.image_size} but the features in {args.feature_dir} were "
                                  f"extracted at {extracted}")
            args.image_size = extracted
            records = self.dataset.records
            self._load = lambda indices, epoch: load_feature_batch(self.dataset, indices, epoch)
            if args.controlnet:
                from pixart.train.controlnet import with_control_features

                self._load = with_control_features(self._load, self.dataset)
            logger.info("features: %d records from %s", len(records), args.feature_dir)
        else:
            records, counts = load_records(args.json_path, args.image_dir, skip_bad_records=args.skip_bad_records)
            logger.info("data: %d records kept of %d (%d invalid, %d with extreme aspect ratios)", counts["kept"],
                        counts["total"], counts["bad"], counts["extreme_ratio"])
            base = args.image_size
            bins = get_bins(base)
            self.bins = bins if args.multi_scale else {"1.0": bins["1.0"]}  # square only (the 256 fixed-grid model)
            self.dataset = TrainDataset(records, args.image_dir, self.bins, real_prompt_ratio=args.real_prompt_ratio,
                                        seed=args.seed)
            self._load = lambda indices, epoch: load_batch(self.dataset, indices, epoch)
            if args.controlnet:
                from pixart.train.controlnet import check_control_records, with_control_images

                check_control_records(records, args.image_dir)
                self._load = with_control_images(self._load, self.dataset)
        self.sampler = BucketBatchSampler(records, self.bins, args.batch_size, shuffle=True, seed=args.seed,
                                          rank=self.rank, world_size=self.world_size, drop_last=True)
        accum = args.gradient_accumulation_steps
        self.total_steps = args.max_steps or (args.epochs * len(self.sampler)) // accum
        if self.total_steps < 1:
            raise ConfigError(f"{len(self.sampler)} batch(es) per epoch per rank and {accum} accumulation steps "
                              f"give no optimizer step in {args.epochs} epoch(s); lower gradient_accumulation_steps "
                              "or add epochs")

    def _model_overrides(self):
        args = self.args
        overrides = {"attention_backend": args.attention_backend,
                     "model_max_length": args.t5_max_length or TEXT_TOKENS[args.version]}
        if args.image_size:
            overrides.update(input_size=args.image_size // 8, pe_interpolation=PE_INTERPOLATION[args.image_size])
        if args.pe_interpolation is not None:
            overrides["pe_interpolation"] = float(args.pe_interpolation)
        if args.kv_compress:
            overrides["kv_compress_config"] = {"sampling": args.kv_compress_sampling,
                                               "scale_factor": args.kv_compress_scale_factor,
                                               "kv_compress_layer": list(args.kv_compress_layer)}
        return overrides

    def _build_model(self):
        args = self.args
        self.model = from_pretrained(self.paths["transformer"], **self._model_overrides())
        if self.feature_mode and self.dataset.max_length != self.model.config.model_max_length:
            raise ConfigError(f"the features hold {self.dataset.max_length} text tokens, the model takes "
                              f"{self.model.config.model_max_length} (--t5_max_length)")
        if args.lora_rank:
            from pixart.models.lora import inject_lora

            inject_lora(self.model, args.lora_rank, args.lora_alpha, args.lora_target_modules, seed=args.seed)
        # Trained weights by name (LoRA: only the adapters; full fine-tuning: everything).
        self.trained = [(n, p) for n, p in self.model.parameters_and_names() if p.requires_grad]
        self.net = self.model
        if args.controlnet:  # only the ControlNet branch trains
            from pixart.train.controlnet import build_controlnet_training

            self.controlnet, self.trained, self.net = build_controlnet_training(
                self.model, args.controlnet, args.controlnet_layers, args.attention_backend)
        if args.recompute:
            for block in list(self.model.blocks) + list(self.controlnet.controlnet if self.controlnet else []):
                block.recompute()
        if self.dtype != "fp32":
            self.net = ms.amp.auto_mixed_precision(self.net, args.amp_level, dtype=ms_dtype(self.dtype))
        n_trained = sum(int(np.prod(p.shape)) for _, p in self.trained)
        n_total = sum(int(np.prod(p.shape)) for _, p in self.model.parameters_and_names())
        logger.info("model: %s, %d blocks, %.1fM parameters, %.2fM trained%s, compute %s%s", self.paths["transformer"],
                    len(self.model.blocks), n_total / 1e6, n_trained / 1e6,
                    f" (LoRA rank {args.lora_rank})" if args.lora_rank else "", self.dtype,
                    ", recompute" if args.recompute else "")
        if not self.feature_mode:
            self._load_encoders()
        if self.rank == 0 and args.visualize:
            self._prepare_validation()

    @property
    def paths(self):
        """Weights locations: a diffusers folder's parts, or --checkpoint and the *_root folders."""
        args = self.args
        if args.pretrained_path:
            root = args.pretrained_path
            return {"transformer": os.path.join(root, "transformer"), "vae": os.path.join(root, "vae"),
                    "text_encoder": os.path.join(root, "text_encoder"), "tokenizer": os.path.join(root, "tokenizer")}
        return {"transformer": args.checkpoint, "vae": args.vae_root, "text_encoder": args.text_encoder_root,
                "tokenizer": args.tokenizer_root}

    def _load_encoders(self):
        from pixart.models.autoencoder_kl import AutoencoderKL
        from pixart.models.t5 import T5Encoder
        from pixart.models.tokenizer import PromptTokenizer

        self.vae = AutoencoderKL.from_pretrained(self.paths["vae"]).set_train(False)
        self.tokenizer = PromptTokenizer.from_pretrained(self.paths["tokenizer"])
        self.text_encoder = T5Encoder.from_pretrained(self.paths["text_encoder"], backend=self.args.attention_backend)

    def _build_step(self):
        args = self.args
        accum = args.gradient_accumulation_steps
        global_batch = args.batch_size * self.world_size * accum
        self.lr = scaled_learning_rate(args.start_learning_rate, global_batch, args.auto_lr)
        self.schedule_args = dict(lr=self.lr, warmup_steps=args.warmup_steps, schedule=args.scheduler,
                                  total_steps=self.total_steps, min_lr=args.min_learning_rate)
        self.train_step = TrainStep(self.net, self.trained, WarmupSchedule(**self.schedule_args), optim=args.optim,
                                    betas=args.betas, eps=args.eps, weight_decay=args.weight_decay,
                                    ema_rate=args.ema_rate if args.use_ema else None, dtype=self.dtype,
                                    clip_norm=args.max_grad_norm if args.clip_grad else 0.0, accum_steps=accum,
                                    world_size=self.world_size, init_loss_scale=args.init_loss_scale,
                                    scale_window=args.scale_window)
        self.ema = self.train_step.ema
        logger.info("optimizer: %s, lr %.3g (%s-scaled for global batch %d = %d × %d rank(s) × %d accumulation), "
                    "warm-up %d, %s schedule, %d steps (%d micro-batches per epoch per rank)", args.optim, self.lr,
                    args.auto_lr, global_batch, args.batch_size, self.world_size, accum, args.warmup_steps,
                    args.scheduler, self.total_steps, len(self.sampler))

    # ------------------------------------------------------------------ inputs

    def _inputs(self, batch, micro):
        """Host batch -> the ForwardBackward inputs (Tensors). ``micro``: global micro-batch index."""
        data = batch.data
        if self.feature_mode:
            latents = ms.Tensor(data["latents"])
            y, mask = ms.Tensor(data["caption_embeds"]), ms.Tensor(data["caption_mask"])
        else:
            latents, y, mask = self._encode(data, batch.epoch)
        n = latents.shape[0]
        draws = draw_step_noise(self.args.seed, self.step, micro, n, tuple(latents.shape[1:]),
                                self.train_step.diffusion.num_timesteps, self.args.class_dropout_prob)
        resolution = ms.Tensor(data["original_sizes"].astype(np.float32))
        aspect = ms.Tensor(np.full((n, 1), float(data["bucket"]), np.float32))
        inputs = (latents, y, mask.astype(ms.int32), ms.Tensor(draws["t"]), ms.Tensor(draws["noise"]),
                  ms.Tensor(draws["drop_ids"]), resolution, aspect)
        if self.controlnet is not None:
            from pixart.train.controlnet import control_inputs

            inputs += (control_inputs(self.vae, data),)
        return inputs

    def _encode(self, data, epoch):
        """Images -> scaled latents z = (mean + std·ε)·s with ε from ``latent_noise`` (the same ε the
        feature cache uses, so both paths train on the same numbers); captions -> T5 (N, L, 4096)."""
        from pixart.data.features import latent_noise
        from pixart.models.tokenizer import encode_prompts

        posterior = self.vae.encode(ms.Tensor(data["images"]))
        eps = latent_noise(self.args.seed, epoch, data["indices"], tuple(posterior.mean.shape[1:]))
        latents = posterior.sample(noise=eps).astype(ms.float32) * self.vae.scaling_factor
        # No caption cleaning: the original training code feeds captions to T5 as they are.
        y, mask = encode_prompts(self.tokenizer, self.text_encoder, data["captions"],
                                 max_length=self.model.config.model_max_length, clean_caption=False)
        return latents, y.astype(ms.float32), mask

    # ------------------------------------------------------------------ the loop

    def train(self):
        args = self.args
        accum = args.gradient_accumulation_steps
        stream = BatchStream(self.sampler, self._load, prefetch=args.prefetch)
        window = {"loss": [], "mse": [], "vb": [], "norm": [], "skipped_images": 0, "skipped_steps": 0,
                  "start": time.perf_counter(), "steps": 0, "images": 0}
        batch = None
        logger.info("training from step %d to %d", self.step, self.total_steps)
        try:
            while self.step < self.total_steps:
                for k in range(accum):
                    batch = next(stream)
                    window["skipped_images"] += batch.skipped
                    inputs = self._inputs(batch, micro=k * self.world_size + self.rank)
                    loss, mse, vb = self.train_step.micro_batch(inputs)
                    window["loss"].append(loss), window["mse"].append(mse), window["vb"].append(vb)
                    window["images"] += inputs[0].shape[0]
                norm, finite = self.train_step.apply()
                window["norm"].append((norm, finite))
                self.step += 1
                self.epoch, self.data_state = batch.epoch, batch.data_state
                window["steps"] += 1
                if self.step % args.log_loss_interval == 0 or self.step == self.total_steps:
                    self._log(window)
                paused = time.perf_counter()  # validation and checkpoints do not count as step time
                if self.rank == 0 and args.visualize and args.visualize_interval and \
                        self.step % args.visualize_interval == 0:
                    self.validate()
                if self.rank == 0 and (self.step % args.ckpt_save_interval == 0 or self.step == self.total_steps):
                    self.save_checkpoint()
                window["start"] += time.perf_counter() - paused
        finally:
            stream.close()
        if self.rank == 0:
            self.export()
        logger.info("done: %d steps", self.step)
        return self

    def _log(self, window):
        losses = [float(x) for x in window["loss"]]
        norms = [(float(n), bool(f)) for n, f in window["norm"]]
        skipped_steps = sum(1 for _, f in norms if not f)
        elapsed = time.perf_counter() - window["start"]
        mean = float(np.mean(losses))
        self.history.append((self.step, mean))
        scaler = self.train_step.scaler
        scale = f", loss scale {float(scaler.scale):g}" if scaler.dynamic else ""
        skipped = f", skipped {window['skipped_images']} unreadable image(s)" if window["skipped_images"] else ""
        overflow = f", {skipped_steps} step(s) skipped (inf/nan gradients)" if skipped_steps else ""
        logger.info("step %d/%d epoch %d: loss %.4f (mse %.4f, vb %.4f), grad norm %.3g, lr %.3g, %.2f s/step, "
                    "%.2f img/s%s%s%s", self.step, self.total_steps, self.epoch, mean,
                    float(np.mean([float(x) for x in window["mse"]])), float(np.mean([float(x) for x in window["vb"]])),
                    float(np.mean([n for n, f in norms if f] or [float("nan")])),
                    self.current_lr(), elapsed / max(window["steps"], 1),
                    window["images"] / max(elapsed, 1e-9), scale, skipped, overflow)
        window.update(loss=[], mse=[], vb=[], norm=[], skipped_images=0, start=time.perf_counter(), steps=0, images=0)

    def current_lr(self):
        """Learning rate of the last optimizer update (skipped fp16 steps do not advance the schedule)."""
        return lr_at(max(self.train_step.optimizer_steps_done() - 1, 0), **self.schedule_args)

    # ------------------------------------------------------------------ checkpoints

    def run_config(self):
        """The options stored with a checkpoint and checked on resume."""
        args = self.args
        config = {key: getattr(args, key, None) for key in RESUME_KEYS + RESUME_WARN_KEYS}
        config["world_size"] = self.world_size
        if isinstance(config.get("lora_target_modules"), (list, tuple)):
            config["lora_target_modules"] = list(config["lora_target_modules"])
        return config

    def state_tensors(self):
        """Everything a resume needs, by checkpoint name (see ``pixart.train.checkpointing``)."""
        named = dict(self.model.parameters_and_names())
        tensors = {name: p for name, p in self.trained}
        tensors[NULL_CAPTION] = named[NULL_CAPTION]  # always, even when only adapters train
        tensors.update(self.train_step.state_tensors())
        return tensors

    def save_checkpoint(self):
        path = ckpt.checkpoint_path(self.args.output_path, self.step)
        started = time.perf_counter()
        ckpt.save_training_checkpoint(path, self.state_tensors(), self.step, self.epoch, self.data_state,
                                      self.model.config.to_dict(), self.run_config())
        removed = ckpt.keep_last(self.args.output_path, self.args.ckpt_max_keep)
        logger.info("saved %s in %.1fs%s", path, time.perf_counter() - started,
                    f" (removed {len(removed)} older)" if removed else "")
        return path

    def _resume(self, which):
        path = ckpt.latest_checkpoint(self.args.output_path) if which == "latest" else which
        if path is None:
            logger.info("no checkpoint in %s: starting from step 0", self.args.output_path)
            return
        tensors, meta = ckpt.read_training_checkpoint(path)
        stored = meta["run_config"]
        differing = {k: (stored.get(k), v) for k, v in self.run_config().items() if stored.get(k) != v}
        detail = lambda keys: ", ".join(f"{k} {differing[k][0]!r} -> {differing[k][1]!r}" for k in keys)  # noqa: E731
        fatal = [k for k in differing if k in RESUME_KEYS]
        if fatal:
            raise ConfigError(f"cannot resume {path}: {detail(fatal)} changed since it was written; use a new "
                              "output_path to train with other settings")
        if differing:
            logger.warning("resuming %s with %s: training continues, but not exactly as the first run would have",
                           path, detail(differing))
        assign_state(self.state_tensors(), tensors, source=path)
        self.sampler.load_state_dict(meta["data_state"])
        self.step, self.epoch, self.data_state = meta["step"], meta["epoch"], meta["data_state"]
        logger.info("resumed %s: step %d, epoch %d", path, self.step, self.epoch)

    # ------------------------------------------------------------------ validation and export

    def _prepare_validation(self):
        """Encode the validation prompts once (T5 is not needed again; with features it is loaded
        just for this and released)."""
        from pixart.pipelines.pixart_pipeline import PixArtAlphaPipeline, PixArtSigmaPipeline

        args = self.args
        prompts = list(args.validation_prompts or [])
        if not prompts:
            logger.warning("visualize is on but there are no validation_prompts: no validation images")
            return
        cls = PixArtSigmaPipeline if args.version == "sigma" else PixArtAlphaPipeline
        loaders = {}
        if self.feature_mode:
            from pixart.models.autoencoder_kl import AutoencoderKL
            from pixart.models.t5 import T5Encoder
            from pixart.models.tokenizer import PromptTokenizer

            paths = self.paths
            loaders = dict(vae=lambda: AutoencoderKL.from_pretrained(paths["vae"]).set_train(False),
                           tokenizer=lambda: PromptTokenizer.from_pretrained(paths["tokenizer"]),
                           text_encoder=lambda: T5Encoder.from_pretrained(paths["text_encoder"]))
        components = dict(vae=self.vae, tokenizer=self.tokenizer, text_encoder=self.text_encoder)
        components.update(loaders)
        self.pipeline = cls(transformer=self.model, sampler=args.sampling_method, low_memory=True,
                            controlnet=self.controlnet, **components)
        if self.controlnet is not None:
            from pixart.train.controlnet import validation_control_image

            self.validation_control = validation_control_image(self.dataset.records, args.image_dir)
        negatives = list(args.validation_negative_prompts or [""] * len(prompts))
        if len(negatives) != len(prompts):
            raise ConfigError(f"{len(negatives)} validation_negative_prompts for {len(prompts)} validation_prompts")
        embeds = self.pipeline.encode_prompt(prompts, negatives, args.guidance_scale > 1.0,
                                             max_sequence_length=self.model.config.model_max_length)
        self.validation_inputs = (prompts, embeds)

    def validate(self):
        """Rank 0: images for the validation prompts with the EMA weights (the model's own without
        EMA), saved as <output>/samples/step-XXXXXX/NN.png."""
        if self.validation_inputs is None:
            return
        args = self.args
        prompts, (embeds, mask, neg, neg_mask) = self.validation_inputs
        started = time.perf_counter()
        with self.ema.swapped_in() if self.ema is not None else nullcontext():
            out = self.pipeline(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                                negative_prompt_attention_mask=neg_mask, num_inference_steps=args.sampling_steps,
                                guidance_scale=args.guidance_scale, seed=args.seed, progress=False,
                                **({"control_image": self.validation_control} if self.controlnet is not None and
                                   self.validation_control else {}))
        folder = os.path.join(args.output_path, "samples", f"step-{self.step:06d}")
        os.makedirs(folder, exist_ok=True)
        from PIL.PngImagePlugin import PngInfo

        for i, (image, prompt) in enumerate(zip(out.images, prompts)):
            info = PngInfo()
            info.add_text("prompt", prompt)
            info.add_text("step", str(self.step))
            image.save(os.path.join(folder, f"{i:02d}.png"), pnginfo=info)
        logger.info("validation: %d image(s) in %s (%.1fs)", len(out.images), folder, time.perf_counter() - started)

    def export(self):
        """Final weights for sample.py: <output>/final/model.ckpt and ema.ckpt (full DiT, original
        names, architecture stored), or lora.safetensors and lora_ema.safetensors for LoRA."""
        folder = os.path.join(self.args.output_path, "final")
        os.makedirs(folder, exist_ok=True)
        # Strings only: numeric entries would read back as (unexpected) tensors in from_pretrained.
        meta = {"train_step": str(self.step), "base_model": str(self.paths["transformer"])}
        names = ("lora", "lora_ema") if self.args.lora_rank else ("model", "ema")
        if self.controlnet is not None:
            names = ("controlnet", "controlnet_ema")
        self._save_weights(os.path.join(folder, names[0]), meta)
        if self.ema is not None:
            with self.ema.swapped_in():
                self._save_weights(os.path.join(folder, names[1]), meta)
        logger.info("exported %s to %s", ", ".join(names if self.ema is not None else names[:1]), folder)

    def _save_weights(self, stem, meta):
        if self.controlnet is not None:  # the official layout's controlnet.N.* names, for sample.py --controlnet
            from pixart.models.controlnet import save_controlnet

            save_controlnet(self.controlnet, stem + ".ckpt", extra=meta)
        elif self.args.lora_rank:
            from pixart.models.lora import save_lora

            save_lora(self.model, stem + ".safetensors", metadata=meta)
        else:
            save_pixart_ckpt(self.model, stem + ".ckpt", extra=meta)


def assign_state(params, state, source="checkpoint"):
    """Copy ``state`` ({name: array}) into ``params`` ({name: Parameter}); every name must be there.

    MindSpore stores 0-d tensors as shape (1,): same-size arrays are reshaped to the Parameter's,
    in numpy. (A Parameter given a reshaped Tensor *view* by set_data ignores later in-place
    ``ops.assign`` writes, which the EMA swap relies on.) Call before the train graphs first run:
    after that, only in-place writes reach them.
    """
    missing = [name for name in params if name not in state]
    wrong = [f"{name} {tuple(np.shape(state[name]))} vs {tuple(p.shape)}" for name, p in params.items()
             if name in state and int(np.prod(np.shape(state[name]))) != int(np.prod(p.shape))]
    if missing or wrong:
        parts = [f"{len(missing)} missing ({', '.join(missing[:3])})"] if missing else []
        parts += [f"{len(wrong)} mis-shaped ({', '.join(wrong[:3])})"] if wrong else []
        raise CheckpointError(f"{source} does not fit this training run: " + "; ".join(parts))
    for name, param in params.items():
        value = np.array(state[name]).reshape(tuple(param.shape))  # own contiguous copy
        param.set_data(ms.Tensor(value, param.dtype) if value.ndim == 0 else to_tensor(value, param.dtype))

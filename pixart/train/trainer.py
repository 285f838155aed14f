"""PixArt fine-tuning: the loop around the train step (data, checkpoints, resume, EMA, validation).

    trainer = Trainer(config)        # a TrainConfig (pixart/train/config.py): train.py's options
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
from pixart.data.dataset import skip_messages
from pixart.models.pixart_weights import from_pretrained, save_pixart_ckpt
from pixart.tables import PE_INTERPOLATION, TEXT_TOKENS, ms_dtype
from pixart.train import checkpointing as ckpt
from pixart.train.outputs import refuse_existing_run, tag_process_output
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
    tag_process_output(rank, world)  # MindSpore's own log lines name the rank too
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
    """Endless micro-batches of this rank, loaded ``prefetch`` batches ahead by a background thread.

    The order is ``sampler.rank_stream()``'s (deterministic, the same global batch sequence for any
    rank count); each Batch carries the sampler position as of its own place in that order, not
    the thread's read-ahead position. Batches whose images are all unreadable are skipped (their
    count is carried to the next batch, for the log). If a whole epoch's worth of this rank's
    batches in a row yields nothing, the data is broken beyond skipping: a ConfigError is raised
    (in the training thread, by ``next``) instead of looping forever.
    """

    def __init__(self, sampler, load, prefetch=2):
        self.sampler, self.load = sampler, load
        # This rank's share of one epoch: that many empty batches in a row cannot be bad luck.
        self.max_empty = -(-sampler.num_global_batches // sampler.world_size)
        self.queue = queue.Queue(maxsize=max(1, prefetch))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="batch-loader", daemon=True)
        self.thread.start()

    def _produce(self):
        try:
            skipped, empty, empty_images = 0, 0, 0
            for epoch, indices, state in self.sampler.rank_stream():
                data, n = self.load(indices, epoch)
                skipped += n
                if data is not None:
                    self._put(Batch(data, epoch, skipped, state))
                    skipped, empty, empty_images = 0, 0, 0
                else:
                    empty, empty_images = empty + 1, empty_images + len(indices)
                    if empty >= self.max_empty:
                        raise ConfigError(
                            f"none of the last {empty_images} records ({empty} batches in a row, a whole epoch's "
                            "worth) could be read: the images are damaged or not images (see the 'skipping "
                            "record' lines); fix or remove them")
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
    """Builds everything from a ``TrainConfig`` (train.py's options) and runs ``train()``."""

    def __init__(self, config, rank=0, world_size=1, device_target="CPU"):
        self.config = cfg = config
        self.rank, self.world_size = rank, world_size
        self.device_target = device_target
        self.step = 0
        self.history = []  # (step, loss) of every logged window, for tests and plots
        self.feature_mode = bool(getattr(cfg, "feature_dir", None))
        self.dtype = resolve_dtype(cfg.dtype, device_target)
        self.vae = self.tokenizer = self.text_encoder = None
        self.controlnet = None  # the ControlNet branch (train.py --controlnet); the DiT is then frozen
        self.validation_inputs = None
        self.epoch = 0

        self._build_data()
        self._build_model()
        self._build_step()
        self.data_state = self.sampler.state_dict()
        refuse_existing_run(cfg.output_path, cfg.resume)
        if cfg.resume:
            self._resume(cfg.resume)

    # ------------------------------------------------------------------ setup

    def _build_data(self):
        cfg = self.config
        if self.feature_mode:
            from pixart.data.features import FeatureDataset, load_feature_batch

            self.dataset = FeatureDataset(cfg.feature_dir, real_prompt_ratio=cfg.real_prompt_ratio, seed=cfg.seed)
            self.bins = self.dataset.bins
            # The features fix the resolution (their buckets); the model geometry follows it as in image mode.
            extracted = int(self.dataset.config["image_size"])
            if cfg.image_size not in (None, extracted):
                raise ConfigError(f"--image_size {cfg.image_size} but the features in {cfg.feature_dir} were "
                                  f"extracted at {extracted}")
            cfg.image_size = extracted
            records = self.dataset.records
            self._load = lambda indices, epoch: load_feature_batch(self.dataset, indices, epoch)
            if cfg.controlnet:
                from pixart.train.controlnet import with_control_features

                self._load = with_control_features(self._load, self.dataset)
            logger.info("features: %d records from %s", len(records), cfg.feature_dir)
        else:
            # check_images: files that are not images are refused now, not met one by one in training.
            records, counts = load_records(cfg.json_path, cfg.image_dir, skip_bad_records=cfg.skip_bad_records,
                                           check_images=True)
            logger.info("data: %d records kept of %d (%d invalid, %d with extreme aspect ratios)", counts["kept"],
                        counts["total"], counts["bad"], counts["extreme_ratio"])
            base = cfg.image_size
            bins = get_bins(base)
            self.bins = bins if cfg.multi_scale else {"1.0": bins["1.0"]}  # square only (the 256 fixed-grid model)
            self.dataset = TrainDataset(records, cfg.image_dir, self.bins, real_prompt_ratio=cfg.real_prompt_ratio,
                                        seed=cfg.seed)
            self._load = lambda indices, epoch: load_batch(self.dataset, indices, epoch)
            if cfg.controlnet:
                from pixart.train.controlnet import check_control_records, with_control_images

                check_control_records(records, cfg.image_dir)
                self._load = with_control_images(self._load, self.dataset)
        self.sampler = BucketBatchSampler(records, self.bins, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                          rank=self.rank, world_size=self.world_size, drop_last=True)
        accum = cfg.gradient_accumulation_steps
        # Every step consumes world_size × accum global batches of the stream (see BatchStream).
        per_step = self.world_size * accum
        self.total_steps = cfg.max_steps or (cfg.epochs * self.sampler.num_global_batches) // per_step
        if self.total_steps < 1:
            raise ConfigError(f"{self.sampler.num_global_batches} batch(es) per epoch for {self.world_size} rank(s) "
                              f"× {accum} accumulation steps give no optimizer step in {cfg.epochs} epoch(s); "
                              "lower gradient_accumulation_steps or add epochs")

    def _model_overrides(self):
        cfg = self.config
        overrides = {"attention_backend": cfg.attention_backend,
                     "model_max_length": cfg.t5_max_length or TEXT_TOKENS[cfg.version]}
        if cfg.image_size:
            overrides.update(input_size=cfg.image_size // 8, pe_interpolation=PE_INTERPOLATION[cfg.image_size])
        if cfg.pe_interpolation is not None:
            overrides["pe_interpolation"] = float(cfg.pe_interpolation)
        if cfg.kv_compress:
            overrides["kv_compress_config"] = {"sampling": cfg.kv_compress_sampling,
                                               "scale_factor": cfg.kv_compress_scale_factor,
                                               "kv_compress_layer": list(cfg.kv_compress_layer)}
        return overrides

    def _build_model(self):
        cfg = self.config
        self.model = from_pretrained(self.paths["transformer"], **self._model_overrides())
        if self.feature_mode and self.dataset.max_length != self.model.config.model_max_length:
            raise ConfigError(f"the features hold {self.dataset.max_length} text tokens, the model takes "
                              f"{self.model.config.model_max_length} (--t5_max_length)")
        if cfg.lora_rank:
            from pixart.models.lora import inject_lora

            inject_lora(self.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules, seed=cfg.seed)
        # Trained weights by name (LoRA: only the adapters; full fine-tuning: everything).
        self.trained = [(n, p) for n, p in self.model.parameters_and_names() if p.requires_grad]
        self.net = self.model
        if cfg.controlnet:  # only the ControlNet branch trains
            from pixart.train.controlnet import build_controlnet_training

            self.controlnet, self.trained, self.net = build_controlnet_training(
                self.model, cfg.controlnet, cfg.controlnet_layers, cfg.attention_backend)
        if cfg.recompute:
            for block in list(self.model.blocks) + list(self.controlnet.controlnet if self.controlnet else []):
                block.recompute()
        if self.dtype != "fp32":
            self.net = ms.amp.auto_mixed_precision(self.net, cfg.amp_level, dtype=ms_dtype(self.dtype))
        n_trained = sum(int(np.prod(p.shape)) for _, p in self.trained)
        n_total = sum(int(np.prod(p.shape)) for _, p in self.model.parameters_and_names())
        logger.info("model: %s, %d blocks, %.1fM parameters, %.2fM trained%s, compute %s%s", self.paths["transformer"],
                    len(self.model.blocks), n_total / 1e6, n_trained / 1e6,
                    f" (LoRA rank {cfg.lora_rank})" if cfg.lora_rank else "", self.dtype,
                    ", recompute" if cfg.recompute else "")
        if not self.feature_mode:
            self._load_encoders()
        if self.rank == 0 and cfg.visualize:
            self._prepare_validation()

    @property
    def paths(self):
        """Weights locations: a diffusers folder's parts, or --checkpoint and the *_root folders."""
        return self.config.paths

    def _load_encoders(self):
        from pixart.models.autoencoder_kl import AutoencoderKL
        from pixart.models.t5 import T5Encoder
        from pixart.models.tokenizer import PromptTokenizer

        self.vae = AutoencoderKL.from_pretrained(self.paths["vae"]).set_train(False)
        self.tokenizer = PromptTokenizer.from_pretrained(self.paths["tokenizer"])
        self.text_encoder = T5Encoder.from_pretrained(self.paths["text_encoder"], backend=self.config.attention_backend)

    def _build_step(self):
        cfg = self.config
        accum = cfg.gradient_accumulation_steps
        global_batch = cfg.batch_size * self.world_size * accum
        self.lr = scaled_learning_rate(cfg.start_learning_rate, global_batch, cfg.auto_lr)
        self.schedule_args = dict(lr=self.lr, warmup_steps=cfg.warmup_steps, schedule=cfg.scheduler,
                                  total_steps=self.total_steps, min_lr=cfg.min_learning_rate)
        self.train_step = TrainStep(self.net, self.trained, WarmupSchedule(**self.schedule_args), optim=cfg.optim,
                                    betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                    ema_rate=cfg.ema_rate if cfg.use_ema else None, dtype=self.dtype,
                                    clip_norm=cfg.max_grad_norm if cfg.clip_grad else 0.0, accum_steps=accum,
                                    world_size=self.world_size, init_loss_scale=cfg.init_loss_scale,
                                    scale_window=cfg.scale_window)
        self.ema = self.train_step.ema
        logger.info("optimizer: %s, lr %.3g (%s-scaled for global batch %d = %d × %d rank(s) × %d accumulation), "
                    "warm-up %d, %s schedule, %d steps (%d batches per epoch, over all ranks)", cfg.optim, self.lr,
                    cfg.auto_lr, global_batch, cfg.batch_size, self.world_size, accum, cfg.warmup_steps,
                    cfg.scheduler, self.total_steps, self.sampler.num_global_batches)

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
        draws = draw_step_noise(self.config.seed, self.step, micro, n, tuple(latents.shape[1:]),
                                self.train_step.diffusion.num_timesteps, self.config.class_dropout_prob)
        resolution = ms.Tensor(data["original_sizes"].astype(np.float32))
        aspect = ms.Tensor(np.full((n, 1), float(data["bucket"]), np.float32))
        inputs = (latents, y, mask.astype(ms.int32), ms.Tensor(draws["t"]), ms.Tensor(draws["noise"]),
                  ms.Tensor(draws["drop_ids"]), resolution, aspect)
        if self.controlnet is not None:
            from pixart.train.controlnet import control_inputs

            inputs += (control_inputs(self.vae, data),)
        return inputs

    def _encode(self, data, epoch):
        """Images -> scaled latents z = (mean + std·ε)·s with ε from ``latent_noise``; captions -> T5
        (N, L, 4096). The functions the feature cache is made with, so both paths train on the same
        bits."""
        from pixart.data.features import encode_captions, encode_posteriors, latent_noise, sample_latents

        mean, std = encode_posteriors(self.vae, data["images"])
        eps = latent_noise(self.config.seed, epoch, data["indices"], mean.shape[1:])
        latents = sample_latents(mean, std, eps, self.vae.scaling_factor)
        # No caption cleaning: the original training code feeds captions to T5 as they are.
        y, mask = encode_captions(self.tokenizer, self.text_encoder, data["captions"],
                                  max_length=self.model.config.model_max_length, clean_caption=False)
        return ms.Tensor(latents), ms.Tensor(y), ms.Tensor(mask)

    # ------------------------------------------------------------------ the loop

    def train(self):
        cfg = self.config
        accum = cfg.gradient_accumulation_steps
        skip_messages.reset()  # before the loader thread starts
        stream = BatchStream(self.sampler, self._load, prefetch=cfg.prefetch)
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
                if self.step % cfg.log_loss_interval == 0 or self.step == self.total_steps:
                    self._log(window)
                paused = time.perf_counter()  # validation and checkpoints do not count as step time
                if self.rank == 0 and cfg.visualize and cfg.visualize_interval and \
                        self.step % cfg.visualize_interval == 0:
                    self.validate()
                if self.rank == 0 and (self.step % cfg.ckpt_save_interval == 0 or self.step == self.total_steps):
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
        cfg = self.config
        config = {key: getattr(cfg, key, None) for key in RESUME_KEYS + RESUME_WARN_KEYS}
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
        path = ckpt.checkpoint_path(self.config.output_path, self.step)
        started = time.perf_counter()
        ckpt.save_training_checkpoint(path, self.state_tensors(), self.step, self.epoch, self.data_state,
                                      self.model.config.to_dict(), self.run_config())
        removed = ckpt.keep_last(self.config.output_path, self.config.ckpt_max_keep)
        logger.info("saved %s in %.1fs%s", path, time.perf_counter() - started,
                    f" (removed {len(removed)} older)" if removed else "")
        return path

    def _resume(self, which):
        path = ckpt.latest_checkpoint(self.config.output_path) if which == "latest" else which
        if path is None:
            logger.info("no checkpoint in %s: starting from step 0", self.config.output_path)
            return
        try:
            tensors, meta = ckpt.read_training_checkpoint(path)
        except CheckpointError as err:
            raise CheckpointError(f"cannot resume: {err}{ckpt.unreadable_hint(path)}") from None
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

        cfg = self.config
        prompts = list(cfg.validation_prompts or [])
        if not prompts:
            logger.warning("visualize is on but there are no validation_prompts: no validation images")
            return
        cls = PixArtSigmaPipeline if cfg.version == "sigma" else PixArtAlphaPipeline
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
        self.pipeline = cls(transformer=self.model, sampler=cfg.sampling_method, low_memory=True,
                            controlnet=self.controlnet, **components)
        if self.controlnet is not None:  # validation uses the first record's control image
            from pixart.train.controlnet import validation_control_image

            self.validation_control = validation_control_image(self.dataset.records, cfg.image_dir)
        negatives = list(cfg.validation_negative_prompts or [""] * len(prompts))
        if len(negatives) != len(prompts):
            raise ConfigError(f"{len(negatives)} validation_negative_prompts for {len(prompts)} validation_prompts")
        embeds = self.pipeline.encode_prompt(prompts, negatives, cfg.guidance_scale > 1.0,
                                             max_sequence_length=self.model.config.model_max_length)
        self.validation_inputs = (prompts, embeds)

    def validate(self):
        """Rank 0: images for the validation prompts with the EMA weights (the model's own without
        EMA), saved as <output>/samples/step-XXXXXX/NN.png."""
        if self.validation_inputs is None:
            return
        cfg = self.config
        prompts, (embeds, mask, neg, neg_mask) = self.validation_inputs
        started = time.perf_counter()
        with self.ema.swapped_in() if self.ema is not None else nullcontext():
            out = self.pipeline(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                                negative_prompt_attention_mask=neg_mask, num_inference_steps=cfg.sampling_steps,
                                timesteps=cfg.timesteps, guidance_scale=cfg.guidance_scale, seed=cfg.seed,
                                progress=False,
                                **({"control_image": self.validation_control} if self.controlnet is not None and
                                   self.validation_control else {}))
        folder = os.path.join(cfg.output_path, "samples", f"step-{self.step:06d}")
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
        folder = os.path.join(self.config.output_path, "final")
        os.makedirs(folder, exist_ok=True)
        # Strings only: numeric entries would read back as (unexpected) tensors in from_pretrained.
        meta = {"train_step": str(self.step), "base_model": str(self.paths["transformer"])}
        names = ("lora", "lora_ema") if self.config.lora_rank else ("model", "ema")
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
        elif self.config.lora_rank:
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

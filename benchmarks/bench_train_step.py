"""Seconds per training step of the PixArt DiT on this machine, from cached features and on the fly.

    python benchmarks/bench_train_step.py --model small --image_size 256 --batch_size 4
    python benchmarks/bench_train_step.py --model xl --image_size 256 --batch_size 1 --steps 3

The timed step is the trainer's own (``pixart.train.step.TrainStep``: IDDPM loss, backward, CAME,
gradient clipping, EMA) on inputs shaped like a real batch: latents (B, 4, S/8, S/8) and T5-XXL
caption embeddings (B, 300, 4096) with a 120-token mask. Weights are random (no downloads).

* cached features (``train.py --feature_dir``): the step alone; the loader thread reads the
  feature files while the step runs.
* on the fly (images): + the SDXL VAE encoder on the batch's images and T5-XXL on its captions,
  both run every step. T5-XXL is timed on ``--t5_layers`` of its 24 layers (a full one needs
  ~10 GB and minutes per caption on CPU) and scaled to 24 (the layers are identical, the
  embedding and final norm are negligible).

Models: ``small`` is DiT-S/2-like (12 blocks, hidden 384, 6 heads, 4096-d captions), ``xl`` is
PixArt-XL/2 (28 blocks, hidden 1152, 610.9 M parameters). The first step (graph compilation) is
reported separately; the median of the next ``--steps`` is the step time.
"""
import argparse
import os
import platform
import resource
import statistics
import time

import numpy as np

os.environ.setdefault("GLOG_v", "3")

MODELS = {
    "small": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "xl": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
}
PE = {256: 0.5, 512: 1.0, 1024: 2.0, 2048: 4.0}
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu")
TOKENS, REAL_TOKENS = 300, 120


def timed(fn, repeats):
    """(first call seconds, median of the next ``repeats`` calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def bench_dit_step(args):
    import mindspore as ms

    from pixart.models.pixart import build_pixart
    from pixart.train.optim import WarmupSchedule
    from pixart.train.step import TrainStep, draw_step_noise

    model = build_pixart(dict(MODELS[args.model], input_size=args.image_size // 8, pe_interpolation=PE[args.image_size],
                              caption_channels=4096, model_max_length=TOKENS, attention_backend="math"))
    if args.recompute:
        for block in model.blocks:
            block.recompute()
    net = model if args.dtype == "fp32" else ms.amp.auto_mixed_precision(model, "O2", dtype=ms.float16)
    trained = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
    step = TrainStep(net, trained, WarmupSchedule(2e-5, warmup_steps=1000), optim=args.optim, ema_rate=0.9999,
                     dtype=args.dtype, clip_norm=0.01)
    b, h = args.batch_size, args.image_size // 8
    rng = np.random.default_rng(0)
    mask = np.zeros((b, TOKENS), np.int32)
    mask[:, :REAL_TOKENS] = 1
    fixed = (ms.Tensor(rng.standard_normal((b, 4, h, h), dtype=np.float32)),
             ms.Tensor(rng.standard_normal((b, TOKENS, 4096), dtype=np.float32) * 0.1), ms.Tensor(mask))
    counter = iter(range(10 ** 6))

    def one_step():
        draws = draw_step_noise(0, next(counter), 0, b, (4, h, h), drop_prob=0.1)
        micro = (ms.Tensor(np.full((b, 2), args.image_size, np.float32)), ms.Tensor(np.ones((b, 1), np.float32)))
        inputs = fixed + (ms.Tensor(draws["t"]), ms.Tensor(draws["noise"]), ms.Tensor(draws["drop_ids"])) + micro
        step.micro_batch(inputs)
        norm, _ = step.apply()
        float(norm)  # wait for the step to finish

    n_params = sum(int(np.prod(p.shape)) for _, p in trained)
    return n_params, timed(one_step, args.steps)


def bench_vae(args):
    import mindspore as ms

    from pixart.models.autoencoder_kl import SDXL_VAE_CONFIG, AutoencoderKL

    vae = AutoencoderKL(SDXL_VAE_CONFIG).set_train(False)
    images = ms.Tensor(np.random.default_rng(0).uniform(-1, 1, (args.batch_size, 3, args.image_size, args.image_size))
                       .astype(np.float32))
    return timed(lambda: vae.encode(images).mean.asnumpy(), 1)


def bench_t5(args):
    import mindspore as ms

    from pixart.models.t5 import T5Config, T5Encoder

    encoder = T5Encoder(T5Config(**{**T5_XXL, "num_layers": args.t5_layers}), weight_dtype=ms.bfloat16)
    ids = np.zeros((args.batch_size, TOKENS), np.int32)
    ids[:, :REAL_TOKENS] = np.random.default_rng(0).integers(3, 32000, (args.batch_size, REAL_TOKENS))
    mask = (ids > 0).astype(np.int32)
    first, median = timed(lambda: encoder(ms.Tensor(ids), ms.Tensor(mask)).asnumpy(), 1)
    scale = T5_XXL["num_layers"] / args.t5_layers
    return first * scale, median * scale


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--image_size", type=int, choices=sorted(PE), default=256)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps after the first (compiling) one")
    p.add_argument("--optim", choices=["came", "adamw"], default="came")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--t5_layers", type=int, default=2, help="T5-XXL layers actually run (scaled to 24)")
    p.add_argument("--skip_encoders", action="store_true", help="time only the cached-features step")
    p.add_argument("--memory_optimize", action="store_true",
                   help="MindSpore memory pool optimize_level O1 (more buffer reuse)")
    args = p.parse_args(argv)

    import mindspore as ms

    from pixart.utils.device import set_device

    set_device("CPU")  # as train.py
    if args.memory_optimize:
        ms.runtime.set_memory(optimize_level="O1")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, "
          f"MindSpore {ms.__version__} CPU")
    n_params, (compile_s, step_s) = bench_dit_step(args)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    options = f"{args.optim}, {args.dtype}{', recompute' if args.recompute else ''}"
    print(f"DiT {args.model} ({n_params / 1e6:.1f} M trained), {args.image_size}px, batch {args.batch_size}, "
          f"{options}: first step (compile) {compile_s:.1f} s, peak RSS {rss:.1f} GiB")
    print(f"  cached features: {step_s:.3f} s/step ({args.batch_size / step_s:.2f} img/s)")
    if args.skip_encoders:
        return
    _, vae_s = bench_vae(args)
    _, t5_s = bench_t5(args)
    total = step_s + vae_s + t5_s
    print(f"  on the fly:      {total:.3f} s/step ({args.batch_size / total:.2f} img/s) = step + SDXL VAE encode "
          f"{vae_s:.3f} s + T5-XXL {t5_s:.3f} s (from {args.t5_layers} of 24 layers)")


if __name__ == "__main__":
    main()

"""Peak memory and time of the T5-XXL text encoder on CPU: load + encode one 300-token prompt.

    python benchmarks/bench_t5_memory.py                  # random full-size T5-XXL in a temp dir
    python benchmarks/bench_t5_memory.py --folder DIR     # use (or create, with --keep) DIR

Without a real checkpoint at hand it writes a full-size T5 v1.1 XXL encoder with random weights
(d_model 4096, d_kv 64, d_ff 10240, 24 layers, 64 heads, vocab 32128, gated-gelu; 4.76 B
parameters) as a sharded bf16 safetensors folder like transformers saves it (9.5 GB on disk).
The shards are written by a child process, one shard at a time, so writing stays small and does
not count in the measured process; its own peak is reported separately.

Reported: load seconds, encode seconds, and the process' peak RSS (ru_maxrss, which includes
the file pages of mapped checkpoints that were touched). Target: peak RSS <= 12 GiB.
"""
import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np


XXL = dict(model_type="t5", architectures=["T5EncoderModel"], vocab_size=32128, d_model=4096, d_kv=64,
           d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
           relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
           is_encoder_decoder=False, torch_dtype="bfloat16")
TARGET_GIB = 12.0


def _layer_weights(config, index, rng):
    """Random weights of one block, scaled like T5's init so 24 layers stay finite."""
    d, inner, ff = config["d_model"], config["num_heads"] * config["d_kv"], config["d_ff"]
    prefix = f"encoder.block.{index}.layer."
    shapes = {
        "0.SelfAttention.q.weight": ((inner, d), (d * config["d_kv"]) ** -0.5),
        "0.SelfAttention.k.weight": ((inner, d), d ** -0.5),
        "0.SelfAttention.v.weight": ((inner, d), d ** -0.5),
        "0.SelfAttention.o.weight": ((d, inner), inner ** -0.5),
        "1.DenseReluDense.wi_0.weight": ((ff, d), d ** -0.5),
        "1.DenseReluDense.wi_1.weight": ((ff, d), d ** -0.5),
        "1.DenseReluDense.wo.weight": ((d, ff), ff ** -0.5),
    }
    out = {}
    for name, (shape, std) in shapes.items():
        out[prefix + name] = (rng.standard_normal(shape, dtype=np.float32) * std).astype(ml_dtypes.bfloat16)
    for norm in ("0.layer_norm.weight", "1.layer_norm.weight"):
        out[prefix + norm] = (1 + 0.1 * rng.standard_normal(d, dtype=np.float32)).astype(ml_dtypes.bfloat16)
    if index == 0:
        out[prefix + "0.SelfAttention.relative_attention_bias.weight"] = rng.standard_normal(
            (config["relative_attention_num_buckets"], config["num_heads"]), dtype=np.float32).astype(ml_dtypes.bfloat16)
    return out


def write_checkpoint(folder, layers_per_shard=4, seed=0):
    """Write config.json + model-0000k-of-0000n.safetensors + index, one shard in memory at a time."""
    from pixart.utils.checkpoint import save_safetensors

    config = dict(XXL)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    groups = [None] + [range(i, min(i + layers_per_shard, config["num_layers"]))
                       for i in range(0, config["num_layers"], layers_per_shard)]
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        if group is None:  # embedding + final norm
            shard = {"shared.weight": rng.standard_normal((config["vocab_size"], config["d_model"]),
                                                          dtype=np.float32).astype(ml_dtypes.bfloat16),
                     "encoder.final_layer_norm.weight": np.ones(config["d_model"], ml_dtypes.bfloat16)}
        else:
            shard = {}
            for i in group:
                shard.update(_layer_weights(config, i, rng))
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_safetensors(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        total += sum(v.nbytes for v in shard.values())
        print(f"  wrote {name} ({sum(v.nbytes for v in shard.values()) / 2**30:.2f} GiB)", flush=True)
        del shard
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def _rss_gib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gib(who):
    return resource.getrusage(who).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", help="text_encoder folder to use; created (random XXL) if it has no config.json")
    parser.add_argument("--keep", action="store_true", help="keep a generated folder")
    parser.add_argument("--tokens", type=int, default=300, help="prompt length (300 for PixArt-Σ)")
    parser.add_argument("--weight-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--write-only", metavar="DIR", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.write_only:
        write_checkpoint(args.write_only)
        return 0

    folder = args.folder or tempfile.mkdtemp(prefix="t5xxl-bench-")
    generated = not os.path.isfile(os.path.join(folder, "config.json"))
    if generated:
        print(f"writing a random full-size T5-XXL encoder (bf16 shards) to {folder} ...", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, os.path.abspath(__file__), "--write-only", folder], check=True)
        print(f"  done in {time.perf_counter() - start:.0f} s; writer peak RSS "
              f"{_peak_gib(resource.RUSAGE_CHILDREN):.2f} GiB (child process, not counted below)", flush=True)
    try:
        import mindspore as ms

        from pixart.models.t5 import T5Encoder
        from pixart.utils.device import set_device

        set_device("CPU")  # eager ops on the calling thread, as the entry points run them
        weight_dtype = args.weight_dtype if args.weight_dtype == "auto" else getattr(ms, args.weight_dtype)
        start = time.perf_counter()
        model = T5Encoder.from_pretrained(folder, dtype=ms.float32, weight_dtype=weight_dtype)
        load_s = time.perf_counter() - start
        params = sum(int(np.prod(p.shape)) for p in model.get_parameters())
        print(f"loaded {params / 1e9:.2f} B parameters in {load_s:.1f} s (projections stored as "
              f"{model.weight_dtype}); RSS now {_rss_gib():.2f} GiB, peak {_peak_gib(resource.RUSAGE_SELF):.2f} GiB",
              flush=True)

        rng = np.random.default_rng(1)
        ids = rng.integers(3, model.config.vocab_size, size=(1, args.tokens)).astype(np.int32)
        ids[0, -1] = 1  # </s>
        mask = np.ones_like(ids)
        start = time.perf_counter()
        out = model(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
        encode_s = time.perf_counter() - start
        peak = _peak_gib(resource.RUSAGE_SELF)
        print(f"encoded 1 x {args.tokens} tokens -> {out.shape} {out.dtype} in {encode_s:.1f} s; "
              f"finite: {bool(np.isfinite(out).all())}, std {out.std():.3f}")
        print(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, "
              f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM, "
              f"MindSpore {ms.__version__}")
        print(f"RESULT load_s={load_s:.1f} encode_s={encode_s:.1f} peak_rss_gib={peak:.2f} "
              f"(target <= {TARGET_GIB:.0f}: {'OK' if peak <= TARGET_GIB else 'EXCEEDED'})")
        return 0 if peak <= TARGET_GIB else 1
    finally:
        if generated and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Attention of XL-2 on CPU: this project's fused fp32 and bf16 kernels against torch's SDPA.

    python benchmarks/bench_attention.py [--repeats 5] [--sizes 256 512]

One self-attention layer of PixArt-XL/2 with classifier-free guidance (batch 2, 16 heads of 72,
the image's tokens as queries and keys: 256 at 256², 1024 at 512²) and its cross-attention
(64 text tokens, a padding mask). Candidates, run interleaved (one repeat of each in turn):

    ms fp32      the "cpu" backend (pixart.ops.cpu_kernels, fp32 sgemm + softmax per block of rows)
    ms bf16      the "cpu-bf16" backend of --dtype bf16 (bf16 q, k, v and probabilities on the AMX
                 tile unit, fp32 sums; where the CPU has no AMX it is the fp32 kernel)
    torch fp32   torch.nn.functional.scaled_dot_product_attention, fp32
    torch bf16   the same in bf16 (diffusers' bf16 attention)

Prints median seconds, GFLOP/s (4·N·H·T·S·d), the layer's time × 28 blocks, and each one's max
abs difference from torch fp32.
"""
import argparse
import os
import sys

os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import mindspore as ms  # noqa: E402

from bench_t5_cast import interleaved  # noqa: E402 (benchmarks/ is on sys.path: run as a script)
from pixart.models.attention import mask_to_bias, scaled_dot_product_attention  # noqa: E402
from pixart.ops import cpu_kernels  # noqa: E402
from pixart.utils.device import set_device  # noqa: E402

HEADS, HEAD_DIM, TEXT = 16, 72, 64


def make_ops():
    """The fused attention ops of both precisions (use_fused_attention makes them for a model)."""
    for key_bias in (False, True):
        for bf16 in (False, True):
            cpu_kernels.ATTENTION_OPS.setdefault((key_bias, bf16), cpu_kernels.attention_op(key_bias, bf16))


def bench(label, t, s, masked, repeats, rng):
    q, k, v = (rng.standard_normal((2, n, HEADS * HEAD_DIM)).astype(np.float32) for n in (t, s, s))
    mask = np.ones((2, s), np.float32)
    if masked:
        mask[0, s // 2:] = 0
    bias = mask_to_bias(ms.Tensor(mask)) if masked else None
    ms_in = [ms.Tensor(x) for x in (q, k, v)]

    def heads(x, dtype):
        return torch.from_numpy(x).reshape(2, -1, HEADS, HEAD_DIM).transpose(1, 2).to(dtype)

    torch_mask = torch.from_numpy(mask).bool()[:, None, None, :] if masked else None

    def torch_run(dtype):
        out = torch.nn.functional.scaled_dot_product_attention(heads(q, dtype), heads(k, dtype), heads(v, dtype),
                                                                 attn_mask=torch_mask)
        return out.transpose(1, 2).reshape(2, t, -1).float().numpy()

    run = {"ms fp32": lambda: scaled_dot_product_attention(*ms_in, bias=bias, backend="cpu",
                                                           num_heads=HEADS).asnumpy(),
           "ms bf16": lambda: scaled_dot_product_attention(*ms_in, bias=bias, backend="cpu-bf16",
                                                           num_heads=HEADS).asnumpy(),
           "torch fp32": lambda: torch_run(torch.float32), "torch bf16": lambda: torch_run(torch.bfloat16)}
    ref = run["torch fp32"]()
    errors = {name: float(np.abs(fn() - ref).max()) for name, fn in run.items()}
    times = interleaved(run, repeats)
    flops = 4.0 * 2 * HEADS * t * s * HEAD_DIM
    print(f"| {label} | {t}×{s} | " + " | ".join(f"{times[n]:.4f}" for n in run) + " | "
          + " / ".join(f"{flops / times[n] / 1e9:.0f}" for n in run) + " | "
          + " / ".join(f"{28 * times[n]:.2f}" for n in run) + " | "
          + " / ".join(f"{errors[n]:.1e}" for n in ("ms fp32", "ms bf16", "torch bf16")) + " |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args(argv)
    set_device("CPU")
    make_ops()
    torch.set_num_threads(os.cpu_count())
    print(f"load average {os.getloadavg()[0]:.2f}; AMX tile unit used: {cpu_kernels.amx_ready()}; "
          f"MindSpore {ms.__version__}, torch {torch.__version__}; repeats {args.repeats} (median)")
    print("| layer | queries×keys | ms fp32 s | ms bf16 s | torch fp32 s | torch bf16 s | GFLOP/s (same order) | "
          "× 28 blocks s | max abs diff vs torch fp32: ms fp32 / ms bf16 / torch bf16 |\n|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        tokens = (size // 16) ** 2
        bench(f"self-attention {size}²", tokens, tokens, False, args.repeats, rng)
        bench(f"cross-attention {size}²", tokens, TEXT, True, args.repeats, rng)


if __name__ == "__main__":
    main()

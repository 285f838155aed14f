"""The fp32 convolution kernel (im2col + the kernels' sgemm) vs MindSpore's CPU Conv2D, and torch.

    python benchmarks/bench_conv.py [--size 512] [--repeats 3]

Rows: the SDXL decoder's 3×3 convolutions (input channels -> output channels at a side), each
timed eagerly as the pipelines run the VAE (ops on the calling thread), MindSpore's ``nn.Conv2d``,
``cpu_kernels.F32Conv2d`` and torch's fp32 conv2d (all cores), medians; then the full SDXL VAE
decode (random weights, the fused GroupNorm kernels as the pipelines use) at ``--size`` with
MindSpore's convolutions and with the kernel (``use_conv_kernels``), interleaved.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's idle threads must not spin between ops
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mindspore import nn  # noqa: E402
import mindspore as ms  # noqa: E402

from pixart.utils.device import set_device  # noqa: E402

SHAPES = [(512, 512, 64), (512, 512, 128), (512, 512, 256), (512, 256, 256), (256, 256, 256), (256, 128, 512),
          (128, 128, 512), (128, 3, 512)]


def median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512, help="image side of the full decode")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max_side", type=int, default=512, help="skip convolution rows above this side")
    args = p.parse_args()
    set_device("CPU")
    from pixart.models.autoencoder_kl import SDXL_VAE_CONFIG, AutoencoderKL
    from pixart.ops import cpu_kernels

    rng = np.random.default_rng(0)
    print(f"{os.cpu_count()} cores, medians of {args.repeats}")
    print("| 3×3 conv | MindSpore Conv2D s | kernel s | torch fp32 s | MindSpore / kernel | max abs diff |")
    print("|---|---|---|---|---|---|")
    for cin, cout, side in SHAPES:
        if side > args.max_side:
            continue
        x = rng.standard_normal((1, cin, side, side)).astype(np.float32)
        w = (rng.standard_normal((cout, cin, 3, 3)) * 0.02).astype(np.float32)
        b = rng.standard_normal(cout).astype(np.float32)
        conv = nn.Conv2d(cin, cout, 3, pad_mode="pad", padding=1, has_bias=True)
        conv.weight.set_data(ms.Tensor(w))
        conv.bias.set_data(ms.Tensor(b))
        kernel = cpu_kernels.F32Conv2d(conv)
        mx, tx, tw, tb = ms.Tensor(x), *map(torch.from_numpy, (x, w, b))
        diff = float(np.abs(conv(mx).asnumpy() - kernel(mx).asnumpy()).max())
        t_ms = median_seconds(lambda: conv(mx).asnumpy(), args.repeats)
        t_kernel = median_seconds(lambda: kernel(mx).asnumpy(), args.repeats)
        with torch.no_grad():
            t_torch = median_seconds(lambda: torch.nn.functional.conv2d(tx, tw, tb, padding=1).numpy(), args.repeats)
        print(f"| {cin} -> {cout} at {side}² | {t_ms:.3f} | {t_kernel:.3f} | {t_torch:.3f} | {t_ms / t_kernel:.2f} | "
              f"{diff:.1e} |", flush=True)

    plain = AutoencoderKL.from_config(SDXL_VAE_CONFIG)
    cpu_kernels.use_fused_norms(plain)
    convs = AutoencoderKL.from_config(SDXL_VAE_CONFIG)
    ms.load_param_into_net(convs, {p.name: p for p in plain.get_parameters()})
    cpu_kernels.use_fused_norms(convs)
    swapped = cpu_kernels.use_conv_kernels(convs)
    z = ms.Tensor(rng.standard_normal((1, 4, args.size // 8, args.size // 8)).astype(np.float32))
    diff = float(np.abs(plain.decode(z).asnumpy() - convs.decode(z).asnumpy()).max())
    times = {"MindSpore Conv2D": [], f"conv kernel ({swapped} convolutions)": []}
    for r in range(args.repeats):
        for name, vae in (zip(times, (plain, convs)) if r % 2 == 0 else reversed(list(zip(times, (plain, convs))))):
            t0 = time.perf_counter()
            vae.decode(z).asnumpy()
            times[name].append(time.perf_counter() - t0)
    print(f"\n| SDXL VAE decode {args.size}² | s (median of {args.repeats}, interleaved) |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {np.median(values):.2f} |")
    print(f"max abs difference of the images: {diff:.1e}")


if __name__ == "__main__":
    main()

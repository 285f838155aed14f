"""Seconds per classifier-free-guidance step of the full PixArt-XL/2 DiT: this project vs diffusers.

    python benchmarks/bench_dit.py [--sizes 256 512] [--repeats 3] [--mode graph]

Random weights, identical in both frameworks; one step = one forward at batch 2 (conditional +
unconditional) with 300 text tokens, as in sampling. PyTorch runs fp32 with all cores; the
ratio is ours / PyTorch (target ≤ 0.8). Two rows of ours: the plain model, and with the fused norm
kernels the pipelines swap in on CPU (pixart.ops.cpu_kernels.use_fused_norms): what sample.py
runs in fp32. Also prints user/wall CPU time (cores kept busy). torch's OpenMP threads are set to
sleep when idle (OMP_WAIT_POLICY=PASSIVE): spinning after each op, they would slow down the
MindSpore run that follows.
"""
import argparse
import os
import resource
import sys
import time

os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import mindspore as ms  # noqa: E402

from pixart.models.pixart import PixArtMS_XL_2  # noqa: E402
from pixart.ops import cpu_kernels  # noqa: E402
from pixart.tables import PE_INTERPOLATION  # noqa: E402
from pixart.models.pixart_weights import diffusers_to_original  # noqa: E402
from pixart.utils.checkpoint import load_into_cell  # noqa: E402


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn, repeats):
    fn()  # warm-up (graph compilation, allocator)
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = cpu_seconds(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    best = int(np.argmin(wall))
    return wall[best], cpu[best] / wall[best]


def bench(size, repeats, mode):
    from diffusers import PixArtTransformer2DModel

    latent = size // 8
    torch.manual_seed(0)
    ref = PixArtTransformer2DModel(sample_size=latent, interpolation_scale=PE_INTERPOLATION[size],
                                   caption_channels=4096, use_additional_conditions=False).eval()
    with torch.no_grad():  # diffusers zero-initialises some projections: make every weight active
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    state = diffusers_to_original({k: v.detach().numpy() for k, v in ref.state_dict().items()})

    def ours(kernels):
        model = PixArtMS_XL_2(input_size=latent, pe_interpolation=PE_INTERPOLATION[size])
        load_into_cell(model, {**state, "y_embedder.y_embedding": model.y_embedder.y_embedding.asnumpy()})
        if kernels:  # as PixArtSigmaPipeline.from_components does for an fp32 DiT on CPU
            cpu_kernels.use_fused_norms(model)
        model.set_train(False)
        return model

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, latent, latent)).astype(np.float32)
    t = np.array([500, 500], np.int64)
    y = (rng.standard_normal((2, 300, 4096)) * 0.1).astype(np.float32)
    mask = np.zeros((2, 300), np.int64)
    mask[:, :120] = 1

    tx, tt, ty, tm = map(torch.from_numpy, (x, t, y, mask))
    with torch.no_grad():
        run_torch = lambda: ref(tx, encoder_hidden_states=ty, timestep=tt, encoder_attention_mask=tm,  # noqa: E731
                                return_dict=False)[0]
        torch_s, torch_cores = timed(run_torch, repeats)
        expected = run_torch().numpy()

    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    mx, mt, my, mm = ms.Tensor(x), ms.Tensor(t.astype(np.int32)), ms.Tensor(y), ms.Tensor(mask.astype(np.int32))

    def time_ours(kernels):
        model = ours(kernels)
        run_ms = lambda: model(mx, mt, my, mm).asnumpy()  # noqa: E731
        ms_s, ms_cores = timed(run_ms, repeats)
        name = f"ours, {cpu_kernels.fused_norm_layers(model)} fused norms" if kernels else "ours plain"
        return dict(size=size, tokens=(latent // 2) ** 2, name=name, torch_s=torch_s, ms_s=ms_s,
                    torch_cores=torch_cores, ms_cores=ms_cores, diff=float(np.abs(run_ms() - expected).max()))

    rows = [time_ours(False), time_ours(True)]
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    args = p.parse_args()
    print(f"torch {torch.__version__} threads={torch.get_num_threads()}, mindspore {ms.__version__} "
          f"({args.mode}), {os.cpu_count()} cores")
    print("| image | tokens | ours | PyTorch fp32 s/step | ours s/step | ratio | cores used (torch / ours) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for r in bench(size, args.repeats, args.mode):
            print(f"| {size}² | {r['tokens']} | {r['name']} | {r['torch_s']:.2f} | {r['ms_s']:.2f} | "
                  f"{r['ms_s'] / r['torch_s']:.2f} | {r['torch_cores']:.2f} / {r['ms_cores']:.2f} | {r['diff']:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()

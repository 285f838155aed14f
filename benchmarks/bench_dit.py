"""Seconds per classifier-free-guidance step of the full PixArt-XL/2 DiT: this project vs diffusers.

    python benchmarks/bench_dit.py [--sizes 256 512] [--repeats 3] [--mode graph]

Random weights, identical in both frameworks; one step = one forward at batch 2 (conditional +
unconditional) with 300 text tokens (120 of them real), as diffusers samples. PyTorch runs fp32
with all cores; the ratio is ours / PyTorch (target ≤ 0.8). Rows of ours:
- "plain": the model as built, 300 tokens (like for like);
- "fused kernels": with the kernels the pipelines swap in for an fp32 DiT on CPU
  (pixart.ops.cpu_kernels.use_fused_kernels: norms, linears, attention), 300 tokens;
- "as sample.py": fused kernels, the text trimmed to the pipeline's bucket of the real length (128)
  and the caption K/V computed once per prompt (``text_context``, outside the step): what a
  sampling step costs in sample.py (fp32).
The runs are interleaved (torch, then each of ours, repeated) and the median is reported, so a
noisy machine slows all of them alike. Also prints user/wall CPU time (cores kept busy). torch's
OpenMP threads are set to sleep when idle (OMP_WAIT_POLICY=PASSIVE): spinning after each op,
they would slow down the MindSpore run that follows.
"""
import argparse
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# for the per-size processes: importing MindSpore prepends its plugin folder to LD_LIBRARY_PATH,
# which left a child's torch on one core
_ENV = dict(os.environ)
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


def timed_interleaved(runners, repeats):
    """{name: fn} -> {name: (median wall s, cores busy)}: each fn warmed up (graph compilation,
    allocator) once, then called round-robin ``repeats`` times."""
    for fn in runners.values():
        fn()
    wall = {name: [] for name in runners}
    cores = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            c0, t0 = cpu_seconds(), time.perf_counter()
            fn()
            seconds = time.perf_counter() - t0
            wall[name].append(seconds)
            cores[name].append((cpu_seconds() - c0) / seconds)
    return {name: (float(np.median(wall[name])), float(np.median(cores[name]))) for name in runners}


REAL_TOKENS, SAMPLE_TOKENS = 120, 128  # the pipeline's bucket for 120 real tokens


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
            cpu_kernels.use_fused_kernels(model)
        model.set_train(False)
        return model

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, latent, latent)).astype(np.float32)
    t = np.array([500, 500], np.int64)
    y = (rng.standard_normal((2, 300, 4096)) * 0.1).astype(np.float32)
    mask = np.zeros((2, 300), np.int64)
    mask[:, :REAL_TOKENS] = 1

    tx, tt, ty, tm = map(torch.from_numpy, (x, t, y, mask))
    with torch.no_grad():
        run_torch = lambda: ref(tx, encoder_hidden_states=ty, timestep=tt, encoder_attention_mask=tm,  # noqa: E731
                                return_dict=False)[0].numpy()
        expected = run_torch()

    mx, mt, my, mm = ms.Tensor(x), ms.Tensor(t.astype(np.int32)), ms.Tensor(y), ms.Tensor(mask.astype(np.int32))
    plain, fused = ours(False), ours(True)
    # As the pipeline samples: trimmed text, its caption K/V made once (eagerly) before the steps.
    context = fused.text_context(my[:, :SAMPLE_TOKENS])
    trimmed_mask = mm[:, :SAMPLE_TOKENS]
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    runners = {
        "PyTorch fp32": lambda: torch.no_grad()(run_torch)(),
        "ours plain": lambda: plain(mx, mt, my, mm).asnumpy(),
        f"ours, fused kernels ({cpu_kernels.fused_norm_layers(fused)} norms, "
        f"{cpu_kernels.fused_linear_layers(fused)} linears, {cpu_kernels.fused_attention_layers(fused)} "
        "attentions)": lambda: fused(mx, mt, my, mm).asnumpy(),
        f"ours as sample.py ({SAMPLE_TOKENS} tokens, caption K/V once)":
            lambda: fused(mx, mt, context, trimmed_mask).asnumpy(),
    }
    times = timed_interleaved(runners, repeats)
    torch_s, torch_cores = times.pop("PyTorch fp32")
    rows = [dict(size=size, tokens=(latent // 2) ** 2, name=name, torch_s=torch_s, ms_s=ms_s, torch_cores=torch_cores,
                 ms_cores=ms_cores, diff=float(np.abs(runners[name]() - expected).max()))
            for name, (ms_s, ms_cores) in times.items()]
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    p.add_argument("--rows_only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.rows_only:
        print(f"torch {torch.__version__} threads={torch.get_num_threads()}, mindspore {ms.__version__} "
              f"({args.mode}), {os.cpu_count()} cores")
        print("| image | tokens | ours | PyTorch fp32 s/step | ours s/step | ratio | cores used (torch / ours) | "
              "max abs diff |")
        print("|---|---|---|---|---|---|---|---|", flush=True)
    if len(args.sizes) > 1:  # a process per size: compiled graphs keep their models alive (24 GiB at 512²)
        for size in args.sizes:
            subprocess.run([sys.executable, os.path.abspath(__file__), "--sizes", str(size), "--repeats",
                            str(args.repeats), "--mode", args.mode, "--rows_only"], check=True, env=_ENV)
        return
    for r in bench(args.sizes[0], args.repeats, args.mode):
        print(f"| {r['size']}² | {r['tokens']} | {r['name']} | {r['torch_s']:.2f} | {r['ms_s']:.2f} | "
              f"{r['ms_s'] / r['torch_s']:.2f} | {r['torch_cores']:.2f} / {r['ms_cores']:.2f} | {r['diff']:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()

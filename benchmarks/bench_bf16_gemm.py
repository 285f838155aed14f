"""GFLOP/s of the big linear layers on CPU: MindSpore fp32 MatMul vs this project's bf16 GEMM vs torch.

    python benchmarks/bench_bf16_gemm.py [--repeats 5] [--shapes dit256 dit512 t5]

y = x Wᵀ for the DiT (XL-2, batch 2: 512 tokens at 256², 2048 at 512²) and T5-XXL (2 × 300
tokens) shapes. Candidates, run interleaved (one repeat of each in turn, so a change of machine
load hits all of them alike):

    ms fp32      MindSpore ops.MatMul, fp32 x and W (the default CPU path), in a compiled graph
                 (ms.jit) as the DiT runs it: in PyNative the same op measured 1.5-2x slower
    ms bf16      pixart.ops.cpu_kernels (MindSpore ops.Custom → oneDNN gemm_bf16bf16f32), fp32 x, bf16 W
    torch fp32   torch.nn.functional.linear, fp32
    torch bf16   torch.nn.functional.linear, bf16 x and W (bf16 output)

Prints the median seconds and GFLOP/s of each, the ratios to ms fp32, the error of ms bf16
against torch fp32 on the same bf16-rounded operands, and the load average before/after.
torch's OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE): spinning after each torch op,
they would slow down whichever candidate runs next.

    python benchmarks/bench_bf16_gemm.py --dit_step [--size 256] [--mode graph]

instead times one classifier-free-guidance step of the full PixArt-XL/2 (batch 2, 300 text
tokens, random weights shared by all): ours fp32, ours fp32 with use_fused_norms, ours with
use_bf16_gemm and use_fused_norms (what `--dtype bf16` runs on CPU), and diffusers in
torch bf16, interleaved, with each one's max abs difference from ours fp32. (torch fp32 is
left out to stay within the machine's memory; bench_dit.py measures it.)
"""
import argparse
import gc
import os
import sys
import time

os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import ops  # noqa: E402

from bench_t5_cast import interleaved  # noqa: E402 (benchmarks/ is on sys.path: run as a script)
from pixart.ops import cpu_kernels  # noqa: E402
from pixart.utils.device import set_device  # noqa: E402

SHAPES = {  # name -> [(label, M, K, N)]
    "dit256": [("XL-2 qkv 256²", 512, 1152, 3456), ("XL-2 fc1 256²", 512, 1152, 4608),
               ("XL-2 fc2 256²", 512, 4608, 1152)],
    "dit512": [("XL-2 qkv 512²", 2048, 1152, 3456), ("XL-2 fc1 512²", 2048, 1152, 4608),
               ("XL-2 fc2 512²", 2048, 4608, 1152)],
    "t5": [("T5-XXL q/k/v/o", 600, 4096, 4096), ("T5-XXL wi", 600, 4096, 10240), ("T5-XXL wo", 600, 10240, 4096)],
}


def candidates(m, k, n, rng):
    x = rng.standard_normal((m, k), np.float32)
    w = (rng.standard_normal((n, k), np.float32) / np.sqrt(k)).astype(np.float32)
    w_bf16 = w.astype(ml_dtypes.bfloat16)
    ms_x, ms_w, ms_wb = ms.Tensor(x), ms.Tensor(w), ms.Tensor(w_bf16)
    matmul = ops.MatMul(transpose_b=True)

    @ms.jit
    def graph_matmul(a, b):
        return matmul(a, b)

    run = {
        "ms fp32": lambda: graph_matmul(ms_x, ms_w).asnumpy(),
        "torch fp32": lambda: torch.nn.functional.linear(tx, tw),
        "torch bf16": lambda: torch.nn.functional.linear(tx_b, tw_b),
    }
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    tx_b, tw_b = tx.bfloat16(), tw.bfloat16()
    error = None
    if cpu_kernels.bf16_gemm_available():
        op = cpu_kernels.bf16_matmul_op()
        run["ms bf16"] = lambda: op(ms_x, ms_wb).asnumpy()
        # the same bf16-rounded operands in fp32: only the summation order differs
        exact = torch.nn.functional.linear(tx_b.float(), tw_b.float()).numpy()
        error = float(np.abs(run["ms bf16"]() - exact).max() / np.abs(exact).max())
    return run, error


def dit_step(size, repeats, mode):
    from diffusers import PixArtTransformer2DModel

    from pixart.models.pixart import PixArtMS_XL_2
    from pixart.tables import PE_INTERPOLATION
    from pixart.models.pixart_weights import diffusers_to_original
    from pixart.utils.checkpoint import load_into_cell

    latent = size // 8
    torch.manual_seed(0)
    ref = PixArtTransformer2DModel(sample_size=latent, interpolation_scale=PE_INTERPOLATION[size],
                                   caption_channels=4096, use_additional_conditions=False).eval()
    with torch.no_grad():  # diffusers zero-initialises some projections: make every weight active
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    state = diffusers_to_original({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    ref = ref.to(torch.bfloat16)

    def ours(bf16_gemm, fused_norms):
        model = PixArtMS_XL_2(input_size=latent, pe_interpolation=PE_INTERPOLATION[size])
        load_into_cell(model, {**state, "y_embedder.y_embedding": model.y_embedder.y_embedding.asnumpy()})
        if bf16_gemm and not cpu_kernels.use_bf16_gemm(model):
            return None
        if fused_norms and not cpu_kernels.use_fused_norms(model):
            return None
        return model.set_train(False)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, latent, latent)).astype(np.float32)
    t = np.array([500, 500], np.int64)
    y = (rng.standard_normal((2, 300, 4096)) * 0.1).astype(np.float32)
    mask = np.zeros((2, 300), np.int64)
    mask[:, :120] = 1
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    inputs = ms.Tensor(x), ms.Tensor(t.astype(np.int32)), ms.Tensor(y), ms.Tensor(mask.astype(np.int32))
    tx, tt, ty, tm = torch.from_numpy(x).bfloat16(), torch.from_numpy(t), torch.from_numpy(y).bfloat16(), \
        torch.from_numpy(mask)

    def torch_bf16():
        with torch.no_grad():
            return ref(tx, encoder_hidden_states=ty, timestep=tt, encoder_attention_mask=tm,
                       return_dict=False)[0].float().numpy()

    run = {}
    for name, bf16_gemm, fused_norms in (("ours fp32", False, False), ("ours fp32, fused norms", False, True),
                                         ("ours bf16 GEMM, fused norms", True, True)):
        model = ours(bf16_gemm, fused_norms)
        if model is not None:
            run[name] = lambda model=model: model(*inputs).asnumpy()
    run["torch bf16"] = torch_bf16
    state.clear()  # its arrays share the fp32 torch storage: 2.4 GB
    gc.collect()
    base = run["ours fp32"]()
    errors = {name: float(np.abs(fn() - base).max()) for name, fn in run.items()}
    times = interleaved(run, repeats)
    print(f"\nPixArt-XL/2 CFG step {size}² ({mode}), output up to {np.abs(base).max():.3g}:\n"
          "| denoiser | s/step | vs ours fp32 | max abs diff vs ours fp32 |\n|---|---|---|---|")
    ref_s = times["ours fp32"]
    for name, med in times.items():
        print(f"| {name} | {med:.2f} | {med / ref_s:.2f} | {errors[name]:.2e} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=["dit256", "dit512", "t5"], choices=sorted(SHAPES))
    parser.add_argument("--dit_step", action="store_true", help="time a full XL-2 CFG step instead")
    parser.add_argument("--size", type=int, default=256, choices=[256, 512, 1024])
    parser.add_argument("--mode", choices=["graph", "pynative"], default="pynative",
                        help="graph mode keeps a second copy of each model's weights: > 12 GB here")
    args = parser.parse_args(argv)
    set_device("CPU")  # eager ops on the calling thread, as the entry points run them
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"MindSpore {ms.__version__}, torch {torch.__version__}; repeats {args.repeats} (median)")
    if args.dit_step:
        dit_step(args.size, args.repeats, args.mode)
        print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        return
    print("| shape | M×K→N | ms fp32 s | ms bf16 s | torch fp32 s | torch bf16 s | GFLOP/s ms fp32 / ms bf16 / torch fp32 / torch bf16 "
          "| ms bf16 speed-up vs ms fp32 | ms bf16 rel. error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for group in args.shapes:
        for label, m, k, n in SHAPES[group]:
            run, error = candidates(m, k, n, rng)
            for fn in run.values():
                fn()  # warm-up
            times = {name: [] for name in run}
            for _ in range(args.repeats):
                for name, fn in run.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            med = {name: float(np.median(t)) for name, t in times.items()}
            flop = 2.0 * m * k * n
            gf = {name: flop / t / 1e9 for name, t in med.items()}
            cell = lambda name: f"{med[name]:.4f}" if name in med else "n/a"  # noqa: E731
            speedup = f"**{med['ms fp32'] / med['ms bf16']:.2f}×**" if "ms bf16" in med else "n/a"
            print(f"| {label} | {m}×{k}→{n} | {cell('ms fp32')} | {cell('ms bf16')} | {cell('torch fp32')} | "
                  f"{cell('torch bf16')} | {gf['ms fp32']:.0f} / {gf.get('ms bf16', float('nan')):.0f} / "
                  f"{gf['torch fp32']:.0f} / {gf['torch bf16']:.0f} | {speedup} | {'n/a' if error is None else f'{error:.1e}'} |", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

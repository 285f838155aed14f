"""The fp32 linear kernel's sgemm: numpy's OpenBLAS vs MindSpore's oneDNN, at the DiT's and T5's shapes.

    python benchmarks/bench_sgemm.py [--repeats 5]

Builds the kernel library both ways (``PIXART_SGEMM=onednn`` is the oneDNN build) and times
``F32MatMulBias`` (y = x·wᵀ + b) from each in a compiled graph, interleaved, medians. Also runs
T5-XXL encoding (4 sequences) with the projections on each when ``--t5_folder`` is given.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import nn, ops  # noqa: E402

from pixart.ops import cpu_kernels  # noqa: E402
from pixart.utils.device import set_device  # noqa: E402

SHAPES = {"T5-XXL FF (256 rows)": (256, 4096, 10240), "T5-XXL attention (256 rows)": (256, 4096, 4096),
          "XL-2 qkv 256²": (512, 1152, 3456), "XL-2 fc1 256²": (512, 1152, 4608), "XL-2 fc2 256²": (512, 4608, 1152),
          "XL-2 fc1 512²": (2048, 1152, 4608), "XL-2 fc2 512²": (2048, 4608, 1152)}


class Linear(nn.Cell):
    def __init__(self, library, name="F32MatMulBias"):
        super().__init__()
        self.op = ops.Custom(f"{library}:{name}", out_shape=lambda x, w, *b: list(x[:-1]) + [w[0]],
                             out_dtype=lambda *a: ms.float32, func_type="aot")

    def construct(self, x, w, b):
        return self.op(x, w, b)


def interleaved(fns, repeats):
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for r in range(repeats):
        for name, fn in (fns.items() if r % 2 == 0 else reversed(list(fns.items()))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(v)) for name, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--t5_folder", help="a T5 text_encoder/ folder (e.g. bench_pipeline's) for the T5 rows")
    args = p.parse_args()
    if cpu_kernels.numpy_openblas() is None:
        sys.exit("numpy has no bundled OpenBLAS here: nothing to compare")
    libraries = {"OpenBLAS": cpu_kernels.kernel_library()}
    os.environ["PIXART_SGEMM"] = "onednn"
    libraries["oneDNN"] = cpu_kernels.kernel_library.__wrapped__()
    ms.set_context(mode=ms.GRAPH_MODE)
    cells = {name: Linear(lib) for name, lib in libraries.items()}
    rng = np.random.default_rng(0)
    print(f"{os.cpu_count()} cores, medians of {args.repeats}, compiled graphs")
    print("| GEMM | M x K x N | OpenBLAS ms | oneDNN ms | oneDNN / OpenBLAS |")
    print("|---|---|---|---|---|")
    for label, (m, k, n) in SHAPES.items():
        x, w, b = (ms.Tensor(rng.standard_normal(s).astype(np.float32)) for s in ((m, k), (n, k), (n,)))
        t = interleaved({name: (lambda c=c: c(x, w, b).asnumpy()) for name, c in cells.items()}, args.repeats)
        print(f"| {label} | {m}x{k}x{n} | {t['OpenBLAS'] * 1e3:.0f} | {t['oneDNN'] * 1e3:.0f} | "
              f"{t['oneDNN'] / t['OpenBLAS']:.2f} |", flush=True)
    if args.t5_folder:
        from pixart.models.t5 import Linear as T5Linear, T5Encoder

        set_device("CPU")  # eager, ops on the calling thread, as the pipelines run T5
        encoder = T5Encoder.from_pretrained(args.t5_folder)
        ops_by_name = {name: ops.Custom(f"{lib}:F32MatMul", out_shape=lambda x, w: list(x[:-1]) + [w[0]],
                                        out_dtype=lambda *a: ms.float32, func_type="aot")
                       for name, lib in libraries.items()}
        ops_by_name["MindSpore MatMul"] = ops.MatMul(transpose_b=True)
        ids = ms.Tensor(rng.integers(1, 30000, (4, 64)).astype(np.int32))
        mask = ms.Tensor(np.ones((4, 64), np.int32))

        def encode(op):
            for _, cell in encoder.cells_and_names():
                if isinstance(cell, T5Linear):
                    cell.matmul = op
            return encoder(ids, mask).asnumpy()

        t = interleaved({name: (lambda op=op: encode(op)) for name, op in ops_by_name.items()}, max(2, args.repeats // 2))
        print("\n| T5-XXL encode, 4 x 64 tokens, PyNative | s |\n|---|---|")
        for name, seconds in t.items():
            print(f"| projections by {name} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
